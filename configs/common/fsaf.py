# FSAF R-50-FPN, 1x schedule on COCO, as a LazyConfig (tools/lazyconfig_train_net.py): the model and recipe of
# Base-FSAF.yaml + fsaf_R50_FPN_1x.yaml, key for key (tests/test_lazyconfig.py checks the two build the same
# model). Built from Detectron2's common pieces: RetinaNet's ResNet-FPN backbone, the COCO data loaders, SGD,
# the 1x schedule and the training keys, with FSAF's parts put in. docs/lazyconfig.md lists the keys.
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T
from detectron2.model_zoo import get_config

from fsaf_d2.data.lazy import test_dataset_dicts, train_dataset_dicts
from fsaf_d2.data.mapper import FSAFDatasetMapper
from fsaf_d2.engine.evaluation import BackendCOCOEvaluator
from fsaf_d2.modeling import FSAF, FSAFHead, FSAFLossSettings, P6P7TopBlock, TBLRBoxCoder

# ---------------------------------------------------------------------------------------------- model
model = L(FSAF)(
    # Detectron2's RetinaNet backbone (ResNet-50 + FPN on res3-res5 + P6/P7), pytorch-style ResNet (stride in
    # the 3x3 conv, torchvision weights), stem and res2 frozen, and the reference's top block: P6 from C5,
    # no ReLU before P7
    backbone=get_config("common/models/retinanet.py").model.backbone,
    head=L(FSAFHead)(
        in_channels="${..backbone.out_channels}",
        num_classes="${..num_classes}",
        num_convs=4,
        norm="",
        prior_prob=0.01,
        reg_bias_init=0.25,
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    num_classes=80,
    prior_offset=0.0,
    box_coder=L(TBLRBoxCoder)(normalizer=4.0),
    loss_settings=L(FSAFLossSettings)(
        pos_scale=0.2,
        neg_scale=0.2,
        min_pos_iof=0.01,
        crowd_as_ignore=False,
        ignore_gt_scale=0.5,
        focal_alpha=0.25,
        focal_gamma=2.0,
        iou_eps=1e-6,
        reg_clamp_min=1e-4,
    ),
    loss_normalizer="exact",
    test_score_thresh=0.05,
    test_topk_candidates=1000,
    test_nms_thresh=0.5,
    test_topk_rule="pairs",
    test_min_box_size=0.0,
    max_detections_per_image=100,
    max_gt=0,  # 0: dynamic; on npu the entry point sets 128 (fsaf_d2.engine.lazy.apply_lazy_device_rules)
    fixed_sizes=[],  # []: dynamic; on npu the entry point sets the resize settings' two orientation buckets
    anchor_based=None,
    af_loss_weight=0.5,
    memory_format="auto",  # resolved for train.device by the entry point, as MODEL.FSAF.MEMORY_FORMAT
    fold_frozen_bn=True,
    pixel_mean=[123.675, 116.28, 103.53],  # RGB, torchvision statistics
    pixel_std=[58.395, 57.12, 57.375],
)
model.backbone.bottom_up.stages.stride_in_1x1 = False
model.backbone.bottom_up.freeze_at = 2
model.backbone.top_block._target_ = P6P7TopBlock
model.backbone.top_block.in_feature = "res5"
model.backbone.top_block.relu_before_p7 = False

# ---------------------------------------------------------------------------------------------- data
dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.dataset = L(train_dataset_dicts)(names="coco_2017_train", num_classes="${model.num_classes}")
dataloader.train.mapper = L(FSAFDatasetMapper)(
    is_train=True,
    augmentations=[
        L(T.ResizeShortestEdge)(short_edge_length=(800,), max_size=1333, sample_style="choice"),
        L(T.RandomFlip)(horizontal=True),
    ],
    image_format="RGB",
    crowd_as_ignore="${model.loss_settings.crowd_as_ignore}",
)
dataloader.test.dataset = L(test_dataset_dicts)(names="coco_2017_val")
dataloader.test.mapper._target_ = FSAFDatasetMapper
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333, sample_style="choice")
]
dataloader.evaluator = L(BackendCOCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    backend="auto",
    tasks=("bbox",),
    max_dets_per_image="${model.max_detections_per_image}",
)

# ---------------------------------------------------------------------------------------------- solver
optimizer = get_config("common/optim.py").SGD
optimizer.lr = 0.01
optimizer.weight_decay = 1e-4
optimizer.params.weight_decay_norm = 1e-4  # mmdet decays every parameter

lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x  # x0.1 at 60k and 80k of 90k
lr_multiplier.warmup_length = 500 / 90000

# ---------------------------------------------------------------------------------------------- training
train = get_config("common/train.py").train
train.max_iter = 90000
train.checkpointer.period = 10000
train.eval_period = 0  # evaluate after training only (TEST.EVAL_PERIOD 0)
train.device = "cuda"
train.seed = -1
# fsaf_d2's keys (docs/lazyconfig.md): AMP precision, global-norm clipping, NPU runtime, throughput window,
# seconds of silence after which a peer rank counts as lost
train.amp.precision = "float16"
train.clip_grad = dict(max_norm=10.0, norm_type=2.0)  # global L2 norm over all parameters, max 10
train.npu = dict(env=[], jit_compile=False, allow_hf32=True)
train.throughput_warmup_iters = 5
train.peer_timeout_s = 60
