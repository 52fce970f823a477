"""fsaf_d2.weights (mmdet FSAF -> fsaf_d2 names, torchvision -> Detectron2 names) and tools/convert_mmdet.py.

The mmdet-named state dicts are synthesised from mmdet's shape rules (ResNet / ResNeXt, FPN with
C3-C5 laterals and P6-from-C5 / P7 extra convs, FSAFHead), written out independently of the converter.
They are converted and loaded into the fsaf_d2 model built from the matching config, with no missing,
unexpected or mis-shaped key.
"""
import math
import os
from collections import OrderedDict

import pytest
import torch

from fsaf_d2.weights.mmdet import ConversionError, convert_mmdet_checkpoint, convert_mmdet_state_dict
from fsaf_d2.weights.torchvision import convert_torchvision_resnet, rename_torchvision_resnet_keys
from tools_testing import run_side_by_side, tool_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FPN_CHANNELS = 32  # small, to keep the synthetic models light (shapes follow the config)
NUM_CLASSES = 7

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


# ---------------------------------------------------------------------------------------------- mmdet shapes
def _bn(sd, prefix, c):
    sd[prefix + ".weight"] = (c,)
    sd[prefix + ".bias"] = (c,)
    sd[prefix + ".running_mean"] = (c,)
    sd[prefix + ".running_var"] = (c,)
    sd[prefix + ".num_batches_tracked"] = ()


def mmdet_fsaf_shapes(depth, groups=1, base_width=4, fpn_channels=FPN_CHANNELS, num_classes=NUM_CLASSES):
    """Key -> shape of an mmdet v2 FSAF model (mmdet/models/backbones/resnet.py, resnext.py, necks/fpn.py,
    dense_heads/retina_head.py), pytorch style, BN everywhere in the backbone."""
    sd = OrderedDict()
    basic = depth in (18, 34)
    expansion = 1 if basic else 4
    sd["backbone.conv1.weight"] = (64, 3, 7, 7)
    _bn(sd, "backbone.bn1", 64)
    inplanes = 64
    stage_out = []
    for i, n in enumerate(STAGE_BLOCKS[depth]):
        planes = 64 * 2 ** i
        stride = 1 if i == 0 else 2
        for b in range(n):
            p = f"backbone.layer{i + 1}.{b}"
            if basic:
                sd[p + ".conv1.weight"] = (planes, inplanes, 3, 3)
                _bn(sd, p + ".bn1", planes)
                sd[p + ".conv2.weight"] = (planes, planes, 3, 3)
                _bn(sd, p + ".bn2", planes)
            else:
                width = planes if groups == 1 else math.floor(planes * (base_width / 64)) * groups
                sd[p + ".conv1.weight"] = (width, inplanes, 1, 1)
                _bn(sd, p + ".bn1", width)
                sd[p + ".conv2.weight"] = (width, width // groups, 3, 3)
                _bn(sd, p + ".bn2", width)
                sd[p + ".conv3.weight"] = (planes * expansion, width, 1, 1)
                _bn(sd, p + ".bn3", planes * expansion)
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                sd[p + ".downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                _bn(sd, p + ".downsample.1", planes * expansion)
            inplanes = planes * expansion
        stage_out.append(inplanes)
    # FPN: start_level=1 (C3..C5), add_extra_convs='on_input' (P6 from C5), num_outs=5
    for j, c in enumerate(stage_out[1:]):
        sd[f"neck.lateral_convs.{j}.conv.weight"] = (fpn_channels, c, 1, 1)
        sd[f"neck.lateral_convs.{j}.conv.bias"] = (fpn_channels,)
        sd[f"neck.fpn_convs.{j}.conv.weight"] = (fpn_channels, fpn_channels, 3, 3)
        sd[f"neck.fpn_convs.{j}.conv.bias"] = (fpn_channels,)
    sd["neck.fpn_convs.3.conv.weight"] = (fpn_channels, stage_out[-1], 3, 3)
    sd["neck.fpn_convs.3.conv.bias"] = (fpn_channels,)
    sd["neck.fpn_convs.4.conv.weight"] = (fpn_channels, fpn_channels, 3, 3)
    sd["neck.fpn_convs.4.conv.bias"] = (fpn_channels,)
    for tower in ("cls", "reg"):
        for i in range(4):
            sd[f"bbox_head.{tower}_convs.{i}.conv.weight"] = (fpn_channels, fpn_channels, 3, 3)
            sd[f"bbox_head.{tower}_convs.{i}.conv.bias"] = (fpn_channels,)
    sd["bbox_head.retina_cls.weight"] = (num_classes, fpn_channels, 3, 3)
    sd["bbox_head.retina_cls.bias"] = (num_classes,)
    sd["bbox_head.retina_reg.weight"] = (4, fpn_channels, 3, 3)
    sd["bbox_head.retina_reg.bias"] = (4,)
    return sd


def mmdet_state_dict(depth, **kw):
    """Synthetic mmdet state dict; every tensor is filled with its own index (to trace the renaming)."""
    out = OrderedDict()
    for i, (k, shape) in enumerate(mmdet_fsaf_shapes(depth, **kw).items()):
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1000, dtype=torch.long)
        else:
            out[k] = torch.full(shape, float(i))
    return out


def fsaf_cfg(depth, groups=1, width_per_group=64):
    from detectron2.config import get_cfg

    import fsaf_d2

    cfg = get_cfg()
    fsaf_d2.add_fsaf_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "Base-FSAF.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256
    cfg.MODEL.RESNETS.NUM_GROUPS = groups
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = width_per_group
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.FPN.OUT_CHANNELS = FPN_CHANNELS
    cfg.MODEL.FSAF.NUM_CLASSES = NUM_CLASSES
    return cfg


def load_into_model(cfg, path):
    """DetectionCheckpointer(model).load(path) -> (model, incompatible keys)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    ckpt = DetectionCheckpointer(model)
    found = []
    inner = ckpt._load_model
    ckpt._load_model = lambda c: found.append(inner(c)) or found[-1]
    ckpt.load(path)
    return model, found[0]


ARCHS = {
    "R18": dict(depth=18),
    "R34": dict(depth=34),
    "R50": dict(depth=50),
    "R101": dict(depth=101),
    "X101-64x4d": dict(depth=101, groups=64, base_width=4),
}

# spot checks of the renaming, written out by hand (docs/algorithm.md#mmdetection-checkpoint-names)
SPOT = {
    "R18": {
        "backbone.layer1.1.bn2.running_var": "backbone.bottom_up.res2.1.conv2.norm.running_var",
        "backbone.layer2.0.downsample.0.weight": "backbone.bottom_up.res3.0.shortcut.weight",
        "backbone.layer4.1.conv1.weight": "backbone.bottom_up.res5.1.conv1.weight",
    },
    "R101": {
        "backbone.conv1.weight": "backbone.bottom_up.stem.conv1.weight",
        "backbone.bn1.running_mean": "backbone.bottom_up.stem.conv1.norm.running_mean",
        "backbone.layer3.22.bn2.weight": "backbone.bottom_up.res4.22.conv2.norm.weight",
        "backbone.layer3.22.bn1.weight": "backbone.bottom_up.res4.22.conv1.norm.weight",
        "backbone.layer1.0.downsample.1.bias": "backbone.bottom_up.res2.0.shortcut.norm.bias",
        "neck.lateral_convs.0.conv.weight": "backbone.fpn_lateral3.weight",
        "neck.lateral_convs.2.conv.bias": "backbone.fpn_lateral5.bias",
        "neck.fpn_convs.1.conv.weight": "backbone.fpn_output4.weight",
        "neck.fpn_convs.3.conv.weight": "backbone.top_block.p6.weight",
        "neck.fpn_convs.4.conv.bias": "backbone.top_block.p7.bias",
        "bbox_head.cls_convs.3.conv.weight": "head.cls_subnet.6.weight",
        "bbox_head.reg_convs.1.conv.bias": "head.bbox_subnet.2.bias",
        "bbox_head.retina_cls.bias": "head.cls_score.bias",
        "bbox_head.retina_reg.weight": "head.bbox_pred.weight",
    },
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_convert_and_load_exactly(arch, tmp_path):
    kw = ARCHS[arch]
    src = mmdet_state_dict(**kw)
    out, summary = convert_mmdet_checkpoint({"meta": {"mmdet_version": "2.28.2"}, "state_dict": src})
    assert out["__author__"] == "mmdet" and out["matching_heuristics"] is False
    assert not any(k.endswith("num_batches_tracked") for k in out["model"])
    assert len(summary["dropped"]) == sum(k.endswith("num_batches_tracked") for k in src)
    info = summary["backbone"]
    assert info["depth"] == kw["depth"]
    assert summary["num_classes"] == NUM_CLASSES and summary["fpn_out_channels"] == FPN_CHANNELS
    assert summary["p6_input"] == "res5"
    if "groups" in kw:
        assert (info["num_groups"], info["width_per_group"]) == (64, 4)
    path = str(tmp_path / "converted.pth")
    torch.save(out, path)

    groups = kw.get("groups", 1)
    cfg = fsaf_cfg(kw["depth"], groups=groups, width_per_group=kw.get("base_width", 64) if groups > 1 else 64)
    for k, v in summary["config"].items():  # the implied config keys are consistent with the model
        node = cfg
        for part in k.split(".")[:-1]:
            node = node[part]
        assert node[k.split(".")[-1]] == v, (k, v)
    model, incompatible = load_into_model(cfg, path)
    assert not incompatible.missing_keys, incompatible.missing_keys
    assert not incompatible.unexpected_keys, incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes, incompatible.incorrect_shapes
    state = model.state_dict()
    assert set(state) == set(out["model"])
    for dst, src_key in summary["mapping"].items():
        assert torch.equal(state[dst], src[src_key]), (src_key, dst)
    for src_key, dst in SPOT.get(arch, {}).items():
        assert summary["mapping"][dst] == src_key
        assert torch.equal(state[dst], src[src_key])


def test_raw_state_dict_and_module_prefix():
    src = mmdet_state_dict(18)
    a, _ = convert_mmdet_state_dict(src)
    b = convert_mmdet_checkpoint({"module." + k: v for k, v in src.items()})[0]["model"]
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra",
    [
        "backbone.layer2.0.conv2.conv_offset.weight",  # DCN
        "neck.fpn_convs.5.conv.weight",  # a third extra level
        "bbox_head.cls_convs.0.gn.weight",  # GN in the head
        "backbone.stem.0.weight",  # ResNetV1d deep stem
        "roi_head.bbox_head.fc_cls.weight",  # a two-stage model
    ],
)
def test_unmapped_key_is_an_error(extra):
    src = mmdet_state_dict(18)
    src[extra] = torch.zeros(4)
    with pytest.raises(ConversionError, match=extra.replace(".", r"\.")):
        convert_mmdet_state_dict(src)


def test_a_retinanet_checkpoint_is_refused_naming_its_anchors():
    """mmdetection's RetinaNet uses the same head names; its 9 anchors per location must not pass as classes."""
    src = mmdet_state_dict(18)
    src["bbox_head.retina_cls.weight"] = torch.zeros(9 * NUM_CLASSES, FPN_CHANNELS, 3, 3)
    src["bbox_head.retina_cls.bias"] = torch.zeros(9 * NUM_CLASSES)
    src["bbox_head.retina_reg.weight"] = torch.zeros(36, FPN_CHANNELS, 3, 3)
    src["bbox_head.retina_reg.bias"] = torch.zeros(36)
    with pytest.raises(ConversionError, match="retina_reg has 36 output channels: a head with 9 anchors"):
        convert_mmdet_state_dict(src)


@pytest.mark.parametrize("extra", [{"__author__": "mmdet"}, {"iteration": 99, "optimizer": {}}])
def test_a_detectron2_checkpoint_is_named_as_such(extra):
    """A converted or fsaf_d2-trained checkpoint (weights under 'model') needs no conversion; say so."""
    with pytest.raises(ConversionError, match="Detectron2 / fsaf_d2 checkpoint.*loads as MODEL.WEIGHTS as it is"):
        convert_mmdet_checkpoint({"model": {"head.cls_score.bias": torch.zeros(3)}, **extra})


def test_cli(tmp_path):
    """The converter's command line on a good checkpoint and on four bad inputs. The five conversions run
    concurrently: each spends most of its time importing torch on one core."""
    src = mmdet_state_dict(50)
    inp, outp = tmp_path / "fsaf_r50_mmdet.pth", tmp_path / "fsaf_r50_converted.pth"
    torch.save({"meta": {"mmdet_version": "2.28.2", "CLASSES": ("a",) * NUM_CLASSES}, "state_dict": src}, inp)
    good = inp.read_bytes()
    # an unmapped key; a missing file, a truncated file, a web page saved under the name
    unmapped = dict(src)
    unmapped["neck.fpn_convs.0.bn.weight"] = torch.zeros(FPN_CHANNELS)
    unmapped["backbone.layer1.0.conv2.conv_offset.weight"] = torch.zeros(18, 64, 3, 3)
    torch.save({"state_dict": unmapped}, tmp_path / "unmapped.pth")
    (tmp_path / "truncated.pth").write_bytes(good[: len(good) // 2])
    (tmp_path / "page.pth").write_text("<html><body>proxy login</body></html>")
    unreadable = "not a readable PyTorch checkpoint"
    bad_inputs = {"unmapped.pth": None, "missing.pth": "no such file", "truncated.pth": unreadable,
                  "page.pth": unreadable}
    runs = [(inp, outp)] + [(tmp_path / name, tmp_path / f"out_{name}") for name in bad_inputs]
    good_proc, *bad_procs = run_side_by_side([tool_command("convert_mmdet", src_path, out_path)
                                              for src_path, out_path in runs], cwd=REPO)

    assert good_proc.returncode == 0, good_proc.stderr
    assert "ResNet-50" in good_proc.stdout and "FPN top block (P6, P7)" in good_proc.stdout, good_proc.stdout
    assert "MODEL.RESNETS.DEPTH: 50" in good_proc.stdout
    out = torch.load(outp, map_location="cpu", weights_only=True)
    assert set(out) == {"model", "__author__", "matching_heuristics"}
    assert out["__author__"] == "mmdet" and out["matching_heuristics"] is False
    assert torch.equal(out["model"]["backbone.top_block.p6.weight"], src["neck.fpn_convs.3.conv.weight"])

    for (path, bad_out), proc, says in zip(runs[1:], bad_procs, bad_inputs.values()):
        assert not bad_out.exists(), path  # no output written
        if says is None:  # an unmapped key: non-zero exit, the message names the keys
            assert proc.returncode != 0
            assert "neck.fpn_convs.0.bn.weight" in proc.stderr
            assert "backbone.layer1.0.conv2.conv_offset.weight" in proc.stderr
        else:  # one line naming the file, no traceback
            assert proc.returncode == 1 and f"{path}" in proc.stderr and says in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize(
    "name, depth, groups, width",
    [("resnet18", 18, 1, 64), ("resnet50", 50, 1, 64), ("resnext50_32x4d", 50, 32, 4)],
)
def test_torchvision_names(name, depth, groups, width):
    import torchvision
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    tv = getattr(torchvision.models, name)().state_dict()
    out = convert_torchvision_resnet(tv)
    assert out["__author__"] == "torchvision" and out["matching_heuristics"] is True
    renamed = out["model"]
    assert "stem.conv1.weight" in renamed and "res2.0.conv1.norm.running_var" in renamed
    assert not any(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in renamed)

    cfg = fsaf_cfg(depth, groups=groups, width_per_group=width)
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    d2 = build_resnet_backbone(cfg, ShapeSpec(channels=3)).state_dict()
    assert set(renamed) == set(d2)
    assert all(tuple(renamed[k].shape) == tuple(d2[k].shape) for k in d2)
    assert torch.equal(renamed["res3.0.shortcut.norm.weight"], tv["layer2.0.downsample.1.weight"])
    assert torch.equal(renamed["res5.1.conv2.weight"], tv["layer4.1.conv2.weight"])


def test_torchvision_unknown_key():
    with pytest.raises(ConversionError, match="layer1.0.se.fc1.weight"):
        rename_torchvision_resnet_keys({"conv1.weight": torch.zeros(1), "layer1.0.se.fc1.weight": torch.zeros(1)})
