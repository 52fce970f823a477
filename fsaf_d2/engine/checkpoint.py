"""Crash-safe checkpoints.

fvcore's ``Checkpointer.save`` writes ``model_XXXXXXX.pth`` and then ``last_checkpoint`` in place: a
crash (OOM kill, preemption, full disk) in the middle leaves a truncated file that ``--resume`` then
fails to load, or a ``last_checkpoint`` pointing at one. :class:`AtomicCheckpointer` writes both with
:func:`fsaf_d2.utils.io.atomic_write` (temporary file, fsync, ``os.replace``), so readers see either the
old or the new complete file.

It also loads trusted checkpoints with ``weights_only=False`` (torch >= 2.6 defaults to
``weights_only=True``, which rejects the non-tensor entries of Detectron2 checkpoints).

Faults of checkpoint files (docs/training.md#faults):

* a write that fails (full disk, quota, read-only or vanished volume) raises
  :class:`~fsaf_d2.engine.faults.CheckpointWriteError` naming the file, the free space and the previous
  checkpoint, which stays intact with ``last_checkpoint``; :func:`check_output_dir` fails before training
  on an ``OUTPUT_DIR`` that cannot be written at all;
* a truncated or corrupt file raises :class:`~fsaf_d2.engine.faults.CheckpointLoadError` naming it; on
  ``--resume`` the newest older readable ``model_*.pth`` is used instead, with a warning;
* a ``.pth`` of another architecture or class count raises
  :class:`~fsaf_d2.engine.faults.CheckpointMismatchError` naming the keys and shapes (``strict``), except the
  class layer when fine-tuning to new classes was asked for (``new_class_layer``);
* temporary files of writes killed half-way are removed when a run resumes.
"""
import errno
import glob
import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from typing import Any, Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from detectron2.checkpoint import DetectionCheckpointer

from detectron2.utils import comm

from ..utils.io import atomic_torch_save, atomic_write_bytes, is_local
from .faults import CheckpointLoadError, CheckpointMismatchError, CheckpointWriteError, OutputDirError

__all__ = ["AtomicCheckpointer", "ModelRunningScalars", "check_output_dir", "check_same_start_iteration", "free_space"]

logger = logging.getLogger(__name__)

#: periodic checkpoint files, ``model_<iteration>.pth``
_PERIODIC = re.compile(r"^model_(\d+)\.pth$")
#: temporary files of fsaf_d2.utils.io.atomic_write (``.<basename>.<random>.tmp``) of checkpoint files
_STALE_TEMP = re.compile(r"^\.(model_\w+\.pth|last_checkpoint)\..+\.tmp$")
#: errors of reading a file that is not a complete checkpoint (unpickling garbage can also ask for
#: an impossible allocation: MemoryError, OverflowError)
_UNREADABLE = (
    RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, UnicodeDecodeError,
    MemoryError, OverflowError,
)
#: first bytes of a torch.save file: a zip archive (torch >= 1.6) or a legacy pickle (PROTO opcode)
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_PROTOCOLS = (2, 3, 4, 5)
#: Detectron2's own exceptions to exact loading (see DetectionCheckpointer._load_model)
_IGNORED_MISSING = ("pixel_mean", "pixel_std")
_IGNORED_UNEXPECTED = "anchor_generator.cell_anchors"
#: last module name of the class-score layers (their shape depends on the class count)
_CLASS_LAYER_SUFFIX = "cls_score"
#: keys listed per kind of mismatch in an error message
_MAX_LISTED = 12


def free_space(path: str) -> str:
    """Free space of the file system holding ``path`` (or its nearest existing parent), for messages."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        return f"{shutil.disk_usage(probe).free / 2**20:.1f} MiB free on {probe}"
    except OSError as e:  # pragma: no cover - vanished mount
        return f"free space of {probe} unknown ({e.strerror})"


def check_output_dir(output_dir: str) -> None:
    """Create ``output_dir`` and write (then remove) a probe file in it; fail now, not at the first checkpoint.

    Raises:
        OutputDirError: naming the directory, the OS error and the free space.
    """
    if not output_dir or not is_local(output_dir):
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=output_dir, prefix=".write_probe.", suffix=".tmp")
        try:
            os.write(fd, b"fsaf_d2")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutputDirError(
            e.errno,
            f"OUTPUT_DIR {output_dir!r} cannot be written ({e.strerror}; {free_space(output_dir)}): logs and "
            "checkpoints could not be saved. Set OUTPUT_DIR to a writable folder with room for the checkpoints.",
        ) from e


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested checkpoint dict (the size of its file, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _os_error_in(error: BaseException) -> Optional[OSError]:
    """``error`` itself or the first ``OSError`` among its causes/contexts, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _strip_module_prefix(keys) -> List[str]:
    keys = list(keys)
    if keys and all(k.startswith("module.") for k in keys):
        return [k[len("module."):] for k in keys]
    return keys


def _listed(items: List[str]) -> str:
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose ``save`` and ``last_checkpoint`` tagging are atomic.

    Save directories that are not plain paths (``scheme://``, see :func:`~fsaf_d2.utils.io.is_local`) fall
    back to Detectron2's writer.

    Args:
        model, save_dir, checkpointables: as in ``DetectionCheckpointer``.
        strict: a checkpoint loaded by name (``.pth``; not the name-matched ``.pkl`` backbones) must fit the
            model: missing, unexpected or differently shaped keys raise ``CheckpointMismatchError``
            (``MODEL.WEIGHTS_STRICT``).
        new_class_layer: class-score keys (``*cls_score.*``) of another shape are left at their
            initialisation instead (fine-tuning to another class count, ``MODEL.WEIGHTS_NEW_CLASS_LAYER``).
    """

    def __init__(self, model, save_dir: str = "", *, strict: bool = True, new_class_layer: bool = False,
                 **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.strict = strict
        self.new_class_layer = new_class_layer
        self._loading: Optional[str] = None

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
        try:
            atomic_torch_save(data, save_file)
        except (OSError, RuntimeError) as e:
            # torch.save's zip writer reports a failed write as a RuntimeError raised while closing the
            # archive, with the OSError as its context
            os_error = _os_error_in(e)
            if os_error is None:
                raise
            raise self._write_error(save_file, os_error, _tensor_bytes(data)) from e
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not is_local(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        try:
            atomic_write_bytes(path, last_filename_basename.encode())
        except OSError as e:
            raise self._write_error(path, e, len(last_filename_basename)) from e

    def _write_error(self, path: str, error: OSError, size: int) -> CheckpointWriteError:
        """The error of a failed write of ``path`` (``size`` bytes): cause, free space, what was kept, what to do."""
        previous = self.get_checkpoint_file() if self.has_checkpoint() else ""
        kept = (
            f"The previous checkpoint {previous} and last_checkpoint are unchanged: after making room, rerun "
            f"with --resume to continue from it."
            if previous
            else "No earlier checkpoint exists in this folder."
        )
        cause = errno.errorcode.get(error.errno, str(error.errno)) if error.errno else type(error).__name__
        return CheckpointWriteError(
            error.errno,
            f"Cannot write {path} ({cause}: {error.strerror or error}); it needs about {size / 2**20:.1f} MiB, "
            f"{free_space(path)}. {kept} Free space there or set OUTPUT_DIR to a volume with room for "
            "two checkpoints.",
        )

    # ------------------------------------------------------------------------------------------- loading

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """fvcore's ``resume_or_load``; a corrupt last checkpoint falls back to the newest readable older one."""
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        self.remove_stale_temp_files()
        last = self.get_checkpoint_file()
        try:
            return self.load(last)
        except CheckpointMismatchError:
            raise
        except CheckpointLoadError as error:
            for candidate in self.older_checkpoints(last):
                try:
                    result = self.load(candidate)
                except CheckpointMismatchError:
                    raise
                except CheckpointLoadError as e:
                    logger.warning(f"Skipping {candidate} too: {e}")
                    continue
                logger.warning(f"{error}\nResumed from the previous readable checkpoint {candidate} instead.")
                return result
            raise CheckpointLoadError(
                f"{error}\nNo other readable model_*.pth in {self.save_dir}: restore the file, or train from "
                "scratch (without --resume) in a new OUTPUT_DIR."
            ) from error

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._parsed_url_during_load = None  # DetectionCheckpointer.load leaves it set when loading fails

    def older_checkpoints(self, path: str) -> List[str]:
        """Periodic checkpoints next to ``path``, older than it (all of them for ``model_final.pth``),
        newest first."""
        directory = os.path.dirname(path) or "."
        match = _PERIODIC.match(os.path.basename(path))
        limit = int(match.group(1)) if match else float("inf")
        found = []
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            m = _PERIODIC.match(name)
            if m and int(m.group(1)) < limit:
                found.append((int(m.group(1)), os.path.join(directory, name)))
        return [p for _, p in sorted(found, reverse=True)]

    def remove_stale_temp_files(self) -> None:
        """Remove the temporary files of checkpoint writes killed half-way (main process, local folders)."""
        if not self.save_to_disk or not is_local(self.save_dir) or not comm.is_main_process():
            return
        for path in glob.glob(os.path.join(glob.escape(self.save_dir), ".*.tmp")):
            if _STALE_TEMP.match(os.path.basename(path)):
                logger.info(f"Removing {path}, left by a checkpoint write that did not finish")
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def _load_file(self, filename: str):
        self._loading = filename
        try:
            return super()._load_file(filename)
        except _UNREADABLE as e:
            older = self.older_checkpoints(filename)
            hint = f" The newest older checkpoint next to it is {older[0]}." if older else ""
            raise CheckpointLoadError(
                f"Cannot read checkpoint {filename} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}) "
                f"The file is truncated or corrupt (copied while being written, a full disk, a failed "
                f"transfer); use another checkpoint.{hint}"
            ) from e

    def _load_model(self, checkpoint):
        if self.strict and not checkpoint.get("matching_heuristics", False):
            self._check_fits(checkpoint["model"])
        return super()._load_model(checkpoint)

    def _check_fits(self, state: Dict[str, Any]) -> None:
        """Raise CheckpointMismatchError listing the keys of ``state`` that do not fit the model."""
        model_state = self.model.state_dict()
        keys = dict(zip(_strip_module_prefix(state.keys()), state.values()))
        missing = [k for k in model_state if k not in keys and k not in _IGNORED_MISSING]
        unexpected = [k for k in keys if k not in model_state and _IGNORED_UNEXPECTED not in k]
        shapes = []
        for k, v in keys.items():
            if k not in model_state or not hasattr(v, "shape"):
                continue
            if tuple(v.shape) != tuple(model_state[k].shape):
                if self.new_class_layer and k.rpartition(".")[0].endswith(_CLASS_LAYER_SUFFIX):
                    continue
                shapes.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_state[k].shape)}")
        if not (missing or unexpected or shapes):
            return
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} keys of another shape: {_listed(shapes)}")
        if unexpected:
            parts.append(f"{len(unexpected)} keys the model does not have: {_listed(unexpected)}")
        if missing:
            parts.append(f"{len(missing)} model keys missing from the checkpoint: {_listed(missing)}")
        raise CheckpointMismatchError(
            f"Checkpoint {self._loading} does not fit the model (another architecture or class count?): "
            + "; ".join(parts)
            + ". To fine-tune onto another class count set MODEL.WEIGHTS_NEW_CLASS_LAYER True (the class layer "
            "starts from its initialisation); MODEL.WEIGHTS_STRICT False loads the fitting keys only."
        )

    def _torch_load(self, f: str):
        # Checkpoints written by this project (and Detectron2 model-zoo files) are trusted inputs;
        # ``f`` is already a local path (DetectionCheckpointer.load resolves URLs first).
        # A file that is neither format is refused before it is unpickled: unpickling garbage fails
        # in ways that depend on the bytes (even a MemoryError), not with one clear error.
        with open(f, "rb") as fh:
            head = fh.read(4)
        is_legacy = len(head) >= 2 and head[0] == pickle.PROTO[0] and head[1] in _LEGACY_PROTOCOLS
        if head != _ZIP_MAGIC and not is_legacy:
            raise pickle.UnpicklingError(
                f"not a torch.save file (first bytes {head!r}: neither a zip archive nor a pickle)"
            )
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


def check_same_start_iteration(start_iter: int) -> None:
    """Fail on every rank, naming each rank's iteration, unless all ranks resume from the same iteration.

    Each rank loads the checkpoint itself; one for which the newest ``model_*.pth`` was unreadable (a shared
    file system still syncing, a transient read error) falls back to an older one. DDP broadcast the weights
    before the load and never again, so the replicas would silently diverge and then run different numbers of
    steps into mismatched collectives. One small all-gather after loading; nothing with one process.
    """
    if comm.get_world_size() == 1:
        return
    iterations = comm.all_gather(int(start_iter))
    if len(set(iterations)) > 1:
        per_rank = ", ".join(f"rank {r}: {it}" for r, it in enumerate(iterations))
        raise CheckpointLoadError(
            f"The ranks would resume from different iterations ({per_rank}): a checkpoint was readable on "
            "some ranks only (see the warnings above). Make the newest checkpoint readable on every machine "
            "(or delete it) and rerun with --resume."
        )
