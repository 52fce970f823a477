"""MODEL.FSAF.MEMORY_FORMAT: channels-last convolutions compute the same model as NCHW ones."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from fsaf_d2.config import validate_fsaf_config
from fsaf_d2.engine.config import (
    CHANNELS_LAST_CPU_CAPABILITIES,
    apply_device_rules,
    build_config,
    resolve_memory_format,
)

from fsaf_testing import CONFIG, tiny_cfg


def _build(memory_format, device_rules=False, **overrides):
    """The tiny model; with ``device_rules``, its config resolved as fsaf_d2.engine.build_config does."""
    torch.manual_seed(0)
    cfg = tiny_cfg(**{"MODEL.FSAF.MEMORY_FORMAT": memory_format, **overrides})
    if device_rules:
        apply_device_rules(cfg)
    return build_model(cfg)


# Gradient agreement between two float32 computations of the same model (see gradient_mismatches).
GLOBAL_RTOL = 1e-3
TENSOR_RTOL = 1e-2


def gradient_mismatches(ref, other, global_rtol=GLOBAL_RTOL, tensor_rtol=TENSOR_RTOL):
    """Names of the parameters whose gradient in ``other`` differs from ``ref`` by more than rounding
    (``["<global>"]`` first if the whole gradient does). Both: {name: grad or None}.

    Another memory layout only reorders float32 sums. A reduction of n terms then moves by up to about
    sqrt(n) * 6e-8 of the sum of its terms' magnitudes, *not* of its result, and these differences
    compound through the backward pass. A tensor whose gradient is the small remainder of large,
    cancelling terms therefore differs by much more than 6e-8 of itself: measured 1.6e-3 relative for
    ``res3.0.shortcut.weight`` with AVX2 kernels, 1.1e-2 for an FPN output conv whose gradient is 1e-7 of
    the global norm (AVX-512). A bound on each tensor's own maximum cannot hold for those.

    So the bound is global, on what the optimiser uses: the whole gradient vector (clipped by its global
    norm) may move by ``global_rtol`` of its norm (measured 3e-7 with AVX-512 kernels, 2.6e-5 with AVX2:
    40x margin on the worse). Each tensor may move by ``tensor_rtol`` of its own norm plus its share of
    the global allowance, ``global_rtol * |g| * sqrt(n_t / N)`` (the error it would carry if the global
    allowance were spread evenly over all N gradient entries, n_t of them its own): a tensor far below
    rounding at the scale of the whole step cannot be told apart from its rounding, every other one is
    held to 1 %. A real layout bug (a kernel laid out transposed, a gradient 5 % off) fails both
    (``test_gradient_rule_catches_a_wrong_gradient``).
    """
    names = [n for n in ref if ref[n] is not None]
    diff = {n: (other[n].double() - ref[n].double()).norm() for n in names}
    norm = {n: ref[n].double().norm() for n in names}
    total = sum(ref[n].numel() for n in names)
    g_norm = torch.stack(list(norm.values())).norm()
    bad = ["<global>"] if torch.stack(list(diff.values())).norm() > global_rtol * g_norm else []
    for n in names:
        share = global_rtol * g_norm * (ref[n].numel() / total) ** 0.5
        if diff[n] > tensor_rtol * norm[n] + share:
            bad.append(n)
    return bad


def _conv_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_auto_resolves_per_device_type_and_cpu_kind():
    assert resolve_memory_format("auto", "cpu", cpu_capability="AVX512") == "channels_last"
    assert resolve_memory_format("auto", "cpu", cpu_capability="AVX2") == "contiguous"  # measured slower
    assert resolve_memory_format("auto", "cpu") == (
        "channels_last" if torch.backends.cpu.get_cpu_capability() in CHANNELS_LAST_CPU_CAPABILITIES else "contiguous"
    )
    assert resolve_memory_format("auto", "cuda:0") == "channels_last"
    assert resolve_memory_format("auto", "npu:3") == "contiguous"  # torch_npu has no channels_last
    assert resolve_memory_format("contiguous", "cpu") == "contiguous"
    assert resolve_memory_format("channels_last", "cuda") == "channels_last"
    with pytest.raises(ValueError, match="MODEL.FSAF.MEMORY_FORMAT"):
        resolve_memory_format("channels_last", "npu")


def test_the_config_builder_resolves_auto_and_the_model_applies_only_an_explicit_layout():
    cpu = build_config(CONFIG, ["MODEL.DEVICE", "cpu"])
    assert cpu.MODEL.FSAF.MEMORY_FORMAT == resolve_memory_format("auto", "cpu")
    assert build_config(CONFIG, ["MODEL.DEVICE", "cuda"]).MODEL.FSAF.MEMORY_FORMAT == "channels_last"
    assert build_config(CONFIG, ["MODEL.DEVICE", "npu:0"]).MODEL.FSAF.MEMORY_FORMAT == "contiguous"
    with pytest.raises(ValueError, match="MODEL.FSAF.MEMORY_FORMAT"):
        build_config(CONFIG, ["MODEL.DEVICE", "npu", "MODEL.FSAF.MEMORY_FORMAT", "channels_last"])
    # Detectron2's build_model on a config that did not go through the builder: "auto" is NCHW
    assert all(w.is_contiguous() for w in _conv_weights(_build("auto")))


def test_bad_value_names_the_key():
    cfg = tiny_cfg(**{"MODEL.FSAF.MEMORY_FORMAT": "nhwc"})
    with pytest.raises(ValueError, match="MODEL.FSAF.MEMORY_FORMAT"):
        validate_fsaf_config(cfg)


def test_every_conv_weight_takes_the_layout():
    last = _build("channels_last")
    plain = _build("contiguous")
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(last))
    # (a 1x1 kernel has the same strides in both layouts)
    assert all(not w.is_contiguous() for w in _conv_weights(last) if w.shape[-1] > 1)
    assert all(w.is_contiguous() for w in _conv_weights(plain))
    auto = _build("auto", device_rules=True)  # as train_net.py and the tools build it, on this cpu
    layout = torch.channels_last if resolve_memory_format("auto", "cpu") == "channels_last" else torch.contiguous_format
    assert auto.head.cls_score.weight.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("combined", [False, True], ids=["fsaf", "fsaf+retinanet"])
def test_channels_last_gives_the_same_losses_gradients_and_detections(batch, combined):
    overrides = {"MODEL.FSAF.ANCHOR_BASED": True} if combined else {}
    plain = _build("contiguous", **overrides)
    last = _build("channels_last", **overrides)
    last.load_state_dict(plain.state_dict())
    assert last.head.cls_score.weight.is_contiguous(memory_format=torch.channels_last)  # loading keeps the layout

    plain.train()
    last.train()
    with EventStorage(0):  # Detectron2's RetinaNet losses log to the event storage
        a, b = plain(batch), last(batch)
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (k, a[k], b[k])
    sum(a.values()).backward()
    sum(b.values()).backward()
    grads_a = {n: p.grad for n, p in plain.named_parameters()}
    grads_b = {n: p.grad for n, p in last.named_parameters()}
    assert [n for n in grads_a if grads_a[n] is None] == [n for n in grads_b if grads_b[n] is None]
    assert gradient_mismatches(grads_a, grads_b) == []

    plain.eval()
    last.eval()
    images = [{"image": x["image"], "height": x["height"], "width": x["width"]} for x in batch]
    with torch.no_grad():
        x = plain.preprocess_image(images).tensor
        fa, fb = plain.backbone(x), last.backbone(x)
        assert fb["p3"].is_contiguous(memory_format=torch.channels_last)  # activations follow the weights
        for name in fa:
            assert torch.allclose(fa[name], fb[name], atol=1e-4), name
        outs_a = plain.head([fa[f] for f in plain.head_in_features])
        outs_b = last.head([fa[f] for f in last.head_in_features])
        for per_level_a, per_level_b in zip(outs_a, outs_b):
            for ya, yb in zip(per_level_a, per_level_b):
                assert torch.allclose(ya, yb, atol=1e-4)
        # classifiers spread so that detections come out (random weights score every pair about 0.01, below
        # the 0.05 threshold), with scores far enough apart that rounding does not reorder them
        for name in ("cls_score", "ab_cls_score"):
            if hasattr(plain.head, name):
                spread = getattr(plain.head, name).weight * 300
                for model in (plain, last):
                    getattr(model.head, name).weight.copy_(spread)
                    getattr(model.head, name).bias.fill_(-3.0)
        ra, rb = plain(images), last(images)
    assert sum(len(r["instances"]) for r in ra) > 0
    for a, b in zip(ra, rb):
        _assert_same_detections(a["instances"], b["instances"])


def _assert_same_detections(a, b, score_atol=1e-4, box_atol=1e-3):
    """Each detection of ``a`` has one of ``b`` with its class, its score within ``score_atol`` and every
    coordinate within ``box_atol`` px, and the other way round (the order of near-equal scores may differ)."""
    assert len(a) == len(b)
    if not len(a):
        return
    same = (
        (a.pred_classes[:, None] == b.pred_classes[None, :])
        & ((a.scores[:, None] - b.scores[None, :]).abs() <= score_atol)
        & ((a.pred_boxes.tensor[:, None] - b.pred_boxes.tensor[None, :]).abs().amax(dim=-1) <= box_atol)
    )
    assert bool(same.any(dim=1).all()) and bool(same.any(dim=0).all()), (a, b)


def _gradients(model, batch):
    model.train()
    with EventStorage(0):
        sum(model(batch).values()).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_gradient_rule_catches_a_wrong_gradient(batch):
    """gradient_mismatches accepts the channels-last gradients but not a mislaid or slightly wrong one."""
    plain = _build("contiguous")
    last = _build("channels_last")
    last.load_state_dict(plain.state_dict())
    ref, grads = _gradients(plain, batch), _gradients(last, batch)
    assert gradient_mismatches(ref, grads) == []

    conv = "head.cls_subnet.0.weight"  # 3x3
    mislaid = dict(grads, **{conv: grads[conv].transpose(-1, -2)})  # kernel read as (kw, kh)
    assert conv in gradient_mismatches(ref, mislaid)
    # a small-gradient tensor, the one whose per-maximum bound failed on AVX2, 5 % off
    small = "backbone.bottom_up.res3.0.shortcut.weight"
    assert gradient_mismatches(ref, dict(grads, **{small: grads[small] * 1.05})) == [small]
    # and the whole gradient 0.5 % off: within each tensor's 1 %, but not the optimiser's step
    assert gradient_mismatches(ref, {n: g * 1.005 if g is not None else g for n, g in grads.items()})[0] == "<global>"
