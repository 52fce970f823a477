"""The FSAF meta-architecture (Feature Selective Anchor-Free detector, CVPR 2019)."""
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import configurable
from detectron2.layers import move_device_like
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn
from torch.autograd.profiler import record_function

from ..config import check_choice
from .anchor_based import AnchorBasedBranch
from .box_coder import TBLRBoxCoder, tblr_decode
from .frozen_bn import fold_frozen_batchnorm
from .head import FSAFHead
from .inference import clip_boxes, detections_per_image, gather_rows, multi_level_candidates, usable_boxes
from .losses import FSAFLossSettings, fsaf_losses
from .priors import PointPriors, point_prior_grid

__all__ = ["FSAF", "pad_ground_truth", "choose_fixed_size"]

logger = logging.getLogger(__name__)


#: MODEL.FSAF.MEMORY_FORMAT values the model applies ("auto" unresolved: the default NCHW)
_MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def pad_ground_truth(
    instances: Sequence[Instances], num_slots: int, with_crowd: bool
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Stack per-image ground truth into padded tensors, on the device the instances live on.

    Returns boxes (N, G, 4) float, labels (N, G) int64, valid (N, G) bool (real, non-crowd objects) and,
    when ``with_crowd``, ignore (N, G) bool (crowd boxes, from the ``gt_is_crowd`` field).
    """
    n = len(instances)
    device = instances[0].gt_boxes.tensor.device if n else torch.device("cpu")
    boxes = torch.zeros(n, num_slots, 4, device=device)
    labels = torch.zeros(n, num_slots, dtype=torch.int64, device=device)
    present = torch.zeros(n, num_slots, dtype=torch.bool, device=device)
    crowd = torch.zeros(n, num_slots, dtype=torch.bool, device=device)
    for i, inst in enumerate(instances):  # a loop over images, not objects
        k = len(inst)
        boxes[i, :k] = inst.gt_boxes.tensor.float()
        labels[i, :k] = inst.gt_classes
        present[i, :k] = True
        if with_crowd and inst.has("gt_is_crowd"):
            crowd[i, :k] = inst.gt_is_crowd
    valid = present & ~crowd
    return boxes, labels, valid, (crowd if with_crowd else None)


def choose_fixed_size(image_sizes: Sequence[Tuple[int, int]], fixed_sizes: Sequence[Sequence[int]]) -> Tuple[int, int]:
    """The smallest (by area) of ``fixed_sizes`` [(H, W), ...] that contains every image of the batch."""
    need_h = max(s[0] for s in image_sizes)
    need_w = max(s[1] for s in image_sizes)
    fits = [(int(h), int(w)) for h, w in fixed_sizes if h >= need_h and w >= need_w]
    if not fits:
        raise ValueError(
            f"A batch with images up to {need_h}x{need_w} (HxW) fits none of INPUT.FIXED_SIZES={list(fixed_sizes)}; "
            "add a larger size or lower INPUT.MAX_SIZE_TRAIN/TEST."
        )
    return min(fits, key=lambda hw: (hw[0] * hw[1], hw))


def _without_crowd(instances: Instances) -> Instances:
    """``instances`` less its crowd boxes (``gt_is_crowd``, present with ``MODEL.FSAF.CROWD_AS_IGNORE``)."""
    if not instances.has("gt_is_crowd"):
        return instances
    return instances[~instances.gt_is_crowd]


@META_ARCH_REGISTRY.register()
class FSAF(DenseDetector):
    """FSAF: an anchor-free head on every FPN level, each object trained on the level where its loss
    is lowest (online feature selection). See docs/algorithm.md for the reference behaviour.
    """

    # training-only; TorchScript (inference export) would otherwise compile it
    __jit_unused_properties__ = ["has_static_training_step"]

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        head: nn.Module,
        head_in_features: List[str],
        num_classes: int,
        prior_offset: float = 0.0,
        box_coder: TBLRBoxCoder,
        loss_settings: FSAFLossSettings = FSAFLossSettings(),
        loss_normalizer: str = "exact",
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.5,
        test_topk_rule: str = "pairs",
        test_min_box_size: float = 0.0,
        max_detections_per_image: int = 100,
        max_gt: int = 0,
        fixed_sizes: Sequence[Sequence[int]] = (),
        anchor_based: Optional[nn.Module] = None,
        af_loss_weight: float = 0.5,
        memory_format: Union[torch.memory_format, str] = torch.contiguous_format,
        fold_frozen_bn: bool = False,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
    ):
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.num_classes = num_classes
        shapes = backbone.output_shape()
        self.strides = [shapes[f].stride for f in head_in_features]
        self.priors = PointPriors(self.strides, offset=prior_offset)
        self.box_coder = box_coder
        # plain copies for the TorchScript inference path, which cannot use PointPriors / TBLRBoxCoder
        self.prior_offset = float(prior_offset)
        self.box_normalizer = float(box_coder.normalizer)
        self.loss_settings = loss_settings
        self.loss_normalizer = check_choice("MODEL.FSAF.LOSS_NORMALIZER", loss_normalizer)
        self.register_buffer("loss_normalizer_ema", torch.tensor(100.0), persistent=False)
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.test_topk_rule = check_choice("MODEL.FSAF.TOPK_RULE", test_topk_rule)
        self.test_min_box_size = float(test_min_box_size)
        self.max_detections_per_image = max_detections_per_image
        self.max_gt = max_gt
        self.fixed_sizes = [tuple(int(v) for v in s) for s in fixed_sizes]
        # combined model: RetinaNet's anchor-based outputs on the same towers (None = FSAF only)
        self.anchor_based = anchor_based
        self.af_loss_weight = af_loss_weight
        # conv weights in this layout make every convolution (and its activations) use it: the first conv
        # turns the NCHW image batch into the weights' layout, and the head outputs' NHWC transpose is free.
        # A string is a MODEL.FSAF.MEMORY_FORMAT value: "auto" is the device's layout once the config builder
        # (fsaf_d2.engine.build_config, or fsaf_d2.engine.lazy for a LazyConfig) has resolved it; unresolved: NCHW
        if isinstance(memory_format, str):
            memory_format = _MEMORY_FORMATS.get(check_choice("MODEL.FSAF.MEMORY_FORMAT", memory_format))
        if memory_format is torch.channels_last:
            self.to(memory_format=memory_format)
        if fold_frozen_bn:
            fold_frozen_batchnorm(self)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        backbone_shape = backbone.output_shape()
        f = cfg.MODEL.FSAF
        missing = [name for name in f.IN_FEATURES if name not in backbone_shape]
        if missing:
            raise ValueError(
                f"MODEL.FSAF.IN_FEATURES={list(f.IN_FEATURES)} names features the backbone does not produce: "
                f"{missing}; it produces {sorted(backbone_shape)}"
            )
        feature_shapes = [backbone_shape[name] for name in f.IN_FEATURES]
        return {
            "backbone": backbone,
            "head": FSAFHead(cfg, feature_shapes),
            "head_in_features": list(f.IN_FEATURES),
            "num_classes": f.NUM_CLASSES,
            "prior_offset": f.PRIOR_OFFSET,
            "box_coder": TBLRBoxCoder(f.BBOX_NORMALIZER),
            "loss_settings": FSAFLossSettings.from_config(cfg),
            "loss_normalizer": f.LOSS_NORMALIZER,
            "test_score_thresh": f.SCORE_THRESH_TEST,
            "test_topk_candidates": f.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": f.NMS_THRESH_TEST,
            "test_topk_rule": f.TOPK_RULE,
            "test_min_box_size": f.MIN_BOX_SIZE_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "max_gt": f.MAX_GT,
            "fixed_sizes": cfg.INPUT.FIXED_SIZES,
            "anchor_based": AnchorBasedBranch(cfg, feature_shapes, f.NUM_CLASSES) if f.ANCHOR_BASED else None,
            "af_loss_weight": f.AF_LOSS_WEIGHT,
            "memory_format": f.MEMORY_FORMAT,
            "fold_frozen_bn": f.FOLD_FROZEN_BN,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        """``DenseDetector.forward``, overridden where it has no hook for two things.

        * Training: ``DenseDetector.forward`` moves each image's ``Instances`` to the device, field by field,
          before ``forward_training``. FSAF hands them on where the data loader left them (the host), so that
          :meth:`forward_training` pads them there and sends each padded tensor with one non-blocking copy:
          with ``MODEL.FSAF.MAX_GT`` the device sees fixed shapes and no per-image copies.
        * TorchScript cannot compile ``super()``: the scripted model runs the same hooks here
          (:meth:`preprocess_image`, :meth:`features_and_predictions`, :meth:`forward_inference`) and returns
          the results in the input image's pixels, like Detectron2's scripted dense detectors.

        * Static shapes (``INPUT.FIXED_SIZES`` + ``MODEL.FSAF.MAX_GT``, FSAF alone): the tensor part of the step,
          from the padded image batch to the losses, is one method, :meth:`static_training_losses`, which
          ``SOLVER.COMPILE`` compiles as one graph per fixed size (:mod:`fsaf_d2.engine.compile`).

        Eager inference is ``DenseDetector.forward`` unchanged.
        """
        if torch.jit.is_scripting():
            images = self.preprocess_image(batched_inputs)
            features, predictions = self.features_and_predictions(images.tensor)
            return self.forward_inference(images, features, predictions)
        else:
            if not self.training:
                return super().forward(batched_inputs)
            if "instances" not in batched_inputs[0]:
                raise ValueError("FSAF training needs 'instances' (ground truth) in every input dict")
            gt_instances = [x["instances"] for x in batched_inputs]
            with record_function("fsaf.preprocess"):
                images = self.preprocess_image(batched_inputs)
            if self.has_static_training_step:
                with record_function("fsaf.preprocess"):
                    gt = self.padded_ground_truth(gt_instances)
                    sizes = self._to_device_async(torch.tensor(images.image_sizes, dtype=torch.int64).reshape(-1, 2))
                return self.static_training_losses(images.tensor, sizes, *gt)
            features, predictions = self.features_and_predictions(images.tensor)
            return self.forward_training(images, features, predictions, gt_instances)

    def _move_to_current_device(self, x: Tensor) -> Tensor:
        """A loader's image (uint8, normalised only on the device) on the model's device. Eager copies are
        non-blocking: from pinned memory (``DATALOADER.PIN_MEMORY``) the host goes on while the copy runs."""
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return move_device_like(x, self.pixel_mean)
        return x.to(self.pixel_mean.device, non_blocking=True)

    def preprocess_image(self, batched_inputs: List[Dict[str, Tensor]]) -> ImageList:
        """Normalise and batch the images, padded to the backbone's size divisibility as in
        ``DenseDetector.preprocess_image``; with ``INPUT.FIXED_SIZES`` (eager mode only) padded to the
        smallest of those sizes that holds the batch instead."""
        images = [self._move_to_current_device(x["image"]) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        if not torch.jit.is_scripting():
            if self.fixed_sizes:
                return self._pad_to_fixed_size(images)
        return ImageList.from_tensors(
            images, self.backbone.size_divisibility, padding_constraints=self.backbone.padding_constraints
        )

    def _pad_to_fixed_size(self, images: List[Tensor]) -> ImageList:
        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
        h, w = choose_fixed_size(sizes, self.fixed_sizes)
        batched = images[0].new_zeros(len(images), images[0].shape[0], h, w)
        for i, img in enumerate(images):
            batched[i, :, : img.shape[-2], : img.shape[-1]].copy_(img)
        return ImageList(batched, sizes)

    def features_and_predictions(self, images: Tensor) -> Tuple[List[Tensor], List[List[Tensor]]]:
        """Backbone, then the head, on a normalised and padded image batch (N, 3, H, W).

        Returns:
            the backbone features the head runs on (``MODEL.FSAF.IN_FEATURES`` order), and the head's
            per-level outputs: FSAF class logits (N, C, H_l, W_l) and TBLR distances (N, 4, H_l, W_l), then
            (combined model only) RetinaNet's logits and deltas.
        """
        with record_function("fsaf.backbone"):
            out = self.backbone(images)
            features = [out[f] for f in self.head_in_features]
        with record_function("fsaf.head"):
            predictions = self.head(features)
        return features, predictions

    # ------------------------------------------------------------------ training
    def forward_training(self, images, features, predictions, gt_instances):
        """DenseDetector's training hook: the FSAF losses (and, in the combined model, RetinaNet's) of a batch.

        Args:
            gt_instances: per-image ground truth ``Instances``, on the host (as :meth:`forward` passes them)
                or on the model's device; see :meth:`padded_ground_truth`.
        """
        with record_function("fsaf.preprocess"):
            gt = self.padded_ground_truth(gt_instances)
        losses = self.losses(images, features, predictions, *gt)
        if self.anchor_based is None:
            return losses
        # combined model: RetinaNet's loss + AF_LOSS_WEIGHT * (FSAF cls + FSAF box), paper Sec. 3.5. Crowd boxes
        # (kept by MODEL.FSAF.CROWD_AS_IGNORE) are not objects for RetinaNet's matcher: its branch sees the
        # other boxes only, so crowd regions are background to it, as in Detectron2's RetinaNet
        total = self.anchor_based.forward_training(
            images, features, predictions[2:], [_without_crowd(x).to(self.device) for x in gt_instances]
        )
        total.update({k: self.af_loss_weight * v for k, v in losses.items()})
        return total

    @property
    def has_static_training_step(self) -> bool:
        """Training takes :meth:`static_training_losses`: fixed input sizes and ground-truth slots, FSAF alone
        (the combined model's anchor-based branch matches ``Instances`` on the host)."""
        return bool(self.fixed_sizes) and self.max_gt > 0 and self.anchor_based is None

    def static_training_losses(
        self,
        images: Tensor,
        image_sizes: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_valid: Tensor,
        gt_ignore: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """Backbone, head, assignment, level selection and losses of a static-shape batch: tensors in,
        tensors out, without a host synchronisation, so that ``torch.compile`` takes it as one graph.

        Args:
            images: (N, 3, H, W) normalised batch padded to one of ``INPUT.FIXED_SIZES``.
            image_sizes: (N, 2) int64 (H, W) of every image before padding, on the model's device.
            gt_boxes, gt_labels, gt_valid, gt_ignore: ``MODEL.FSAF.MAX_GT`` slots per image
                (:meth:`padded_ground_truth`).
        """
        features, predictions = self.features_and_predictions(images)
        return self.losses(
            ImageList(images, image_sizes), features, predictions, gt_boxes, gt_labels, gt_valid, gt_ignore
        )

    def padded_ground_truth(self, gt_instances: Sequence[Instances]) -> List[Optional[Tensor]]:
        """Ground truth as padded tensors on the model's device (see :func:`pad_ground_truth`).

        The tensors are padded on the device the instances live on; host tensors then reach the device
        with one pinned non-blocking copy each.
        """
        tensors = pad_ground_truth(gt_instances, self._gt_slots(gt_instances), self.loss_settings.crowd_as_ignore)
        return [None if t is None else self._to_device_async(t) for t in tensors]

    def _gt_slots(self, instances: Sequence[Instances]) -> int:
        """Ground-truth slots per image: MODEL.FSAF.MAX_GT (static) or the batch's largest count (dynamic)."""
        most = max(len(x) for x in instances)
        if self.max_gt == 0:
            return max(1, most)
        if most > self.max_gt:
            raise ValueError(
                f"An image has {most} ground-truth boxes, more than MODEL.FSAF.MAX_GT={self.max_gt}; "
                "raise MODEL.FSAF.MAX_GT (or set it to 0 for dynamic shapes)."
            )
        return self.max_gt

    def _to_device_async(self, t: Tensor) -> Tensor:
        if t.device == self.device:
            return t
        if t.device.type == "cpu":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def prior_layout(self, images: ImageList, features: List[Tensor]):
        """Priors (R, 4), prior level ids (R,), level sizes and the (N, R) valid mask of a batch.

        ``images.image_sizes`` is Detectron2's list of (H, W), or an (N, 2) tensor on the model's device
        (:meth:`static_training_losses`)."""
        shapes = [tuple(f.shape[-2:]) for f in features]
        priors, prior_level, level_sizes = self.priors.grid(shapes, self.device)
        prior_valid = self.priors.valid_mask(
            shapes, images.image_sizes, self.backbone.size_divisibility, self.device
        )
        return priors, prior_level, level_sizes, prior_valid

    def losses(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_valid: Tensor,
        gt_ignore: Optional[Tensor] = None,
        return_details: bool = False,
    ):
        """FSAF losses of a batch from the head outputs and padded ground truth (see ``fsaf_losses``)."""
        logits, deltas = predictions[0], predictions[1]
        logits, deltas = self._transpose_dense_predictions([logits, deltas], [self.num_classes, 4])
        priors, prior_level, level_sizes, prior_valid = self.prior_layout(images, features)
        return fsaf_losses(
            torch.cat(logits, dim=1),
            torch.cat(deltas, dim=1),
            priors,
            level_sizes,
            prior_level,
            prior_valid,
            gt_boxes,
            gt_labels,
            gt_valid,
            gt_ignore=gt_ignore,
            box_coder=self.box_coder,
            settings=self.loss_settings,
            normalizer_fn=self._ema_normalizer if self.loss_normalizer == "ema" else None,
            return_details=return_details,
        )

    def _ema_normalizer(self, num_pos: Tensor, num_neg: Tensor) -> Tensor:
        """Detectron2 RetinaNet's normaliser (EMA of max(num_pos, 1), momentum 0.9), kept as a tensor."""
        value = 0.9 * self.loss_normalizer_ema + 0.1 * num_pos.clamp(min=1)
        self.loss_normalizer_ema.copy_(value)
        return value

    # ------------------------------------------------------------------ inference
    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ) -> List[Instances]:
        logits, deltas = predictions[0], predictions[1]
        logits, deltas = self._transpose_dense_predictions([logits, deltas], [self.num_classes, 4])
        shapes = [(f.shape[-2], f.shape[-1]) for f in features]
        if torch.jit.is_scripting():  # PointPriors (cached) and TBLRBoxCoder are plain Python objects
            level_priors = point_prior_grid(shapes, self.strides, self.prior_offset, self.device)
            normalizer = self.box_normalizer
        else:
            level_priors = self.priors.level_priors(shapes, self.device)
            normalizer = self.box_coder.normalizer
        scores, locations, classes, valid = multi_level_candidates(
            logits, self.test_score_thresh, self.test_topk_candidates, self.test_topk_rule
        )
        boxes = tblr_decode(
            gather_rows(torch.cat(deltas, dim=1), locations).float(), torch.cat(level_priors)[locations], normalizer
        )
        # built on the host and sent without waiting (no sync): the clip limits of every image
        image_sizes = torch.tensor([[h, w] for h, w in images.image_sizes]).to(boxes.device, non_blocking=True)
        boxes = clip_boxes(boxes, image_sizes)
        valid = valid & usable_boxes(boxes, self.test_min_box_size)
        if self.anchor_based is not None:
            ab = self.anchor_based.candidates(
                features, predictions[2], predictions[3], image_sizes, self.test_min_box_size
            )
            boxes, scores = torch.cat([ab[0], boxes], 1), torch.cat([ab[1], scores], 1)
            classes, valid = torch.cat([ab[2], classes], 1), torch.cat([ab[3], valid], 1)
        per_image = detections_per_image(
            boxes, scores, classes, valid, self.test_nms_thresh, self.max_detections_per_image
        )
        results: List[Instances] = []
        for (b, s, c), image_size in zip(per_image, images.image_sizes):
            result = Instances(image_size)
            result.pred_boxes = Boxes(b)
            result.scores = s
            result.pred_classes = c
            results.append(result)
        return results
