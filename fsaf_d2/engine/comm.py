"""Collectives that work under gloo, NCCL and HCCL, plus the DDP wrapper.

Detectron2's evaluators and ``SimpleTrainer.write_metrics`` call ``detectron2.utils.comm.all_gather`` /
``gather`` on picklable objects. Stock Detectron2 creates a gloo side group only when the backend is
"nccl" and otherwise runs the object collectives on the default group; under HCCL that means
``gather``, which ProcessGroupHCCL does not implement ("ProcessGroupHCCL does not support gather"),
so ``COCOEvaluator`` crashes.

:func:`patch_detectron2` (idempotent) swaps in the functions of this module:

* object collectives run on a **gloo side group** whenever the default backend is not gloo;
* if that group cannot be created (gloo missing, or disabled with ``FSAF_D2_GLOO_SIDE_GROUP=0`` for
  clusters whose gloo networking is broken), objects are pickled into uint8 tensors and exchanged with
  ``all_gather`` on the default (device) group;
* under HCCL (any backend other than gloo / nccl / mpi), ``gather`` is an ``all_gather`` whose result
  is kept on ``dst`` only, so no ``gather`` call ever reaches the backend.
"""
import gc
import logging
import os
import pickle
import sys
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from detectron2.utils import comm as d2_comm
from torch.nn.parallel import DistributedDataParallel

from .device import current_device, is_accelerator

__all__ = [
    "release_process_groups",
    "patch_detectron2",
    "unpatch_detectron2",
    "is_patched",
    "all_gather",
    "gather",
    "get_object_group",
    "create_ddp_model",
    "ddp_device_ids",
]

logger = logging.getLogger(__name__)

# Backends whose ProcessGroup implements ``gather``.
_GATHER_BACKENDS = ("gloo", "nccl", "mpi")
_PATCHED_NAMES = ("all_gather", "gather", "_get_global_gloo_group")

_state = {"device_type": None, "originals": None}
# (default process group, object group or None) of the current process group generation
_group_cache: dict = {}


def _default_group():
    return dist.distributed_c10d._get_default_group()


def get_object_group():
    """Process group for object (pickle) collectives, created once per process-group lifetime.

    Returns:
        the default group when its backend is gloo; otherwise a gloo side group over all ranks; or None
        when no gloo group can be used (then callers exchange objects as device tensors).
    """
    default = _default_group()
    if _group_cache.get("default") is default:
        return _group_cache["group"]
    backend = dist.get_backend()
    if backend == "gloo":
        group = dist.group.WORLD
    elif os.environ.get("FSAF_D2_GLOO_SIDE_GROUP", "1") == "0":
        logger.info(f"FSAF_D2_GLOO_SIDE_GROUP=0: object collectives run on the {backend} group")
        group = None
    else:
        try:
            group = dist.new_group(backend="gloo")
        except Exception as e:  # gloo not compiled in / not usable on this cluster
            logger.warning(
                f"Cannot create a gloo side group ({e!r}); object collectives fall back to all_gather on the "
                f"{backend} group"
            )
            group = None
    _group_cache.update(default=default, group=group)
    return group


def release_process_groups() -> None:
    """Drop every Python reference to sub-groups (Detectron2's local group and gloo cache, the object
    group) and destroy all process groups. Dangling group objects destroyed at interpreter exit can abort
    the process ("terminate called without an active exception") while gloo threads are still alive."""
    _group_cache.clear()
    d2_comm._LOCAL_PROCESS_GROUP = None
    originals = _state["originals"][0] if _state["originals"] is not None else {}
    for fn in (originals.get("_get_global_gloo_group"), getattr(d2_comm, "_get_global_gloo_group", None)):
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def _device_for_backend() -> torch.device:
    """Device on which tensors for the default group's collectives must live."""
    dtype = _state["device_type"]
    if dist.get_backend() == "gloo" or dtype is None or not is_accelerator(dtype):
        return torch.device("cpu")
    return torch.device(f"{dtype}:{current_device(dtype)}")


def _all_gather_as_tensors(data: Any, group=None, device: Optional[torch.device] = None) -> List[Any]:
    """all_gather of a picklable object through uint8 tensors on ``device`` (uses only ``all_gather``)."""
    device = _device_for_backend() if device is None else device
    world = dist.get_world_size(group)
    payload = torch.frombuffer(bytearray(pickle.dumps(data)), dtype=torch.uint8).to(device)
    size = torch.tensor([payload.numel()], dtype=torch.int32, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s.item()) for s in sizes]
    max_size = max(sizes)
    if payload.numel() < max_size:
        payload = torch.cat([payload, payload.new_zeros(max_size - payload.numel())])
    chunks = [payload.new_empty(max_size) for _ in range(world)]
    dist.all_gather(chunks, payload, group=group)
    return [pickle.loads(c[:n].cpu().numpy().tobytes()) for c, n in zip(chunks, sizes)]


def all_gather(data: Any, group=None) -> List[Any]:
    """Gather a picklable object from every rank (drop-in for ``detectron2.utils.comm.all_gather``).

    Args:
        data: any picklable object.
        group: process group; default: :func:`get_object_group`.

    Returns:
        list with one entry per rank of ``group``, in rank order.
    """
    if d2_comm.get_world_size() == 1:
        return [data]
    if group is None:
        group = get_object_group()
        if group is None:
            return _all_gather_as_tensors(data)
    if dist.get_world_size(group) == 1:
        return [data]
    backend = dist.get_backend(group)
    if backend not in _GATHER_BACKENDS:
        # all_gather_object would pick the device itself; keep it explicit for custom backends (hccl)
        return _all_gather_as_tensors(data, group)
    output = [None] * dist.get_world_size(group)
    dist.all_gather_object(output, data, group=group)
    return output


def gather(data: Any, dst: int = 0, group=None) -> List[Any]:
    """Gather a picklable object on rank ``dst`` (drop-in for ``detectron2.utils.comm.gather``).

    Under backends without ``gather`` support (HCCL) this is an :func:`all_gather` whose result is
    returned on ``dst`` only.

    Returns:
        on ``dst``: list with one entry per rank; elsewhere: ``[]``.
    """
    if d2_comm.get_world_size() == 1:
        return [data]
    if dist.get_backend() not in _GATHER_BACKENDS:
        gathered = all_gather(data, group=group)
        rank = dist.get_rank(group) if group is not None else dist.get_rank()
        return gathered if rank == dst else []
    if group is None:
        group = get_object_group()
    world = dist.get_world_size(group)
    if world == 1:
        return [data]
    if dist.get_rank(group) == dst:
        output = [None] * world
        dist.gather_object(data, output, dst=dst, group=group)
        return output
    dist.gather_object(data, None, dst=dst, group=group)
    return []


def _global_gloo_group():
    """Replacement of ``comm._get_global_gloo_group``: the object group, or WORLD without gloo."""
    group = get_object_group()
    return dist.group.WORLD if group is None else group


_REPLACEMENTS = {"all_gather": all_gather, "gather": gather, "_get_global_gloo_group": _global_gloo_group}


def patch_detectron2(device_type: str) -> None:
    """Route Detectron2's object collectives through this module. Idempotent; call it in every worker.

    Replaces ``all_gather``, ``gather`` and ``_get_global_gloo_group`` in ``detectron2.utils.comm`` and in
    every loaded ``detectron2.*`` module that imported them by name (e.g. ``sem_seg_evaluation``).

    Args:
        device_type: "cpu", "cuda" or "npu": where fallback tensor collectives allocate their buffers.
    """
    _state["device_type"] = device_type
    if _state["originals"] is not None:
        return
    originals = {name: getattr(d2_comm, name) for name in _PATCHED_NAMES}
    replaced = []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "detectron2" or mod_name.startswith("detectron2.")):
            continue
        for name in _PATCHED_NAMES:
            if getattr(mod, name, None) is originals[name]:
                setattr(mod, name, _REPLACEMENTS[name])
                replaced.append((mod, name))
    _state["originals"] = (originals, replaced)
    _group_cache.clear()
    logger.debug(f"patch_detectron2({device_type!r}): replaced {len(replaced)} attributes")


def unpatch_detectron2() -> None:
    """Undo :func:`patch_detectron2` (for tests)."""
    if _state["originals"] is None:
        return
    originals, replaced = _state["originals"]
    for mod, name in replaced:
        setattr(mod, name, originals[name])
    _state.update(device_type=None, originals=None)
    _group_cache.clear()


def is_patched() -> bool:
    """Whether :func:`patch_detectron2` is in effect."""
    return _state["originals"] is not None


# ---------------------------------------------------------------------------------------------- DDP


def ddp_device_ids(device: torch.device) -> Optional[List[int]]:
    """``device_ids`` for DistributedDataParallel: ``[index]`` on cuda/npu, None on CPU.

    Detectron2's ``create_ddp_model`` always passes ``[local_rank]``, which DDP rejects for CPU modules.
    """
    if not is_accelerator(device.type):
        return None
    return [device.index if device.index is not None else current_device(device.type)]


def create_ddp_model(model: torch.nn.Module, *, fp16_compression: bool = False, **kwargs) -> torch.nn.Module:
    """Wrap ``model`` in DistributedDataParallel when more than one process runs (device-generic).

    Args:
        model: the module, already on its device.
        fp16_compression: all-reduce gradients in fp16 (DDP comm hook).
        kwargs: passed to DDP; ``broadcast_buffers`` defaults to False (as in Detectron2) and
            ``device_ids`` to :func:`ddp_device_ids` of the model's device.
    """
    if d2_comm.get_world_size() == 1:
        return model
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    kwargs.setdefault("device_ids", ddp_device_ids(device))
    kwargs.setdefault("broadcast_buffers", False)
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp
