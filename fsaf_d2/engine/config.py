"""The config of fsaf_d2's programs: the engine's keys, the rules that depend on ``MODEL.DEVICE``, one builder.

:func:`build_config` is the only place that turns a YAML file and ``KEY VALUE`` overrides into the config
that ``train_net.py`` and the tools (demo, export, benchmarks) run with, so that they all see the same
config for the same file on the same device. :func:`add_engine_config` adds the keys of the training
engine in Detectron2's namespaces (``SOLVER``, ``DATALOADER``, ``TEST``) and the ``NPU`` runtime keys;
:func:`apply_device_rules` resolves the settings whose default depends on the device. Nothing here imports
``torch_npu``: the rules read the device string only.
"""
from typing import Sequence

import torch

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from ..config import add_fsaf_config, add_if_missing, check_choice, validate_fsaf_config
from ..data.config_datasets import parse_register_coco
from ..model_zoo.model_zoo import resolve_config_file

__all__ = [
    "add_engine_config",
    "NPU_DEFAULT_MAX_GT",
    "orientation_buckets",
    "apply_static_shape_defaults",
    "resolve_memory_format",
    "apply_device_rules",
    "validate_engine_config",
    "validate_config",
    "build_config",
]


def add_engine_config(cfg):
    """Add the engine's keys with their defaults to a Detectron2 ``CfgNode`` (in place).

    The ``SOLVER`` / ``DATALOADER`` / ``TEST`` keys are added only when missing, so an upstream Detectron2 that already
    has one keeps its own default.
    """
    _C = cfg

    # ------------------------------------------------------------------ solver / AMP
    # SOLVER.AMP.PRECISION: "float16" or "bfloat16" (CPU autocast supports bfloat16 only); "fp16" and "bf16"
    # are accepted spellings (fsaf_d2.config.FSAF_VALID_CHOICES)
    add_if_missing(_C.SOLVER.AMP, "PRECISION", "float16")
    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE accepts "full_model": one global L2 norm over all parameters
    # (reference: max 10), applied to unscaled gradients under AMP. "value"/"norm" keep Detectron2's
    # per-parameter meaning.
    # "SGD" (Detectron2's: SOLVER.MOMENTUM, NESTEROV) or "AdamW" (torch.optim.AdamW with SOLVER.ADAMW_BETAS;
    # SOLVER.WEIGHT_DECAY is then AdamW's decoupled decay). Both take BASE_LR, the per-group decay and LR
    # factors of Detectron2 (WEIGHT_DECAY_NORM, BIAS_LR_FACTOR, ...) and any SOLVER.CLIP_GRADIENTS.
    add_if_missing(_C.SOLVER, "OPTIMIZER", "SGD")
    add_if_missing(_C.SOLVER, "ADAMW_BETAS", (0.9, 0.999))
    # Fused SGD of torch_npu (torch_npu.optim.NpuFusedSGD) when MODEL.DEVICE is npu
    add_if_missing(_C.SOLVER, "NPU_FUSED_SGD", False)
    # compile the static-shape training step (backbone, head, assignment, selection, losses) with torch.compile,
    # one graph per INPUT.FIXED_SIZES entry (fsaf_d2.engine.compile). Needs INPUT.FIXED_SIZES and MODEL.FSAF.MAX_GT.
    # MODE: "default", "max-autotune" or "reduce-overhead" (CUDA graphs on cuda)
    if "COMPILE" not in _C.SOLVER:
        _C.SOLVER.COMPILE = CN()
    add_if_missing(_C.SOLVER.COMPILE, "ENABLED", False)
    add_if_missing(_C.SOLVER.COMPILE, "MODE", "default")
    # iterations excluded from the images/s figure in the training log
    add_if_missing(_C.SOLVER, "THROUGHPUT_WARMUP_ITERS", 5)
    # with SEED >= 0: restart the training data stream from a seed derived from (SEED, iteration //
    # SOLVER.CHECKPOINT_PERIOD) at every checkpoint boundary, so that --resume from a periodic checkpoint
    # replays exactly the batches of an uninterrupted run (fsaf_d2.engine.hooks.DeterministicDataStream)
    add_if_missing(_C.DATALOADER, "DETERMINISTIC_RESUME", True)
    # page-locked batches from the loader's pin-memory thread, so that the model's host-to-device copies of the
    # uint8 images do not block the host. Only where there is a device to copy to (cuda, npu); ignored on cpu
    add_if_missing(_C.DATALOADER, "PIN_MEMORY", True)

    # ------------------------------------------------------------------ datasets
    # COCO-format datasets registered by name, no Python needed: [[NAME, JSON_FILE, IMAGE_ROOT], ...], then
    # used in DATASETS.TRAIN / TEST; classes come from the json (fsaf_d2.data.config_datasets)
    add_if_missing(_C.DATASETS, "REGISTER_COCO", [])

    # ------------------------------------------------------------------ faults (docs/training.md#faults)
    # a NaN/inf loss stops training (NonFiniteLossError naming the iteration and loss terms) unless SKIP:
    # then that step is skipped (no optimizer update). MAX_CONSECUTIVE: more consecutive skipped steps
    # (non-finite losses, or fp16 steps the grad scaler skipped on overflow) are an error.
    if "NONFINITE" not in _C.SOLVER:
        _C.SOLVER.NONFINITE = CN()
    add_if_missing(_C.SOLVER.NONFINITE, "SKIP", False)
    add_if_missing(_C.SOLVER.NONFINITE, "MAX_CONSECUTIVE", 10)
    # a .pth loaded by MODEL.WEIGHTS or --resume must fit the model: missing, unexpected or differently
    # shaped keys are an error naming them (name-matched .pkl backbones are exempt)
    add_if_missing(_C.MODEL, "WEIGHTS_STRICT", True)
    # fine-tuning onto another class count: class-score keys of another shape keep their initialisation
    add_if_missing(_C.MODEL, "WEIGHTS_NEW_CLASS_LAYER", False)
    # multi-process jobs: a worker stops (exit code 76, fsaf_d2.engine.faults) when another rank has not
    # answered for this many seconds, instead of waiting for the process-group timeout; 0 disables
    if "DIST" not in _C:
        _C.DIST = CN()
    add_if_missing(_C.DIST, "PEER_TIMEOUT_S", 60)  # whole seconds

    # ------------------------------------------------------------------ weight EMA (d2go's key names)
    # keep an exponential moving average of the weights; evaluation and model_final.pth use it
    # (fsaf_d2.engine.ema). DECAY is the largest decay, reached after a (1 + t) / (10 + t) ramp.
    if "MODEL_EMA" not in _C:
        _C.MODEL_EMA = CN()
    add_if_missing(_C.MODEL_EMA, "ENABLED", False)
    add_if_missing(_C.MODEL_EMA, "DECAY", 0.999)

    # ------------------------------------------------------------------ evaluation
    # COCOeval of the COCO box AP (fsaf_d2.engine.evaluation): "faster_coco_eval" (C++, same numbers),
    # "pycocotools" (pure Python) or "auto" = faster_coco_eval when it imports, else pycocotools
    add_if_missing(_C.TEST, "COCO_EVAL_BACKEND", "auto")

    # ------------------------------------------------------------------ Ascend NPU runtime
    _C.NPU = CN()
    # torch_npu.npu.set_compile_mode(jit_compile=...): False = prebuilt binary kernels (recommended)
    _C.NPU.JIT_COMPILE = False
    # environment defaults set in each worker when not already set, "KEY=VALUE" strings, e.g.
    # ["TASK_QUEUE_ENABLE=2", "CPU_AFFINITY_CONF=1", "HCCL_CONNECT_TIMEOUT=1200"]
    _C.NPU.ENV = []
    # allow HF32 (TF32-like) in convolutions and matmuls
    _C.NPU.ALLOW_HF32 = True
    return cfg


NPU_DEFAULT_MAX_GT = 128


def _device_type(device) -> str:
    return str(device).split(":")[0]


def _ceil32(v: int) -> int:
    return int(-(-int(v) // 32) * 32)


def orientation_buckets(short: int, long: int) -> list:
    """The two static input sizes [[S, L], [L, S]] (H, W) that hold every image resized to a shorter side of at
    most ``short`` and a longer side of at most ``long`` pixels, rounded up to multiples of 32."""
    short, long = _ceil32(short), _ceil32(max(long, short))
    return [[short, long], [long, short]]


def apply_static_shape_defaults(cfg):
    """Static shapes by default on Ascend NPUs (unfrozen ``cfg``, in place; returns whether it changed).

    With ``MODEL.DEVICE`` npu and no explicit choice: ``INPUT.FIXED_SIZES`` becomes the two orientation
    buckets [short, long] and [long, short] that hold every train and test image after resizing
    (800 / 1333 -> [[800, 1344], [1344, 800]]), and ``MODEL.FSAF.MAX_GT`` becomes ``NPU_DEFAULT_MAX_GT``.
    Batches are grouped by orientation (``DATALOADER.ASPECT_RATIO_GROUPING``), so no image is padded to
    the square. Other devices keep dynamic shapes unless the keys are set.
    """
    if _device_type(cfg.MODEL.DEVICE) != "npu":
        return False
    changed = False
    if not cfg.INPUT.FIXED_SIZES:
        if min(cfg.INPUT.MIN_SIZE_TRAIN) == 0 or cfg.INPUT.MIN_SIZE_TEST == 0:
            raise ValueError(
                "MODEL.DEVICE is npu, which needs static input sizes, and INPUT.FIXED_SIZES is empty, but "
                f"INPUT.MIN_SIZE_TRAIN {tuple(cfg.INPUT.MIN_SIZE_TRAIN)} / MIN_SIZE_TEST {cfg.INPUT.MIN_SIZE_TEST} "
                "keep some images at their native size (0), so no size bound can be derived: set "
                "INPUT.FIXED_SIZES [[H, W], ...] (multiples of 32 that hold every input image)"
            )
        short = max(max(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MIN_SIZE_TEST)
        long = max(cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TEST)
        cfg.INPUT.FIXED_SIZES = orientation_buckets(short, long)
        changed = True
    if cfg.MODEL.FSAF.MAX_GT == 0:
        cfg.MODEL.FSAF.MAX_GT = NPU_DEFAULT_MAX_GT
        changed = True
    return changed


#: torch CPU capabilities (``torch.backends.cpu.get_cpu_capability()``) whose channels-last convolutions
#: measured faster than NCHW, paired (tools/benchmark_layout.py, docs/benchmarks.md#conv-layout-per-cpu-kind):
#: on a 2-core AMD EPYC Zen 4 with AVX-512, 0.87x the NCHW step of the quickstart model and 0.92x of R-50;
#: on a 2-core AMD EPYC with AVX2 only, R-50's channels-last step took 1.14x the NCHW one.
CHANNELS_LAST_CPU_CAPABILITIES = ("AVX512", "AVX512_BF16", "AMX")


def resolve_memory_format(choice: str, device, cpu_capability: str = "") -> str:
    """``MODEL.FSAF.MEMORY_FORMAT`` for ``MODEL.DEVICE`` -> "channels_last" or "contiguous".

    "auto": channels_last on cuda (cuDNN's NHWC convolutions); on cpu channels_last where oneDNN's NHWC
    kernels measured faster, i.e. with AVX-512 (``cpu_capability``, default: this machine's
    ``torch.backends.cpu.get_cpu_capability()``, in :data:`CHANNELS_LAST_CPU_CAPABILITIES`), NCHW on
    AVX2-only CPUs; contiguous (NCHW) on npu, whose adapter has no channels_last.
    "channels_last" / "contiguous" force one; channels_last on npu is refused, naming the key.
    """
    check_choice("MODEL.FSAF.MEMORY_FORMAT", choice)
    device_type = _device_type(device)
    if choice == "auto":
        if device_type == "npu":
            return "contiguous"
        if device_type == "cpu":
            capability = cpu_capability or torch.backends.cpu.get_cpu_capability()
            return "channels_last" if capability in CHANNELS_LAST_CPU_CAPABILITIES else "contiguous"
        return "channels_last"
    if choice == "channels_last" and device_type == "npu":
        raise ValueError(
            "MODEL.FSAF.MEMORY_FORMAT='channels_last' is not supported on npu (torch_npu has no "
            "channels_last); use 'auto' or 'contiguous'"
        )
    return choice


def apply_device_rules(cfg) -> None:
    """Settle the keys whose value depends on ``MODEL.DEVICE`` (unfrozen ``cfg``, in place).

    Static shapes on npu (:func:`apply_static_shape_defaults`) and ``MODEL.FSAF.MEMORY_FORMAT`` "auto"
    replaced by the device's layout (:func:`resolve_memory_format`).
    """
    apply_static_shape_defaults(cfg)
    cfg.MODEL.FSAF.MEMORY_FORMAT = resolve_memory_format(cfg.MODEL.FSAF.MEMORY_FORMAT, cfg.MODEL.DEVICE)


def validate_engine_config(cfg) -> None:
    """Fail early, naming the key, on values of the engine's keys that fsaf_d2 cannot use."""
    check_choice("SOLVER.AMP.PRECISION", cfg.SOLVER.AMP.PRECISION)
    check_choice("TEST.COCO_EVAL_BACKEND", cfg.TEST.COCO_EVAL_BACKEND)
    check_choice("SOLVER.OPTIMIZER", cfg.SOLVER.OPTIMIZER)
    check_choice("SOLVER.COMPILE.MODE", cfg.SOLVER.COMPILE.MODE)
    parse_register_coco(cfg.DATASETS.REGISTER_COCO)
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED:
        check_choice("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip.CLIP_TYPE)


def validate_config(cfg) -> None:
    """:func:`~fsaf_d2.config.validate_fsaf_config` and :func:`validate_engine_config`."""
    validate_fsaf_config(cfg)
    validate_engine_config(cfg)


def build_config(config_file: str = "", opts: Sequence = (), freeze: bool = True):
    """The config of a YAML file and ``KEY VALUE`` overrides, as every fsaf_d2 program runs it.

    Detectron2's defaults plus fsaf_d2's model and engine keys, merged from ``config_file`` (none if empty; a path,
    or the name of a shipped config: :func:`fsaf_d2.model_zoo.resolve_config_file`)
    and ``opts`` (a flat list ``[KEY, VALUE, ...]``, values as strings or Python objects), validated, with the
    device rules applied (:func:`apply_device_rules`). Frozen unless ``freeze`` is False.
    """
    cfg = get_cfg()
    add_fsaf_config(cfg)
    add_engine_config(cfg)
    if config_file:
        cfg.merge_from_file(resolve_config_file(config_file))
    cfg.merge_from_list(list(opts))
    validate_config(cfg)
    apply_device_rules(cfg)
    if freeze:
        cfg.freeze()
    return cfg
