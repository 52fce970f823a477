"""Data-loader workers that outlive a scheduler's preemption signal (docs/training.md#faults).

Slurm and Kubernetes signal every process of a job. A torch DataLoader worker dies on SIGTERM from anyone
but its parent (and on SIGUSR1 by default), and the trainer would then stop with a DataLoader error instead
of saving the current iteration. :func:`shield_loader_workers` makes a loader's workers

* start with SIGTERM and SIGUSR1 blocked (they are blocked in the thread that starts the workers, for the
  length of the start, and forked workers inherit that): a signal that comes before the worker's own code
  runs waits instead of killing it;
* ignore both signals from then on;
* end with their main process however it ends: ``multiprocessing`` stops a process's daemonic children
  at its exit with SIGTERM, which a shielded worker ignores, and then waits for them. So a finalizer that
  runs before that (:func:`_kill_shielded_children`) kills the shielded workers that are still alive, which
  is only the case when the main process failed (after an error, say a killed sibling worker); a normal end
  has already shut them down through torch's own protocol.
"""
import functools
import multiprocessing
import os
import signal

from multiprocessing.util import Finalize

from .faults import PREEMPTION_SIGNALS

__all__ = ["shield_loader_workers"]

#: attribute set on the ``multiprocessing.Process`` of each shielded worker
_SHIELDED = "fsaf_d2_shielded"
#: the process whose exit finalizer is registered (a forked child starts without its parent's finalizers)
_finalizer_pid = None


def _shield_worker(worker_init_fn, worker_id: int) -> None:
    """``worker_init_fn`` of a shielded loader: ignore the signals, then run the loader's own init."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # also drops one that arrived during the start
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def _kill_shielded_children() -> None:
    """Exit finalizer: SIGKILL this process's shielded workers that are still alive (they ignore the
    SIGTERM ``multiprocessing`` would send them, and it would wait for them forever)."""
    for child in multiprocessing.active_children():
        if getattr(child, _SHIELDED, False):
            child.kill()
            child.join()


def _start_with_signals_blocked(get_iterator):
    """``DataLoader._get_iterator`` with the preemption signals blocked while it starts the workers (their
    processes inherit the mask). A signal for this process meanwhile waits and is handled after."""
    global _finalizer_pid
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        iterator = get_iterator()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    for worker in getattr(iterator, "_workers", ()):  # torch's multi-process iterator: its worker processes
        setattr(worker, _SHIELDED, True)
    if _finalizer_pid != os.getpid():
        Finalize(None, _kill_shielded_children, exitpriority=10)  # runs before multiprocessing stops children
        _finalizer_pid = os.getpid()
    return iterator


def shield_loader_workers(loader):
    """Make the data-loader workers of ``loader`` survive the preemption signals (in place; returns it).

    Shielded workers keep serving until the main process has saved and exits; they end with it.
    ``loader``: a ``torch.utils.data.DataLoader``, or Detectron2's aspect-ratio grouping wrapper around
    one; anything else (or a loader without worker processes) is returned unchanged. The start is covered
    with the default ``fork`` start method; with ``spawn``/``forkserver`` a signal during the worker's
    interpreter start-up still has its default effect.
    """
    from torch.utils.data import DataLoader

    inner = loader if isinstance(loader, DataLoader) else getattr(loader, "dataset", None)
    if isinstance(inner, DataLoader) and inner.num_workers > 0:
        inner.worker_init_fn = functools.partial(_shield_worker, inner.worker_init_fn)
        inner._get_iterator = functools.partial(_start_with_signals_blocked, inner._get_iterator)
    return loader
