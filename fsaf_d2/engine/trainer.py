"""The fsaf_d2 ``Trainer`` and the per-process setup used by ``train_net.py``.

:class:`Trainer` is a ``DefaultTrainer`` whose pieces are device-generic:

* the training step is :class:`~fsaf_d2.engine.train_loop.DeviceTrainer` (AMP on cuda/npu/cpu,
  global-norm clipping on unscaled gradients) instead of ``SimpleTrainer`` / ``AMPTrainer``;
* DDP comes from :func:`~fsaf_d2.engine.comm.create_ddp_model` (``device_ids=None`` on CPU);
* checkpoints are written atomically (:class:`~fsaf_d2.engine.checkpoint.AtomicCheckpointer`) and include
  the model's EMA loss normalisers (:class:`~fsaf_d2.engine.checkpoint.ModelRunningScalars`);
* throughput, device memory and evaluation timing use the device's own synchronize/memory calls;
* COCO box AP is computed by ``TEST.COCO_EVAL_BACKEND`` (faster-coco-eval when installed,
  :mod:`~fsaf_d2.engine.evaluation`);
* with ``SEED >= 0`` and ``DATALOADER.DETERMINISTIC_RESUME``, ``--resume`` reproduces an uninterrupted run.
* faults (docs/training.md#faults): an unwritable ``OUTPUT_DIR`` fails before training, SIGTERM/SIGUSR1
  save the current iteration and exit with code 75 (:class:`~fsaf_d2.engine.hooks.PreemptionHook`), a
  NaN/inf loss stops or skips the step (``SOLVER.NONFINITE``), a silent peer rank ends the job
  (``DIST.PEER_TIMEOUT_S``).

Helpers for scripts: :func:`config_from_args` (:func:`~fsaf_d2.engine.config.build_config` of ``args``),
:func:`pre_launch` (``MODEL.DEVICE`` and NPU environment defaults, in the launching process), :func:`setup`
(config + logging + worker preparation, in every worker), :func:`prepare_worker` (device runtime knobs and
collective patches).
"""
import logging
import os
import weakref
from collections import OrderedDict

import torch
import torch.distributed as dist
from detectron2.engine import DefaultTrainer, TrainerBase, default_setup
from detectron2.engine import hooks as d2_hooks
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset, print_csv_format
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger

from ..data.config_datasets import check_config_datasets
from .checkpoint import AtomicCheckpointer, ModelRunningScalars, check_output_dir, check_same_start_iteration
from .comm import create_ddp_model, patch_detectron2, start_peer_watchdog
from .compile import check_compile_support, compile_static_training_step
from .config import build_config, validate_config
from .device import (
    apply_device_runtime,
    apply_npu_env_defaults,
    device_type_of,
    import_torch_npu,
    manual_seed_all,
    max_memory_allocated,
    resolve_device,
)
from .ema import ModelEMAHook, build_model_ema
from .evaluation import BackendCOCOEvaluator, resolve_coco_eval_backend
from .hooks import (
    DeterministicDataStream,
    FinishedRunEvalHook,
    PreemptionHook,
    ThroughputHook,
    training_writers,
)
from .inference_timing import TimedEvaluator, inference_callbacks
from .train_loop import DeviceTrainer, build_grad_scaler, check_amp_support, parse_precision
from .worker_shield import shield_loader_workers

__all__ = ["Trainer", "config_from_args", "pre_launch", "setup", "prepare_worker"]

logger = logging.getLogger(__name__)

#: device types whose torch has fused SGD and AdamW kernels (torch.optim.SGD / AdamW(fused=True))
_FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")


# ---------------------------------------------------------------------------------------------- setup


def config_from_args(args, freeze: bool = True):
    """:func:`~fsaf_d2.engine.config.build_config` of ``args.config_file`` and ``args.opts``."""
    return build_config(getattr(args, "config_file", ""), getattr(args, "opts", None) or [], freeze=freeze)


def pre_launch(args) -> str:
    """Settings of the launching process; returns ``MODEL.DEVICE`` for :func:`~fsaf_d2.engine.launch`.

    For npu this exports the ``NPU.ENV`` defaults (keys not already set) *before* ``torch_npu`` is
    imported: torch_npu reads variables such as ``TASK_QUEUE_ENABLE`` when it initialises, and spawned
    workers inherit the environment. :func:`prepare_worker` applies them again (no-op if set). The entries
    of ``DATASETS.REGISTER_COCO`` are checked here, so a bad one fails before any worker starts.
    """
    cfg = config_from_args(args, freeze=False)
    check_config_datasets(cfg)  # a bad DATASETS.REGISTER_COCO entry fails before any worker starts
    if device_type_of(cfg.MODEL.DEVICE) == "npu":
        apply_npu_env_defaults(cfg.NPU.ENV)
    return cfg.MODEL.DEVICE


def check_config(cfg) -> None:
    """Fail early on values fsaf_d2 cannot use and on settings this machine cannot run."""
    validate_config(cfg)
    check_device_support(cfg)
    check_evaluation_support(cfg)


def check_device_support(cfg) -> None:
    """Fail early on settings ``MODEL.DEVICE`` cannot run (AMP precision, ``SOLVER.COMPILE``)."""
    if cfg.SOLVER.AMP.ENABLED:
        check_amp_support(device_type_of(cfg.MODEL.DEVICE), parse_precision(cfg.SOLVER.AMP.PRECISION))
    check_compile_support(cfg)


def check_evaluation_support(cfg) -> None:
    """Fail early (before training) when ``TEST.COCO_EVAL_BACKEND`` names a package that is not installed."""
    resolve_coco_eval_backend(cfg.TEST.COCO_EVAL_BACKEND)


def prepare_worker(cfg) -> torch.device:
    """Per-process preparation; call in every worker before building the model.

    Validates and resolves ``MODEL.DEVICE`` (importing torch_npu only for npu), applies the NPU runtime
    knobs, and patches Detectron2's object collectives for the backend.

    Returns:
        the resolved ``torch.device``.
    """
    device = resolve_device(cfg.MODEL.DEVICE)
    apply_device_runtime(cfg)
    patch_detectron2(device.type)
    return device


def setup(args):
    """Config + Detectron2's ``default_setup`` (logging, config dump, seeding) + :func:`prepare_worker`."""
    cfg = config_from_args(args)  # validated
    check_device_support(cfg)
    check_evaluation_support(cfg)
    check_output_dir(cfg.OUTPUT_DIR)  # before default_setup writes there, and long before a checkpoint
    default_setup(cfg, args)
    # default_setup configures the "detectron2" and "fvcore" loggers; fsaf_d2's own messages (throughput
    # summary, NPU runtime, data-stream restarts) go to the same console and log file
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="fsaf_d2", abbrev_name="fsaf")
    device = prepare_worker(cfg)
    if dist.is_available() and dist.is_initialized():
        where = (
            f"process group backend {dist.get_backend()}, rank {comm.get_rank()}/{comm.get_world_size()}, "
            f"local rank {comm.get_local_rank()}/{comm.get_local_size()}"
        )
    else:
        where = "single process"
    logger.info(f"Device {device} (MODEL.DEVICE {cfg.MODEL.DEVICE}); {where}, pid {os.getpid()}")
    start_peer_watchdog(cfg.DIST.PEER_TIMEOUT_S)
    if cfg.SEED >= 0:
        manual_seed_all(cfg.MODEL.DEVICE, cfg.SEED + comm.get_rank())
    return cfg


# ---------------------------------------------------------------------------------------------- trainer


class Trainer(DefaultTrainer):
    """Device-generic ``DefaultTrainer`` for fsaf_d2 (CUDA, Ascend NPU, CPU; 1..N processes)."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        if not logging.getLogger("fsaf_d2").isEnabledFor(logging.INFO):
            setup_logger(name="fsaf_d2", abbrev_name="fsaf")
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        check_output_dir(cfg.OUTPUT_DIR)
        self.device = resolve_device(cfg.MODEL.DEVICE)
        self.device_type = self.device.type

        model = self.build_model(cfg)
        if cfg.SOLVER.COMPILE.ENABLED:
            check_compile_support(cfg)
            compile_static_training_step(model, cfg.SOLVER.COMPILE.MODE, self.device_type)
        optimizer = self.build_optimizer(cfg, model)
        if _deterministic_stream(cfg):
            # DeterministicDataStream builds the loader at the start of train(); avoid loading twice
            data_loader = _DeferredLoader(lambda: self.build_train_loader(cfg))
        else:
            data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = self.build_train_loop(cfg, model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.build_checkpointer(
            cfg, model, trainer=weakref.proxy(self), model_running_scalars=ModelRunningScalars(model)
        )
        self.model_ema = build_model_ema(model, cfg.MODEL_EMA.DECAY) if cfg.MODEL_EMA.ENABLED else None
        if self.model_ema is not None:
            self.checkpointer.add_checkpointable("model_ema", self.model_ema)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # ------------------------------------------------------------------------------------------- builders

    def resume_or_load(self, resume=True):
        """``DefaultTrainer.resume_or_load``, then every rank checks that all resume from the same iteration
        (:func:`~fsaf_d2.engine.checkpoint.check_same_start_iteration`)."""
        super().resume_or_load(resume=resume)
        check_same_start_iteration(self.start_iter)

    @classmethod
    def build_checkpointer(cls, cfg, model, **checkpointables):
        """Atomic checkpointer saving to ``cfg.OUTPUT_DIR`` (extra objects as ``checkpointables``); loading
        follows ``MODEL.WEIGHTS_STRICT`` / ``MODEL.WEIGHTS_NEW_CLASS_LAYER``."""
        return AtomicCheckpointer(
            model,
            cfg.OUTPUT_DIR,
            strict=cfg.MODEL.WEIGHTS_STRICT,
            new_class_layer=cfg.MODEL.WEIGHTS_NEW_CLASS_LAYER,
            **checkpointables,
        )

    @classmethod
    def build_grad_scaler(cls, cfg):
        """Grad scaler for ``MODEL.DEVICE`` / ``SOLVER.AMP`` (see :func:`build_grad_scaler`)."""
        return build_grad_scaler(
            device_type_of(cfg.MODEL.DEVICE), cfg.SOLVER.AMP.ENABLED, parse_precision(cfg.SOLVER.AMP.PRECISION)
        )

    @classmethod
    def build_train_loop(cls, cfg, model, data_loader, optimizer):
        """The per-iteration logic: a :class:`DeviceTrainer` configured from ``SOLVER.AMP`` / ``CLIP_GRADIENTS``."""
        clip = cfg.SOLVER.CLIP_GRADIENTS
        full_model = clip.ENABLED and clip.CLIP_TYPE == "full_model"
        return DeviceTrainer(
            model,
            data_loader,
            optimizer,
            device_type=device_type_of(cfg.MODEL.DEVICE),
            amp=cfg.SOLVER.AMP.ENABLED,
            precision=parse_precision(cfg.SOLVER.AMP.PRECISION),
            grad_scaler=cls.build_grad_scaler(cfg),
            clip_max_norm=float(clip.CLIP_VALUE) if full_model else None,
            clip_norm_type=float(clip.NORM_TYPE),
            skip_nonfinite=cfg.SOLVER.NONFINITE.SKIP,
            max_consecutive_skips=cfg.SOLVER.NONFINITE.MAX_CONSECUTIVE,
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        """SGD with Detectron2's parameter groups (fused on cpu/cuda), AdamW (``SOLVER.OPTIMIZER``), or
        ``torch_npu.optim.NpuFusedSGD`` with ``SOLVER.NPU_FUSED_SGD`` on npu.

        ``CLIP_TYPE`` "value"/"norm" keep Detectron2's per-parameter clipping inside ``optimizer.step``;
        "full_model" (global norm) is applied by the training step on unscaled gradients instead.
        """
        if cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model":
            cfg = cfg.clone()
            cfg.defrost()
            cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False  # not Detectron2's job; see DeviceTrainer.clip_gradients
        if cfg.SOLVER.OPTIMIZER == "AdamW":
            return cls._build_adamw(cfg, model)
        if cfg.SOLVER.NPU_FUSED_SGD:
            if device_type_of(cfg.MODEL.DEVICE) == "npu":
                return cls._build_sgd(cfg, model, _npu_fused_sgd_class())
            logger.warning(f"SOLVER.NPU_FUSED_SGD ignored on MODEL.DEVICE {cfg.MODEL.DEVICE}: using torch SGD")
        return cls._build_sgd(cfg, model, torch.optim.SGD, **_multi_tensor_kwargs(cfg))

    @staticmethod
    def _build_sgd(cfg, model, sgd_class, **kwargs):
        """``sgd_class`` (torch's SGD, or torch_npu's ``NpuFusedSGD``) with Detectron2's parameter groups and
        ``SOLVER`` momentum / Nesterov / decay. torch's SGD is fused on cpu and cuda (:func:`_multi_tensor_kwargs`):
        its step runs 2.7-3.7x faster than Detectron2's ``foreach`` one on the CPU (14.0 against 38.1 ms for
        ResNet-50's 25.6M parameters on a 2-core AVX-512 Xeon, docs/training.md).
        """
        optimizer = sgd_class(
            _param_groups(cfg, model),
            lr=cfg.SOLVER.BASE_LR,
            momentum=cfg.SOLVER.MOMENTUM,
            nesterov=cfg.SOLVER.NESTEROV,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            **kwargs,
        )
        return maybe_add_gradient_clipping(cfg, optimizer)

    @staticmethod
    def _build_adamw(cfg, model):
        """``torch.optim.AdamW``, fused where torch has the kernel (see :func:`_multi_tensor_kwargs`). Fused
        halves the step's time on the quickstart model (2.6 against 5.3 ms for 3.1M parameters on a 2-core
        AVX-512 Xeon, docs/training.md).
        """
        optimizer = torch.optim.AdamW(
            _param_groups(cfg, model),
            lr=cfg.SOLVER.BASE_LR,
            betas=tuple(cfg.SOLVER.ADAMW_BETAS),
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            **_multi_tensor_kwargs(cfg),
        )
        return maybe_add_gradient_clipping(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        """fsaf_d2's training loader, its workers shielded from preemption signals (:func:`shield_loader_workers`)."""
        from ..data import build_fsaf_train_loader

        return shield_loader_workers(build_fsaf_train_loader(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """fsaf_d2's evaluation loader, its workers shielded from preemption signals like the training loader's
        (a signal during a periodic evaluation is handled after that step)."""
        from ..data import build_fsaf_test_loader

        return shield_loader_workers(build_fsaf_test_loader(cfg, dataset_name))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO box AP on ``dataset_name`` by ``TEST.COCO_EVAL_BACKEND``; results under ``<OUTPUT_DIR>/inference``."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return BackendCOCOEvaluator(
            dataset_name,
            backend=cfg.TEST.COCO_EVAL_BACKEND,
            tasks=("bbox",),
            distributed=True,
            output_dir=output_folder,
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        )

    def build_writers(self):
        """Console (device memory, images/s), ``metrics.json`` and TensorBoard writers."""
        return training_writers(self.cfg.OUTPUT_DIR, self.max_iter, self.device_type)

    def build_hooks(self):
        """Detectron2's default hooks plus throughput and (with ``SEED >= 0``) the deterministic data stream."""
        cfg = self.cfg
        ret = FinishedRunEvalHook.replacing(super().build_hooks())
        throughput = ThroughputHook(
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            num_devices=comm.get_world_size(),
            warmup_iters=cfg.SOLVER.THROUGHPUT_WARMUP_ITERS,
            device_type=self.device_type,
            output_dir=cfg.OUTPUT_DIR,
        )
        pos = next((i + 1 for i, h in enumerate(ret) if isinstance(h, d2_hooks.IterationTimer)), 0)
        ret.insert(pos, throughput)
        if self.model_ema is not None:
            # before the checkpointer (checkpoints hold their iteration's EMA) and the evaluation (it uses the
            # EMA). Only the main process has a checkpointer; every process evaluates and updates its EMA.
            stages = (d2_hooks.PeriodicCheckpointer, d2_hooks.EvalHook, d2_hooks.PeriodicWriter)
            pos = next((i for i, h in enumerate(ret) if isinstance(h, stages)), len(ret))
            ret.insert(pos, ModelEMAHook(self.model_ema))
            for hook in ret:
                if isinstance(hook, d2_hooks.EvalHook):
                    hook._func = self._test_ema_and_save_results
        ret.append(PreemptionHook(self.checkpointer))  # last: the step's EMA, evaluation and metrics are done
        if _deterministic_stream(cfg):
            ret.insert(
                0,
                DeterministicDataStream(
                    seed=cfg.SEED,
                    period=cfg.SOLVER.CHECKPOINT_PERIOD,
                    build_loader=lambda seed: self.build_train_loader(_with_seed(cfg, seed)),
                    device_type=self.device_type,
                ),
            )
        return ret

    def train(self):
        """``DefaultTrainer.train`` with the preemption signals recorded from its start: before any hook's
        ``before_train`` (on resume, :class:`DeterministicDataStream` rebuilds and fast-forwards the data
        stream there), so a signal then still ends in a checkpoint and exit code 75."""
        preemption = [h for h in self._hooks if isinstance(h, PreemptionHook)]
        for hook in preemption:
            hook.install()
        try:
            return super().train()
        finally:
            for hook in preemption:
                hook.restore()

    def after_train(self):
        """The hooks' ``after_train``, then the training loader's workers stop (also after an exception or a
        preemption: Detectron2 calls this in a ``finally``)."""
        try:
            super().after_train()
        finally:
            self._trainer.release_data_loader()

    # ------------------------------------------------------------------------------------------- eval

    def _test_ema_and_save_results(self):
        """``DefaultTrainer.build_hooks``'s evaluation function, on the EMA weights."""
        self._last_eval_results = self.test(self.cfg, self.model_ema.module)
        return self._last_eval_results

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate ``model`` on ``cfg.DATASETS.TEST`` with device-synchronized timing.

        Logs per test set the inference throughput of all devices and, apart, the evaluator's time
        (:class:`~fsaf_d2.engine.inference_timing.TimedEvaluator`).

        Same contract as ``DefaultTrainer.test``: returns ``{dataset: results}`` (or the single result
        dict when there is one test set); ``evaluators`` overrides :meth:`build_evaluator`.
        """
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        if evaluators is not None and len(evaluators) != len(cfg.DATASETS.TEST):
            raise ValueError(f"{len(evaluators)} evaluators given for {len(cfg.DATASETS.TEST)} test sets")
        dtype = device_type_of(cfg.MODEL.DEVICE)
        callbacks = inference_callbacks(dtype)
        results = OrderedDict()
        for idx, name in enumerate(cfg.DATASETS.TEST):
            loader = cls.build_test_loader(cfg, name)
            evaluator = evaluators[idx] if evaluators is not None else cls.build_evaluator(cfg, name)
            timed = TimedEvaluator(evaluator)
            res = inference_on_dataset(model, loader, timed, callbacks=callbacks)
            results[name] = res
            if comm.is_main_process():
                logger.info(timed.summary(name))
                _put_eval_timing(name, timed)
                if not isinstance(res, dict):
                    raise TypeError(f"Evaluator must return a dict on the main process, got {res!r}")
                logger.info(f"Evaluation results for {name} in csv format:")
                print_csv_format(res)
        mem = max_memory_allocated(dtype)
        if mem is not None:
            logger.info(f"Peak {dtype} memory so far: {mem / 2**20:.0f} MiB")
        if len(results) == 1:
            return next(iter(results.values()))
        return results


def _npu_fused_sgd_class():
    """``torch_npu.optim.NpuFusedSGD`` (npu path only; the installation hint if torch_npu is missing)."""
    try:
        from torch_npu.optim import NpuFusedSGD
    except ImportError:
        import_torch_npu()  # raises the installation hint if torch_npu itself is the problem
        raise
    return NpuFusedSGD


def _multi_tensor_kwargs(cfg) -> dict:
    """``fused=True`` (one kernel over all parameters) on the devices whose torch has fused SGD / AdamW
    kernels (cpu, cuda), else the multi-tensor ``foreach=True``.

    Detectron2's per-parameter clipping (``CLIP_TYPE`` "value"/"norm") keeps ``foreach``: it clips inside
    ``step``, where a fused optimizer under a GradScaler would still hold scaled gradients. The global-norm
    clip ("full_model") runs before the step on unscaled gradients (:class:`DeviceTrainer`) and keeps fused.
    """
    fused = device_type_of(cfg.MODEL.DEVICE) in _FUSED_OPTIMIZER_DEVICES and not cfg.SOLVER.CLIP_GRADIENTS.ENABLED
    return {"fused": True} if fused else {"foreach": True}


def _param_groups(cfg, model):
    """Detectron2's parameter groups (per-group LR and weight-decay factors of ``SOLVER``)."""
    return get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )


def _put_eval_timing(dataset_name: str, timed: TimedEvaluator) -> None:
    """During training, the evaluation's images/s and evaluate() seconds go to metrics.json too."""
    try:
        storage = get_event_storage()
    except AssertionError:  # --eval-only: no training storage, the log line is the record
        return
    storage.put_scalar(f"inference/{dataset_name}/images_per_sec", timed.images_per_second, smoothing_hint=False)
    storage.put_scalar(f"inference/{dataset_name}/evaluate_seconds", timed.evaluate_seconds, smoothing_hint=False)


def _deterministic_stream(cfg) -> bool:
    return cfg.SEED >= 0 and cfg.DATALOADER.DETERMINISTIC_RESUME


class _DeferredLoader:
    """Iterable that builds the real training loader on first use.

    Args:
        build: callable returning the loader.
    """

    def __init__(self, build):
        self._build = build

    def __iter__(self):
        return iter(self._build())


def _with_seed(cfg, seed: int):
    """A copy of ``cfg`` with ``SEED = seed`` (for loaders that seed their sampler from the config)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SEED = int(seed)
    cfg.freeze()
    return cfg
