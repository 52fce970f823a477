"""Export an FSAF model (or the combined RetinaNet + FSAF model) to TorchScript or ONNX for deployment.

The command line is ``tools/export.py`` (modelled on Detectron2's ``tools/deploy/export_model.py``).

* :func:`export_tracing` (TorchScript or ONNX) records the model on one sample input through Detectron2's
  :class:`TracingAdapter`: the exported model takes one image tensor of exactly the sample's size and returns
  flat tensors. :func:`sample_inputs` makes the sample: an image resized as in evaluation
  (``INPUT.MIN/MAX_SIZE_TEST``), or a generated image of a given size.
* :func:`export_scripting` (TorchScript only) compiles the inference path with :func:`scripting_with_instances`:
  the exported model takes a list of ``{"image": tensor}`` of any size and returns a list of dicts.
* ``outputs="head"`` (tracing only, :class:`HeadOutputsAdapter`) exports normalisation + backbone + head and
  returns the raw per-level outputs; score thresholding, top-k, TBLR decoding and NMS then run outside
  (:func:`detections_from_head_outputs`).
"""
import copy
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.export import TracingAdapter, dump_torchscript_IR, scripting_with_instances
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from .data.transforms import apply_resize_backend

__all__ = [
    "FORMATS",
    "DETECTION_OUTPUTS",
    "EXPORT_METHODS",
    "ONNX_OPSET",
    "SCRIPTING_FIELDS",
    "ScriptableAdapter",
    "HeadOutputsAdapter",
    "sample_inputs",
    "export_tracing",
    "export_scripting",
    "detections_from_head_outputs",
]

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
        _, predictions = self.model.features_and_predictions(images.tensor)
        return tuple(x for per_level in predictions for x in per_level)

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
