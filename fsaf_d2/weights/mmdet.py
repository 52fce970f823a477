"""Conversion of mmdetection FSAF checkpoints to fsaf_d2 / Detectron2 names.

``convert_mmdet_checkpoint(ckpt)`` takes an mmdetection FSAF checkpoint: a raw state dict, or a dict
holding ``state_dict`` (the published files, e.g. ``fsaf_r50_fpn_1x_coco-94ccc51f.pth``). It returns
``{"model": state_dict, "__author__": "mmdet", "matching_heuristics": False}``, which, saved as a ``.pth``
file, ``DetectionCheckpointer(model).load(path)`` loads by exact name into the fsaf_d2 model built from
the matching config (``fsaf_R50_FPN_1x.yaml`` etc.). The command line is ``tools/convert_mmdet.py``.

Supported: ResNet-18/34 (basic blocks), ResNet-50/101/152 (bottleneck), ResNeXt (e.g. 101 64x4d),
pytorch style, plain BN; mmdet ``FPN`` with ``start_level`` C3 and two extra convs (P6 from C5 =
``neck.fpn_convs.3``, P7 from P6 = ``neck.fpn_convs.4``); ``FSAFHead`` / ``RetinaHead`` without norm.
Mapping (docs/algorithm.md#mmdetection-checkpoint-names)::

    backbone.conv1.weight                     -> backbone.bottom_up.stem.conv1.weight
    backbone.bn1.X                            -> backbone.bottom_up.stem.conv1.norm.X
    backbone.layer{i}.{k}.conv{n}.weight      -> backbone.bottom_up.res{i+1}.{k}.conv{n}.weight
    backbone.layer{i}.{k}.bn{n}.X             -> backbone.bottom_up.res{i+1}.{k}.conv{n}.norm.X
    backbone.layer{i}.{k}.downsample.0.weight -> backbone.bottom_up.res{i+1}.{k}.shortcut.weight
    backbone.layer{i}.{k}.downsample.1.X      -> backbone.bottom_up.res{i+1}.{k}.shortcut.norm.X
    neck.lateral_convs.{j}.conv.Y             -> backbone.fpn_lateral{s}.Y   (s = log2 stride of its input)
    neck.fpn_convs.{j}.conv.Y                 -> backbone.fpn_output{s}.Y
    neck.fpn_convs.{first extra}.conv.Y       -> backbone.top_block.p6.Y
    neck.fpn_convs.{second extra}.conv.Y      -> backbone.top_block.p7.Y
    bbox_head.cls_convs.{i}.conv.Y            -> head.cls_subnet.{2i}.Y
    bbox_head.reg_convs.{i}.conv.Y            -> head.bbox_subnet.{2i}.Y
    bbox_head.retina_cls.Y                    -> head.cls_score.Y
    bbox_head.retina_reg.Y                    -> head.bbox_pred.Y   (t, b, l, r kept; the plugin's coder has S = 4)
    *.num_batches_tracked                     -> dropped

Any other key is a :class:`~fsaf_d2.weights.errors.ConversionError` naming the keys.
"""
import collections
import os
import pickle
import re
import sys

import torch

from .errors import BN_FIELDS, ConversionError

__all__ = [
    "ConversionError",
    "convert_mmdet_state_dict",
    "convert_mmdet_checkpoint",
    "extract_state_dict",
    "load_checkpoint_file",
]

_CONV_FIELDS = ("weight", "bias")

# blocks per stage -> depth
_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}


# ---------------------------------------------------------------------------------------------- I/O
def load_checkpoint_file(path):
    """``torch.load`` on CPU; first with ``weights_only=True``, then, if its restricted unpickler refuses the
    file (objects beyond tensors and plain containers: trusted files only), without.

    Raises :class:`ConversionError` naming the file when it is missing or not a readable checkpoint.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # a global the weights-only unpickler does not allow (or no pickle at all: the retry says which)
    except Exception as e:  # noqa: BLE001 - a truncated zip, an empty file, ...
        raise _unreadable(path, e) from e
    print(
        f"note: {path} is not loadable with weights_only=True; loading it with weights_only=False "
        "(only do this for files you trust)",
        file=sys.stderr,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, e) from e


def _unreadable(path, error) -> ConversionError:
    return ConversionError(
        f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error}). A truncated "
        "download, or a web page saved under its name? Fetch the file again."
    )


def extract_state_dict(ckpt):
    """Return ``(state_dict, meta)`` from an mmdet checkpoint (raw state dict or ``{"state_dict": ...}``)."""
    if not isinstance(ckpt, collections.abc.Mapping):
        raise ConversionError(f"expected a dict checkpoint, got {type(ckpt).__name__}")
    meta = {}
    if "state_dict" in ckpt and isinstance(ckpt["state_dict"], collections.abc.Mapping):
        meta = ckpt.get("meta") or {}
        sd = ckpt["state_dict"]
    elif "model" in ckpt and isinstance(ckpt["model"], collections.abc.Mapping):
        author = f" (__author__={ckpt['__author__']!r})" if "__author__" in ckpt else ""
        raise ConversionError(
            f"INPUT looks like a Detectron2 / fsaf_d2 checkpoint{author}: its weights are under 'model', where "
            "mmdetection keeps them under 'state_dict'. It loads as MODEL.WEIGHTS as it is; nothing to convert"
        )
    else:
        sd = ckpt
    non_tensor = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if non_tensor:
        raise ConversionError(f"state dict has non-tensor entries: {non_tensor[:10]}")
    # DataParallel / DDP wrappers
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd), dict(meta) if isinstance(meta, collections.abc.Mapping) else {}


# ---------------------------------------------------------------------------------------------- mmdet
_RE_STEM_CONV = re.compile(r"^backbone\.conv1\.weight$")
_RE_STEM_BN = re.compile(r"^backbone\.bn1\.(\w+)$")
_RE_BLOCK_CONV = re.compile(r"^backbone\.layer([1-4])\.(\d+)\.conv([1-3])\.weight$")
_RE_BLOCK_BN = re.compile(r"^backbone\.layer([1-4])\.(\d+)\.bn([1-3])\.(\w+)$")
_RE_DOWN_CONV = re.compile(r"^backbone\.layer([1-4])\.(\d+)\.downsample\.0\.weight$")
_RE_DOWN_BN = re.compile(r"^backbone\.layer([1-4])\.(\d+)\.downsample\.1\.(\w+)$")
_RE_LATERAL = re.compile(r"^neck\.lateral_convs\.(\d+)\.conv\.(\w+)$")
_RE_FPN = re.compile(r"^neck\.fpn_convs\.(\d+)\.conv\.(\w+)$")
_RE_HEAD_TOWER = re.compile(r"^bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.(\w+)$")
_RE_HEAD_OUT = re.compile(r"^bbox_head\.retina_(cls|reg)\.(\w+)$")


def _backbone_info(sd):
    """Infer block type, blocks per stage, stage output channels, groups / width of the mmdet ResNet."""
    blocks = collections.defaultdict(set)
    has_conv3 = False
    for k in sd:
        m = _RE_BLOCK_CONV.match(k)
        if m:
            blocks[int(m.group(1))].add(int(m.group(2)))
            has_conv3 |= m.group(3) == "3"
    if not blocks:
        return None
    kind = "bottleneck" if has_conv3 else "basic"
    last_conv = "conv3" if has_conv3 else "conv2"
    counts = tuple(len(blocks.get(i, ())) for i in (1, 2, 3, 4))
    out_channels = {}
    for i in (1, 2, 3, 4):
        if blocks.get(i):
            w = sd.get(f"backbone.layer{i}.{max(blocks[i])}.{last_conv}.weight")
            if w is not None:
                out_channels[i] = int(w.shape[0])
    info = {
        "block": kind,
        "blocks_per_stage": counts,
        "depth": _DEPTHS.get((kind, counts)),
        "stage_out_channels": out_channels,  # layer index (1..4) -> channels
    }
    stem = sd.get("backbone.conv1.weight")
    if stem is not None:
        info["stem_out_channels"] = int(stem.shape[0])
    info["res2_out_channels"] = out_channels.get(1)
    if kind == "bottleneck":
        c2 = sd.get("backbone.layer1.0.conv2.weight")
        if c2 is not None:
            width = int(c2.shape[0])
            groups = width // int(c2.shape[1])
            info["num_groups"] = groups
            info["width_per_group"] = width // groups
    return info


def convert_mmdet_state_dict(state_dict, verbose=False):
    """Rename an mmdet FSAF state dict to fsaf_d2 names.

    Returns ``(new_state_dict, summary)``. ``summary`` is a dict with the per-group counts, the dropped
    keys, the inferred architecture and the config keys it implies. Raises :class:`ConversionError`
    naming every key that no rule maps (and on other structural problems).
    """
    sd = dict(state_dict)
    info = _backbone_info(sd)
    stage_of_layer = {i: i + 1 for i in (1, 2, 3, 4)}  # layer i -> res{i+1}, stride 2**(i+1)

    # FPN: find which backbone stage each lateral conv reads, by its input channels.
    laterals = sorted({int(m.group(1)) for k in sd for m in [_RE_LATERAL.match(k)] if m})
    fpn_outs = sorted({int(m.group(1)) for k in sd for m in [_RE_FPN.match(k)] if m})
    lateral_stage = {}
    problems = []
    if laterals:
        ch_to_layer = {}
        if info:
            ch_to_layer = {c: i for i, c in info["stage_out_channels"].items()}
        for j in laterals:
            w = sd.get(f"neck.lateral_convs.{j}.conv.weight")
            if w is not None and int(w.shape[1]) in ch_to_layer:
                lateral_stage[j] = stage_of_layer[ch_to_layer[int(w.shape[1])]]
        if len(lateral_stage) != len(laterals):
            # no backbone in the file (neck/head only): assume the FSAF layout, C3..C5
            lateral_stage = {j: 3 + j for j in laterals}
        stages = [lateral_stage[j] for j in laterals]
        if stages != list(range(stages[0], stages[0] + len(stages))):
            problems.append(f"FPN lateral convs read non-consecutive stages {stages}")
    n_lat = len(laterals)
    extra = [j for j in fpn_outs if j >= n_lat]
    top_names = ["p6", "p7"]
    if len(extra) > len(top_names):
        problems.append(
            f"FPN has {len(extra)} extra convs (neck.fpn_convs.{extra}); fsaf_d2 supports P6 and P7 only"
        )

    new_sd = collections.OrderedDict()
    origin = {}
    dropped = []
    unmapped = []
    groups = collections.Counter()

    def put(src, dst, group):
        if dst in new_sd:
            problems.append(f"two keys map to {dst}: {origin[dst]} and {src}")
            return
        new_sd[dst] = sd[src]
        origin[dst] = src
        groups[group] += 1

    for k in sd:
        if k.endswith(".num_batches_tracked"):
            dropped.append(k)
            continue
        bb = "backbone.bottom_up."
        if _RE_STEM_CONV.match(k):
            put(k, bb + "stem.conv1.weight", "backbone stem")
            continue
        m = _RE_STEM_BN.match(k)
        if m and m.group(1) in BN_FIELDS:
            put(k, bb + f"stem.conv1.norm.{m.group(1)}", "backbone stem")
            continue
        m = _RE_BLOCK_CONV.match(k)
        if m:
            i, b, n = m.groups()
            put(k, bb + f"res{int(i) + 1}.{b}.conv{n}.weight", "backbone stages")
            continue
        m = _RE_BLOCK_BN.match(k)
        if m and m.group(4) in BN_FIELDS:
            i, b, n, f = m.groups()
            put(k, bb + f"res{int(i) + 1}.{b}.conv{n}.norm.{f}", "backbone stages")
            continue
        m = _RE_DOWN_CONV.match(k)
        if m:
            i, b = m.groups()
            put(k, bb + f"res{int(i) + 1}.{b}.shortcut.weight", "backbone stages")
            continue
        m = _RE_DOWN_BN.match(k)
        if m and m.group(3) in BN_FIELDS:
            i, b, f = m.groups()
            put(k, bb + f"res{int(i) + 1}.{b}.shortcut.norm.{f}", "backbone stages")
            continue
        m = _RE_LATERAL.match(k)
        if m and m.group(2) in _CONV_FIELDS:
            j = int(m.group(1))
            put(k, f"backbone.fpn_lateral{lateral_stage[j]}.{m.group(2)}", "FPN")
            continue
        m = _RE_FPN.match(k)
        if m and m.group(2) in _CONV_FIELDS:
            j = int(m.group(1))
            if j < n_lat:
                put(k, f"backbone.fpn_output{lateral_stage[j]}.{m.group(2)}", "FPN")
                continue
            e = extra.index(j)
            if e < len(top_names):
                put(k, f"backbone.top_block.{top_names[e]}.{m.group(2)}", "FPN top block (P6, P7)")
                continue
        m = _RE_HEAD_TOWER.match(k)
        if m and m.group(3) in _CONV_FIELDS:
            tower, i, f = m.groups()
            sub = "cls_subnet" if tower == "cls" else "bbox_subnet"
            put(k, f"head.{sub}.{2 * int(i)}.{f}", "head towers")
            continue
        m = _RE_HEAD_OUT.match(k)
        if m and m.group(2) in _CONV_FIELDS:
            which, f = m.groups()
            put(k, f"head.{'cls_score' if which == 'cls' else 'bbox_pred'}.{f}", "head outputs")
            continue
        unmapped.append(k)

    reg = new_sd.get("head.bbox_pred.weight")
    if reg is not None and reg.shape[0] != 4:
        problems.append(
            f"bbox_head.retina_reg has {reg.shape[0]} output channels: a head with {reg.shape[0] // 4} anchors per "
            "location (RetinaNet's), not FSAF's 4 distances. This converter reads mmdetection FSAF checkpoints."
        )
    if unmapped or problems:
        lines = []
        if unmapped:
            lines.append(f"{len(unmapped)} key(s) of the mmdet checkpoint have no fsaf_d2 mapping:")
            lines += [f"  {k} {tuple(sd[k].shape)}" for k in unmapped]
            lines.append(
                "Supported: pytorch-style ResNet/ResNeXt with BN, mmdet FPN (C3-C5 + P6/P7) and FSAFHead "
                "without norm (docs/algorithm.md#mmdetection-checkpoint-names)."
            )
        lines += problems
        raise ConversionError("\n".join(lines))

    summary = {
        "num_input_keys": len(sd),
        "num_output_keys": len(new_sd),
        "groups": dict(groups),
        "dropped": dropped,
        "backbone": info,
        "mapping": dict((dst, src) for dst, src in origin.items()),
    }
    cls = new_sd.get("head.cls_score.weight")
    if cls is not None:
        summary["num_classes"] = int(cls.shape[0])
    lat = new_sd.get(f"backbone.fpn_lateral{lateral_stage[laterals[0]]}.weight") if laterals else None
    if lat is not None:
        summary["fpn_out_channels"] = int(lat.shape[0])
    p6 = new_sd.get("backbone.top_block.p6.weight")
    if p6 is not None and info:
        c5 = info["stage_out_channels"].get(4)
        summary["p6_input"] = "res5" if int(p6.shape[1]) == c5 else f"{int(p6.shape[1])} channels (not C5)"
    summary["config"] = _implied_config(summary)
    if verbose:
        for dst, src in origin.items():
            print(f"  {src:60s} -> {dst}")
    return new_sd, summary


def _implied_config(summary):
    cfg = {}
    info = summary.get("backbone")
    if info:
        if info.get("depth"):
            cfg["MODEL.RESNETS.DEPTH"] = info["depth"]
        if info.get("num_groups"):
            cfg["MODEL.RESNETS.NUM_GROUPS"] = info["num_groups"]
            cfg["MODEL.RESNETS.WIDTH_PER_GROUP"] = info["width_per_group"]
        if info.get("res2_out_channels"):
            cfg["MODEL.RESNETS.RES2_OUT_CHANNELS"] = info["res2_out_channels"]
        if info.get("stem_out_channels"):
            cfg["MODEL.RESNETS.STEM_OUT_CHANNELS"] = info["stem_out_channels"]
        cfg["MODEL.RESNETS.STRIDE_IN_1X1"] = False
    if "fpn_out_channels" in summary:
        cfg["MODEL.FPN.OUT_CHANNELS"] = summary["fpn_out_channels"]
    if "num_classes" in summary:
        cfg["MODEL.FSAF.NUM_CLASSES"] = summary["num_classes"]
    if summary.get("groups", {}).get("FPN top block (P6, P7)"):
        cfg["MODEL.FSAF.TOP_BLOCK_P7_RELU"] = False
    return cfg


def convert_mmdet_checkpoint(ckpt, verbose=False):
    """Convert a loaded mmdet checkpoint object; returns ``(d2_checkpoint_dict, summary)``."""
    sd, meta = extract_state_dict(ckpt)
    new_sd, summary = convert_mmdet_state_dict(sd, verbose=verbose)
    summary["meta"] = {k: meta[k] for k in ("mmdet_version", "mmcv_version", "epoch", "iter") if k in meta}
    classes = meta.get("CLASSES")
    if classes is not None:
        summary["classes"] = list(classes)
    out = {"model": new_sd, "__author__": "mmdet", "matching_heuristics": False}
    return out, summary
