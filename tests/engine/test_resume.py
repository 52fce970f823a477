"""Resume: interrupted + ``--resume`` ends with the weights of an uninterrupted run; scaler state restored."""
import os
import signal

import pytest
import torch
from detectron2.engine import HookBase

import engine_testutils as U
from fsaf_d2.engine import Trainer
from fsaf_d2.engine.faults import Preempted


class _Crash(HookBase):
    """Simulates the job dying at the start of iteration ``at`` (after earlier checkpoints were written)."""

    def __init__(self, at):
        self.at = at

    def before_step(self):
        if self.trainer.iter == self.at:
            raise RuntimeError("simulated crash")


class _SignalAt(HookBase):
    """The scheduler's preemption: SIGTERM to this process at the start of iteration ``at``."""

    def __init__(self, at):
        self.at = at

    def before_step(self):
        if self.trainer.iter == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def _signalled_trainer(at):
    class SignalledTrainer(Trainer):
        def build_hooks(self):
            return super().build_hooks() + [_SignalAt(at)]

    return SignalledTrainer


def _crashing_trainer(at):
    class CrashingTrainer(Trainer):
        def build_hooks(self):
            return super().build_hooks() + [_Crash(at)]

    return CrashingTrainer


@pytest.fixture(autouse=True)
def _no_jit_graph_optimization():
    """Bitwise comparisons need identical numerics in every run. TorchScript's profiling executor (used
    by RetinaNet's jit-scripted focal / smooth-L1 losses from fvcore) switches to optimised graphs after
    the first calls in a process, which changes gradients in the last bit; keep the plain interpreter."""
    with torch.jit.optimized_execution(False):
        yield


@pytest.fixture
def dataset8(tmp_path):
    name = U.register_tiny_coco(str(tmp_path / "data"), num_images=8, seed=5)
    yield name
    U.unregister(name)


def _interrupted_then_resumed(cfg, crash_at):
    with pytest.raises(RuntimeError, match="simulated crash"):
        U.make_trainer(cfg, trainer_cls=_crashing_trainer(crash_at)).train()
    assert open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")).read() == f"model_{crash_at - 1:07d}.pth"
    resumed = U.make_trainer(cfg, resume=True)
    assert resumed.start_iter == crash_at
    resumed.train()
    return U.model_state(resumed)


def _uninterrupted(cfg):
    trainer = U.make_trainer(cfg)
    trainer.train()
    return U.model_state(trainer)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, dataset8):
    common = dict(SEED=7, SOLVER__MAX_ITER=4, SOLVER__CHECKPOINT_PERIOD=2, SOLVER__BASE_LR=0.02,
                  SOLVER__MOMENTUM=0.9, INPUT__RANDOM_FLIP="horizontal")
    full = _uninterrupted(U.tiny_cfg(str(tmp_path / "full"), dataset8, **common))
    resumed = _interrupted_then_resumed(U.tiny_cfg(str(tmp_path / "resumed"), dataset8, **common), crash_at=2)
    assert _same(full, resumed)


def test_resume_inside_a_data_segment_skips_its_used_batches(tmp_path, dataset8):
    """A preemption saves an iteration inside a data segment (period 2: iteration 2, the first of segment 2..3).
    The resumed run rebuilds that segment's stream, skips the batch iteration 2 used, and ends with the
    uninterrupted run's weights."""
    common = dict(SEED=7, SOLVER__MAX_ITER=6, SOLVER__CHECKPOINT_PERIOD=2, SOLVER__BASE_LR=0.02,
                  SOLVER__MOMENTUM=0.9, INPUT__RANDOM_FLIP="horizontal")
    full = _uninterrupted(U.tiny_cfg(str(tmp_path / "full"), dataset8, **common))
    cfg = U.tiny_cfg(str(tmp_path / "resumed"), dataset8, **common)
    with pytest.raises(Preempted) as stopped:
        U.make_trainer(cfg, trainer_cls=_signalled_trainer(2)).train()
    assert stopped.value.iteration == 2
    resumed = U.make_trainer(cfg, resume=True)
    assert resumed.start_iter == 3
    resumed.train()
    assert _same(full, U.model_state(resumed))


def test_a_signal_during_the_last_iteration_lets_training_finish(tmp_path, dataset8, caplog):
    cfg = U.tiny_cfg(str(tmp_path / "out"), dataset8, SEED=7, SOLVER__MAX_ITER=3, SOLVER__CHECKPOINT_PERIOD=100)
    trainer = U.make_trainer(cfg, trainer_cls=_signalled_trainer(2))
    with caplog.at_level("WARNING", logger="fsaf_d2.engine.hooks"):
        trainer.train()  # no Preempted
    assert "Preemption signal during the last iteration: finishing training normally" in caplog.text
    assert "model_final.pth" in os.listdir(cfg.OUTPUT_DIR)
    assert open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")).read() == "model_final.pth"


def test_without_deterministic_stream_resume_diverges(tmp_path, dataset8):
    """Negative control: Detectron2's stock behaviour (the sampler restarts its stream on resume)."""
    common = dict(SEED=7, SOLVER__MAX_ITER=4, SOLVER__CHECKPOINT_PERIOD=2, SOLVER__BASE_LR=0.02,
                  SOLVER__MOMENTUM=0.9, DATALOADER__DETERMINISTIC_RESUME=False)
    full = _uninterrupted(U.tiny_cfg(str(tmp_path / "full"), dataset8, **common))
    resumed = _interrupted_then_resumed(U.tiny_cfg(str(tmp_path / "resumed"), dataset8, **common), crash_at=2)
    assert not _same(full, resumed)


def test_resume_restores_grad_scaler_state(tmp_path, tiny_dataset):
    class ScaledTrainer(Trainer):
        @classmethod
        def build_grad_scaler(cls, cfg):
            # an enabled scaler (as on cuda/npu fp16) whose scale doubles after every finite step
            return torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1)

    cfg = U.tiny_cfg(str(tmp_path / "out"), tiny_dataset, SOLVER__AMP__ENABLED=True,
                     SOLVER__AMP__PRECISION="bfloat16", SOLVER__MAX_ITER=2, SOLVER__CHECKPOINT_PERIOD=1, SEED=1)
    first = U.make_trainer(cfg, trainer_cls=ScaledTrainer)
    first.train()
    saved = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=False)
    state = saved["trainer"]["_trainer"]["grad_scaler"]  # where Detectron2's AMPTrainer keeps it
    assert state["scale"] == 32.0 and state["_growth_tracker"] == 0

    cfg3 = U.tiny_cfg(str(tmp_path / "out"), tiny_dataset, SOLVER__AMP__ENABLED=True,
                      SOLVER__AMP__PRECISION="bfloat16", SOLVER__MAX_ITER=3, SOLVER__CHECKPOINT_PERIOD=1, SEED=1)
    resumed = U.make_trainer(cfg3, resume=True, trainer_cls=ScaledTrainer)
    assert resumed.start_iter == 2
    assert resumed._trainer.grad_scaler.get_scale() == 32.0  # restored, not the initial 8.0


def test_a_run_that_fails_in_its_last_iteration_is_not_evaluated(tmp_path, dataset8, monkeypatch):
    """Detectron2's EvalHook would evaluate after an error in the last iteration (it checks iter + 1 >=
    max_iter): minutes of COCO evaluation before the error shows, and in a multi-process job collectives that
    the peers, still in the failed step, never join. A finished run is evaluated once at the end."""
    evaluations = []
    monkeypatch.setattr(Trainer, "test", classmethod(lambda cls, cfg, model, evaluators=None: evaluations.append(1)
                                                     or {}))
    cfg = U.tiny_cfg(str(tmp_path / "failed"), dataset8, dataset8, SEED=7, SOLVER__MAX_ITER=3, TEST__EVAL_PERIOD=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        U.make_trainer(cfg, trainer_cls=_crashing_trainer(2)).train()
    assert evaluations == []
    U.make_trainer(cfg.clone(), resume=True).train()  # the same run resumed to its end
    assert evaluations == [1]
