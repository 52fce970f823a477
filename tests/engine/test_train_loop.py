"""DeviceTrainer: AMP on CPU (bf16), grad scalers per device, global-norm clipping, fused NPU SGD."""
import logging

import pytest
import torch
from detectron2.utils.events import EventStorage

import engine_testutils as U
from fsaf_d2.engine import Trainer
from fsaf_d2.engine.train_loop import DeviceTrainer, build_grad_scaler
from fsaf_d2.engine.config import validate_engine_config
from fsaf_d2.engine.trainer import check_config


class _Linear(torch.nn.Module):
    """loss = sum(w * c): the gradient is exactly ``c``."""

    def __init__(self, c):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(len(c)))
        self.register_buffer("c", torch.tensor(c, dtype=torch.float32))

    def forward(self, batch):
        return {"loss_lin": (self.w * self.c).sum()}


def _one_step(trainer):
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.run_step()
    return storage


def test_full_model_clip_uses_unscaled_gradients():
    model = _Linear([30.0, 40.0, 0.0])  # gradient norm 50
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # an enabled scaler, as on cuda/npu fp16
    trainer = DeviceTrainer(model, [[{}]] * 2, opt, device_type="cpu", grad_scaler=scaler, clip_max_norm=1.0)
    storage = _one_step(trainer)
    step = -model.w.detach()
    # clipping the unscaled gradient to norm 1 moves w by exactly 1 (clipping the scaled one: 1/1024)
    assert step.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert step.tolist() == pytest.approx([0.6, 0.8, 0.0], rel=1e-5)
    assert storage.latest()["grad_norm"][0] == pytest.approx(50.0)  # logged before clipping, unscaled


def test_no_clip_and_disabled_scaler_is_plain_sgd():
    model = _Linear([3.0, 4.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = DeviceTrainer(model, [[{}]], opt, device_type="cpu")
    assert not trainer.grad_scaler.is_enabled()
    storage = _one_step(trainer)
    assert model.w.detach().tolist() == pytest.approx([-0.3, -0.4])
    assert "grad_norm" not in storage.histories()
    assert trainer.state_dict()["grad_scaler"] == {}


def test_scaler_per_device(torch_npu_spy):
    assert not build_grad_scaler("cpu", True, torch.bfloat16).is_enabled()
    assert not build_grad_scaler("cuda", True, torch.bfloat16).is_enabled()  # bf16 needs no scaling
    assert not build_grad_scaler("cuda", False, torch.float16).is_enabled()
    cuda = build_grad_scaler("cuda", True, torch.float16)
    assert type(cuda) is torch.amp.GradScaler and cuda._device == "cuda"
    assert torch_npu_spy.lookups == []  # cuda and cpu never probe torch_npu


def test_npu_uses_the_torch_npu_scaler(fake_npu):
    scaler = build_grad_scaler("npu", True, torch.float16)
    assert isinstance(scaler, fake_npu.npu.amp.GradScaler)
    assert [e for e in fake_npu.EVENTS if e["event"] == "GradScaler"]
    assert not build_grad_scaler("npu", True, torch.bfloat16).is_enabled()


def test_amp_precision_errors(tmp_path, fake_npu, monkeypatch):
    cfg = U.tiny_cfg(str(tmp_path), "unused", SOLVER__AMP__ENABLED=True, SOLVER__AMP__PRECISION="float16")
    with pytest.raises(ValueError, match="not supported on MODEL.DEVICE cpu.*SOLVER.AMP.PRECISION bfloat16"):
        check_config(cfg)
    monkeypatch.setenv("FAKE_NPU_BF16", "0")
    npu_cfg = U.tiny_cfg(str(tmp_path), "unused", MODEL__DEVICE="npu", SOLVER__AMP__ENABLED=True,
                         SOLVER__AMP__PRECISION="bfloat16")
    with pytest.raises(RuntimeError, match="does not support bfloat16"):
        check_config(npu_cfg)


def test_amp_bf16_training_on_cpu(tmp_path, tiny_dataset):
    cfg = U.tiny_cfg(str(tmp_path / "out"), tiny_dataset, SOLVER__AMP__ENABLED=True,
                     SOLVER__AMP__PRECISION="bfloat16", SOLVER__MAX_ITER=2)
    trainer = U.make_trainer(cfg)
    dtypes = []
    first_conv = trainer.model.backbone.bottom_up.stem.conv1
    first_conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before = U.model_state(trainer)
    trainer.train()
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # the forward ran under CPU autocast
    assert isinstance(trainer._trainer, DeviceTrainer) and not trainer._trainer.grad_scaler.is_enabled()
    after = U.model_state(trainer)
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # weights stay fp32
    assert any(not torch.equal(v, before[k]) for k, v in after.items())
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v, _ in losses)


def test_optimizer_clipping_types(tmp_path, torch_npu_spy, caplog):
    model = _Linear([1.0])
    cfg = U.tiny_cfg(str(tmp_path), "unused")  # CLIP_TYPE full_model
    assert type(Trainer.build_optimizer(cfg, model)) is torch.optim.SGD  # Detectron2 does not clip
    loop = Trainer.build_train_loop(cfg, model, [], torch.optim.SGD(model.parameters(), lr=0.1))
    assert loop.clip_max_norm == 10.0 and loop.clip_norm_type == 2.0
    value = U.tiny_cfg(str(tmp_path), "unused", SOLVER__CLIP_GRADIENTS__CLIP_TYPE="value")
    assert type(Trainer.build_optimizer(value, model)).__name__ == "SGDWithGradientClip"
    assert Trainer.build_train_loop(value, model, [], torch.optim.SGD(model.parameters(), lr=0.1)).clip_max_norm is None
    fused_on_cpu = U.tiny_cfg(str(tmp_path), "unused", SOLVER__NPU_FUSED_SGD=True)
    with caplog.at_level(logging.WARNING, logger="fsaf_d2"):
        assert type(Trainer.build_optimizer(fused_on_cpu, model)) is torch.optim.SGD
    assert "NPU_FUSED_SGD ignored" in caplog.text
    assert torch_npu_spy.lookups == []


def test_npu_fused_sgd_with_fused_global_clip(tmp_path, fake_npu):
    model = _Linear([30.0, 40.0])
    cfg = U.tiny_cfg(str(tmp_path), "unused", MODEL__DEVICE="npu", SOLVER__NPU_FUSED_SGD=True,
                     SOLVER__CLIP_GRADIENTS__CLIP_VALUE=5.0)
    opt = Trainer.build_optimizer(cfg, model)
    assert type(opt) is fake_npu.optim.NpuFusedSGD
    # the same training step on the CPU (the fake's optimizer is SGD): clipping goes through the fused call
    trainer = DeviceTrainer(model, [[{}]], opt, device_type="cpu", clip_max_norm=5.0)
    _one_step(trainer)
    clips = [e for e in fake_npu.EVENTS if e["event"] == "clip_grad_norm_fused_"]
    assert clips and clips[0]["max_norm"] == 5.0
    value = U.tiny_cfg(str(tmp_path), "unused", MODEL__DEVICE="npu", SOLVER__NPU_FUSED_SGD=True,
                       SOLVER__CLIP_GRADIENTS__CLIP_TYPE="norm")
    assert type(Trainer.build_optimizer(value, model)).__name__ == "NpuFusedSGDWithGradientClip"


def _assert_same_steps(model, optimizer, build_reference, steps=3):
    """``optimizer`` (over ``model``'s parameters) and ``build_reference(copies)`` take the same ``steps`` steps."""
    reference = build_reference([torch.nn.Parameter(p.detach().clone()) for p in model.parameters()])
    for step in range(steps):
        for p, q in zip(model.parameters(), reference.param_groups[0]["params"]):
            p.grad = torch.full_like(p, 0.5 - step)
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    for p, q in zip(model.parameters(), reference.param_groups[0]["params"]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_sgd_optimizer_is_fused_on_cpu(tmp_path):
    model = _Linear([1.0, -2.0])
    cfg = U.tiny_cfg(str(tmp_path), "unused", SOLVER__BASE_LR=0.01, SOLVER__MOMENTUM=0.9, SOLVER__NESTEROV=True,
                     SOLVER__WEIGHT_DECAY=1e-3)
    opt = Trainer.build_optimizer(cfg, model)
    group = opt.param_groups[0]
    assert type(opt) is torch.optim.SGD and group["fused"] is True and not group["foreach"]
    assert group["momentum"] == 0.9 and group["nesterov"] and group["weight_decay"] == 1e-3
    # the fused kernel takes the steps Detectron2's multi-tensor SGD takes
    _assert_same_steps(model, opt, lambda params: torch.optim.SGD(
        params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=True))
    value = U.tiny_cfg(str(tmp_path), "unused", SOLVER__CLIP_GRADIENTS__CLIP_TYPE="value")
    assert Trainer.build_optimizer(value, model).param_groups[0]["foreach"]


def test_adamw_optimizer(tmp_path):
    model = _Linear([1.0])
    cfg = U.tiny_cfg(str(tmp_path), "unused", SOLVER__OPTIMIZER="AdamW", SOLVER__BASE_LR=0.002,
                     SOLVER__WEIGHT_DECAY=0.05, SOLVER__ADAMW_BETAS=(0.9, 0.95))
    opt = Trainer.build_optimizer(cfg, model)
    assert type(opt) is torch.optim.AdamW  # global-norm clipping stays in the training step
    group = opt.param_groups[0]
    assert group["lr"] == 0.002 and group["weight_decay"] == 0.05 and group["betas"] == (0.9, 0.95)
    # on the CPU the fused kernel runs, and takes the same steps as the multi-tensor path
    assert group["fused"] is True and not group["foreach"]
    _assert_same_steps(model, opt, lambda params: torch.optim.AdamW(
        params, lr=0.002, weight_decay=0.05, betas=(0.9, 0.95), foreach=True))
    value = U.tiny_cfg(str(tmp_path), "unused", SOLVER__OPTIMIZER="AdamW",
                       SOLVER__CLIP_GRADIENTS__CLIP_TYPE="value")
    clipped_in_step = Trainer.build_optimizer(value, model)
    assert type(clipped_in_step).__name__ == "AdamWWithGradientClip"
    # Detectron2's clipping inside step() needs unscaled gradients there: the multi-tensor path
    assert clipped_in_step.param_groups[0]["foreach"] and not clipped_in_step.param_groups[0]["fused"]
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        validate_engine_config(U.tiny_cfg(str(tmp_path), "unused", SOLVER__OPTIMIZER="Adam"))
