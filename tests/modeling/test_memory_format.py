"""MODEL.FSAF.MEMORY_FORMAT: channels-last convolutions compute the same model as NCHW ones."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from fsaf_d2.config import resolve_memory_format, validate_fsaf_config

from fsaf_testing import tiny_cfg


def _build(memory_format, **overrides):
    torch.manual_seed(0)
    return build_model(tiny_cfg(**{"MODEL.FSAF.MEMORY_FORMAT": memory_format, **overrides}))


def _conv_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_auto_resolves_per_device_type():
    assert resolve_memory_format("auto", "cpu") is torch.channels_last
    assert resolve_memory_format("auto", "cuda:0") is torch.channels_last
    assert resolve_memory_format("auto", "npu:3") is torch.contiguous_format  # torch_npu has no channels_last
    assert resolve_memory_format("contiguous", "cpu") is torch.contiguous_format
    assert resolve_memory_format("channels_last", "cuda") is torch.channels_last
    with pytest.raises(ValueError, match="MODEL.FSAF.MEMORY_FORMAT"):
        resolve_memory_format("channels_last", "npu")


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
    assert _build("auto").head.cls_score.weight.is_contiguous(memory_format=torch.channels_last)  # cpu


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
    grads_a = dict(plain.named_parameters())
    for name, p in last.named_parameters():
        ga = grads_a[name].grad
        if ga is None:
            assert p.grad is None, name
            continue
        scale = ga.abs().max().clamp(min=1e-8)
        assert (p.grad - ga).abs().max() <= 1e-3 * scale + 1e-7, name

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
        ra, rb = plain(images), last(images)
    assert [len(r["instances"]) for r in ra] == [len(r["instances"]) for r in rb]
