"""Device-generic training step, with or without AMP, and global-norm gradient clipping.

Detectron2's ``AMPTrainer`` asserts ``torch.cuda.is_available()`` and uses ``torch.cuda.amp``, so it
cannot run on NPU or CPU. :class:`DeviceTrainer` is a ``SimpleTrainer`` whose ``run_step``:

1. reads a batch (``data_time``), runs the model under ``torch.autocast(device_type, dtype)`` when AMP
   is on;
2. backpropagates the (scaled) loss; logs losses / ``data_time`` through Detectron2's EventStorage;
3. optionally clips the **global** L2 norm of all gradients (``SOLVER.CLIP_GRADIENTS.CLIP_TYPE:
   "full_model"``) after unscaling them, so the threshold refers to true gradients;
4. steps the optimizer through the grad scaler (which skips steps with inf/NaN gradients).

A NaN/inf loss (checked on every rank, all ranks agree) raises
:class:`~fsaf_d2.engine.faults.NonFiniteLossError` naming the iteration and the loss terms before the optimizer
step, so no weight and no checkpoint ever holds it; with ``skip_nonfinite`` (``SOLVER.NONFINITE.SKIP``)
the step is skipped instead. Skipped steps (those, and fp16 steps the grad scaler skipped on overflow) are
logged; more than ``max_consecutive_skips`` in a row are an error.

Checkpoints keep the scaler state under ``"grad_scaler"`` in the trainer state, as ``AMPTrainer`` does.
"""
import logging
import time
from typing import Dict, Optional

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import get_event_storage

from ..config import check_choice
from .comm import any_rank
from .device import DeviceError, import_torch_npu
from .faults import NonFiniteLossError

__all__ = ["parse_precision", "build_grad_scaler", "DeviceTrainer"]

logger = logging.getLogger(__name__)

#: the other accepted spellings of SOLVER.AMP.PRECISION (fsaf_d2.config.FSAF_VALID_CHOICES)
_PRECISION_ALIASES = {"fp16": "float16", "bf16": "bfloat16"}


#: how the AMP keys are spelled in a YAML config; :mod:`fsaf_d2.engine.lazy` passes its LazyConfig spelling
AMP_KEYS = {"enabled": "SOLVER.AMP.ENABLED", "precision": "SOLVER.AMP.PRECISION", "device": "MODEL.DEVICE"}


def parse_precision(name: str, key: str = AMP_KEYS["precision"]) -> torch.dtype:
    """``SOLVER.AMP.PRECISION`` ("float16"/"fp16" or "bfloat16"/"bf16") as a torch dtype (``key``: the
    spelling errors name)."""
    name = check_choice("SOLVER.AMP.PRECISION", name, key)
    return getattr(torch, _PRECISION_ALIASES.get(name, name))


def check_amp_support(device_type: str, precision: torch.dtype, keys: Dict[str, str] = AMP_KEYS) -> None:
    """Fail early, naming the config keys (as ``keys`` spells them), for AMP settings the device cannot run.

    * CPU autocast is used with bfloat16 only: float16 on CPU raises (no silent change of precision).
    * NPU bfloat16 needs a chip that supports it (``torch_npu.npu.is_bf16_supported()``, Atlas A2/A3).
    """
    enabled, key, device = keys["enabled"], keys["precision"], keys["device"]
    if device_type == "cpu" and precision == torch.float16:
        raise ValueError(
            f"{enabled} with {key} float16 is not supported on {device} cpu: CPU autocast is only fast and "
            f"reliable in bfloat16. Set {key} bfloat16 (or disable AMP)."
        )
    if device_type == "npu" and precision == torch.bfloat16:
        npu = import_torch_npu().npu
        check = getattr(npu, "is_bf16_supported", None)
        if check is not None and not check():
            raise DeviceError(
                f"{key} bfloat16 requested, but this NPU does not support bfloat16 "
                "(torch_npu.npu.is_bf16_supported() is False); use float16."
            )


def build_grad_scaler(device_type: str, enabled: bool, precision: torch.dtype):
    """The gradient scaler for a device and AMP setting.

    * fp16 on cuda: ``torch.amp.GradScaler("cuda")``;
    * fp16 on npu: ``torch_npu.npu.amp.GradScaler()`` (handles NPU overflow flags on older chips);
    * no AMP, or bf16 (same exponent range as fp32): a disabled scaler (a pass-through).
    """
    if enabled and precision == torch.float16:
        if device_type == "cuda":
            return torch.amp.GradScaler("cuda")
        if device_type == "npu":
            return import_torch_npu().npu.amp.GradScaler()
        raise ValueError(f"No fp16 gradient scaler for device type {device_type!r}")
    return torch.amp.GradScaler("cpu", enabled=False)


class DeviceTrainer(SimpleTrainer):
    """A ``SimpleTrainer`` with autocast on any device, a grad scaler and global-norm clipping.

    Args:
        model, data_loader, optimizer, gather_metric_period, zero_grad_before_forward,
            async_write_metrics: as in :class:`detectron2.engine.SimpleTrainer`.
        device_type: "cuda", "npu" or "cpu": the autocast device type.
        amp: run the forward pass under autocast.
        precision: autocast dtype (float16 or bfloat16).
        grad_scaler: a ``torch.amp.GradScaler``-like object; default: :func:`build_grad_scaler`.
        clip_max_norm: if set, clip the global L2 norm of all gradients (unscaled) to this value.
        clip_norm_type: the norm's p (2.0 = L2; inf allowed).
        log_grad_norm: write the pre-clipping global gradient norm as ``grad_norm`` to the EventStorage.
        skip_nonfinite: skip the optimizer step of a NaN/inf loss instead of raising NonFiniteLossError.
        max_consecutive_skips: more skipped steps in a row (non-finite losses, fp16 overflows) raise.
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        device_type: str = "cpu",
        amp: bool = False,
        precision: torch.dtype = torch.float16,
        grad_scaler=None,
        clip_max_norm: Optional[float] = None,
        clip_norm_type: float = 2.0,
        log_grad_norm: bool = True,
        skip_nonfinite: bool = False,
        max_consecutive_skips: int = 10,
        gather_metric_period: int = 1,
        zero_grad_before_forward: bool = False,
        async_write_metrics: bool = False,
    ):
        super().__init__(
            model,
            data_loader,
            optimizer,
            gather_metric_period=gather_metric_period,
            zero_grad_before_forward=zero_grad_before_forward,
            async_write_metrics=async_write_metrics,
        )
        if amp:
            check_amp_support(device_type, precision)
        self.device_type = device_type
        self.amp = bool(amp)
        self.precision = precision
        self.grad_scaler = grad_scaler if grad_scaler is not None else build_grad_scaler(device_type, amp, precision)
        self.clip_max_norm = clip_max_norm
        self.clip_norm_type = float(clip_norm_type)
        self.log_grad_norm = log_grad_norm
        self.skip_nonfinite = bool(skip_nonfinite)
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.skipped_in_a_row = 0

    # ------------------------------------------------------------------------------------------- step

    def run_step(self):
        assert self.model.training, "[DeviceTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(device_type=self.device_type, dtype=self.precision, enabled=self.amp):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()

        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        if self.skip_nonfinite_step(loss_dict, losses):
            return

        if self.async_write_metrics:
            self.concurrent_executor.submit(self._write_metrics, loss_dict, data_time, iter=self.iter)
        else:
            self._write_metrics(loss_dict, data_time)

        grad_norm = self.clip_gradients() if self.clip_max_norm is not None else None
        self.optimizer_step()
        if grad_norm is not None and self.log_grad_norm and (self.iter + 1) % self.gather_metric_period == 0:
            get_event_storage().put_scalar("grad_norm", float(grad_norm), cur_iter=self.iter)

    def release_data_loader(self) -> None:
        """Stop the training loader's worker processes now (they exit through their own shutdown protocol).

        Workers shielded from preemption signals (:func:`~fsaf_d2.engine.worker_shield.shield_loader_workers`)
        would otherwise outlive training until the process exits.
        """
        loader_iter, self._data_loader_iter_obj = self._data_loader_iter_obj, None
        close = getattr(loader_iter, "close", None)  # a generator: Detectron2's aspect-ratio grouping
        if close is not None:
            close()
        del loader_iter  # the last reference: a DataLoader iterator shuts its workers down when collected

    def skip_nonfinite_step(self, loss_dict, losses: torch.Tensor) -> bool:
        """Whether to skip this step because a rank's loss is NaN/inf (``skip_nonfinite``); else raise.

        Raises:
            NonFiniteLossError: naming the iteration and this rank's loss terms (without ``skip_nonfinite``,
                or after more than ``max_consecutive_skips`` skipped steps in a row).
        """
        # one host sync per step, where the step waits anyway: Detectron2's metric writer reads every loss
        # term on the host right after this (SimpleTrainer._write_metrics)
        finite = bool(torch.isfinite(losses.detach()).all())
        if not any_rank(not finite):
            return False
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in loss_dict.items())
        where = f"loss terms {terms}" if not finite else f"loss on another rank (this rank: {terms})"
        if not self.skip_nonfinite:
            raise NonFiniteLossError(
                f"Non-finite {where} at iteration {self.iter}. Training stopped before the optimizer step: the "
                "weights and the checkpoints hold no NaN/inf. Lower SOLVER.BASE_LR, lengthen SOLVER.WARMUP_ITERS, "
                "enable SOLVER.CLIP_GRADIENTS or check this iteration's data; SOLVER.NONFINITE.SKIP True skips "
                "such steps instead."
            )
        self.optimizer.zero_grad()  # the NaN/inf gradients never reach the optimizer
        self.count_skipped_step(f"non-finite {where}")
        return True

    def optimizer_step(self) -> None:
        """Step the optimizer through the grad scaler; an fp16 step the scaler skipped (overflow) is counted.

        With an enabled scaler (fp16 AMP) ``get_scale()`` reads the scale on the host before and after the step:
        the second read waits for the optimizer's kernels (one sync per step, fp16 only)."""
        scale = self.grad_scaler.get_scale() if self.grad_scaler.is_enabled() else None
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        new_scale = self.grad_scaler.get_scale() if scale is not None else None
        if new_scale is not None and new_scale < scale:
            self.count_skipped_step(f"gradient overflow, loss scale {scale:g} -> {new_scale:g}")
        else:
            self.skipped_in_a_row = 0

    def count_skipped_step(self, reason: str) -> None:
        """Log a skipped step; raise NonFiniteLossError after more than ``max_consecutive_skips`` in a row."""
        self.skipped_in_a_row += 1
        n, limit = self.skipped_in_a_row, self.max_consecutive_skips
        logger.warning(f"Iteration {self.iter}: optimizer step skipped, {reason} ({n} in a row, limit {limit})")
        if n > limit:
            raise NonFiniteLossError(
                f"{n} consecutive optimizer steps skipped, the last at iteration {self.iter} ({reason}), more than "
                f"SOLVER.NONFINITE.MAX_CONSECUTIVE {limit}: training is diverging. Lower SOLVER.BASE_LR, enable "
                "SOLVER.CLIP_GRADIENTS, or use SOLVER.AMP.PRECISION bfloat16; then rerun with --resume."
            )

    def clip_gradients(self) -> torch.Tensor:
        """Unscale the gradients in place and clip their global norm to ``clip_max_norm``.

        Uses ``optimizer.clip_grad_norm_fused_`` when the optimizer provides it (torch_npu fused
        optimizers, whose gradients live in flat buffers), else ``torch.nn.utils.clip_grad_norm_``.

        Returns:
            the total gradient norm before clipping (0-dim tensor; inf/NaN on overflow, in which case the
            scaler skips the step).
        """
        self.grad_scaler.unscale_(self.optimizer)
        fused = getattr(self.optimizer, "clip_grad_norm_fused_", None)
        if fused is not None:
            return fused(self.clip_max_norm, self.clip_norm_type)
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, self.clip_max_norm, self.clip_norm_type)

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self):
        ret = super().state_dict()
        ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        scaler_state = state_dict.get("grad_scaler")
        if self.grad_scaler.is_enabled():
            if scaler_state:
                self.grad_scaler.load_state_dict(scaler_state)
            else:
                logger.warning("Checkpoint has no grad scaler state; the loss scale restarts from its initial value")
