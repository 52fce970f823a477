"""Multi-process launcher for every device type: spawn, or pick up a torchrun environment.

:func:`launch` replaces ``detectron2.engine.launch`` (which picks NCCL/GLOO from ``torch.cuda`` and only
spawns). Per worker it:

1. selects the worker's device (``set_device(local_rank)``) **before** ``init_process_group``;
2. initialises the process group with the device's backend (cuda -> nccl, npu -> hccl, cpu -> gloo);
3. creates Detectron2's per-machine process group, so ``comm.get_local_rank()`` works;
4. calls ``main_func(*args)`` and tears the process group down afterwards.

Two ways to start workers:

* spawn (default): ``launch(main, num_gpus_per_machine=N, ...)`` starts N local processes per machine.
* torchrun / any launcher that exports ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (and ``MASTER_ADDR``,
  ``MASTER_PORT``): the current process is one worker; nothing is spawned. The workers per machine come
  from ``LOCAL_WORLD_SIZE``; launchers that do not export it need ``--num-gpus`` (else all ranks are
  assumed to share one machine).

Faults (docs/devices.md#faults): a spawning launcher waits for its workers and, when one dies, gives the
others :data:`WORKER_EXIT_GRACE_S` to stop, ends them (SIGTERM, then SIGKILL), and raises
:class:`~fsaf_d2.engine.faults.WorkerLostError` naming the rank and how it ended. It forwards SIGTERM and
SIGUSR1 (preemption, :data:`~fsaf_d2.engine.faults.PREEMPTION_SIGNALS`) to the workers and exits with
:data:`~fsaf_d2.engine.faults.EXIT_PREEMPTED` when all of them stopped for it: with exit code 75, or killed
by the forwarded signal itself (one that came before training started or after it ended, when there is
nothing to save). Once one worker has stopped for preemption, the others get
:data:`PREEMPTED_EXIT_GRACE_S` to finish theirs.
"""
import contextlib
import logging
import multiprocessing.connection
import os
import signal
import socket
import threading
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException, ProcessRaisedException
from detectron2.utils import comm

from .device import DeviceError, check_device_available, dist_backend, parse_device, set_device
from .comm import release_process_groups
from .faults import EXIT_PREEMPTED, EXIT_WORKER_LOST, PREEMPTION_SIGNALS, WorkerLostError

__all__ = [
    "DEFAULT_TIMEOUT",
    "WORKER_EXIT_GRACE_S",
    "PREEMPTED_EXIT_GRACE_S",
    "launch",
    "torchrun_env",
    "init_distributed",
]

DEFAULT_TIMEOUT = timedelta(minutes=30)
#: seconds the other workers get to stop by themselves after one failed (then SIGTERM, and as long again
#: before SIGKILL)
WORKER_EXIT_GRACE_S = 10.0
#: seconds the other workers get after one stopped for preemption (they have agreed on the same iteration
#: and are tearing down; the scheduler's own kill deadline bounds the wait anyway)
PREEMPTED_EXIT_GRACE_S = 120.0

logger = logging.getLogger(__name__)

_TORCHRUN_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env() -> Optional[dict]:
    """The distributed environment exported by torchrun (or a compatible launcher), or None.

    Returns:
        dict with int ``rank``, ``local_rank``, ``world_size``, ``local_world_size`` (None if
        ``LOCAL_WORLD_SIZE`` is not exported) and str ``master_addr`` / ``master_port`` (None if unset);
        None when ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` are not all set.
    """
    if not all(k in os.environ for k in _TORCHRUN_KEYS):
        return None
    try:
        env = {k.lower(): int(os.environ[k]) for k in _TORCHRUN_KEYS}
        lws = os.environ.get("LOCAL_WORLD_SIZE")
        env["local_world_size"] = int(lws) if lws else None
    except ValueError as e:
        raise ValueError(f"Malformed torchrun environment (RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE): {e}")
    env["master_addr"] = os.environ.get("MASTER_ADDR")
    env["master_port"] = os.environ.get("MASTER_PORT")
    return env


def init_distributed(
    device_type: str,
    *,
    rank: int,
    local_rank: int,
    world_size: int,
    local_world_size: int,
    init_method: Optional[str] = None,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Initialise one distributed worker (device first, then the process group, then the local group).

    Args:
        device_type: "cpu", "cuda" or "npu" (decides the backend: gloo, nccl, hccl).
        rank, local_rank, world_size, local_world_size: this worker's coordinates.
        init_method: ``tcp://host:port`` / ``file://...``; None or "env://" reads MASTER_ADDR/MASTER_PORT.
        timeout: process-group timeout.
    """
    if device_type != "cpu":
        # Must precede init_process_group: NCCL/HCCL bind the communicator to the current device.
        set_device(device_type, local_rank)
    elif local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        # N CPU workers on one machine: share the cores instead of oversubscribing them N times.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    backend = dist_backend(device_type)
    try:
        dist.init_process_group(
            backend=backend,
            init_method=init_method or "env://",
            world_size=world_size,
            rank=rank,
            timeout=timeout,
        )
    except Exception:
        logger.error(
            f"init_process_group(backend={backend!r}, init_method={init_method or 'env://'!r}, rank={rank}, "
            f"world_size={world_size}) failed"
        )
        raise
    comm.create_local_process_group(local_world_size)  # Detectron2's per-machine group (get_local_rank)
    # A first barrier catches unreachable peers now rather than at the first collective of training.
    comm.synchronize()


def _worker(
    local_rank: int,
    main_func: Callable,
    device_type: str,
    world_size: int,
    local_world_size: int,
    machine_rank: int,
    init_method: str,
    args: tuple,
    timeout: timedelta,
):
    rank = machine_rank * local_world_size + local_rank
    return _run_in_process_group(
        main_func,
        args,
        device_type,
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        init_method=init_method,
        timeout=timeout,
    )


@contextlib.contextmanager
def _preemption_outside_training_exits_75():
    """While active (main thread only): a preemption signal ends this process at once with
    :data:`~fsaf_d2.engine.faults.EXIT_PREEMPTED` instead of its default action (143, 138).

    Training installs its own handlers (save the current iteration, then exit 75) and gives these back
    when it ends; before it starts and after it ends there is nothing to save, and the exit code is what
    tells a scheduler script to requeue. Signals that already have a handler are left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        logger.warning(f"{signal.Signals(signum).name} outside training (nothing to save): exiting with code "
                       f"{EXIT_PREEMPTED}; rerun with --resume")
        raise SystemExit(EXIT_PREEMPTED)

    previous = {s: signal.signal(s, stop) for s in PREEMPTION_SIGNALS if signal.getsignal(s) == signal.SIG_DFL}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _run_in_process_group(main_func: Callable, args: tuple, device_type: str, **init_kwargs):
    """``init_distributed(device_type, **init_kwargs)``, run ``main_func(*args)``, destroy the group."""
    with _preemption_outside_training_exits_75():
        init_distributed(device_type, **init_kwargs)
        try:
            result = main_func(*args)
        except BaseException as e:
            # no barrier: the other ranks may never reach it. An error (not a clean exit, nor a preemption,
            # which every rank takes at the same iteration) ends the peers through the watchdog at once
            release_process_groups(failed=not (isinstance(e, SystemExit) and e.code in (None, 0, EXIT_PREEMPTED)))
            raise
        # every rank has finished its collectives before any group is torn down
        dist.barrier()
        release_process_groups()
        return result


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    device_type: str = "cuda",
):
    """Run ``main_func(*args)`` in one or more workers of ``device_type``.

    Args:
        main_func: the per-worker entry point (picklable: a module-level function).
        num_gpus_per_machine: worker processes per machine (one per device on cuda/npu); ignored under
            torchrun, whose ``LOCAL_WORLD_SIZE``/``WORLD_SIZE`` win.
        num_machines, machine_rank: multi-machine spawn jobs (one ``launch`` per machine).
        dist_url: ``tcp://IP:PORT`` of machine 0 (required for multi-machine spawn), ``file://...``, or
            "auto" (a free port on localhost, single machine only). Under torchrun, MASTER_ADDR/MASTER_PORT
            (``env://``) win and dist_url is used only when they are not exported.
        args: arguments of ``main_func``.
        timeout: process-group timeout.
        device_type: "cpu", "cuda" or "npu", or a full device spec such as "cuda:0" (its index is only
            allowed with a single worker). Decides the backend and the device each worker selects.

    Returns:
        ``main_func``'s return value when it runs in this process (single process or torchrun), else None.
    """
    dtype, index = parse_device(device_type)
    env = torchrun_env()
    if env is not None:
        return _launch_from_env(main_func, dtype, index, env, num_gpus_per_machine, dist_url, args, timeout)

    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ValueError(f"--num-gpus and --num-machines must be >= 1, got {num_gpus_per_machine}, {num_machines}")
    world_size = num_machines * num_gpus_per_machine
    check_device_available(device_type, num_local_workers=num_gpus_per_machine)

    if world_size == 1:
        if index is not None:
            set_device(dtype, index)
        with _preemption_outside_training_exits_75():
            return main_func(*args)

    if dist_url is None or dist_url == "auto":
        if num_machines > 1:
            raise ValueError("Multi-machine jobs need an explicit --dist-url tcp://<machine-0 IP>:<port>")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if num_machines > 1 and dist_url.startswith("file://"):
        logger.warning("file:// init is unreliable across machines; prefer tcp://")
    context = mp.start_processes(
        _worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, dtype, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
        join=False,
    )
    wait_for_workers(context, first_rank=machine_rank * num_gpus_per_machine)
    return None


def _describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    if code == EXIT_PREEMPTED:
        return f"stopped for preemption (exit code {code})"
    if code == EXIT_WORKER_LOST:
        return f"stopped because a peer was lost (exit code {code})"
    return f"exited with code {code}"


@contextlib.contextmanager
def _forward_signals(processes, signums, forwarded: Optional[list] = None):
    """While active (main thread only), the signals ``signums`` received by this process go to ``processes``
    (and are appended to ``forwarded``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        if forwarded is not None:
            forwarded.append(signum)
        logger.warning(f"Launcher received {signal.Signals(signum).name}: forwarding it to the workers")
        for p in processes:
            if p.is_alive():
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, forward) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def wait_for_workers(context, first_rank: int = 0, grace_s: float = WORKER_EXIT_GRACE_S,
                     preempted_grace_s: float = PREEMPTED_EXIT_GRACE_S) -> None:
    """Wait for the spawned workers of ``context`` (``torch.multiprocessing.ProcessContext``).

    Returns when all succeeded. Raises ``SystemExit(EXIT_PREEMPTED)`` when all stopped for preemption (exit
    code 75, or killed by a preemption signal this launcher forwarded), else :class:`WorkerLostError` naming
    the rank that failed first and how each one ended. After a failure the others get ``grace_s`` seconds to
    stop (``preempted_grace_s`` when one stopped for preemption), then SIGTERM, then SIGKILL as long later.
    """
    forwarded: list = []
    with _forward_signals(context.processes, PREEMPTION_SIGNALS, forwarded):
        try:
            while True:
                running = [p.sentinel for p in context.processes if p.exitcode is None]
                if running:
                    multiprocessing.connection.wait(running)  # until one of them ends
                stopping = any(p.exitcode == EXIT_PREEMPTED for p in context.processes)
                if context.join(timeout=0, grace_period=preempted_grace_s if stopping else grace_s):
                    return
        except ProcessException as e:
            failure = e
    codes = [p.exitcode for p in context.processes]
    preempted = {EXIT_PREEMPTED} | {-signum for signum in forwarded}
    if all(code in preempted for code in codes):
        killed = [first_rank + i for i, code in enumerate(codes) if code != EXIT_PREEMPTED]
        if killed:
            logger.warning(f"Ranks {killed} ended by the forwarded preemption signal outside training (nothing "
                           "to save then)")
        logger.warning(f"All {len(codes)} workers stopped for preemption; exiting with code {EXIT_PREEMPTED}")
        raise SystemExit(EXIT_PREEMPTED)
    first = failure.error_index
    others = "; ".join(
        f"rank {first_rank + i} {_describe_exit(code)}" for i, code in enumerate(codes) if i != first
    )
    detail = f"\n{failure}" if isinstance(failure, ProcessRaisedException) else ""
    raise WorkerLostError(
        f"Worker rank {first_rank + first} (pid {failure.error_pid}) {_describe_exit(codes[first])}; {others}. "
        f"The job stopped; checkpoints written so far are intact: fix the cause and rerun with --resume."
        f"{detail}"
    ) from failure


def _launch_from_env(main_func, dtype, index, env, num_gpus_per_machine, dist_url, args, timeout):
    """Run this process as one worker of a torchrun-style job (see :func:`torchrun_env`)."""
    world_size, rank, local_rank = env["world_size"], env["rank"], env["local_rank"]
    local_world_size = env["local_world_size"]
    if local_world_size is None:
        # Launchers without LOCAL_WORLD_SIZE: --num-gpus (> 1) gives the workers per machine; otherwise all
        # ranks are taken to run on this machine.
        use_flag = num_gpus_per_machine > 1 and world_size % num_gpus_per_machine == 0
        local_world_size = num_gpus_per_machine if use_flag else world_size
    if not 0 <= local_rank < local_world_size or not 0 <= rank < world_size:
        raise ValueError(f"Inconsistent distributed environment: {env}")
    if index is not None and local_world_size > 1:
        raise DeviceError(
            f"MODEL.DEVICE {dtype}:{index} names one device, but {local_world_size} workers run on this machine; "
            f"use MODEL.DEVICE {dtype}"
        )
    if num_gpus_per_machine not in (1, local_world_size):
        logger.warning(
            f"--num-gpus {num_gpus_per_machine} ignored: torchrun started {local_world_size} workers on this machine"
        )
    check_device_available(dtype, num_local_workers=local_world_size)
    if env["master_addr"] and env["master_port"]:
        # torchrun's rendezvous address wins over --dist-url (whose default is a localhost URL).
        dist_url = "env://"
    elif dist_url in (None, "auto", "env://"):
        raise ValueError(
            "RANK/LOCAL_RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not: start with torchrun, "
            "export both, or pass --dist-url tcp://<rank-0 host>:<port>"
        )
    return _run_in_process_group(
        main_func,
        args,
        dtype,
        rank=rank,
        local_rank=local_rank if index is None else index,
        world_size=world_size,
        local_world_size=local_world_size,
        init_method=dist_url,
        timeout=timeout,
    )
