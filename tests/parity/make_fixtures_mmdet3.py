"""Generate the mmdetection 3.3.0 detection fixtures used by ``tests/parity/test_mmdet3_detections.py``.

Why a second reference version: mmdetection >= 3.0 drops, at test time, the boxes that are not wider
*and* taller than the test config's ``min_bbox_size`` (0 for FSAF) **before** NMS
(``BaseDenseHead._bbox_post_process``), so zero-width / zero-height boxes (both distances of an axis 0
after the ReLU, or boxes clipped to a strip at an image border) take none of the ``max_per_img`` places.
mmdet 2.28.2 (``make_fixtures.py``) keeps them. fsaf_d2 follows 3.x by default
(``MODEL.FSAF.MIN_BOX_SIZE_TEST 0``) and 2.x with a negative value.

This script runs **mmdetection 3.3.0's own FSAFHead** (the ground truth) and must be run in a separate
scratch environment, never in the fsaf_d2 environment (fsaf_d2 does not depend on mmdet)::

    python3.11 -m venv /tmp/mmdet3_env
    /tmp/mmdet3_env/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/mmdet3_env/bin/pip install mmengine==0.10.7 mmcv-lite==2.1.0 mmdet==3.3.0
    /tmp/mmdet3_env/bin/python tests/parity/make_fixtures_mmdet3.py   # writes tests/parity/fixtures/

(pip resolves mmdet's pure-Python dependencies itself: matplotlib, pycocotools, scipy, shapely, six,
terminaltables, tqdm; mmengine brings opencv-python, rich, yapf, addict; numpy 2.x works.)

``mmcv-lite`` is mmcv 2.x without compiled ops, so ``mmcv.ops`` (which mmdet imports) cannot load
``mmcv._ext``. The stand-in module of ``make_fixtures.py`` (:func:`make_fixtures.install_mmcv_ext_shim`)
is registered first: every op raises ``NotImplementedError`` except ``nms``, a plain-PyTorch
transcription of mmcv's CPU NMS, checked against ``torchvision.ops.nms`` here too. Test-time FSAF needs no
other compiled op (priors, TBLR decoding, clipping and the size filter are plain PyTorch; mmcv's
``batched_nms`` wraps ``nms``).

Only the head is built, from mmdet 3.3.0's own released ``configs/fsaf/fsaf_r50_fpn_1x_coco.py`` (shipped
in the wheel under ``mmdet/.mim/configs/``), shrunk like the 2.28.2 fixture (10 classes, 64 channels), with
its ``test_cfg`` unchanged (nms_pre 1000, min_bbox_size 0, score_thr 0.05, nms iou 0.5, max_per_img 100).
Its weights do not matter: ``predict_by_feat(cls_scores, bbox_preds, batch_img_metas=..., rescale=False)``
is called on head outputs, which are

* the raw head outputs of every case of the 2.28.2 fixture (``fixtures/mmdet_fsaf_r18.pt.xz``), unchanged;
* new cases made from them that produce many empty boxes (see :func:`new_cases`): regression outputs set to
  exactly 0 on both sides of an axis, boxes of locations outside the image (batch padding) that clipping
  squeezes to a strip at the border, and empty boxes given the highest scores, so that without the filter
  they would take most (or all) of the 100 places.

Every case is run twice: with the released test_cfg (``detections``, mmdet 3.x's rule) and with
``min_bbox_size=-1`` (``detections_no_filter``, the 2.x rule: mmdet 3.3.0 then runs no size filter), and
both again with a second test setting (``score_thr`` 0.3, ``nms_pre`` 50: ``detections_alt`` /
``detections_alt_no_filter``). The script checks that the no-filter result of every copied case equals
the 2.28.2 fixture's detections exactly, that the filtered results hold no empty box, that the non-empty
no-filter detections are the leading detections of the filtered result, and that every new case has at
least MIN_EMPTY_NEW_CASE empty boxes in its no-filter result and a different result under the two rules.

The fixture is a ``torch.save`` dict compressed with ``lzma`` (``*.pt.xz``), loadable with
``torch.load(weights_only=True)`` (``mmdet_fixture.load_fixture``).
"""
import argparse
import copy
import datetime
import hashlib
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_fixtures import (  # noqa: E402  (the 2.28.2 generator: constants and the mmcv._ext shim)
    ALT_TEST_CFG,
    FPN_CHANNELS,
    NUM_CLASSES,
    PIXEL_MEAN,
    PIXEL_STD,
    TEST_CFG,
    check_shim_nms,
    start_run,
    write_fixture,
)
from make_fixtures import versions as versions_2x  # noqa: E402
from mmdet_fixture import FIXTURE as SOURCE_FIXTURE  # noqa: E402
from mmdet_fixture import load_fixture  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "fixtures", "mmdet3_fsaf_detections.pt.xz")
STRIDES = [8, 16, 32, 64, 128]
MIN_EMPTY_NEW_CASE = 20  # empty boxes a new case must have in its no-filter detections (summed over images)
# regression channels (mmdet's TBLR order)
T, B, L, R = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------- head
def build_mmdet3_head(num_classes=NUM_CLASSES, channels=FPN_CHANNELS):
    import mmdet
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    cfg_path = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "fsaf", "fsaf_r50_fpn_1x_coco.py")
    cfg = Config.fromfile(cfg_path)
    head_cfg = copy.deepcopy(cfg.model.bbox_head)
    head_cfg.update(num_classes=num_classes, in_channels=channels, feat_channels=channels,
                    train_cfg=cfg.model.train_cfg, test_cfg=cfg.model.test_cfg)
    head = MODELS.build(head_cfg)
    head.eval()
    t = head.test_cfg
    released = dict(score_thr=t.score_thr, nms_pre=t.nms_pre, nms_iou=t.nms.iou_threshold, max_per_img=t.max_per_img)
    assert released == TEST_CFG and t.min_bbox_size == 0 and t.nms.type == "nms", t
    assert head.prior_generator.strides == [(s, s) for s in STRIDES]
    return head, cfg, head_cfg


def test_cfgs(head):
    """{name: mmdet test cfg}: the released one, the 2.x rule (no filter), and the same for the second setting."""
    from mmengine.config import ConfigDict

    released = ConfigDict(copy.deepcopy(head.test_cfg.to_dict()))
    alt = ConfigDict(copy.deepcopy(head.test_cfg.to_dict()))
    alt.update(score_thr=ALT_TEST_CFG["score_thr"], nms_pre=ALT_TEST_CFG["nms_pre"],
               max_per_img=ALT_TEST_CFG["max_per_img"])
    alt.nms.iou_threshold = ALT_TEST_CFG["nms_iou"]
    out = {}
    for name, c in (("detections", released), ("detections_alt", alt)):
        out[name] = c
        nf = copy.deepcopy(c)
        nf.min_bbox_size = -1  # `cfg.get('min_bbox_size', -1) >= 0` is false: no size filter
        out[name + "_no_filter"] = nf
    return out


def img_metas(image_sizes, batch_shape):
    return [dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=tuple(batch_shape),
                 batch_input_shape=tuple(batch_shape), scale_factor=(1.0, 1.0)) for h, w in image_sizes]


# ---------------------------------------------------------------------------------------------- cases
def copied_case(src):
    return dict(
        name=src["name"], derived_from=src["name"],
        description="2.28.2 fixture case, head outputs unchanged: " + src["description"],
        image_sizes=[list(s) for s in src["image_sizes"]], batch_shape=list(src["batch"].shape[-2:]),
        cls_logits=[c.clone() for c in src["cls_logits"]], bbox_reg=[r.clone() for r in src["bbox_reg"]],
    )


def _centres(h, w, stride):
    ys = torch.arange(h, dtype=torch.float32) * stride
    xs = torch.arange(w, dtype=torch.float32) * stride
    return ys[:, None].expand(h, w), xs[None, :].expand(h, w)


def new_cases(src_cases, gen):
    """Cases built from the 2.28.2 head outputs so that many boxes are empty (exact zeros: no rounding
    decides whether a box is empty)."""
    cases = []

    # 1. zero extent: both distances of an axis exactly 0 at many locations (every level)
    c = copied_case(src_cases["large_image"])
    c.update(name="zero_extent", description=(
        "large_image's head outputs (192x256, >1000 pairs above 0.05 on P3) with the regression set to exactly "
        "0 on both sides of an axis at random locations of every level: l = r = 0 (zero width) at 25 %, "
        "t = b = 0 (zero height) at 15 %, all four 0 (a point) at 5 %"))
    for reg in c["bbox_reg"]:
        u = torch.rand(reg.shape[0], *reg.shape[2:], generator=gen)
        zero_w, zero_h, point = u < 0.25, (u >= 0.25) & (u < 0.40), (u >= 0.40) & (u < 0.45)
        for ch, m in ((L, zero_w | point), (R, zero_w | point), (T, zero_h | point), (B, zero_h | point)):
            reg[:, ch][m] = 0.0
    cases.append(c)

    # 2. boxes clipped at a border: locations outside the image (its share of the batch padding) whose box
    #    lies wholly outside it, squeezed to a strip on the right / bottom border; the first column / row
    #    of locations with the box wholly left of / above the image, a strip on the left / top border
    c = copied_case(src_cases["one_image_empty"])
    c.update(name="border_clipped", description=(
        "one_image_empty's head outputs (117x128 and 50x90 in a 128x128 batch): locations right of / below "
        "the image get l = 0 / t = 0 (the box lies wholly outside and clipping makes it a zero-width / "
        "zero-height strip on the right / bottom border), locations of the first column / row get r = 0 / "
        "b = 0 (a strip on the left / top border); the logits of those locations are raised by 1"))
    for k, (h_img, w_img) in enumerate(c["image_sizes"]):
        for reg, logit, stride in zip(c["bbox_reg"], c["cls_logits"], STRIDES):
            cy, cx = _centres(reg.shape[2], reg.shape[3], stride)
            right, below = cx >= w_img, cy >= h_img
            left_col, top_row = (cx == 0) & ~below, (cy == 0) & ~right
            reg[k, L][right] = 0.0
            reg[k, T][below] = 0.0
            reg[k, R][left_col] = 0.0
            reg[k, B][top_row] = 0.0
            touched = right | below | left_col | top_row
            logit[k][:, touched] += 1.0
    cases.append(c)

    # 3. empty boxes with the highest scores: without the filter they take most (image 0) or all (image 1)
    #    of the 100 places
    c = copied_case(src_cases["batch2_mixed"])
    c.update(name="empty_top_scores", description=(
        "batch2_mixed's head outputs (96x128 and 128x96 in a 128x128 batch): 60 (image 0) and 120 (image 1) "
        "locations inside the image on P3 / P4 get l = r = 0 or t = b = 0 and one class's logit raised above "
        "every other logit of the image (distinct values), so that the 2.x rule gives 60 and 100 empty "
        "detections of 100"))
    for k, n_empty in ((0, 60), (1, 120)):
        h_img, w_img = c["image_sizes"][k]
        top = max(lg[k].max().item() for lg in c["cls_logits"])
        slots = []  # (level, y, x) of interior locations of P3 and P4
        for lvl in (0, 1):
            reg = c["bbox_reg"][lvl]
            cy, cx = _centres(reg.shape[2], reg.shape[3], STRIDES[lvl])
            inside = (cx > 0) & (cx < w_img) & (cy > 0) & (cy < h_img)
            slots += [(lvl, int(y), int(x)) for y, x in torch.nonzero(inside).tolist()]
        pick = torch.randperm(len(slots), generator=gen)[:n_empty].tolist()
        boosts = top + 1.0 + torch.randperm(n_empty, generator=gen).float() * (2.0 / n_empty)  # distinct
        classes = torch.randint(0, NUM_CLASSES, (n_empty,), generator=gen)
        for j, p in enumerate(pick):
            lvl, y, x = slots[p]
            reg = c["bbox_reg"][lvl]
            if j % 2 == 0:
                reg[k, L, y, x] = reg[k, R, y, x] = 0.0
            else:
                reg[k, T, y, x] = reg[k, B, y, x] = 0.0
            c["cls_logits"][lvl][k, classes[j], y, x] = boosts[j]
    cases.append(c)
    return cases


# ---------------------------------------------------------------------------------------------- run
def _dets(results):
    return [dict(boxes=r.bboxes.detach().clone().float(), scores=r.scores.detach().clone().float(),
                 labels=r.labels.detach().clone().long()) for r in results]


def empty_mask(boxes):
    return (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])


@torch.no_grad()
def run_case(head, cfgs, case):
    metas = img_metas(case["image_sizes"], case["batch_shape"])
    out = dict(case)
    for name, cfg in cfgs.items():
        out[name] = _dets(head.predict_by_feat(
            list(case["cls_logits"]), list(case["bbox_reg"]), batch_img_metas=metas, cfg=cfg, rescale=False))
    # the default call (cfg=None: the head's own test_cfg) is the "detections" entry
    default = _dets(head.predict_by_feat(list(case["cls_logits"]), list(case["bbox_reg"]),
                                         batch_img_metas=metas, rescale=False))
    for a, b in zip(default, out["detections"]):
        assert all(torch.equal(a[k], b[k]) for k in a), "cfg=None differs from the released test_cfg"
    out["num_empty_no_filter"] = [int(empty_mask(d["boxes"]).sum()) for d in out["detections_no_filter"]]
    out["num_empty_alt_no_filter"] = [int(empty_mask(d["boxes"]).sum()) for d in out["detections_alt_no_filter"]]
    # pre-NMS candidates (decoded, clipped; no filter): check the shim's NMS against torchvision on them
    for cand in head.predict_by_feat(list(case["cls_logits"]), list(case["bbox_reg"]), batch_img_metas=metas,
                                     cfg=cfgs["detections_no_filter"], rescale=False, with_nms=False):
        check_shim_nms(cand.bboxes, cand.scores, cand.labels)
    return out


def check_case(out, src_cases, is_new):
    """The properties the fixture exists for; returns a one-line summary."""
    for filt, nofilt in (("detections", "detections_no_filter"), ("detections_alt", "detections_alt_no_filter")):
        for f, n in zip(out[filt], out[nofilt]):
            assert not empty_mask(f["boxes"]).any(), (out["name"], filt, "an empty box survived the filter")
            keep = ~empty_mask(n["boxes"])
            k = int(keep.sum())
            # empty boxes neither suppress nor are suppressed (IoU 0 or 0/0), so the non-empty no-filter
            # detections are the filtered result's leading ones
            assert len(f["scores"]) >= k
            for key in ("boxes", "scores", "labels"):
                assert torch.equal(n[key][keep], f[key][:k]), (out["name"], filt, key)
    if out["derived_from"] == out["name"]:
        src = src_cases[out["name"]]
        for mine, ref_name in (("detections_no_filter", "detections"), ("detections_alt_no_filter", "detections_alt")):
            for a, b in zip(out[mine], src[ref_name]):
                assert all(torch.equal(a[k], b[k]) for k in a), (out["name"], mine, "differs from mmdet 2.28.2")
    differs = [len(f["scores"]) != len(n["scores"]) or not torch.equal(f["boxes"], n["boxes"])
               for f, n in zip(out["detections"], out["detections_no_filter"])]
    if is_new:
        assert sum(out["num_empty_no_filter"]) >= MIN_EMPTY_NEW_CASE, (out["name"], out["num_empty_no_filter"])
        assert all(differs), (out["name"], "the two rules give the same detections")
    return (f"{out['name']}: sizes {out['image_sizes']}; detections per image (3.x rule / 2.x rule, of which empty): "
            + ", ".join(f"{len(f['scores'])} / {len(n['scores'])} ({e})" for f, n, e in
                        zip(out["detections"], out["detections_no_filter"], out["num_empty_no_filter"]))
            + "; second setting: "
            + ", ".join(f"{len(f['scores'])} / {len(n['scores'])} ({e})" for f, n, e in
                        zip(out["detections_alt"], out["detections_alt_no_filter"], out["num_empty_alt_no_filter"])))


def versions():
    """make_fixtures.versions() (mmdet, mmcv, torch, torchvision, numpy, python) plus mmengine."""
    import mmengine

    return dict(
        versions_2x(), mmengine=str(mmengine.__version__),
        mmcv_ops="none (mmcv-lite 2.x); mmcv._ext shim with a PyTorch NMS (tests/parity/make_fixtures.py)",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)

    gen = start_run(args.seed)

    head, cfg, head_cfg = build_mmdet3_head()
    cfgs = test_cfgs(head)
    src = load_fixture(SOURCE_FIXTURE)
    assert src["versions"]["mmdet"] == "2.28.2", src["versions"]
    src_cases = {c["name"]: c for c in src["cases"]}
    cases = [copied_case(c) for c in src["cases"]] + new_cases(src_cases, gen)
    n_copied = len(src["cases"])

    outs = []
    for i, case in enumerate(cases):
        out = run_case(head, cfgs, case)
        print(check_case(out, src_cases, is_new=i >= n_copied))
        outs.append(out)

    with open(SOURCE_FIXTURE, "rb") as f:
        src_sha = hashlib.sha256(f.read()).hexdigest()
    fixture = dict(
        format_version=1,
        generator="tests/parity/make_fixtures_mmdet3.py",
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        seed=args.seed,
        versions=versions(),
        ground_truth=("mmdetection 3.3.0 (real mmdet package: FSAFHead.predict_by_feat, "
                      "BaseDenseHead._bbox_post_process, TBLRBBoxCoder, mmcv batched_nms), not a reimplementation"),
        source_fixture=dict(path="tests/parity/fixtures/" + os.path.basename(SOURCE_FIXTURE), sha256=src_sha,
                            created=src["created"], mmdet=src["versions"]["mmdet"]),
        mmdet_config=cfg.pretty_text,
        mmdet_head_config=str(head_cfg.to_dict()),
        mmdet_test_cfgs={k: v.to_dict() for k, v in cfgs.items()},
        # the keys of the 2.28.2 fixture's "model" entry (test_mmdet_parity.fsaf_cfg reads them)
        model=dict(
            depth=src["model"]["depth"], num_classes=NUM_CLASSES, fpn_channels=FPN_CHANNELS,
            pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD, strides=STRIDES,
            test_cfg=dict(TEST_CFG, min_bbox_size=0), alt_test_cfg=dict(ALT_TEST_CFG, min_bbox_size=0),
            train_cfg=dict(src["model"]["train_cfg"]),
        ),
        min_empty_new_case=MIN_EMPTY_NEW_CASE,
        copied_cases=[c["name"] for c in src["cases"]],
        new_cases=[o["name"] for o in outs[n_copied:]],
        cases=outs,
    )
    write_fixture(fixture, args.out)


if __name__ == "__main__":
    main()
