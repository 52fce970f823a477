"""Exponential moving average (EMA) of the model's weights, ``MODEL_EMA.*`` (the keys of d2go's EMA).

A short from-scratch schedule ends with noisy weights; their running average is a better detector.
:class:`ModelEMAHook` keeps an EMA copy of the model (``torch.optim.swa_utils.AveragedModel`` over the
parameters and the buffers, so BatchNorm statistics are averaged too) and updates it after every step:

    ema = d * ema + (1 - d) * weights,   d = min(MODEL_EMA.DECAY, (1 + t) / (10 + t)),  t = updates so far

(the warm-up ramp follows the weights closely while they move fast). Integer buffers are copied.

* Evaluation during training (``TEST.EVAL_PERIOD``) runs on the EMA weights.
* At the last iteration, before ``model_final.pth`` is written, the EMA weights replace the model's, so
  the final evaluation, ``model_final.pth`` and everything that loads it (``--eval-only``, demo, export)
  use the averaged detector.
* Checkpoints store the EMA under ``model_ema``; ``--resume`` restores it, so a resumed run averages exactly
  as an uninterrupted one. A checkpoint without it (or ``MODEL.WEIGHTS``) starts the average afresh.

The update is on the device, with no host synchronisation.
"""
import torch
from detectron2.engine import HookBase
from torch.optim.swa_utils import AveragedModel

__all__ = ["ema_decay", "build_model_ema", "ModelEMAHook"]


def ema_decay(decay: float, num_updates: int) -> float:
    """Decay of update number ``num_updates`` (0-based): ``min(decay, (1 + t) / (10 + t))``."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


class _EMAUpdate:
    """``multi_avg_fn`` of ``AveragedModel``: lerp floating tensors towards the model by ``1 - decay``."""

    def __init__(self, decay: float):
        self.max_decay = decay
        self.num_updates = 0

    def __call__(self, averaged, current, _num_averaged):
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - ema_decay(self.max_decay, self.num_updates))
        else:  # e.g. BatchNorm's num_batches_tracked
            torch._foreach_copy_(averaged, current)


def build_model_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """EMA copy of ``model`` (unwrapped from DDP), in eval mode and without gradients."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"MODEL_EMA.DECAY must be in [0, 1), got {decay}")
    model = getattr(model, "module", model)
    update = _EMAUpdate(decay)
    ema = AveragedModel(model, multi_avg_fn=update, use_buffers=True)
    ema.ema_update = update
    ema.eval()
    ema.requires_grad_(False)
    return ema


class ModelEMAHook(HookBase):
    """Update ``ema`` after every step; at the last step, copy it into the trained model.

    Place it before the ``PeriodicCheckpointer``, so that every checkpoint holds the EMA of its own
    iteration and ``model_final.pth`` holds the EMA weights.
    """

    def __init__(self, ema: AveragedModel):
        self.ema = ema

    def after_step(self):
        model = getattr(self.trainer.model, "module", self.trainer.model)
        self.ema.ema_update.num_updates = self.trainer.iter  # resumable: the iteration, not a counter
        self.ema.update_parameters(model)
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            with torch.no_grad():
                model.load_state_dict(self.ema.module.state_dict())
