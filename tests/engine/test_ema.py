"""Weight EMA (``MODEL_EMA.*``): the update rule, evaluation and model_final.pth on the EMA, exact resume."""
import os

import pytest
import torch

import engine_testutils as U
from fsaf_d2.engine.ema import build_model_ema, ema_decay
from test_resume import _crashing_trainer, _same


def test_decay_ramps_up_to_the_configured_value():
    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 90) == pytest.approx(0.91)
    assert ema_decay(0.999, 10**6) == 0.999


def test_ema_of_parameters_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema = build_model_ema(model, decay=0.5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(4):
        model.train()
        model(torch.randn(2, 3, 8, 8))  # moves the BN running statistics
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.ema_update.num_updates = step
        ema.update_parameters(model)
        d = 0.0 if step == 0 else ema_decay(0.5, step)  # the first update copies
        for k, v in model.state_dict().items():
            expected[k] = v.clone() if not v.is_floating_point() else d * expected[k] + (1 - d) * v
    got = ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6, msg=k)
    assert got["1.num_batches_tracked"] == 4  # integers copied, not averaged
    assert not any(p.requires_grad for p in ema.parameters())
    with pytest.raises(ValueError, match="MODEL_EMA.DECAY"):
        build_model_ema(model, decay=1.0)


def _ema_cfg(out, dataset, **kw):
    return U.tiny_cfg(out, dataset, MODEL_EMA__ENABLED=True, MODEL_EMA__DECAY=0.6, SEED=3,
                      SOLVER__BASE_LR=0.02, SOLVER__MOMENTUM=0.9, **kw)


def test_final_weights_and_evaluation_are_the_ema(tmp_path, tiny_dataset):
    cfg = _ema_cfg(str(tmp_path / "out"), tiny_dataset, SOLVER__MAX_ITER=3, SOLVER__CHECKPOINT_PERIOD=2)
    trainer = U.make_trainer(cfg)
    evaluated = []
    trainer.test = lambda cfg, model, evaluators=None: evaluated.append(model) or {}
    trainer.train()
    final = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=False)
    ema_weights = {k[len("module."):]: v for k, v in final["model_ema"].items() if k.startswith("module.")}
    assert final["model"].keys() == ema_weights.keys()
    assert all(torch.equal(final["model"][k], ema_weights[k]) for k in ema_weights)
    # the EMA is not the last raw weights: at iteration 2 (the periodic checkpoint) they differ
    mid = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_0000001.pth"), weights_only=False)
    mid_ema = {k[len("module."):]: v for k, v in mid["model_ema"].items() if k.startswith("module.")}
    floats = [k for k, v in mid_ema.items() if v.is_floating_point()]
    assert any(not torch.equal(mid["model"][k], mid_ema[k]) for k in floats)
    assert evaluated and evaluated[-1] is trainer.model_ema.module


def test_resume_reproduces_the_uninterrupted_ema(tmp_path, tiny_dataset):
    common = dict(SOLVER__MAX_ITER=4, SOLVER__CHECKPOINT_PERIOD=2)
    full = U.make_trainer(_ema_cfg(str(tmp_path / "full"), tiny_dataset, **common))
    full.train()
    cfg = _ema_cfg(str(tmp_path / "resumed"), tiny_dataset, **common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        U.make_trainer(cfg, trainer_cls=_crashing_trainer(2)).train()
    resumed = U.make_trainer(cfg, resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    assert _same(U.model_state(full), U.model_state(resumed))
    assert _same(full.model_ema.state_dict(), resumed.model_ema.state_dict())
