"""Preemption signals at the edges of training: while the data stream is rebuilt, and to evaluation workers."""
import os
import signal
import time

import pytest

import engine_testutils as U
from fsaf_d2.engine import Trainer
from fsaf_d2.engine import comm as C
from fsaf_d2.engine.faults import EXIT_PREEMPTED, Preempted
from fsaf_d2.engine.hooks import DeterministicDataStream


def _signal_while_the_stream_is_rebuilt(monkeypatch):
    rebuild = DeterministicDataStream.before_train

    def rebuild_and_get_signalled(self):
        rebuild(self)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(DeterministicDataStream, "before_train", rebuild_and_get_signalled)


def test_signal_while_the_data_stream_is_rebuilt_still_saves_and_exits_75(tmp_path, tiny_dataset, monkeypatch):
    """On resume the stream hook rebuilds and fast-forwards the loader in its ``before_train``, before the
    preemption hook's turn: a SIGTERM then must be recorded (not kill the process), and training stops after
    its first step with a checkpoint of that step."""
    _signal_while_the_stream_is_rebuilt(monkeypatch)
    cfg = U.tiny_cfg(str(tmp_path / "out"), tiny_dataset, SEED=3, SOLVER__MAX_ITER=6, SOLVER__CHECKPOINT_PERIOD=100)
    trainer = U.make_trainer(cfg)
    with pytest.raises(Preempted) as stopped:
        trainer.train()
    assert stopped.value.code == EXIT_PREEMPTED and stopped.value.iteration == 0
    assert os.path.isfile(tmp_path / "out" / "model_0000000.pth")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back after training


def test_evaluation_loader_workers_survive_preemption_signals(tmp_path):
    """Slurm signals every process of the job: a periodic evaluation's loader workers must keep serving so
    that the trainer, not a dead worker, decides what happens (save and exit 75)."""
    name = U.register_tiny_coco(str(tmp_path / "data"), num_images=8)
    try:
        cfg = U.tiny_cfg(str(tmp_path / "out"), name, name, DATALOADER__NUM_WORKERS=2)
        it = iter(Trainer.build_test_loader(cfg, name))
        seen = [next(it)]
        os.kill(it._workers[0].pid, signal.SIGTERM)
        time.sleep(0.5)
        seen += list(it)
        assert sum(len(batch) for batch in seen) == 8
    finally:
        U.unregister(name)


def test_preempted_ranks_stop_watching_each_other(tmp_path, tiny_dataset, monkeypatch):
    """After every rank has saved, one leaving first (rank 0 hosts the store) must not read as a lost peer
    to one still tearing down: the preemption stops the peer watchdog (exit 75, not 76)."""
    stopped = []

    class Recorder:
        def stop(self, failed=False):
            stopped.append(failed)

    monkeypatch.setitem(C._watchdog, "current", Recorder())
    _signal_while_the_stream_is_rebuilt(monkeypatch)
    cfg = U.tiny_cfg(str(tmp_path / "out"), tiny_dataset, SEED=3, SOLVER__MAX_ITER=6, SOLVER__CHECKPOINT_PERIOD=100)
    with pytest.raises(Preempted):
        U.make_trainer(cfg).train()
    assert stopped == [False] and C._watchdog["current"] is None
