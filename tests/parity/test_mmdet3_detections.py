"""fsaf_d2's detections against mmdetection 3.3.0's FSAF, on head outputs with many empty boxes.

mmdetection >= 3.0 drops the boxes that are not wider *and* taller than ``min_bbox_size`` (0 for FSAF)
before NMS, so empty (zero-width / zero-height) boxes take none of the 100 places; mmdet 2.x keeps them.
fsaf_d2's ``MODEL.FSAF.MIN_BOX_SIZE_TEST`` chooses (default 0.0: the 3.x rule; negative: no filter, 2.x).

The fixture (``fixtures/mmdet3_fsaf_detections.pt.xz``, written by ``make_fixtures_mmdet3.py`` in a scratch
environment with mmdet 3.3.0) holds per case the raw head outputs (cls logits, regression after ReLU, per
level), the image sizes and mmdet 3.3.0's ``predict_by_feat`` detections (``rescale=False``) under its
released test_cfg (``detections``) and with ``min_bbox_size=-1`` (``detections_no_filter``, the 2.x rule),
and the same for a second test setting (score 0.3, per-level top-k 50). The cases are the 2.28.2 fixture's
head outputs unchanged, and new ones made from them with many empty boxes (exact-zero regression on both
sides of an axis, boxes outside the image clipped to a border strip, empty boxes with the top scores).

The head outputs are fed straight to ``model.forward_inference`` (the weights do not matter), and the
detections are compared by the parity test's one rule (``test_mmdet_parity.DetectionMatch``: same class,
score within 1e-4, IoU >= 0.999 or every coordinate within 1e-3 px, the coordinate rule being the one
that matches zero-area boxes), with equal counts and every matched coordinate within 1e-3 px.

Run ``python tests/parity/test_mmdet3_detections.py`` for a table of the measured differences.
"""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # pytest does this; run as a script (main()) it is needed
if __name__ == "__main__":  # as a script: measure this checkout's fsaf_d2, not another installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from helpers import make_cfg  # noqa: E402
from mmdet_fixture import FIXTURE as FIXTURE_2X  # noqa: E402
from mmdet_fixture import FIXTURE_DIR, load_fixture  # noqa: E402
from test_mmdet_parity import (  # noqa: E402
    BOX_ATOL,
    SCORE_ATOL,
    alt_test_settings,
    assert_same_detections,
    compare_detections,
    fsaf_cfg,
)

FIXTURE = os.path.join(FIXTURE_DIR, "mmdet3_fsaf_detections.pt.xz")
KEY = "MODEL.FSAF.MIN_BOX_SIZE_TEST"
COPIED_CASES = ["batch2_mixed", "one_image_empty", "no_objects", "single_unaligned", "large_image"]
NEW_CASES = ["zero_extent", "border_clipped", "empty_top_scores"]
CASE_NAMES = COPIED_CASES + NEW_CASES
MIN_EMPTY_NEW_CASE = 20  # empty boxes in the 2.x-rule detections of every new case (over its images)
# (fixture entry under the 3.x rule, fixture entry under the 2.x rule, fsaf_d2 test settings)
SETTINGS = {
    "released": ("detections", "detections_no_filter"),
    "alt": ("detections_alt", "detections_alt_no_filter"),
}
RULES = {"filter": 0.0, "no_filter": -1.0}  # MODEL.FSAF.MIN_BOX_SIZE_TEST

pytestmark = pytest.mark.skipif(not os.path.isfile(FIXTURE), reason=f"mmdet 3.x fixture {FIXTURE} missing")


# ---------------------------------------------------------------------------------------------- helpers
def empty_mask(boxes):
    """Boxes (K, 4) XYXY that are not wider and taller than 0 (what mmdet 3.x drops with min_bbox_size 0)."""
    return (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])


def settings_overrides(fixture, setting):
    """fsaf_d2 test keys for the fixture's released (test_cfg) or second (alt_test_cfg) setting."""
    if setting == "released":
        return {}  # fsaf_cfg takes the released test_cfg from the fixture's "model" entry
    return alt_test_settings(fixture)


def build_model(fixture, setting, **overrides):
    """An fsaf_d2 model with the fixture's architecture and test settings; random weights (unused here)."""
    from detectron2.modeling import build_model as d2_build_model

    model = d2_build_model(fsaf_cfg(fixture, **settings_overrides(fixture, setting), **overrides))
    model.eval()
    return model


@torch.no_grad()
def fsaf_d2_detections(model, case):
    """``model.forward_inference`` on the case's head outputs; features only give the spatial sizes."""
    from detectron2.structures import ImageList

    n = len(case["image_sizes"])
    images = ImageList(torch.zeros((n, 3, *case["batch_shape"])), [tuple(s) for s in case["image_sizes"]])
    logits, deltas = list(case["cls_logits"]), list(case["bbox_reg"])
    return model.forward_inference(images, logits, [logits, deltas])


def rule_reports(fixture, setting, reference, **overrides):
    """{case: compare_detections report} of fsaf_d2 (``overrides`` applied) against ``case[reference]``."""
    model = build_model(fixture, setting, **overrides)
    thresh = model.test_score_thresh
    return {
        c["name"]: compare_detections(fsaf_d2_detections(model, c), c[reference], thresh, "dets")
        for c in fixture["cases"]
    }


def assert_detection_for_detection(r, context):
    """The shared rule (rounding-level ties only) plus equal counts and coordinates within BOX_ATOL."""
    assert_same_detections(r, "dets", context)
    assert r["dets: counts equal"], (context, r)
    assert r["dets: max box coordinate diff (px)"] <= BOX_ATOL, (context, r)
    assert r["dets: max score diff"] <= SCORE_ATOL, (context, r)


def require_key():
    """Fail with a clear message while fsaf_d2 has no MODEL.FSAF.MIN_BOX_SIZE_TEST."""
    cfg = make_cfg()
    if "MIN_BOX_SIZE_TEST" not in cfg.MODEL.FSAF:
        pytest.fail(f"{KEY} is not an fsaf_d2 config key (yet): the pre-NMS empty-box rule cannot be chosen")
    return cfg.MODEL.FSAF.MIN_BOX_SIZE_TEST


# ---------------------------------------------------------------------------------------------- pytest
@pytest.fixture(scope="module")
def fixture():
    return load_fixture(FIXTURE)


@pytest.fixture(scope="module")
def reports(fixture):
    """{(setting, rule): {case: report}}, built once per (setting, rule) on first use."""
    cache = {}

    def get(setting, rule):
        if (setting, rule) not in cache:
            filtered, no_filter = SETTINGS[setting]
            ref = filtered if rule == "filter" else no_filter
            cache[setting, rule] = rule_reports(fixture, setting, ref, **{KEY: RULES[rule]})
        return cache[setting, rule]

    return get


def test_default_is_the_mmdet3_rule():
    """fsaf_d2's default drops empty boxes before NMS (min_bbox_size 0, as mmdet 3.x's FSAF config)."""
    assert require_key() == 0.0
    assert make_cfg("configs/Base-FSAF.yaml").MODEL.FSAF.MIN_BOX_SIZE_TEST == 0.0


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", CASE_NAMES)
def test_detections_mmdet3_rule(reports, name, setting):
    """(a) MIN_BOX_SIZE_TEST 0 (the default): mmdet 3.3.0's detections, detection for detection."""
    require_key()
    assert_detection_for_detection(reports(setting, "filter")[name], (name, setting, "3.x rule"))


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", CASE_NAMES)
def test_detections_mmdet2_rule(reports, name, setting):
    """(b) MIN_BOX_SIZE_TEST -1: mmdet 3.3.0 with min_bbox_size -1 (= mmdet 2.x), empty boxes included."""
    require_key()
    assert_detection_for_detection(reports(setting, "no_filter")[name], (name, setting, "2.x rule"))


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("rule", list(RULES))
def test_the_other_rule_fails(fixture, rule, setting):
    """Each rule compared with the *other* rule's reference fails on every new case: the fixture tells the
    rules apart through the tie-tolerant matching (an empty box is no rounding-level tie)."""
    require_key()
    filtered, no_filter = SETTINGS[setting]
    wrong = rule_reports(fixture, setting, no_filter if rule == "filter" else filtered, **{KEY: RULES[rule]})
    for name in NEW_CASES:
        r = wrong[name]
        assert r["dets: unexplained"] > 0, (name, rule, setting, r)


def test_fixture_provenance(fixture):
    v = fixture["versions"]
    assert (v["mmdet"], v["mmcv"]) == ("3.3.0", "2.1.0"), v
    assert v["mmengine"].startswith("0."), v
    assert "not a reimplementation" in fixture["ground_truth"]
    assert fixture["generator"] == "tests/parity/make_fixtures_mmdet3.py"
    assert [c["name"] for c in fixture["cases"]] == CASE_NAMES
    t = fixture["model"]["test_cfg"]
    assert t == dict(score_thr=0.05, nms_pre=1000, nms_iou=0.5, max_per_img=100, min_bbox_size=0), t
    cfgs = fixture["mmdet_test_cfgs"]
    assert cfgs["detections"]["min_bbox_size"] == 0 and cfgs["detections_no_filter"]["min_bbox_size"] < 0
    assert cfgs["detections_alt"]["min_bbox_size"] == 0 and cfgs["detections_alt_no_filter"]["min_bbox_size"] < 0
    for c in fixture["cases"]:
        n = len(c["image_sizes"])
        assert all(x.dtype == torch.float32 and x.shape[0] == n for x in c["cls_logits"] + c["bbox_reg"])
        assert all((r >= 0).all() for r in c["bbox_reg"])  # after FSAF's ReLU


@pytest.mark.skipif(not os.path.isfile(FIXTURE_2X), reason=f"mmdet 2.28.2 fixture {FIXTURE_2X} missing")
def test_copied_cases_are_the_2x_fixture(fixture):
    """The copied cases hold the 2.28.2 fixture's head outputs, and mmdet 3.3.0 without the size filter gives
    exactly mmdet 2.28.2's detections on them (the two versions differ only by the filter)."""
    src = {c["name"]: c for c in load_fixture()["cases"]}  # the 2.28.2 fixture (shared cache with its test)
    for c in fixture["cases"]:
        if c["name"] not in COPIED_CASES:
            continue
        s = src[c["name"]]
        assert c["image_sizes"] == s["image_sizes"] and c["batch_shape"] == list(s["batch"].shape[-2:])
        assert all(torch.equal(a, b) for a, b in zip(c["cls_logits"] + c["bbox_reg"], s["cls_logits"] + s["bbox_reg"]))
        for mine, theirs in (("detections_no_filter", "detections"), ("detections_alt_no_filter", "detections_alt")):
            for a, b in zip(c[mine], s[theirs]):
                assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels")), (c["name"], mine)


def test_fixture_has_many_empty_boxes(fixture):
    """(c) The fixture keeps its point: many empty boxes under the 2.x rule, none under 3.x's, and results that
    differ between the rules (guards future regenerations)."""
    cases = {c["name"]: c for c in fixture["cases"]}
    for name, c in cases.items():
        for filtered, no_filter in SETTINGS.values():
            for k, (f, nf) in enumerate(zip(c[filtered], c[no_filter])):
                assert not empty_mask(f["boxes"]).any(), (name, filtered, k)
                # empty boxes neither suppress nor are suppressed: the non-empty 2.x-rule detections are the
                # leading 3.x-rule ones, the filter only frees places further down
                keep = ~empty_mask(nf["boxes"])
                m = int(keep.sum())
                assert len(f["scores"]) >= m, (name, filtered, k)
                for key in ("boxes", "scores", "labels"):
                    assert torch.equal(nf[key][keep], f[key][:m]), (name, filtered, k, key)
        empties = [int(empty_mask(d["boxes"]).sum()) for d in c["detections_no_filter"]]
        assert empties == c["num_empty_no_filter"], name
    for name in NEW_CASES:
        c = cases[name]
        assert sum(c["num_empty_no_filter"]) >= MIN_EMPTY_NEW_CASE, (name, c["num_empty_no_filter"])
        for f, nf in zip(c["detections"], c["detections_no_filter"]):
            # capped at 100 under both rules: the places of the empty boxes go to other detections
            assert len(f["scores"]) == len(nf["scores"]) == fixture["model"]["test_cfg"]["max_per_img"], name
            assert not torch.equal(f["boxes"], nf["boxes"]), name
        for f, nf in zip(c["detections_alt"], c["detections_alt_no_filter"]):
            assert len(f["scores"]) < len(nf["scores"]), name  # below the cap: fewer detections remain
    # the empty boxes with the top scores: under the 2.x rule the first 60 places of image 0 and all 100 of
    # image 1 are empty boxes
    top = cases["empty_top_scores"]["detections_no_filter"]
    assert empty_mask(top[0]["boxes"][:60]).all() and empty_mask(top[1]["boxes"]).all()
    # the kinds of empty box: zero width, zero height, at each border of an image
    seen = dict(zero_width=False, zero_height=False, left=False, right=False, top=False, bottom=False)
    for c in cases.values():
        for (h, w), d in zip(c["image_sizes"], c["detections_no_filter"]):
            b = d["boxes"][empty_mask(d["boxes"])]
            seen["zero_width"] |= bool((b[:, 2] == b[:, 0]).any())
            seen["zero_height"] |= bool((b[:, 3] == b[:, 1]).any())
            seen["left"] |= bool((b[:, 2] == 0).any())
            seen["top"] |= bool((b[:, 3] == 0).any())
            seen["right"] |= bool((b[:, 0] == w).any())
            seen["bottom"] |= bool((b[:, 1] == h).any())
    assert all(seen.values()), seen


# ---------------------------------------------------------------------------------------------- report
def main():
    """Table of the measured differences. Without the config key (fsaf_d2 before it), fsaf_d2 as it is runs
    no filter before NMS: it is compared with the 2.x-rule detections, in full and with the empty boxes
    dropped on both sides after NMS (Detectron2's ``detector_postprocess``, the model's own output)."""
    from detectron2.modeling.postprocessing import detector_postprocess

    fx = load_fixture(FIXTURE)
    print(f"fixture {FIXTURE} ({os.path.getsize(FIXTURE) / 1e6:.2f} MB), made with {fx['versions']}")
    has_key = "MIN_BOX_SIZE_TEST" in make_cfg().MODEL.FSAF
    rows = {}
    for setting, (filtered, no_filter) in SETTINGS.items():
        if has_key:
            for rule, ref in (("filter", filtered), ("no_filter", no_filter)):
                rows[f"{setting}, {KEY} {RULES[rule]} vs {ref}"] = rule_reports(fx, setting, ref, **{KEY: RULES[rule]})
            continue
        model = build_model(fx, setting)
        full, post = {}, {}
        for c in fx["cases"]:
            dets = fsaf_d2_detections(model, c)
            full[c["name"]] = compare_detections(dets, c[no_filter], model.test_score_thresh, "dets")
            kept = [detector_postprocess(d, *d.image_size) for d in dets]
            ref = [{k: v[~empty_mask(r["boxes"])] for k, v in r.items()} for r in c[no_filter]]
            post[c["name"]] = compare_detections(kept, ref, model.test_score_thresh, "dets")
        rows[f"{setting}, fsaf_d2 as is (no key) vs {no_filter}"] = full
        rows[f"{setting}, fsaf_d2 as is + detector_postprocess vs {no_filter} without empty boxes"] = post
    names = [c["name"] for c in fx["cases"]]
    counts = {n: c["num_empty_no_filter"] for n, c in zip(names, fx["cases"])}
    print("| quantity | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    print("| empty boxes among the 2.x-rule detections (per image) | "
          + " | ".join("/".join(map(str, counts[n])) for n in names) + " |")
    for title, per_case in rows.items():
        print(f"| **{title}** |" + " |" * len(names))
        for k in next(iter(per_case.values())):
            vals = [per_case[n][k] for n in names]
            print(f"| {k[len('dets: '):]} | " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in vals) + " |")


if __name__ == "__main__":
    main()
