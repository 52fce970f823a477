"""Crash-safe checkpoints.

fvcore's ``Checkpointer.save`` writes ``model_XXXXXXX.pth`` and then ``last_checkpoint`` in place: a
crash (OOM kill, preemption, full disk) in the middle leaves a truncated file that ``--resume`` then
fails to load, or a ``last_checkpoint`` pointing at one. :class:`AtomicCheckpointer` writes both with
:func:`fsaf_d2.utils.io.atomic_write` (temporary file, fsync, ``os.replace``), so readers see either the
old or the new complete file.

It also loads trusted checkpoints with ``weights_only=False`` (torch >= 2.6 defaults to
``weights_only=True``, which rejects the non-tensor entries of Detectron2 checkpoints).
"""
import os
from typing import Any, Dict

import torch
from torch.nn.parallel import DistributedDataParallel
from detectron2.checkpoint import DetectionCheckpointer

from ..utils.io import atomic_torch_save, atomic_write_bytes, is_local

__all__ = ["AtomicCheckpointer", "ModelRunningScalars"]


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose ``save`` and ``last_checkpoint`` tagging are atomic.

    Save directories that are not plain paths (``scheme://``, see :func:`~fsaf_d2.utils.io.is_local`) fall
    back to Detectron2's writer.
    """

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not is_local(self.save_dir):
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not is_local(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write_bytes(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename.encode())

    def _torch_load(self, f: str):
        # Checkpoints written by this project (and Detectron2 model-zoo files) are trusted inputs;
        # ``f`` is already a local path (DetectionCheckpointer.load resolves URLs first).
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=False)
        except TypeError:  # pragma: no cover - torch < 1.13 has no weights_only
            return torch.load(f, map_location=torch.device("cpu"))


class ModelRunningScalars:
    """Checkpointable holding the model's running scalars that ``state_dict()`` leaves out.

    Losses normalised by an exponential moving average keep it outside the model's state dict:
    Detectron2's ``DenseDetector._ema_update`` stores a Python float attribute (RetinaNet:
    ``loss_normalizer``), and a non-persistent buffer is another common choice. Without them a resumed
    run restarts the average from its initial value and diverges from an uninterrupted run. This object
    saves and restores, for every submodule:

    * Python ``float`` attributes named ``loss_normalizer``;
    * non-persistent 0-dim floating-point buffers.

    It is saved with the trainer state and loaded on ``--resume`` only (not with ``MODEL.WEIGHTS``).

    Args:
        model: the (possibly DDP-wrapped) model.
    """

    FLOAT_ATTRIBUTES = ("loss_normalizer",)

    def __init__(self, model: torch.nn.Module):
        self.model = model.module if isinstance(model, DistributedDataParallel) else model

    def state_dict(self) -> Dict[str, Any]:
        ret = {}
        for prefix, module in self.model.named_modules():
            for name in self.FLOAT_ATTRIBUTES:
                value = module.__dict__.get(name)
                if isinstance(value, float):
                    ret[f"{prefix}.{name}" if prefix else name] = value
            for name in getattr(module, "_non_persistent_buffers_set", ()):
                buf = module._buffers.get(name)
                if buf is not None and buf.dim() == 0 and buf.is_floating_point():
                    ret[f"{prefix}.{name}" if prefix else name] = buf.detach().cpu().clone()
        return ret

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        modules = dict(self.model.named_modules())
        for key, value in state.items():
            prefix, _, name = key.rpartition(".")
            module = modules.get(prefix)
            if module is None:
                continue
            if isinstance(value, torch.Tensor):
                buf = module._buffers.get(name)
                if buf is not None and buf.shape == value.shape:
                    with torch.no_grad():
                        buf.copy_(value.to(buf.device, buf.dtype))
            elif name in self.FLOAT_ATTRIBUTES:
                setattr(module, name, float(value))
