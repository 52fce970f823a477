"""Detectron2's object collectives under HCCL, process-group teardown, and the DDP wrapper.

Detectron2's evaluators and ``SimpleTrainer.write_metrics`` call ``detectron2.utils.comm.all_gather`` /
``gather`` on picklable objects, on the group ``comm._get_global_gloo_group()`` returns: a gloo side group
when the backend is NCCL, the default group otherwise. Under gloo and NCCL that works as it is, and this
module changes nothing there. Under HCCL the default group is ProcessGroupHCCL, which implements
``all_gather`` but not ``gather`` ("ProcessGroupHCCL does not support gather"), so ``COCOEvaluator``
crashes.

:func:`patch_detectron2` (idempotent; a no-op for every backend that implements ``gather``) therefore
replaces two functions of ``detectron2.utils.comm``, and nothing else, under HCCL only:

* ``_get_global_gloo_group`` returns a **gloo side group** under HCCL too, as Detectron2 does for NCCL;
  Detectron2's own ``all_gather`` and ``gather`` then run on it unchanged;
* ``gather`` falls back to an ``all_gather`` kept on ``dst`` when no gloo group can be used (gloo missing,
  or disabled with ``FSAF_D2_GLOO_SIDE_GROUP=0`` for clusters whose gloo networking is broken): objects
  then travel pickled in uint8 device tensors, and no ``gather`` ever reaches HCCL.

These two (:data:`_D2_PATCHED`) and the two references :func:`_forget_detectron2_groups` drops at
teardown are the only Detectron2 internals this package touches.

Faults of multi-process jobs: :func:`any_rank` lets every rank take the same decision (preemption, a
non-finite loss), and :class:`PeerWatchdog` stops a worker whose peer died or froze within
``DIST.PEER_TIMEOUT_S`` instead of the process-group timeout (30 minutes by default).
"""
import gc
import logging
import os
import pickle
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from detectron2.utils import comm as d2_comm
from torch.nn.parallel import DistributedDataParallel

from .device import current_device, dist_backend, is_accelerator
from .faults import EXIT_WORKER_LOST

__all__ = [
    "release_process_groups",
    "patch_detectron2",
    "unpatch_detectron2",
    "is_patched",
    "needs_patch",
    "gather",
    "get_object_group",
    "create_ddp_model",
    "ddp_device_ids",
    "any_rank",
    "PeerWatchdog",
    "start_peer_watchdog",
    "stop_peer_watchdog",
]

logger = logging.getLogger(__name__)

# Backends whose ProcessGroup implements ``gather``: Detectron2's collectives work there as they are.
_GATHER_BACKENDS = ("gloo", "nccl", "mpi")
#: the attributes of ``detectron2.utils.comm`` that :func:`patch_detectron2` replaces (HCCL only)
_D2_PATCHED = ("_get_global_gloo_group", "gather")

_state = {"device_type": None, "originals": None}
# (default process group, object group or None) of the current process group generation
_group_cache: dict = {}


def needs_patch(device_type: str) -> bool:
    """Whether Detectron2's object collectives need :func:`patch_detectron2` on ``device_type``'s backend
    (True for npu / HCCL, which has no ``gather``; False for cpu / gloo and cuda / NCCL)."""
    return dist_backend(device_type) not in _GATHER_BACKENDS


def _default_group():
    return dist.distributed_c10d._get_default_group()


def get_object_group():
    """The process group of object (pickle) collectives under HCCL, created once per process-group lifetime.

    Returns:
        a gloo side group over all ranks; or the default group when no gloo group can be used (then
        :func:`gather` exchanges objects as device tensors through ``all_gather``).
    """
    default = _default_group()
    if _group_cache.get("default") is default:
        return _group_cache["group"]
    backend = dist.get_backend()
    if os.environ.get("FSAF_D2_GLOO_SIDE_GROUP", "1") == "0":
        logger.info(f"FSAF_D2_GLOO_SIDE_GROUP=0: object collectives run on the {backend} group")
        group = dist.group.WORLD
    else:
        try:
            group = dist.new_group(backend="gloo")
        except Exception as e:  # gloo not compiled in / not usable on this cluster
            logger.warning(
                f"Cannot create a gloo side group ({e!r}); object collectives fall back to all_gather on the "
                f"{backend} group"
            )
            group = dist.group.WORLD
    _group_cache.update(default=default, group=group)
    return group


def _forget_detectron2_groups() -> None:
    """Drop the process groups Detectron2's comm module holds (it has no public reset for them): the
    per-machine group of ``create_local_process_group`` and the cached ``_get_global_gloo_group`` result."""
    d2_comm._LOCAL_PROCESS_GROUP = None
    originals = _state["originals"] or {}
    originals.get("_get_global_gloo_group", d2_comm._get_global_gloo_group).cache_clear()


def release_process_groups(failed: bool = False) -> None:
    """Drop every Python reference to sub-groups (Detectron2's local group and gloo cache, the object
    group) and destroy all process groups. Dangling group objects destroyed at interpreter exit can abort
    the process ("terminate called without an active exception") while gloo threads are still alive.
    Stops the :class:`PeerWatchdog` first (``failed``: this rank stops with an error, which ends its peers)."""
    stop_peer_watchdog(failed)
    _group_cache.clear()
    _forget_detectron2_groups()
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


def gather(data: Any, dst: int = 0, group=None) -> List[Any]:
    """``detectron2.utils.comm.gather`` for HCCL: Detectron2's own on a group whose backend has ``gather``
    (the gloo side group of :func:`get_object_group`), else an ``all_gather`` kept on ``dst``.

    Returns:
        on ``dst``: list with one entry per rank; elsewhere: ``[]``.
    """
    if group is None:
        group = get_object_group() if d2_comm.get_world_size() > 1 else None
    if group is None or dist.get_backend(group) in _GATHER_BACKENDS:
        return _state["originals"]["gather"](data, dst=dst, group=group)
    if dist.get_world_size(group) == 1:
        return [data]
    gathered = _all_gather_as_tensors(data, group)
    return gathered if dist.get_rank(group) == dst else []


_REPLACEMENTS = {"_get_global_gloo_group": get_object_group, "gather": gather}


def patch_detectron2(device_type: str) -> None:
    """Make Detectron2's object collectives work on ``device_type``'s backend; call it in every worker.

    A no-op where the backend implements ``gather`` (cpu / gloo, cuda / NCCL). Under HCCL (npu) it replaces
    ``_get_global_gloo_group`` and ``gather`` in ``detectron2.utils.comm`` (see the module docstring).
    Idempotent; :func:`unpatch_detectron2` undoes it.

    Args:
        device_type: "cpu", "cuda" or "npu": decides the backend, and where fallback tensor collectives
            allocate their buffers.
    """
    if not needs_patch(device_type) or _state["originals"] is not None:
        return
    _state["device_type"] = device_type
    _state["originals"] = {name: getattr(d2_comm, name) for name in _D2_PATCHED}
    for name in _D2_PATCHED:
        setattr(d2_comm, name, _REPLACEMENTS[name])
    _group_cache.clear()
    logger.debug(f"patch_detectron2({device_type!r}): replaced detectron2.utils.comm.{'/'.join(_D2_PATCHED)}")


def unpatch_detectron2() -> None:
    """Undo :func:`patch_detectron2` (for tests)."""
    if _state["originals"] is None:
        return
    for name, fn in _state["originals"].items():
        setattr(d2_comm, name, fn)
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


# ---------------------------------------------------------------------------------------------- faults


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is True on at least one rank; every rank gets the same answer (one small CPU
    collective on the object group; no collective in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    group = d2_comm._get_global_gloo_group()
    device = torch.device("cpu") if dist.get_backend(group) == "gloo" else _device_for_backend()
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def _heartbeat_key(rank: int) -> str:
    return f"fsaf_d2/heartbeat/{rank}"


_DONE = b"done"
_FAILED = b"failed"


class PeerWatchdog:
    """A thread that ends this worker when another rank stops answering.

    Every ``interval`` seconds it increments this rank's counter in the process group's key-value store
    and reads the others'. A peer whose counter has not moved for ``timeout_s`` seconds (killed, frozen, its
    machine gone) or a store that cannot be reached (it lives in rank 0's process under ``launch``) ends
    this process with :data:`~fsaf_d2.engine.faults.EXIT_WORKER_LOST`, after logging which rank was lost.
    The main thread may be blocked inside a collective that only the process-group timeout would end,
    hence ``os._exit``. Checkpoints are atomic, so nothing written is lost; ``--resume`` continues.

    Args:
        store: a ``torch.distributed.Store`` shared by all ranks (its own TCP connection is opened).
        rank, world_size: this worker's coordinates.
        timeout_s: seconds of silence after which a peer is declared lost.
    """

    def __init__(self, store, rank: int, world_size: int, timeout_s: float, key: str = "DIST.PEER_TIMEOUT_S"):
        self.store = store
        self.key = key
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = float(timeout_s)
        self.interval = max(0.1, min(5.0, self.timeout_s / 10))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fsaf_d2-peer-watchdog", daemon=True)

    def start(self) -> "PeerWatchdog":
        self.store.set(_heartbeat_key(self.rank), "0")
        self._thread.start()
        return self

    def stop(self, failed: bool = False) -> None:
        """Stop watching. The job ends normally: peers then ignore this rank's silence; ``failed`` (this rank
        stops with an error): peers end at once, as for a lost rank, instead of waiting in a collective for a
        rank that has left."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            # first: a beat it is writing must not land after the mark (a store round trip may take a while)
            self._thread.join(timeout=self.interval * 2 + 2.0)
        try:
            self.store.set(_heartbeat_key(self.rank), _FAILED if failed else _DONE)
        except Exception:  # the store's host may already be gone at teardown
            pass

    def _run(self) -> None:
        peers = [r for r in range(self.world_size) if r != self.rank]
        seen: Dict[int, tuple] = {r: (None, time.monotonic()) for r in peers}
        beat = 0
        woke = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                beat += 1
                self.store.set(_heartbeat_key(self.rank), str(beat))
                now = time.monotonic()
                # this thread itself was held up (the GIL held by a long parse, the process stopped): the
                # peers' silence over that time says nothing, their clocks start again
                stalled, woke = now - woke > 3 * self.interval + 1.0, now
                for r in list(seen):
                    key = _heartbeat_key(r)
                    value = self.store.get(key) if self.store.check([key]) else None
                    if value == _DONE:
                        del seen[r]
                    elif value == _FAILED:
                        self._lost(f"rank {r} stopped with an error (its log names it)")
                        return
                    elif value != seen[r][0] or stalled:
                        seen[r] = (value, now)
                    elif now - seen[r][1] > self.timeout_s:
                        self._lost(f"rank {r} has not answered for {now - seen[r][1]:.0f} s (killed, frozen or "
                                   "its machine lost)")
                        return
            except Exception as e:  # the store's host (rank 0's process) is gone
                if self._stop.wait(max(2.0, self.interval)):
                    return  # the job is ending: the host left first
                self._lost(f"the process group's store is unreachable, so rank 0 (its host) is gone ({e})")
                return

    def _lost(self, why: str) -> None:
        message = (
            f"Worker lost: {why}. Rank {self.rank} stops now with exit code {EXIT_WORKER_LOST} instead of "
            f"waiting for the process-group timeout ({self.key} {self.timeout_s:g}). Checkpoints are "
            "intact: restart the job with --resume."
        )
        logger.error(message)
        print(f"[fsaf_d2] {message}", file=sys.stderr, flush=True)
        for handler in logging.getLogger().handlers + logging.getLogger("fsaf_d2").handlers:
            try:
                handler.flush()
            except Exception:
                pass
        os._exit(EXIT_WORKER_LOST)


_watchdog: Dict[str, Optional[PeerWatchdog]] = {"current": None}


def _own_store_connection(timeout_s: float):
    """A new client of the default process group's store (a TCPStore of its own), or the store itself."""
    store = dist.distributed_c10d._get_default_store()
    base = store
    while hasattr(base, "underlying_store"):
        base = base.underlying_store
    if isinstance(base, dist.TCPStore):
        return dist.TCPStore(base.host, base.port, is_master=False, wait_for_workers=False,
                             timeout=timedelta(seconds=max(timeout_s, 10.0)))
    return store


def start_peer_watchdog(timeout_s: float, key: str = "DIST.PEER_TIMEOUT_S") -> Optional[PeerWatchdog]:
    """Start the :class:`PeerWatchdog` of this worker (multi-process jobs, ``timeout_s > 0``); idempotent.
    ``key``: the config key of ``timeout_s``, named in the messages."""
    if timeout_s <= 0 or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if _watchdog["current"] is None:
        store = _own_store_connection(timeout_s)
        _watchdog["current"] = PeerWatchdog(store, dist.get_rank(), dist.get_world_size(), timeout_s, key).start()
        logger.info(f"Peer watchdog: a rank silent for {timeout_s:g} s ends the job ({key})")
    return _watchdog["current"]


def stop_peer_watchdog(failed: bool = False) -> None:
    """Stop this worker's :class:`PeerWatchdog`, if any (see :meth:`PeerWatchdog.stop`)."""
    watchdog, _watchdog["current"] = _watchdog["current"], None
    if watchdog is not None:
        watchdog.stop(failed)
