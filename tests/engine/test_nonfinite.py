"""Non-finite losses and skipped steps: NaN/inf stops training naming the iteration and the loss terms with
nothing corrupt saved; SOLVER.NONFINITE.SKIP skips such steps up to a cap; fp16 overflow skips are capped too."""
import json
import os

import pytest
import torch

import engine_testutils as U
import engine_workers
import fault_testutils as F
from fsaf_d2.engine.faults import NonFiniteLossError
from fsaf_d2.engine.launch import launch
from fsaf_d2.engine.train_loop import DeviceTrainer

NAN = float("nan")


class _Regressor(torch.nn.Module):
    """Loss terms of a linear regression on batches ``(x, y)``; a NaN in ``x`` makes ``loss_fit`` NaN."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, batch):
        x, y = batch
        return {"loss_fit": ((self.linear(x) - y) ** 2).mean(), "loss_l1": 1e-3 * self.linear.weight.abs().sum()}


def _batches(bad=(), scale=1.0, n=6):
    """``n`` batches; those of the iterations in ``bad`` hold a NaN input."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x = torch.randn(4, 3, generator=gen) * scale
        if i in bad:
            x[0, 0] = NAN
        out.append((x, x.sum(1, keepdim=True)))
    return out


def _train(batches, iterations=None, **kwargs):
    model = _Regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trainer = DeviceTrainer(model, batches, optimizer, **kwargs)
    trainer.train(0, iterations or len(batches))
    return trainer


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_nan_loss_stops_before_the_step_naming_the_iteration_and_the_terms():
    model = _Regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trainer = DeviceTrainer(model, _batches(bad={2}), optimizer)
    with pytest.raises(NonFiniteLossError, match=r"Non-finite loss terms loss_fit=nan, loss_l1=0\.\d+ at iteration 2\."):
        trainer.train(0, 6)
    clean = _train(_batches(), iterations=2)  # the two steps before the NaN, and nothing else
    assert F.same_weights(_weights(trainer), _weights(clean))


def test_skip_option_skips_the_nan_step_exactly(caplog):
    skipped = _train(_batches(bad={2}), skip_nonfinite=True)
    assert "Iteration 2: optimizer step skipped, non-finite loss terms loss_fit=nan" in caplog.text
    assert skipped.skipped_in_a_row == 0
    # the same stream without batch 2: no trace of the skipped step (weights and momentum untouched by it)
    without = [b for i, b in enumerate(_batches()) if i != 2]
    assert F.same_weights(_weights(skipped), _weights(_train(without)))


def test_skip_option_has_a_cap_on_consecutive_skips():
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive optimizer steps skipped, the last at iteration 3 "
                                                 r"\(non-finite loss terms loss_fit=nan.*MAX_CONSECUTIVE 2"):
        _train(_batches(bad={1, 2, 3}), skip_nonfinite=True, max_consecutive_skips=2)


def _fp16_like_scaler():
    """An enabled grad scaler whose initial scale overflows fp32 gradients of inputs ~100 (about 7 halvings)."""
    return torch.amp.GradScaler("cpu", init_scale=2.0**120, growth_interval=1000)


def test_grad_scaler_overflow_skips_are_logged_and_capped(caplog):
    trainer = _train(_batches(scale=100.0, n=12), grad_scaler=_fp16_like_scaler())
    skips = [line for line in caplog.text.splitlines() if "optimizer step skipped, gradient overflow" in line]
    assert 1 < len(skips) <= 10 and trainer.skipped_in_a_row == 0  # recovered once the scale came down
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    with pytest.raises(NonFiniteLossError, match=r"4 consecutive optimizer steps skipped.*gradient overflow, "
                                                 r"loss scale .*MAX_CONSECUTIVE 3"):
        _train(_batches(scale=100.0, n=12), grad_scaler=_fp16_like_scaler(), max_consecutive_skips=3)


def test_diverging_training_stops_and_every_checkpoint_is_finite(tmp_path, tiny_dataset):
    """A real divergence of the detector (learning rate 1e30): the error names the iteration and FSAF's loss
    terms; the checkpoints written before hold no NaN/inf."""
    out = str(tmp_path / "out")
    cfg = U.tiny_cfg(out, tiny_dataset, SOLVER__BASE_LR=1e30, SOLVER__CHECKPOINT_PERIOD=1, SOLVER__MAX_ITER=6,
                     **F.NARROW)
    with pytest.raises(NonFiniteLossError, match=r"Non-finite loss terms loss_fsaf_cls=\S+, loss_fsaf_reg=\S+ at "
                                                 r"iteration (\d+)\.") as error:
        U.make_trainer(cfg).train()
    saved = sorted(f for f in os.listdir(out) if f.endswith(".pth"))
    assert saved, "the iterations before the divergence were checkpointed"
    for name in saved:
        state = torch.load(os.path.join(out, name), map_location="cpu", weights_only=False)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), name


@pytest.mark.slow
def test_ranks_agree_on_a_nan_of_one_rank(tmp_path):
    """Two gloo processes, a NaN on rank 1 only: both stop at iteration 2, neither hangs."""
    launch(engine_workers.nonfinite_agreement_worker, 2, dist_url="auto", args=(str(tmp_path),), device_type="cpu")
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [r["iteration"] for r in results] == [2, 2]
    assert results[1]["error"].startswith("Non-finite loss terms loss_sq=nan at iteration 2.")
    assert results[0]["error"].startswith("Non-finite loss on another rank (this rank: loss_sq=")
