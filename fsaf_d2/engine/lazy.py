"""Training and evaluation from a Detectron2 LazyConfig (``configs/*.py``) through fsaf_d2's device layer.

``tools/lazyconfig_train_net.py`` is Detectron2's LazyConfig entry point with fsaf_d2's engine underneath,
so that a LazyConfig runs on cpu, cuda and npu, with AMP and under torchrun, as a YAML config does with
``train_net.py``:

* the device is ``train.device`` ("cpu", "cuda", "npu", "cuda:1"): resolved by
  :func:`~fsaf_d2.engine.device.resolve_device` (torch_npu imported for npu only), workers started by
  :func:`~fsaf_d2.engine.launch` with the device's backend (gloo / nccl / hccl), or taken from torchrun;
* the training step is :class:`~fsaf_d2.engine.train_loop.DeviceTrainer`: ``train.amp.enabled`` /
  ``train.amp.precision`` autocast on any device, ``train.clip_grad`` global-norm clipping on unscaled
  gradients;
* DDP from :func:`~fsaf_d2.engine.comm.create_ddp_model`, atomic checkpoints with the model's running scalars
  (:class:`~fsaf_d2.engine.checkpoint.AtomicCheckpointer`), device-aware metric printer and throughput;
* the settings that depend on the device are applied to the config as ``build_config`` applies them to a
  YAML config (:func:`apply_lazy_device_rules`).

The config has Detectron2's five top-level keys (``model``, ``dataloader``, ``optimizer``,
``lr_multiplier``, ``train``); the ``train`` keys fsaf_d2 adds to Detectron2's ``common/train.py`` are listed
in docs/lazyconfig.md.
"""
import logging
import os
from typing import Sequence

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_setup
from detectron2.engine import hooks as d2_hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from omegaconf import OmegaConf

from ..model_zoo.model_zoo import resolve_config_file
from .checkpoint import AtomicCheckpointer, ModelRunningScalars, check_same_start_iteration
from .comm import create_ddp_model, patch_detectron2, start_peer_watchdog
from .config import NPU_DEFAULT_MAX_GT, orientation_buckets, resolve_memory_format
from .device import (
    apply_npu_env_defaults,
    apply_npu_runtime,
    device_type_of,
    manual_seed_all,
    resolve_device,
)
from .evaluation import resolve_coco_eval_backend
from .hooks import FinishedRunEvalHook, PreemptionHook, ThroughputHook, training_writers
from .inference_timing import inference_callbacks
from .train_loop import DeviceTrainer, build_grad_scaler, check_amp_support, parse_precision
from .worker_shield import shield_loader_workers

__all__ = [
    "load_lazy_config",
    "apply_lazy_device_rules",
    "lazy_pre_launch",
    "lazy_setup",
    "build_lazy_train_loop",
    "build_lazy_model",
    "do_test",
    "do_train",
    "do_eval_only",
]

logger = logging.getLogger(__name__)


def load_lazy_config(config_file: str, opts: Sequence[str] = ()):
    """The LazyConfig of ``config_file`` (a path or a shipped config's name: a ``.py`` file, or the
    ``config.yaml`` a LazyConfig run saves) with ``key=value`` overrides, and the device rules applied."""
    config_file = resolve_config_file(config_file)
    cfg = LazyConfig.load(config_file)
    missing = [k for k in ("model", "train") if k not in cfg]
    if missing:
        raise ValueError(
            f"{config_file} is not a LazyConfig: it has no {missing}. A LazyConfig defines model, dataloader, "
            "optimizer, lr_multiplier and train (a .py file, or the config.yaml a LazyConfig run saves); YAML "
            "configs with MODEL / SOLVER keys train with train_net.py (python train_net.py --config-file FILE, "
            "installed: fsaf-train)"
        )
    cfg = LazyConfig.apply_overrides(cfg, list(opts))
    apply_lazy_device_rules(cfg)
    return cfg


def _target_name(node) -> str:
    """The class name a LazyCall node instantiates (its ``_target_`` is the class, or its dotted name)."""
    target = node.get("_target_", None) if hasattr(node, "get") else None
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else getattr(target, "__name__", "")


def _resize_limits(dataloader):
    """(largest shorter side, largest longer side) that the ``ResizeShortestEdge`` augmentations of the train
    and test mappers give, or None when a mapper has no such resize with a ``max_size``."""
    short, long = [], []
    for split in ("train", "test"):
        augs = OmegaConf.select(dataloader, f"{split}.mapper.augmentations", default=None) if dataloader else None
        resizes = [a for a in augs or [] if _target_name(a) == "ResizeShortestEdge"]
        if not resizes or any("max_size" not in a for a in resizes):
            return None
        for aug in resizes:
            edge = aug.short_edge_length
            short.append(max(edge) if isinstance(edge, (list, tuple)) or OmegaConf.is_list(edge) else edge)
            long.append(aug.max_size)
    return max(short), max(long)


def apply_lazy_device_rules(cfg) -> None:
    """Settle the model settings whose value depends on ``train.device`` (in place), as
    :func:`~fsaf_d2.engine.config.apply_device_rules` does for a YAML config.

    * ``model.memory_format`` "auto" -> the device's layout (:func:`~fsaf_d2.engine.config.resolve_memory_format`);
    * on npu, static shapes unless set: ``model.max_gt`` 0 -> ``NPU_DEFAULT_MAX_GT`` and ``model.fixed_sizes``
      [] -> the two orientation buckets of the data loaders' ``ResizeShortestEdge`` settings.
    """
    device = cfg.train.get("device", "cuda")
    model = cfg.model
    if "memory_format" in model:
        model.memory_format = resolve_memory_format(model.memory_format, device)
    if device_type_of(device) != "npu":
        return
    if "max_gt" in model and not model.max_gt:
        model.max_gt = NPU_DEFAULT_MAX_GT
    if "fixed_sizes" in model and not model.fixed_sizes:
        limits = _resize_limits(cfg.get("dataloader", None))
        if limits is None:
            raise ValueError(
                "train.device is npu, which needs static input sizes, and model.fixed_sizes is empty, but the train "
                "and test loaders do not both resize with ResizeShortestEdge(short_edge_length, max_size), which "
                "would bound them: set model.fixed_sizes=[[H, W], ...] (multiples of 32 that hold every input image)"
            )
        model.fixed_sizes = orientation_buckets(*limits)


def lazy_pre_launch(args) -> str:
    """Settings of the launching process; returns ``train.device`` for :func:`~fsaf_d2.engine.launch`.

    For npu it exports the ``train.npu.env`` defaults before torch_npu is imported (see
    :func:`~fsaf_d2.engine.pre_launch`).
    """
    cfg = load_lazy_config(args.config_file, args.opts)
    device = cfg.train.get("device", "cuda")
    if device_type_of(device) == "npu":
        apply_npu_env_defaults(cfg.train.get("npu", {}).get("env", []))
    return device


#: the AMP keys as a LazyConfig spells them (errors name these)
LAZY_AMP_KEYS = {"enabled": "train.amp.enabled", "precision": "train.amp.precision", "device": "train.device"}


def _amp_settings(cfg):
    amp = cfg.train.get("amp", {})
    precision = parse_precision(amp.get("precision", "float16"), LAZY_AMP_KEYS["precision"])
    return bool(amp.get("enabled", False)), precision


def lazy_setup(args):
    """Config + Detectron2's ``default_setup`` (logging, ``config.yaml``, seeding) + the worker's device
    preparation, in every worker. Fails before any model is built on AMP settings the device cannot run and
    on a COCO evaluation backend that is not installed."""
    cfg = load_lazy_config(args.config_file, args.opts)
    device_spec = cfg.train.get("device", "cuda")
    amp, precision = _amp_settings(cfg)
    if amp:
        check_amp_support(device_type_of(device_spec), precision, LAZY_AMP_KEYS)
    backend = OmegaConf.select(cfg, "dataloader.evaluator.backend", default=None)
    if backend is not None:
        resolve_coco_eval_backend(backend, "dataloader.evaluator.backend")
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="fsaf_d2", abbrev_name="fsaf")
    device = resolve_device(device_spec)
    npu = cfg.train.get("npu", {})
    apply_npu_runtime(device_spec, npu.get("env", []), npu.get("jit_compile", False), npu.get("allow_hf32", True))
    patch_detectron2(device.type)
    seed = cfg.train.get("seed", -1)
    if seed >= 0:
        manual_seed_all(device_spec, seed + comm.get_rank())
    logger.info(f"Device {device} (train.device {device_spec}); world size {comm.get_world_size()}")
    start_peer_watchdog(float(cfg.train.get("peer_timeout_s", 60)), "train.peer_timeout_s")  # lost rank: exit 76
    return cfg


def build_lazy_train_loop(cfg, model, data_loader, optimizer) -> DeviceTrainer:
    """The training step of ``train.amp`` and ``train.clip_grad`` (``dict(max_norm, norm_type)`` or None)."""
    device_type = device_type_of(cfg.train.get("device", "cuda"))
    amp, precision = _amp_settings(cfg)
    clip = cfg.train.get("clip_grad", None)
    return DeviceTrainer(
        model,
        data_loader,
        optimizer,
        device_type=device_type,
        amp=amp,
        precision=precision,
        grad_scaler=build_grad_scaler(device_type, amp, precision),
        clip_max_norm=float(clip.max_norm) if clip else None,
        clip_norm_type=float(clip.get("norm_type", 2.0)) if clip else 2.0,
    )


def build_lazy_model(cfg) -> torch.nn.Module:
    """``instantiate(cfg.model)`` on ``train.device``."""
    model = instantiate(cfg.model)
    model.to(resolve_device(cfg.train.get("device", "cuda")))
    logger.info(f"Model:\n{model}")
    return model


def do_test(cfg, model):
    """COCO evaluation of ``model`` on ``dataloader.test`` by ``dataloader.evaluator`` (results under
    ``<train.output_dir>/inference``); returns the results, or {} when the config has no evaluator."""
    if "evaluator" not in cfg.get("dataloader", {}):
        return {}
    evaluator_cfg = cfg.dataloader.evaluator
    if "output_dir" not in evaluator_cfg or evaluator_cfg.output_dir is None:
        evaluator_cfg.output_dir = os.path.join(cfg.train.output_dir, "inference")
    device_type = device_type_of(cfg.train.get("device", "cuda"))
    loader = shield_loader_workers(instantiate(cfg.dataloader.test))  # a preemption is the trainer's to handle
    results = inference_on_dataset(
        model, loader, instantiate(evaluator_cfg), callbacks=inference_callbacks(device_type)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(cfg, resume: bool = False):
    """Train ``cfg.model`` for ``train.max_iter`` iterations; ``resume`` continues from ``last_checkpoint`` of
    ``train.output_dir`` (else ``train.init_checkpoint`` is loaded)."""
    device_type = device_type_of(cfg.train.get("device", "cuda"))
    model = build_lazy_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = shield_loader_workers(instantiate(cfg.dataloader.train))
    model = create_ddp_model(model, **cfg.train.get("ddp", {}))
    trainer = build_lazy_train_loop(cfg, model, train_loader, optimizer)
    checkpointer = AtomicCheckpointer(
        model, cfg.train.output_dir, trainer=trainer, model_running_scalars=ModelRunningScalars(model)
    )
    batch_size = OmegaConf.select(cfg, "dataloader.train.total_batch_size", default=0)
    # SIGTERM / SIGUSR1 (Slurm, Kubernetes): save the current iteration and exit with 75, as train_net.py does
    preemption = PreemptionHook(checkpointer)
    trainer.register_hooks(
        [
            d2_hooks.IterationTimer(),
            ThroughputHook(
                total_batch_size=batch_size,
                num_devices=comm.get_world_size(),
                warmup_iters=cfg.train.get("throughput_warmup_iters", 5),
                device_type=device_type,
                output_dir=cfg.train.output_dir,
            ),
            d2_hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            d2_hooks.PeriodicCheckpointer(checkpointer, max_iter=cfg.train.max_iter, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            FinishedRunEvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            d2_hooks.PeriodicWriter(
                training_writers(cfg.train.output_dir, cfg.train.max_iter, device_type), period=cfg.train.log_period
            )
            if comm.is_main_process()
            else None,
            preemption,  # last: the step's evaluation and metrics are done
        ]
    )
    preemption.install()  # from here on: a signal while the checkpoint is being loaded is kept too
    try:
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
        start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
        check_same_start_iteration(start_iter)
        trainer.train(start_iter, cfg.train.max_iter)
    finally:
        preemption.restore()
        trainer.release_data_loader()  # shielded workers would otherwise outlive training


def do_eval_only(cfg):
    """Evaluate ``train.init_checkpoint`` (``--eval-only``)."""
    model = create_ddp_model(build_lazy_model(cfg))
    AtomicCheckpointer(model).load(cfg.train.init_checkpoint)
    return do_test(cfg, model)
