"""Config keys of the FSAF model and its input, and the allowed values of fsaf_d2's multiple-choice keys.

``add_fsaf_config(cfg)`` only *adds* keys (Detectron2 plugin convention); it must run before
``cfg.merge_from_file``. Every key is documented next to its default. The ``INPUT`` keys that stock
Detectron2 lacks are added only when missing, so an upstream Detectron2 that already has one keeps its own
default. The training engine's keys (AMP, NPU runtime, ...) and the rules that depend on ``MODEL.DEVICE``
are in :mod:`fsaf_d2.engine.config`, whose ``build_config`` builds the full config.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_fsaf_config", "add_if_missing", "FSAF_VALID_CHOICES", "check_choice", "validate_fsaf_config"]


def add_if_missing(node, key, value):
    """``node[key] = value`` unless ``node`` already has ``key``."""
    if key not in node:
        node[key] = value


def add_fsaf_config(cfg):
    """Add the keys of the FSAF model and its input, with their defaults, to a Detectron2 ``CfgNode`` (in place)."""
    _C = cfg

    # ------------------------------------------------------------------ model: FSAF head and losses
    _C.MODEL.FSAF = CN()
    # number of foreground classes C (sigmoid classification, no background channel)
    _C.MODEL.FSAF.NUM_CLASSES = 80
    # backbone features the head runs on, finest first (strides 8..128)
    _C.MODEL.FSAF.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # one square prior of side s (the level stride) per location, centred at ((j + OFFSET) * s, (i + OFFSET) * s);
    # the reference uses 0 (top-left corner of the cell), the paper 0.5
    _C.MODEL.FSAF.PRIOR_OFFSET = 0.0
    # 3x3 convs in each of the two towers (shared across levels)
    _C.MODEL.FSAF.NUM_CONVS = 4
    # normalisation in the towers: "" (reference), "GN" or "BN" variants of detectron2's get_norm
    _C.MODEL.FSAF.HEAD_NORM = ""
    # classification bias init: -log((1 - p) / p)
    _C.MODEL.FSAF.PRIOR_PROB = 0.01
    # regression output bias init (reference 0.25 -> initial distance s on every side; paper: 0.1)
    _C.MODEL.FSAF.REG_BIAS_INIT = 0.25
    # sigmoid focal loss
    _C.MODEL.FSAF.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.FSAF.FOCAL_LOSS_GAMMA = 2.0
    # -log(IoU) loss: IoU clamped at this eps
    _C.MODEL.FSAF.IOU_LOSS_EPS = 1e-6
    # regression outputs clamped to >= this value inside the loss only
    _C.MODEL.FSAF.REG_CLAMP_MIN = 1e-4
    # TBLR coder normaliser S: distances are predicted in units of S * stride pixels
    _C.MODEL.FSAF.BBOX_NORMALIZER = 4.0
    # CenterRegion assignment: core ("effective") and shadow ("ignoring") region scales
    _C.MODEL.FSAF.POS_SCALE = 0.2
    _C.MODEL.FSAF.NEG_SCALE = 0.2
    # a prior is a candidate positive if IoF(prior, core box) > MIN_POS_IOF (and its centre is in the box)
    _C.MODEL.FSAF.MIN_POS_IOF = 0.01
    # crowd boxes: False = dropped by the data mapper, i.e. background (reference v2, default);
    # True = kept as ignore regions: priors whose centre is inside the crowd box shrunk by
    # IGNORE_GT_SCALE are ignored for every class (reference v3)
    _C.MODEL.FSAF.CROWD_AS_IGNORE = False
    _C.MODEL.FSAF.IGNORE_GT_SCALE = 0.5
    # loss normaliser: "exact" = number of positives after level selection in this batch on this
    # process, falling back to the number of negatives (reference); "ema" = Detectron2 RetinaNet's EMA
    _C.MODEL.FSAF.LOSS_NORMALIZER = "exact"
    # inference (reference: threshold 0.05, top 1000 (location, class) pairs per level, NMS 0.5)
    _C.MODEL.FSAF.SCORE_THRESH_TEST = 0.05
    _C.MODEL.FSAF.TOPK_CANDIDATES_TEST = 1000
    _C.MODEL.FSAF.NMS_THRESH_TEST = 0.5
    # "pairs": threshold then top-k (location, class) pairs (mmdet >= 2.18, Detectron2 RetinaNet);
    # "locations": top-k locations by their max class score, threshold afterwards (mmdet < 2.18,
    # the rule the published 37.4 AP checkpoint was evaluated with)
    _C.MODEL.FSAF.TOPK_RULE = "pairs"
    # boxes (clipped, in input-image pixels) not wider and taller than this are dropped before NMS, so
    # that they take no place among TEST.DETECTIONS_PER_IMAGE: mmdet >= 3.0's min_bbox_size, 0 for FSAF
    # (zero-width / zero-height boxes go). Negative: no filter before NMS (mmdet 2.x); Detectron2's
    # postprocessing still removes empty boxes afterwards. Applies to the combined model's anchor-based
    # candidates too.
    _C.MODEL.FSAF.MIN_BOX_SIZE_TEST = 0.0
    # static shapes (NPU / torch.compile): pad ground truth of every image to MAX_GT boxes with a
    # validity mask (0 = pad to the largest image of the batch, dynamic). An image with more boxes
    # fails with an error naming this key. On npu, 0 means fsaf_d2.engine.config.NPU_DEFAULT_MAX_GT
    # (fsaf_d2.engine.config.apply_static_shape_defaults).
    _C.MODEL.FSAF.MAX_GT = 0
    # combined model (paper Fig. 4): RetinaNet anchor-based outputs (MODEL.RETINANET.*, MODEL.ANCHOR_GENERATOR.*)
    # on the same towers; total loss = anchor-based + AF_LOSS_WEIGHT * (FSAF cls + FSAF box)
    _C.MODEL.FSAF.ANCHOR_BASED = False
    _C.MODEL.FSAF.AF_LOSS_WEIGHT = 0.5

    # memory layout of the model's conv weights and activations: "channels_last" (NHWC), "contiguous"
    # (NCHW) or "auto" = the device's layout, chosen by fsaf_d2.engine.build_config (the config of
    # train_net.py and the tools): channels_last on cuda and on AVX-512 CPUs, contiguous on AVX2-only CPUs
    # (measured per CPU kind: docs/benchmarks.md#conv-layout-per-cpu-kind), contiguous on npu (torch_npu has
    # no channels_last). The model itself applies only an explicit layout: Detectron2's build_model(cfg) on
    # a config that did not go through that builder builds "auto" as NCHW.
    # Numerics differ only by float rounding.
    _C.MODEL.FSAF.MEMORY_FORMAT = "auto"
    # compute every Conv2d + FrozenBatchNorm2d of the model as one convolution with per-channel scaled
    # weights and a bias (fsaf_d2.modeling.frozen_bn): same parameters and checkpoint keys, float
    # rounding differences only, two fewer passes over each activation. On by default: paired on the CPU,
    # R-50 inference 1.02-1.14x faster on both CPU kinds, training within noise (docs/benchmarks.md);
    # scripts/gpu_benchmark.sh measures it on a GPU. No effect on models without FrozenBN.
    _C.MODEL.FSAF.FOLD_FROZEN_BN = True

    # FPN top block: P6 from C5 and P7 from P6. The reference has no ReLU before P7 (Detectron2 has one).
    _C.MODEL.FSAF.TOP_BLOCK_IN_FEATURE = "res5"
    _C.MODEL.FSAF.TOP_BLOCK_P7_RELU = False

    # ------------------------------------------------------------------ input
    # static input buckets, e.g. [[800, 1344], [1344, 800]] (H, W): every batch is padded to the
    # smallest bucket (by area) that contains all of its images; [] = dynamic (pad to batch max / 32).
    # On npu, [] means the two orientation buckets of the resize settings
    # (fsaf_d2.engine.config.apply_static_shape_defaults).
    add_if_missing(_C.INPUT, "FIXED_SIZES", [])
    # "pil" (Detectron2 default, antialiased) or "cv2" (cv2.INTER_LINEAR, as mmdetection resizes)
    add_if_missing(_C.INPUT, "RESIZE_BACKEND", "pil")
    return cfg


#: Allowed values of every multiple-choice key of fsaf_d2 (model, input and engine keys). Every check of one
#: of these keys, in the config validation and in the code that reads it, goes through :func:`check_choice`.
FSAF_VALID_CHOICES = {
    "MODEL.FSAF.LOSS_NORMALIZER": ("exact", "ema"),
    "MODEL.FSAF.TOPK_RULE": ("pairs", "locations"),
    "MODEL.FSAF.MEMORY_FORMAT": ("auto", "channels_last", "contiguous"),
    "INPUT.RESIZE_BACKEND": ("pil", "cv2"),
    "SOLVER.AMP.PRECISION": ("float16", "bfloat16", "fp16", "bf16"),
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": ("value", "norm", "full_model"),
    "SOLVER.OPTIMIZER": ("SGD", "AdamW"),
    "SOLVER.COMPILE.MODE": ("default", "max-autotune", "reduce-overhead"),
    "TEST.COCO_EVAL_BACKEND": ("auto", "faster_coco_eval", "pycocotools"),
}


def check_choice(key: str, value, name: str = ""):
    """Return ``value`` if :data:`FSAF_VALID_CHOICES` allows it for ``key``, else raise a ``ValueError`` naming
    both (``name``: how the user spells the key, e.g. a LazyConfig's ``train.amp.precision``; default ``key``)."""
    choices = FSAF_VALID_CHOICES[key]
    if value not in choices:
        raise ValueError(f"Invalid config value {name or key}={value!r}; expected one of {list(choices)}")
    return value


#: the keys of FSAF_VALID_CHOICES that add_fsaf_config declares (the others are the engine's)
_MODEL_CHOICE_KEYS = [key for key in FSAF_VALID_CHOICES if key.startswith(("MODEL.", "INPUT."))]


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate_fsaf_config(cfg):
    """Fail early, naming the key, on values of the model's and input's keys that fsaf_d2 cannot use."""
    for key in _MODEL_CHOICE_KEYS:
        check_choice(key, _get(cfg, key))
    f = cfg.MODEL.FSAF
    if f.NUM_CLASSES < 1:
        raise ValueError(f"MODEL.FSAF.NUM_CLASSES must be >= 1, got {f.NUM_CLASSES}")
    if not 0 < f.POS_SCALE <= f.NEG_SCALE <= 1:
        raise ValueError(
            f"MODEL.FSAF.POS_SCALE / NEG_SCALE must satisfy 0 < POS_SCALE <= NEG_SCALE <= 1, got "
            f"{f.POS_SCALE} / {f.NEG_SCALE}"
        )
    if f.MAX_GT < 0:
        raise ValueError(f"MODEL.FSAF.MAX_GT must be >= 0 (0 = dynamic), got {f.MAX_GT}")
    for size in cfg.INPUT.FIXED_SIZES:
        if len(size) != 2 or any(int(s) % 32 for s in size):
            raise ValueError(
                f"INPUT.FIXED_SIZES entries must be [H, W] multiples of 32, got {list(cfg.INPUT.FIXED_SIZES)}"
            )
