"""Device-generic training engine of fsaf_d2: CUDA/NCCL, Ascend NPU/HCCL and CPU/gloo.

Import order matters only for NPU: nothing here imports ``torch_npu`` until a device string asks for
"npu" (see :mod:`fsaf_d2.engine.device`).
"""
from ..utils.io import atomic_torch_save
from .checkpoint import AtomicCheckpointer
from .comm import create_ddp_model, patch_detectron2, unpatch_detectron2
from .config import add_engine_config, apply_device_rules, build_config
from .device import (
    DeviceError,
    apply_device_runtime,
    dist_backend,
    get_device_api,
    import_torch_npu,
    parse_device,
    resolve_device,
)
from .evaluation import BackendCOCOEvaluator
from .hooks import DeterministicDataStream, DeviceMetricPrinter, ThroughputHook
from .launch import launch
from .train_loop import DeviceTrainer, build_grad_scaler
from .trainer import Trainer, config_from_args, pre_launch, prepare_worker, setup

__all__ = [
    "AtomicCheckpointer",
    "BackendCOCOEvaluator",
    "DeterministicDataStream",
    "DeviceError",
    "DeviceMetricPrinter",
    "DeviceTrainer",
    "ThroughputHook",
    "Trainer",
    "add_engine_config",
    "apply_device_rules",
    "apply_device_runtime",
    "atomic_torch_save",
    "build_config",
    "build_grad_scaler",
    "config_from_args",
    "create_ddp_model",
    "dist_backend",
    "get_device_api",
    "import_torch_npu",
    "launch",
    "parse_device",
    "pre_launch",
    "patch_detectron2",
    "prepare_worker",
    "resolve_device",
    "setup",
    "unpatch_detectron2",
]
