"""Export an FSAF model (or the combined RetinaNet + FSAF model) to TorchScript or ONNX for deployment.

Usage::

    python -m fsaf_d2.export --config-file configs/fsaf_R50_FPN_1x.yaml \\
        --format {torchscript,onnx} --export-method {tracing,scripting} --output DIR \\
        [--sample-image IMG | --input-size H W] [--outputs {detections,head}] \\
        MODEL.WEIGHTS model.pth [KEY VALUE ...]

Modelled on Detectron2's ``tools/deploy/export_model.py``; writes ``DIR/model.ts`` or ``DIR/model.onnx`` and
``DIR/export_info.json`` (inputs, outputs, input size), checks the exported model against the eager one on
the sample input and prints how to run it.

* ``tracing`` (TorchScript or ONNX) records the model on one sample input through Detectron2's
  :class:`TracingAdapter`: the exported model takes one image tensor of exactly the sample's size and returns
  flat tensors. The sample is ``--sample-image`` resized as in evaluation (``INPUT.MIN/MAX_SIZE_TEST``), or
  a generated image of ``--input-size`` (default ``INPUT.MIN_SIZE_TEST`` square).
* ``scripting`` (TorchScript only) compiles the inference path with :func:`scripting_with_instances`: the
  exported model takes a list of ``{"image": tensor}`` of any size and returns a list of dicts.
* ``--outputs head`` (tracing only) exports normalisation + backbone + head and returns the raw per-level
  outputs; score thresholding, top-k, TBLR decoding and NMS then run outside (see
  :func:`detections_from_head_outputs`).
"""
import argparse
import copy
import json
import logging
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.export import TracingAdapter, dump_torchscript_IR, scripting_with_instances
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

__all__ = [
    "FORMATS",
    "EXPORT_METHODS",
    "ONNX_OPSET",
    "SCRIPTING_FIELDS",
    "ScriptableAdapter",
    "HeadOutputsAdapter",
    "sample_inputs",
    "export_tracing",
    "export_scripting",
    "detections_from_head_outputs",
    "build_argument_parser",
    "main",
]

logger = logging.getLogger("fsaf_d2.export")  # not "__main__" under python -m

FORMATS = ("torchscript", "onnx")
EXPORT_METHODS = ("tracing", "scripting")
#: opset of the TorchScript-based ONNX exporter (torchvision's NMS needs >= 11)
ONNX_OPSET = 17
#: the ``Instances`` fields of FSAF's inference path, declared for :func:`scripting_with_instances`
SCRIPTING_FIELDS = {"pred_boxes": Boxes, "scores": Tensor, "pred_classes": Tensor}
#: names of the flattened detections of one image, in :class:`TracingAdapter`'s order
DETECTION_OUTPUTS = ("pred_boxes", "pred_classes", "scores", "image_size")


class ScriptableAdapter(nn.Module):
    """The scripting entry point: ``List[{"image": (3, H, W)}]`` -> ``List[{"pred_boxes", "scores", "pred_classes"}]``.

    Returns plain dicts (a process that loads the model has no Python class for the scripted ``Instances``)
    in the input tensor's pixels, with the empty boxes removed, i.e. what the eager model returns for an input
    without "height" / "width".
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, inputs: List[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
        outputs: List[Dict[str, Tensor]] = []
        for instances in self.model(inputs):
            fields = instances.get_fields()
            keep = Boxes(fields["pred_boxes"]).nonempty()
            kept: Dict[str, Tensor] = {}
            for name, value in fields.items():
                kept[name] = value[keep]
            outputs.append(kept)
        return outputs


class HeadOutputsAdapter(nn.Module):
    """Normalisation, padding, backbone and head of a model: ``image (3, H, W)`` -> the raw per-level outputs.

    Outputs, flattened level by level: FSAF class logits (1, C, H_l, W_l) of every level, then FSAF TBLR
    distances (1, 4, H_l, W_l), then (combined model only) RetinaNet logits (1, A*C, H_l, W_l) and deltas
    (1, 4A, H_l, W_l). Names: :meth:`output_names`.
    """

    def __init__(self, model: nn.Module, size_check=None):
        super().__init__()
        self.model = model
        self.size_check = size_check
        self.eval()

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        if self.size_check is not None:
            image = self.size_check(image)
        images = self.model.preprocess_image([{"image": image}])
        features = self.model.backbone(images.tensor)
        features = [features[f] for f in self.model.head_in_features]
        return tuple(x for per_level in self.model.head(features) for x in per_level)

    def output_names(self) -> List[str]:
        kinds = ["cls_logits", "bbox_tblr"]
        if getattr(self.model, "anchor_based", None) is not None:
            kinds += ["anchor_cls_logits", "anchor_deltas"]
        return [f"{kind}_{f}" for kind in kinds for f in self.model.head_in_features]


def sample_inputs(cfg, sample_image: Optional[str] = None, input_size: Optional[Sequence[int]] = None):
    """One evaluation-style input ``[{"image": (3, H, W) float32, "height", "width"}]``.

    ``sample_image`` is read in ``INPUT.FORMAT`` and resized by the test-time augmentation of ``cfg``; without it
    a reproducible random image of ``input_size`` (H, W), default ``INPUT.MIN_SIZE_TEST`` square, is generated.
    """
    if sample_image is not None:
        from fsaf_d2.data.transforms import apply_resize_backend

        original = utils.read_image(sample_image, format=cfg.INPUT.FORMAT)
        height, width = original.shape[:2]
        augs = utils.build_augmentation(cfg, is_train=False)
        aug_input = T.AugInput(np.ascontiguousarray(original))
        T.AugmentationList(apply_resize_backend(augs, cfg.INPUT.get("RESIZE_BACKEND", "pil")))(aug_input)
        image = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)).astype("float32"))
        return [{"image": image, "height": height, "width": width}]
    if input_size is None:
        side = cfg.INPUT.MIN_SIZE_TEST
        if not side:
            raise ValueError("INPUT.MIN_SIZE_TEST is 0 (no resize): give a sample image or an input size")
        input_size = (side, side)
    h, w = (int(v) for v in input_size)
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, h, w), generator=g).float()
    return [{"image": image, "height": h, "width": w}]


def _check_image_size(image: Tensor, height: int, width: int) -> Tensor:
    if image.shape[-2] != height or image.shape[-1] != width:
        raise ValueError(
            "This traced model only takes images of the size it was exported with, "
            + str(height) + "x" + str(width) + " (HxW); resize or pad the image, or export again"
        )
    return image


def _fixed_size_check(image: Tensor):
    """A function that fails on images of another size than ``image``; scripted, so that the check survives tracing."""
    check = torch.jit.script(_check_image_size)
    height, width = int(image.shape[-2]), int(image.shape[-1])
    return lambda x: check(x, height, width)


def _detection_output_names(adapter: TracingAdapter) -> Optional[List[str]]:
    """Names of the flat outputs when they are the detections of one image (the usual case), else None."""
    schema = adapter.outputs_schema
    try:
        keys = schema.schemas[0].schemas[0].keys
    except (AttributeError, IndexError):
        return None
    if len(schema.schemas) != 1 or list(keys) != list(DETECTION_OUTPUTS[:3]):
        return None
    return list(DETECTION_OUTPUTS)


def export_tracing(
    model: nn.Module, inputs, fmt: str, output_dir: str, outputs: str = "detections", opset: int = ONNX_OPSET
):
    """Trace ``model`` on ``inputs[0]["image"]`` and save ``model.ts`` / ``model.onnx`` under ``output_dir``.

    Returns ``(path, adapter, exported)``: ``adapter`` is the traced module (a :class:`TracingAdapter`, whose
    ``outputs_schema`` rebuilds ``[{"instances": Instances}]`` from the flat outputs, or a
    :class:`HeadOutputsAdapter`); ``exported`` is the traced TorchScript module (None for ONNX).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    image = inputs[0]["image"]
    # ONNX declares the input's static shape, TorchScript needs an explicit check
    size_check = _fixed_size_check(image) if fmt == "torchscript" else None
    if outputs == "detections":
        inference = None
        if size_check is not None:

            def inference(model, inputs):
                return model([{"image": size_check(inputs[0]["image"])}])

        adapter = TracingAdapter(model, [{"image": image}], inference)
    elif outputs == "head":
        adapter = HeadOutputsAdapter(model, size_check)
    else:
        raise ValueError(f"outputs must be 'detections' or 'head', got {outputs!r}")
    # torch.onnx.export restores the wrapper's training flag on the whole module tree afterwards
    adapter.eval()
    with torch.no_grad():
        adapter(image)  # records TracingAdapter's output schema
    os.makedirs(output_dir, exist_ok=True)
    with warnings.catch_warnings():
        # sizes become constants of the trace: expected, the exported model has a fixed input size
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if fmt == "torchscript":
            path = os.path.join(output_dir, "model.ts")
            with torch.no_grad():
                traced = torch.jit.trace(adapter, (image,), check_trace=False)
            torch.jit.save(traced, path)
            dump_torchscript_IR(traced, output_dir)
            return path, adapter, traced
        try:
            import onnx  # noqa: F401  (torch's TorchScript-based exporter serialises with it)
        except ImportError as e:
            raise ImportError(
                "ONNX export needs the onnx package: `pip install onnx` (and onnxruntime to run the model)"
            ) from e
        path = os.path.join(output_dir, "model.onnx")
        if outputs == "head":
            names = adapter.output_names()
        else:
            names = _detection_output_names(adapter)
        with torch.no_grad():
            torch.onnx.export(
                adapter,
                (image,),
                path,
                dynamo=False,  # the TorchScript-based exporter: data-dependent shapes (nonzero, top-k, NMS)
                opset_version=opset,
                input_names=["image"],
                output_names=names,
                do_constant_folding=True,
            )
    return path, adapter, None


def export_scripting(model: nn.Module, output_dir: str):
    """Script the inference path of ``model`` (through :class:`ScriptableAdapter`) and save ``model.ts``.

    Returns ``(path, scripted)``.
    """
    if getattr(model, "fixed_sizes", None):
        raise ValueError(
            "Scripting does not support INPUT.FIXED_SIZES (the scripted model pads to the backbone's size "
            "divisibility); export with --export-method tracing, or clear INPUT.FIXED_SIZES."
        )
    os.makedirs(output_dir, exist_ok=True)
    # torch.jit.script replaces submodules in place with their __prepare_scriptable__ versions (Detectron2's
    # ResNet / FPN rename their parameters there): script a copy, so that ``model`` stays usable
    scripted = scripting_with_instances(ScriptableAdapter(copy.deepcopy(model)), SCRIPTING_FIELDS)
    path = os.path.join(output_dir, "model.ts")
    torch.jit.save(scripted, path)
    dump_torchscript_IR(scripted, output_dir)
    return path, scripted


def detections_from_head_outputs(model: nn.Module, outputs: Sequence[Tensor], image_size: Tuple[int, int]) -> Instances:
    """FSAF's post-processing (threshold, top-k, decoding, NMS) of the raw outputs of a ``--outputs head`` export.

    Args:
        model: the eager model the export came from (its test settings and priors are used).
        outputs: the flat outputs, in :class:`HeadOutputsAdapter`'s order (numpy arrays are accepted).
        image_size: (H, W) of the image given to the exported model.
    Returns:
        ``Instances`` with ``pred_boxes``, ``scores``, ``pred_classes`` in that image's pixels, empty boxes
        removed: the eager model's output for an input without "height" / "width".
    """
    tensors = [torch.as_tensor(x, device=model.device) for x in outputs]
    num_levels = len(model.head_in_features)
    if len(tensors) % num_levels:
        raise ValueError(f"{len(tensors)} outputs do not split into {num_levels} levels")
    predictions = [tensors[i : i + num_levels] for i in range(0, len(tensors), num_levels)]
    # forward_inference only reads the features' spatial sizes, which the logits share
    height, width = (int(v) for v in image_size)
    image_list = ImageList(tensors[0], [(height, width)])
    with torch.no_grad():
        return detector_postprocess(model.forward_inference(image_list, predictions[0], predictions)[0], height, width)


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _compare_detections(reference: Instances, exported: Instances) -> Dict[str, float]:
    if len(reference) != len(exported):
        return {"num_reference": len(reference), "num_exported": len(exported)}
    return {
        "num": len(reference),
        "boxes": _max_abs_diff(reference.pred_boxes.tensor, exported.pred_boxes.tensor),
        "scores": _max_abs_diff(reference.scores, exported.scores),
        "classes_equal": bool(torch.equal(reference.pred_classes.cpu(), exported.pred_classes.cpu())),
    }


def _run_onnx(path: str, image: Tensor):
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(x) for x in session.run(None, {session.get_inputs()[0].name: image.cpu().numpy()})]


def verify_export(model, inputs, args, path, adapter, exported) -> Optional[Dict[str, float]]:
    """Max differences between the exported and the eager model on the sample (None if it cannot run here)."""
    image = inputs[0]["image"]
    with torch.no_grad():
        if args.outputs == "head":
            reference = adapter(image)
            flat = exported(image) if exported is not None else _run_onnx(path, image)
            if flat is None:
                return None
            return {name: _max_abs_diff(r, e) for name, r, e in zip(adapter.output_names(), reference, flat)}
        reference = model([{"image": image}])[0]["instances"]
        if args.export_method == "scripting":
            fields = exported([{"image": image}])[0]
            result = Instances(tuple(image.shape[-2:]))
            result.pred_boxes = Boxes(fields["pred_boxes"])
            result.scores = fields["scores"]
            result.pred_classes = fields["pred_classes"]
        else:
            flat = exported(image) if exported is not None else _run_onnx(path, image)
            if flat is None:
                return None
            result = adapter.outputs_schema(flat)[0]["instances"]
    return _compare_detections(reference, result)


def usage_text(args, path: str, image_shape: Sequence[int], output_names: Optional[Sequence[str]], cfg) -> str:
    """How to run the exported model (printed by the CLI)."""
    c, h, w = (int(v) for v in image_shape)
    image_doc = (
        f"image: float32 tensor (3, H, W), channels in {cfg.INPUT.FORMAT} order, values 0-255, resized like "
        f"evaluation (INPUT.MIN_SIZE_TEST={cfg.INPUT.MIN_SIZE_TEST}, MAX_SIZE_TEST={cfg.INPUT.MAX_SIZE_TEST})"
    )
    if args.export_method == "scripting":
        return "\n".join(
            [
                f"TorchScript (scripting): {path}",
                "  import torch, torchvision  # torchvision registers the NMS op the model calls",
                f"  model = torch.jit.load({path!r})",
                "  outputs = model([{'image': image}, ...])  # any image size; batches of several images work",
                f"  {image_doc}",
                "  outputs[i]: {'pred_boxes': (K, 4) XYXY, 'scores': (K,), 'pred_classes': (K,) int64}, in the",
                "  input tensor's pixels: scale boxes by original size / input size to go back to the original image.",
            ]
        )
    lines = []
    if args.format == "torchscript":
        lines += [
            f"TorchScript (tracing): {path}",
            "  import torch, torchvision  # torchvision registers the NMS op the model calls",
            f"  model = torch.jit.load({path!r})",
            "  outputs = model(image)",
        ]
    else:
        lines += [
            f"ONNX (opset {args.opset}): {path}",
            "  import onnxruntime",
            f"  session = onnxruntime.InferenceSession({path!r})",
            "  outputs = session.run(None, {'image': image})  # image: numpy float32",
        ]
    lines.append(f"  {image_doc}; exactly H={h}, W={w}: the traced model has a fixed input size")
    if args.outputs == "head":
        lines += [
            f"  outputs (raw, per level {list(cfg.MODEL.FSAF.IN_FEATURES)}): {list(output_names or [])}",
            "  class logits (1, C, H_l, W_l) and TBLR distances (1, 4, H_l, W_l) [+ RetinaNet logits / deltas];",
            "  post-process with fsaf_d2.export.detections_from_head_outputs(model, outputs, (H, W)) or as in",
            "  docs/export.md (sigmoid, threshold, top-k per level, TBLR decoding, class-aware NMS).",
        ]
    else:
        lines += [
            "  outputs: pred_boxes (K, 4) XYXY, pred_classes (K,) int64, scores (K,) sorted by decreasing score,",
            "  image_size (2,) = (H, W); boxes in the input tensor's pixels: scale by original size / input size.",
        ]
    return "\n".join(lines)


def build_argument_parser() -> argparse.ArgumentParser:
    """Argument parser of ``python -m fsaf_d2.export``."""
    parser = argparse.ArgumentParser(
        prog="python -m fsaf_d2.export", description="Export an FSAF model to TorchScript or ONNX."
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to the config file")
    parser.add_argument("--format", choices=FORMATS, default="torchscript", help="output format (torchscript)")
    parser.add_argument(
        "--export-method", choices=EXPORT_METHODS, default="tracing", help="tracing (default) or scripting"
    )
    parser.add_argument("--output", required=True, help="output directory (created)")
    parser.add_argument("--sample-image", default=None, help="image to trace with (default: a generated one)")
    parser.add_argument(
        "--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
        help="size of the generated sample image (default: INPUT.MIN_SIZE_TEST square)",
    )
    parser.add_argument(
        "--outputs", choices=("detections", "head"), default="detections",
        help="detections (default: post-processing included) or head (raw per-level outputs; tracing only)",
    )
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset ({ONNX_OPSET})")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[],
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Command-line entry point; returns the path of the exported model."""
    from detectron2.utils.logger import setup_logger

    from fsaf_d2.demo import setup_cfg  # registers fsaf_d2 (import fsaf_d2) and adds its config keys

    parser = build_argument_parser()
    args = parser.parse_args(argv)
    if args.export_method == "scripting" and args.format == "onnx":
        parser.error("ONNX export goes through tracing: use --export-method tracing")
    if args.export_method == "scripting" and args.outputs == "head":
        parser.error("--outputs head needs --export-method tracing")
    if args.sample_image is not None and args.input_size is not None:
        parser.error("give --sample-image or --input-size, not both")
    setup_logger(name="fsaf_d2")
    setup_logger(name="detectron2", abbrev_name="d2")
    cfg = setup_cfg(args.config_file, args.opts)

    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialised model")
    model.eval()
    inputs = sample_inputs(cfg, args.sample_image, args.input_size)

    if args.export_method == "scripting":
        path, exported = export_scripting(model, args.output)
        adapter, names = None, None
    else:
        path, adapter, exported = export_tracing(model, inputs, args.format, args.output, args.outputs, args.opset)
        names = adapter.output_names() if args.outputs == "head" else list(DETECTION_OUTPUTS)
    check = verify_export(model, inputs, args, path, adapter, exported)
    if check is None:
        check_text = "not checked against the eager model (onnxruntime is not installed)"
    else:
        check_text = f"exported vs eager model on the sample input (max abs differences): {check}"
    logger.info(check_text)

    image_shape = tuple(inputs[0]["image"].shape)
    info = {
        "format": args.format,
        "export_method": args.export_method,
        "outputs": args.outputs,
        "input": "list of {'image': (3, H, W)}" if args.export_method == "scripting" else "image (3, H, W)",
        "input_size": None if args.export_method == "scripting" else list(image_shape[1:]),
        "input_format": cfg.INPUT.FORMAT,
        "output_names": names if names is not None else list(SCRIPTING_FIELDS),
        "onnx_opset": args.opset if args.format == "onnx" else None,
        "check_against_eager": check,
    }
    with open(os.path.join(args.output, "export_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(usage_text(args, path, image_shape, names, cfg))
    print(f"  {check_text}")
    return path


if __name__ == "__main__":
    main()
