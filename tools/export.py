#!/usr/bin/env python
"""Export an FSAF model (or the combined RetinaNet + FSAF model) to TorchScript or ONNX for deployment.

Usage::

    python tools/export.py --config-file configs/fsaf_R50_FPN_1x.yaml \\
        --format {torchscript,onnx} --export-method {tracing,scripting} --output DIR \\
        [--sample-image IMG | --input-size H W] [--outputs {detections,head}] \\
        MODEL.WEIGHTS model.pth [KEY VALUE ...]

(installed: ``fsaf-export ...``). Modelled on Detectron2's ``tools/deploy/export_model.py``; writes
``DIR/model.ts`` or ``DIR/model.onnx`` and ``DIR/export_info.json`` (inputs, outputs, input size), checks the
exported model against the eager one on the sample input and prints how to run it. The config is built as
``train_net.py`` builds it (:func:`fsaf_d2.engine.build_config`). What tracing, scripting and
``--outputs head`` export: :mod:`fsaf_d2.export`. A traced model's sample is ``--sample-image`` resized as in
evaluation (``INPUT.MIN/MAX_SIZE_TEST``), or a generated image of ``--input-size`` (default
``INPUT.MIN_SIZE_TEST`` square).
"""
import argparse
import json
import logging
import os
import sys
from typing import Dict, Optional, Sequence

import torch
import fsaf_d2  # noqa: F401  (first: registers FSAF, and Detectron2's import-time warnings stay quiet)
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from torch import Tensor

from fsaf_d2.engine import build_config
from fsaf_d2.engine.checkpoint import AtomicCheckpointer
from fsaf_d2.export import (
    DETECTION_OUTPUTS,
    EXPORT_METHODS,
    FORMATS,
    ONNX_OPSET,
    SCRIPTING_FIELDS,
    export_scripting,
    export_tracing,
    sample_inputs,
)

logger = logging.getLogger("fsaf_d2.export")  # not "__main__" when run as a script


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
    """Argument parser of ``tools/export.py``."""
    parser = argparse.ArgumentParser(description="Export an FSAF model to TorchScript or ONNX.")
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
    cfg = build_config(args.config_file, args.opts)

    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        AtomicCheckpointer(model, strict=cfg.MODEL.WEIGHTS_STRICT).load(cfg.MODEL.WEIGHTS)  # a mismatch is an error
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


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Console-script entry point (``fsaf-export``): :func:`main`, exit status 0 (``main`` returns what it wrote,
    which ``sys.exit`` would print and turn into status 1)."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
