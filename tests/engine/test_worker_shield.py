"""Shielded data-loader workers: a scheduler's SIGTERM/SIGUSR1 never kills them, not even while they start,
and they end with their main process, also when it fails."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.utils.data._utils.signal_handling as torch_worker_signals
from torch.utils.data import DataLoader, Dataset

from fsaf_d2.engine.worker_shield import shield_loader_workers


class SelfSignallingDataset(Dataset):
    """Item ``i`` is ``i``; fetching item ``at`` first sends ``sig`` to the fetching worker itself (a sender
    that is not its parent, as Slurm's is)."""

    def __init__(self, n: int, at: int, sig: int):
        self.n, self.at, self.sig = n, at, sig

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.at:
            os.kill(os.getpid(), self.sig)
        return i


def _items(loader):
    return sorted(int(x) for batch in loader for x in batch)


@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_workers_keep_serving_through_a_preemption_signal(sig, context):
    dataset = SelfSignallingDataset(12, at=3, sig=sig)
    loader = shield_loader_workers(DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context=context))
    assert _items(loader) == list(range(12))
    with pytest.raises(RuntimeError, match="killed by signal|exited unexpectedly"):  # what it guards against
        _items(DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context=context))


def test_a_signal_during_worker_start_waits_instead_of_killing_it(monkeypatch):
    """Slurm's SIGTERM may come while the loader forks its workers: after torch's worker installed its
    signal handler and before any init function runs. The worker must not die of it."""
    install = torch_worker_signals._set_worker_signal_handlers

    def install_then_get_signalled(*args):
        install(*args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(torch_worker_signals, "_set_worker_signal_handlers", install_then_get_signalled)
    loader = shield_loader_workers(DataLoader(list(range(8)), batch_size=2, num_workers=2,
                                              multiprocessing_context="fork"))
    assert _items(loader) == list(range(8))
    assert _items(loader) == list(range(8))  # a second epoch starts new workers the same way


def test_a_main_process_whose_worker_died_exits_with_the_error():
    """A worker killed outright (OOM killer) fails the main process; it must then exit, not wait forever
    on the other, shielded worker (``multiprocessing`` SIGTERMs daemonic children at exit and joins them)."""
    script = textwrap.dedent(
        """
        import os, signal
        from torch.utils.data import DataLoader, Dataset
        from fsaf_d2.engine.worker_shield import shield_loader_workers

        class Dies(Dataset):
            def __len__(self):
                return 64
            def __getitem__(self, i):
                if i == 5:
                    os.kill(os.getpid(), signal.SIGKILL)
                return i

        for batch in shield_loader_workers(DataLoader(Dies(), batch_size=2, num_workers=2)):
            pass
        """
    )
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the main process did not exit: it waits on its shielded worker\n{e.stderr}")
    assert done.returncode == 1 and "DataLoader worker" in done.stderr, done.stderr[-3000:]


def test_loaders_without_workers_are_unchanged():
    loader = DataLoader(torch.arange(4), batch_size=2)
    assert shield_loader_workers(loader) is loader and loader.worker_init_fn is None
    assert "_get_iterator" not in vars(loader)
