"""Generate the mmdetection FSAF parity fixtures used by ``tests/parity/test_mmdet_parity.py``.

This script runs **mmdetection's own FSAF** (the ground truth, mmdet 2.28.2) and must be run in a
separate scratch environment, never in the fsaf_d2 environment (fsaf_d2 does not depend on mmdet)::

    python3.11 -m venv /tmp/mmdet_env
    /tmp/mmdet_env/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/mmdet_env/bin/pip install "setuptools<81" wheel
    MMCV_WITH_OPS=0 /tmp/mmdet_env/bin/pip install --no-build-isolation mmcv==1.7.2
    /tmp/mmdet_env/bin/pip install --no-build-isolation mmdet==2.28.2
    /tmp/mmdet_env/bin/python tests/parity/make_fixtures.py            # writes tests/parity/fixtures/

``mmcv`` 1.7.2 is installed without its compiled ops (mmcv-full has no wheel for torch 2.14).
:func:`install_mmcv_ext_shim` registers a stand-in ``mmcv._ext`` module before mmdet is imported: every
op raises ``NotImplementedError`` except ``nms``, which is a plain-PyTorch transcription of the semantics
of mmcv's CPU kernel (greedy, scores sorted descending, a box is suppressed when IoU > threshold, with
mmcv's ``offset`` convention). On the CPU, FSAF needs no other compiled op: mmdet's ``FocalLoss`` uses its
Python implementation for CPU tensors, and IoU, TBLR coding, the CenterRegion assigner and the anchor
generator are plain PyTorch.

The model is the released ``configs/fsaf/fsaf_r50_fpn_1x_coco.py`` config shipped in the mmdet wheel,
shrunk to a ResNet-18 backbone, 64 FPN / head channels and NUM_CLASSES classes, with random but
non-degenerate weights:

* conv weights are ``q * 2**e`` with small integers ``q`` (so they are stored exactly as int8 and the
  fixture stays small), scaled like Kaiming / Xavier initialisation;
* BN statistics are first estimated on the fixture images, then perturbed (so frozen BN is not the
  identity and not a perfect whitening), with random affine parameters;
* the classification biases are calibrated so that a sizeable fraction of the (location, class) scores
  pass the 0.05 test threshold (top-k 1000, NMS and the 100-detection cap are all exercised), and the
  regression biases so that most regression outputs are positive after the ReLU, with some exact zeros.

For every case it records: the normalised padded batch and the image sizes, the raw head outputs per
level, mmdet's per-level targets (labels, (M, C) label weights, box targets / weights, assigned gt
index), the unreduced per-element losses, the per-gt per-level selection costs and the selected level,
the final positive flags, the per-level loss sums and the normaliser, the pre-NMS candidates and the
final detections (``rescale=False``, i.e. in input-image coordinates).

The fixture is a ``torch.save`` dict compressed with ``lzma`` (``*.pt.xz``); see ``fixtures.py`` for the
loader used by the tests.
"""
import argparse
import datetime
import io
import lzma
import math
import os
import platform
import sys
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "fixtures", "mmdet_fsaf_r18.pt.xz")

NUM_CLASSES = 10
FPN_CHANNELS = 64
PIXEL_MEAN = [123.675, 116.28, 103.53]  # RGB, mmdet img_norm_cfg / docs/algorithm.md#reference-training-settings
PIXEL_STD = [58.395, 57.12, 57.375]
TEST_CFG = dict(score_thr=0.05, nms_pre=1000, nms_iou=0.5, max_per_img=100)  # released config
ALT_TEST_CFG = dict(score_thr=0.3, nms_pre=50, nms_iou=0.5, max_per_img=100)
ALT_TEST_CFG_MMDET = dict(
    nms_pre=ALT_TEST_CFG["nms_pre"], min_bbox_size=0, score_thr=ALT_TEST_CFG["score_thr"],
    nms=dict(type="nms", iou_threshold=ALT_TEST_CFG["nms_iou"]), max_per_img=ALT_TEST_CFG["max_per_img"],
)


# ---------------------------------------------------------------------------------------------- mmcv shim
def _nms_like_mmcv_cpu(boxes, scores, iou_threshold, offset=0):
    """Greedy NMS with the semantics of mmcv's CPU kernel (our own transcription in PyTorch).

    Scores sorted descending (``torch.sort``), areas ``(x2 - x1 + offset) * (y2 - y1 + offset)``,
    box j suppressed by a kept box i when ``inter / (area_i + area_j - inter) > iou_threshold``.
    Returns the kept indices in descending score order.
    """
    if boxes.numel() == 0:
        return boxes.new_zeros((0,), dtype=torch.long)
    boxes = boxes.float()
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1 + offset) * (y2 - y1 + offset)
    order = scores.sort(0, descending=True)[1]
    keep_mask = torch.ones(len(order), dtype=torch.bool)
    thr = torch.tensor(iou_threshold, dtype=torch.float32)
    for a in range(len(order)):
        if not keep_mask[a]:
            continue
        i = order[a]
        rest = order[a + 1:]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + offset).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + offset).clamp(min=0)
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        keep_mask[a + 1:] &= ~(ovr > thr)
    return order[keep_mask]


def install_mmcv_ext_shim():
    """Register a stand-in ``mmcv._ext`` (mmcv-lite has no compiled ops); only ``nms`` works."""
    if "mmcv._ext" in sys.modules:
        return
    mod = types.ModuleType("mmcv._ext")
    mod.__doc__ = "fsaf_d2 parity shim: compiled mmcv ops are not available; only nms is provided."

    def nms(boxes, scores, iou_threshold, offset=0, **_):
        return _nms_like_mmcv_cpu(boxes, scores, float(iou_threshold), int(offset))

    mod.nms = nms

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def _missing(*args, **kwargs):
            raise NotImplementedError(f"mmcv op {name!r} is not available in the parity shim")

        return _missing

    mod.__getattr__ = __getattr__
    sys.modules["mmcv._ext"] = mod


def check_shim_nms(boxes, scores, labels, iou_threshold=0.5):
    """The shim's NMS keeps what ``torchvision.ops.nms`` keeps on these (class-offset) candidates."""
    import torchvision

    if len(boxes):
        offs = labels.to(boxes) * (boxes.max() + 1)
        ref = torchvision.ops.nms(boxes + offs[:, None], scores, iou_threshold)
        mine = _nms_like_mmcv_cpu(boxes + offs[:, None], scores, iou_threshold)
        assert torch.equal(ref, mine), "shim NMS differs from torchvision.ops.nms"


# ---------------------------------------------------------------------------------------------- run
def start_run(seed):
    """Seeded, single-threaded (deterministic CPU reductions), the mmcv._ext shim installed, warnings off;
    returns the generator of the random data."""
    import warnings

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    install_mmcv_ext_shim()
    warnings.filterwarnings("ignore")
    return torch.Generator().manual_seed(seed)


def write_fixture(fixture, path):
    """``torch.save`` the fixture dict into ``path``, compressed with lzma (``*.pt.xz``)."""
    buf = io.BytesIO()
    torch.save(fixture, buf)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    print(f"wrote {path}: {os.path.getsize(path) / 1e6:.2f} MB (uncompressed {len(buf.getvalue()) / 1e6:.2f} MB)")


# ---------------------------------------------------------------------------------------------- model
def build_mmdet_fsaf(num_classes=NUM_CLASSES, fpn_channels=FPN_CHANNELS):
    import mmdet
    from mmcv import Config
    from mmdet.models import build_detector

    cfg_path = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "fsaf", "fsaf_r50_fpn_1x_coco.py")
    cfg = Config.fromfile(cfg_path)
    m = cfg.model
    m.backbone.depth = 18
    m.backbone.init_cfg = None
    m.neck.in_channels = [64, 128, 256, 512]
    m.neck.out_channels = fpn_channels
    m.bbox_head.num_classes = num_classes
    m.bbox_head.in_channels = fpn_channels
    m.bbox_head.feat_channels = fpn_channels
    model = build_detector(m)
    model.eval()
    return model, cfg


def _quantised(shape, std, gen):
    """Random weight q * 2**e (q small integers, int8) with roughly the given std."""
    q = torch.round(torch.randn(shape, generator=gen) * 1.5).clamp_(-7, 7).to(torch.int8)
    e = int(round(math.log2(std / 1.5)))
    return q, e


def dequantise(q, e):
    return q.to(torch.float32) * (2.0 ** e)


@torch.no_grad()
def randomise_weights(model, images_for_bn, gen):
    """Random non-degenerate weights; returns the quantised encoding of every conv weight."""
    import torch.nn as nn

    quant = {}
    sd_names = {id(p): n for n, p in model.named_parameters()}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            fan_in = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            fan_out = mod.out_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            if name.startswith("neck."):
                std = math.sqrt(2.0 / (fan_in + fan_out)) * 1.5
            elif name.endswith("retina_reg"):
                std = 0.3 / math.sqrt(fan_in)
            elif name.endswith("retina_cls"):
                std = 1.5 / math.sqrt(fan_in)
            else:
                std = math.sqrt(2.0 / fan_in)
            q, e = _quantised(tuple(mod.weight.shape), std, gen)
            mod.weight.copy_(dequantise(q, e))
            quant[sd_names[id(mod.weight)]] = (q, e)
            if mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)

    # BN: estimate the statistics on the fixture images (cumulative average), then perturb them
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.weight.fill_(1.0)
        bn.bias.zero_()
    frozen = model.backbone.frozen_stages
    model.backbone.norm_eval, model.backbone.frozen_stages = False, -1
    model.backbone.train()
    assert all(bn.training for bn in bns)
    for x in images_for_bn:
        model.backbone(x)
    model.backbone.norm_eval, model.backbone.frozen_stages = True, frozen
    model.eval()
    for bn in bns:
        c = bn.num_features
        std = bn.running_var.clamp(min=1e-4).sqrt()
        bn.running_mean.add_(0.2 * std * torch.randn(c, generator=gen))
        bn.running_var.mul_(torch.empty(c).uniform_(0.6, 1.6, generator=gen))
        bn.weight.copy_(torch.empty(c).uniform_(0.6, 1.4, generator=gen))
        bn.bias.copy_(0.2 * torch.randn(c, generator=gen))
        bn.momentum = 0.1
        bn.num_batches_tracked.fill_(1000)

    # calibrate the output convs on the first batch: logit spread ~2 (power-of-two weight rescale),
    # then the biases
    head = model.bbox_head
    feats = model.extract_feat(images_for_bn[0])
    head.retina_cls.bias.zero_()
    head.retina_reg.bias.zero_()
    for conv_name, target_std in (("retina_cls", 2.0), ("retina_reg", 0.25)):
        conv = getattr(head, conv_name)
        cls, reg_pre = _head_raw(head, feats)
        out = cls if conv_name == "retina_cls" else reg_pre
        measured = torch.cat([o.flatten() for o in out]).std().item()
        shift = int(round(math.log2(target_std / measured)))
        key = f"bbox_head.{conv_name}.weight"
        q, e = quant[key]
        quant[key] = (q, e + shift)
        conv.weight.copy_(dequantise(q, e + shift))
    cls, reg_pre = _head_raw(head, feats)
    logits = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, c.shape[1]) for c in cls])  # (sum M, C)
    # per-class target fraction of (location, class) scores above the test threshold 0.05
    frac = torch.empty(logits.shape[1]).uniform_(0.15, 0.7, generator=gen)
    thr_logit = math.log(0.05 / 0.95)
    q = torch.stack([torch.quantile(logits[:, c], 1 - frac[c].item()) for c in range(logits.shape[1])])
    head.retina_cls.bias.copy_(thr_logit - q)
    r = torch.cat([t.permute(0, 2, 3, 1).reshape(-1, 4) for t in reg_pre])
    # ~8 % of the regression outputs at or below zero (exercises the ReLU and the 1e-4 loss clamp)
    head.retina_reg.bias.copy_(-torch.quantile(r, 0.08, dim=0))
    return quant


def _head_raw(head, feats):
    """Head outputs with the regression *before* the FSAF ReLU (for calibration only)."""
    cls_out, reg_out = [], []
    for x in feats:
        c, r = x, x
        for conv in head.cls_convs:
            c = conv(c)
        for conv in head.reg_convs:
            r = conv(r)
        cls_out.append(head.retina_cls(c))
        reg_out.append(head.retina_reg(r))
    return cls_out, reg_out


# ---------------------------------------------------------------------------------------------- cases
def _make_image(h, w, boxes, gen):
    """Smooth random RGB image (uint8, CHW) with the boxes painted in random colours."""
    small = torch.rand((3, max(h // 16, 2), max(w // 16, 2)), generator=gen)
    img = torch.nn.functional.interpolate(small[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    img = img * 160 + 40 + torch.randn((3, h, w), generator=gen) * 12
    for b in boxes:
        x1, y1, x2, y2 = [int(round(v)) for v in b]
        colour = torch.rand(3, generator=gen) * 255
        img[:, max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = colour[:, None, None] * 0.8 + img[
            :, max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)
        ] * 0.2
    return img.round().clamp(0, 255).to(torch.uint8)


def make_cases(gen):
    """Synthetic batches (boxes in input-image pixels, x1 y1 x2 y2; labels 0..NUM_CLASSES-1)."""
    cases = []
    # two images of different sizes in one batch: (H, W) = (96, 128) and (128, 96)
    cases.append(dict(
        name="batch2_mixed",
        description=(
            "2 images (96x128, 128x96; batch padded to 128x128); overlapping same-class objects (class 1), "
            "overlapping different-class objects, a box with edges on the stride-8/16 grid, tiny objects "
            "(4x5, 6x6), a huge object covering the whole second image and objects at the borders"),
        sizes=[(96, 128), (128, 96)],
        boxes=[
            [[20.0, 20.0, 80.0, 70.0],     # class 1
             [30.5, 25.0, 90.0, 75.5],     # class 1, overlaps the previous (same-class override)
             [36.0, 30.0, 60.0, 58.0],     # class 3, inside both (different class, smaller wins)
             [16.0, 16.0, 48.0, 48.0],     # class 2, edges on the grid (strict centre test)
             [100.0, 10.0, 104.0, 15.0],   # class 5, tiny 4x5
             [61.0, 3.0, 67.0, 9.0],       # class 0, tiny 6x6
             [0.0, 60.0, 30.0, 96.0]],     # class 6, touches the left/bottom border
            [[0.0, 0.0, 96.0, 128.0],      # class 2, the whole image (huge)
             [10.0, 60.0, 50.0, 110.0],    # class 4, inside the huge box
             [60.0, 20.0, 72.0, 32.0],     # class 4, 12x12
             [58.0, 18.0, 75.0, 36.0],     # class 7, overlaps the previous one
             [80.0, 100.0, 95.5, 127.0]],  # class 9, at the right/bottom border
        ],
        labels=[[1, 1, 3, 2, 5, 0, 6], [2, 4, 4, 7, 9]],
    ))
    cases.append(dict(
        name="one_image_empty",
        description=(
            "2 images (117x128 with objects, 50x90 without any; sizes not multiples of 32, so each image's "
            "own 32-padding adds valid locations; batch padded to 128x128)"),
        sizes=[(117, 128), (50, 90)],
        boxes=[
            [[8.0, 8.0, 120.0, 112.0],     # class 8, almost the whole image
             [40.0, 44.0, 72.0, 84.0],     # class 8, same class inside it
             [90.0, 20.0, 126.0, 50.0]],   # class 3
            [],
        ],
        labels=[[8, 8, 3], []],
    ))
    cases.append(dict(
        name="no_objects",
        description="2 images (96x83, 64x128) without objects: negatives-only loss, normaliser fallback",
        sizes=[(96, 83), (64, 128)],
        boxes=[[], []],
        labels=[[], []],
    ))
    cases.append(dict(
        name="single_unaligned",
        description="1 image of 100x118 (padded to 128x128 as at test time with batch size 1), 3 objects",
        sizes=[(100, 118)],
        boxes=[[[5.0, 50.0, 45.0, 98.0],     # class 0
                [50.0, 10.0, 110.0, 60.0],   # class 5
                [70.0, 30.0, 82.0, 44.0]]],  # class 5, inside the previous one (same class)
        labels=[[0, 5, 5]],
    ))
    cases.append(dict(
        name="large_image",
        description="1 image of 192x256 with a huge object (candidates down to P7), a medium and a small one",
        sizes=[(192, 256)],
        boxes=[[[20.0, 10.0, 250.0, 190.0],   # class 6, candidates on P3..P7
                [150.0, 120.0, 220.0, 180.0], # class 1
                [30.0, 150.0, 40.0, 160.0]]], # class 2, 10x10
        labels=[[6, 1, 2]],
    ))
    for case in cases:
        case["images"] = [_make_image(h, w, b, gen) for (h, w), b in zip(case["sizes"], case["boxes"])]
    return cases


def batch_tensor(images):
    """Normalise each uint8 RGB image ((x - mean) / std, fp32) and zero-pad them into one batch.

    The batch is padded at the bottom/right to the largest size, rounded up to a multiple of 32.
    """
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    H = max(int(math.ceil(i.shape[1] / 32) * 32) for i in images)
    W = max(int(math.ceil(i.shape[2] / 32) * 32) for i in images)
    out = torch.zeros((len(images), 3, H, W))
    for k, img in enumerate(images):
        out[k, :, : img.shape[1], : img.shape[2]] = (img.float() - mean) / std
    return out


def img_metas_for(sizes, batch_shape):
    metas = []
    for h, w in sizes:
        ph, pw = int(math.ceil(h / 32) * 32), int(math.ceil(w / 32) * 32)
        metas.append(dict(
            img_shape=(h, w, 3), ori_shape=(h, w, 3), pad_shape=(ph, pw, 3),
            batch_input_shape=tuple(batch_shape), scale_factor=np.ones(4, dtype=np.float32), flip=False,
        ))
    return metas


# ---------------------------------------------------------------------------------------------- capture
def _clone(x):
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


@torch.no_grad()
def run_case(model, case):
    head = model.bbox_head
    img = batch_tensor(case["images"])
    metas = img_metas_for(case["sizes"], img.shape[-2:])
    gt_bboxes = [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in case["boxes"]]
    gt_labels = [torch.tensor(l, dtype=torch.long) for l in case["labels"]]

    feats = model.extract_feat(img)
    cls_scores, bbox_preds = head(feats)

    cap = {"loss_single": [], "collect": [], "reweight": []}
    orig = {n: getattr(head, n) for n in ("get_targets", "loss_single", "collect_loss_level_single", "reweight_loss_single")}

    def get_targets(*a, **k):
        r = orig["get_targets"](*a, **k)
        cap["targets"] = _clone(r)
        return r

    def loss_single(*a, **k):
        r = orig["loss_single"](*a, **k)
        cap["loss_single"].append(_clone(r))
        return r

    def collect(*a, **k):
        r = orig["collect_loss_level_single"](*a, **k)
        cap["collect"].append(_clone(r[0]))
        return r

    def reweight(*a, **k):
        cap["min_levels"] = _clone(k["min_levels"])
        r = orig["reweight_loss_single"](*a, **k)
        cap["reweight"].append(_clone(r))
        return r

    head.get_targets, head.loss_single = get_targets, loss_single
    head.collect_loss_level_single, head.reweight_loss_single = collect, reweight
    try:
        losses = head.loss(list(cls_scores), list(bbox_preds), gt_bboxes, gt_labels, metas)
    finally:
        for n, f in orig.items():
            setattr(head, n, f)
    # the public forward_train gives the same numbers (sanity check of the capture)
    losses_ft = model.forward_train(img, metas, gt_bboxes, gt_labels)
    for a, b in zip(losses["loss_cls"] + losses["loss_bbox"], losses_ft["loss_cls"] + losses_ft["loss_bbox"]):
        assert torch.equal(a, b), "forward_train differs from the captured head.loss"

    (labels_l, label_w_l, bbox_t_l, bbox_w_l, num_total_pos, num_total_neg, pos_gt_l) = cap["targets"]
    num_levels = len(cls_scores)
    cls_sums = torch.stack([r[0] for r in cap["reweight"]])
    reg_sums = torch.stack([r[1] for r in cap["reweight"]])
    pos_flags = [r[2] for r in cap["reweight"]]
    num_pos = torch.cat(pos_flags).sum().float()
    normalizer = num_pos if num_pos > 0 else num_pos + float(num_total_neg)
    assert torch.allclose(torch.stack(losses["loss_cls"]), cls_sums / normalizer, rtol=0, atol=0)
    n_gt = sum(len(l) for l in gt_labels)
    cost = torch.stack(cap["collect"]) if cap["collect"] else torch.zeros((num_levels, 0))
    selected = cap.get("min_levels", torch.zeros((0,), dtype=torch.long))

    N = img.shape[0]
    out = dict(
        name=case["name"],
        description=case["description"],
        image_sizes=[list(s) for s in case["sizes"]],
        images_uint8=case["images"],
        batch=img,
        gt_boxes=gt_bboxes,
        gt_labels=gt_labels,
        features=[f.clone() for f in feats],
        cls_logits=[c.clone() for c in cls_scores],
        bbox_reg=[r.clone() for r in bbox_preds],
        targets=dict(
            # per level, (N, h*w[, ...]) in the order (image, y, x): mmdet's images_to_levels layout
            labels=[t.to(torch.int16) for t in labels_l],
            label_weights=[t.to(torch.uint8) for t in label_w_l],
            bbox_targets=bbox_t_l,
            bbox_weights=[t.to(torch.uint8) for t in bbox_w_l],
            pos_gt_inds=[t.to(torch.int16) for t in pos_gt_l],  # 0-based index within the image, -1 = none
            num_total_pos=int(num_total_pos),
            num_total_neg=int(num_total_neg),
        ),
        elementwise=dict(
            # unreduced losses of mmdet's loss_single, rows = N*h*w (image-major), before re-weighting
            cls_loss=[ls[0] for ls in cap["loss_single"]],  # (N*h*w, C), label weights applied
            reg_loss=[ls[1] for ls in cap["loss_single"]],  # (N*h*w,), box weights applied
        ),
        selection=dict(
            cost=cost,            # (L, G): mean of (sum_c cls + reg) over the gt's candidates, 1e6 = none
            selected_level=selected,  # (G,) argmin over levels; gt order = image 0's gts, then image 1's
        ),
        final_pos_flags=[p.reshape(N, -1) for p in pos_flags],
        losses=dict(
            cls_sum=cls_sums, reg_sum=reg_sums, normalizer=torch.as_tensor(normalizer, dtype=torch.float32),
            num_pos=num_pos, loss_cls=torch.stack(losses["loss_cls"]), loss_bbox=torch.stack(losses["loss_bbox"]),
        ),
    )
    assert cost.shape == (num_levels, n_gt)

    # inference: rescale=False, boxes in input-image coordinates, clipped to each image's own size
    dets = head.get_bboxes(cls_scores, bbox_preds, img_metas=metas, rescale=False)
    cands = head.get_bboxes(cls_scores, bbox_preds, img_metas=metas, rescale=False, with_nms=False)
    out["detections"] = [dict(boxes=d[:, :4].clone(), scores=d[:, 4].clone(), labels=l.clone()) for d, l in dets]
    # a second test setting: higher threshold, small per-level top-k (fewer than max_per_img survive)
    from mmcv import ConfigDict

    alt_cfg = ConfigDict(ALT_TEST_CFG_MMDET)
    dets_alt = head.get_bboxes(cls_scores, bbox_preds, img_metas=metas, cfg=alt_cfg, rescale=False)
    out["detections_alt"] = [
        dict(boxes=d[:, :4].clone(), scores=d[:, 4].clone(), labels=l.clone()) for d, l in dets_alt
    ]
    out["candidates"] = [dict(boxes=c[0].clone(), scores=c[1].clone(), labels=c[2].clone()) for c in cands]
    # check the shim's NMS against torchvision on this case's candidates
    try:
        for b, s, l in cands:
            check_shim_nms(b, s, l)
    except ImportError:
        pass
    return out


def describe(case_out):
    """Human-readable statistics: which behaviours the case exercises."""
    t = case_out["targets"]
    lines = [f"case {case_out['name']}: sizes {case_out['image_sizes']}, batch {tuple(case_out['batch'].shape)}"]
    for l, (lab, lw, bw, pg) in enumerate(zip(t["labels"], t["label_weights"], t["bbox_weights"], t["pos_gt_inds"])):
        valid = lw.sum(-1) > 0
        pos = pg >= 0
        partial = (lw.sum(-1) > 0) & (lw.sum(-1) < lw.shape[-1])
        final = case_out["final_pos_flags"][l]
        lines.append(
            f"  P{l + 3}: priors {tuple(pg.shape)}, invalid(batch pad) {(~valid).sum().item()}, candidates {pos.sum().item()}, "
            f"final positives {final.sum().item()}, shadowed priors {partial.sum().item()}, "
            f"reg==0 {(case_out['bbox_reg'][l] == 0).sum().item()}")
    sel = case_out["selection"]
    lines.append(f"  selected levels (P3=0): {sel['selected_level'].tolist()}")
    lines.append(f"  costs:\n{sel['cost']}")
    L = case_out["losses"]
    lines.append(f"  cls sums {L['cls_sum'].tolist()}\n  reg sums {L['reg_sum'].tolist()}\n  normaliser {L['normalizer'].item()}")
    for k, d in enumerate(case_out["detections"]):
        c = case_out["candidates"][k]
        a = case_out["detections_alt"][k]
        per_level = [int(((lg[k].sigmoid() > 0.05).sum().item())) for lg in case_out["cls_logits"]]
        lines.append(
            f"  image {k}: pairs > 0.05 per level {per_level}, {len(c['scores'])} candidates, "
            f"{len(d['scores'])} detections (scores {d['scores'].min().item() if len(d['scores']) else float('nan'):.4f}"
            f"..{d['scores'].max().item() if len(d['scores']) else float('nan'):.4f}), alt setting: {len(a['scores'])} detections")
    return "\n".join(lines)


def versions():
    import mmcv
    import mmdet
    import torchvision

    return dict(
        mmdet=str(mmdet.__version__), mmcv=str(mmcv.__version__), torch=str(torch.__version__),
        torchvision=str(torchvision.__version__),
        numpy=str(np.__version__), python=platform.python_version(),
        mmcv_ops="none (mmcv lite, MMCV_WITH_OPS=0); mmcv._ext shim with a PyTorch NMS (tests/parity/make_fixtures.py)",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)

    gen = start_run(args.seed)

    model, cfg = build_mmdet_fsaf()
    cases = make_cases(gen)
    quant = randomise_weights(model, [batch_tensor(c["images"]) for c in cases], gen)

    sd = model.state_dict()
    state_q = {k: (q, e) for k, (q, e) in quant.items()}
    for k, (q, e) in state_q.items():
        assert torch.equal(sd[k], dequantise(q, e)), k
    state_f = {k: v.clone() for k, v in sd.items() if k not in state_q}

    outs = [run_case(model, c) for c in cases]
    for o in outs:
        print(describe(o))

    fixture = dict(
        format_version=1,
        generator="tests/parity/make_fixtures.py",
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        seed=args.seed,
        versions=versions(),
        ground_truth="mmdetection (real mmdet package, FSAFHead / CenterRegionAssigner / TBLRBBoxCoder), not a reimplementation",
        mmdet_config=cfg.pretty_text,
        model=dict(
            depth=18, num_classes=NUM_CLASSES, fpn_channels=FPN_CHANNELS, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD,
            strides=[8, 16, 32, 64, 128], test_cfg=TEST_CFG, alt_test_cfg=ALT_TEST_CFG,
            train_cfg=dict(pos_scale=0.2, neg_scale=0.2, min_pos_iof=0.01),
        ),
        # mmdet state dict = {**state_dict_float, **{k: q * 2**e for k, (q, e) in state_dict_quantised}}
        state_dict_quantised={k: dict(q=q, exp=e) for k, (q, e) in state_q.items()},
        state_dict_float=state_f,
        state_dict_keys=list(sd.keys()),
        cases=outs,
    )
    write_fixture(fixture, args.out)


if __name__ == "__main__":
    main()
