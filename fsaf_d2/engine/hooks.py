"""Training hooks and writers that use the device layer instead of ``torch.cuda``.

* :class:`ThroughputHook`: images/s from device-synchronized step times after a warm-up, written to the
  EventStorage as ``throughput/images_per_sec`` (all devices) and ``throughput/images_per_sec_per_device``,
  summarised at the end of training in the log and in ``<OUTPUT_DIR>/throughput.json``.
* :class:`DeviceMetricPrinter`: Detectron2's console line with ``max_mem`` taken from the configured
  device (CUDA or NPU) and the current images/s.
* :class:`DeterministicDataStream`: restarts the training data stream from a seed derived from
  ``(SEED, segment)`` at every checkpoint boundary, so ``--resume`` replays exactly the batches an
  uninterrupted run would have seen.
* :class:`PreemptionHook`: on SIGTERM/SIGUSR1 finishes the current step, saves it and exits with
  :data:`~fsaf_d2.engine.faults.EXIT_PREEMPTED`; all ranks agree on the iteration.
"""
import json
import logging
import os
import signal
import threading
import time
from typing import Callable, List, Optional

import numpy as np
from detectron2.engine import HookBase
from detectron2.engine.hooks import EvalHook
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter, get_event_storage

from ..utils.io import atomic_write_bytes
from .comm import any_rank, stop_peer_watchdog
from .device import manual_seed_all, max_memory_allocated, synchronize
from .faults import EXIT_PREEMPTED, PREEMPTION_SIGNALS, Preempted

__all__ = [
    "training_writers",
    "ThroughputHook",
    "DeviceMetricPrinter",
    "DeterministicDataStream",
    "PreemptionHook",
    "FinishedRunEvalHook",
    "segment_seed",
]

logger = logging.getLogger(__name__)

THROUGHPUT_KEY = "throughput/images_per_sec"
THROUGHPUT_PER_DEVICE_KEY = "throughput/images_per_sec_per_device"


class ThroughputHook(HookBase):
    """Measure training throughput in images/s.

    Each step is timed from this hook's ``before_step`` to its ``after_step``, which first waits for the
    device (``synchronize``) so asynchronous CUDA/NPU work is counted. The first ``warmup_iters`` steps of
    every ``train()`` call (kernel compilation, allocator growth, data-loader start) are excluded.

    Args:
        total_batch_size: images per iteration over all processes (``SOLVER.IMS_PER_BATCH``).
        num_devices: number of processes/devices sharing that batch (world size).
        warmup_iters: steps excluded from the figures (``SOLVER.THROUGHPUT_WARMUP_ITERS``).
        device_type: "cuda", "npu" or "cpu" (what to synchronize).
        output_dir: where the main process writes ``throughput.json``; None to skip.
    """

    def __init__(
        self,
        total_batch_size: int,
        num_devices: int,
        warmup_iters: int,
        device_type: str,
        output_dir: Optional[str] = None,
    ):
        self.total_batch_size = int(total_batch_size)
        self.num_devices = max(1, int(num_devices))
        self.warmup_iters = max(0, int(warmup_iters))
        self.device_type = device_type
        self.output_dir = output_dir
        self._step_start = None
        self._measured_iters = 0
        self._measured_seconds = 0.0
        self.summary = None

    def before_train(self):
        self._measured_iters = 0
        self._measured_seconds = 0.0
        self.summary = None

    def before_step(self):
        self._step_start = time.perf_counter()

    def after_step(self):
        synchronize(self.device_type)
        seconds = time.perf_counter() - self._step_start
        done = self.trainer.iter - self.trainer.start_iter + 1
        if done <= self.warmup_iters or seconds <= 0:
            return
        self._measured_iters += 1
        self._measured_seconds += seconds
        ips = self.total_batch_size / seconds
        storage = self.trainer.storage
        storage.put_scalar(THROUGHPUT_KEY, ips)
        storage.put_scalar(THROUGHPUT_PER_DEVICE_KEY, ips / self.num_devices)

    def after_train(self):
        if self._measured_iters == 0:
            logger.info(
                f"[Throughput] not measured: training ran no iteration after the {self.warmup_iters} "
                "warm-up iterations (SOLVER.THROUGHPUT_WARMUP_ITERS)"
            )
            return
        sec_per_iter = self._measured_seconds / self._measured_iters
        total = self.total_batch_size / sec_per_iter
        self.summary = {
            "images_per_sec": total,
            "images_per_sec_per_device": total / self.num_devices,
            "num_devices": self.num_devices,
            "device_type": self.device_type,
            "total_batch_size": self.total_batch_size,
            "seconds_per_iter": sec_per_iter,
            "measured_iters": self._measured_iters,
            "warmup_iters": self.warmup_iters,
        }
        if not comm.is_main_process():
            return
        n = self.num_devices
        logger.info(
            f"[Throughput] {total / n:.2f} images/s per {self.device_type} device (1 card) | {total:.2f} images/s "
            f"on {n} card{'s' if n > 1 else ''} | total batch {self.total_batch_size}, {sec_per_iter:.4f} s/iter, "
            f"{self._measured_iters} iterations after {self.warmup_iters} warm-up"
        )
        if self.output_dir:
            path = os.path.join(self.output_dir, "throughput.json")
            atomic_write_bytes(path, (json.dumps(self.summary, indent=2) + "\n").encode())


class DeviceMetricPrinter(CommonMetricPrinter):
    """Detectron2's console metric line, with device memory from the configured device type.

    ``CommonMetricPrinter.write`` only reports ``torch.cuda.max_memory_allocated``. This printer keeps that
    ``write`` and appends to the line it logs the smoothed ``grad_norm`` and images/s when available, and
    the peak memory of the device layer (CUDA or NPU; nothing on CPU) unless the line already has one.

    Args:
        max_iter: total iterations (for the ETA).
        device_type: "cuda", "npu" or "cpu".
        window_size: median window for losses.
    """

    def __init__(self, max_iter: Optional[int], device_type: str, window_size: int = 20):
        super().__init__(max_iter, window_size=window_size)
        self.device_type = device_type
        self.logger = _LineExtension(self.logger, self._extra_fields)

    def _median(self, storage, key):
        return storage.history(key).median(storage.count_samples(key, self._window_size))

    def _extra_fields(self, line: str) -> List[str]:
        storage = get_event_storage()
        histories = storage.histories()
        parts = []
        if "grad_norm" in histories:
            parts.append(f"grad_norm: {self._median(storage, 'grad_norm'):.4g}")
        if THROUGHPUT_KEY in histories:
            parts.append(f"images/s: {self._median(storage, THROUGHPUT_KEY):.2f}")
        mem = None if "max_mem:" in line else max_memory_allocated(self.device_type)
        if mem is not None:
            # NOTE: "max_mem: <N>M" is the format Detectron2's tooling greps for
            parts.append(f"max_mem: {mem / 1024.0 / 1024.0:.0f}M")
        return parts


def training_writers(output_dir: str, max_iter: int, device_type: str) -> list:
    """The event writers of a training run: the console (:class:`DeviceMetricPrinter`), ``metrics.json`` and
    TensorBoard, in ``output_dir`` (created)."""
    os.makedirs(output_dir, exist_ok=True)
    return [
        DeviceMetricPrinter(max_iter, device_type),
        JSONWriter(os.path.join(output_dir, "metrics.json")),
        TensorboardXWriter(output_dir),
    ]


class _LineExtension(logging.LoggerAdapter):
    """A logger that appends ``extra_fields(message)`` (a list of "key: value" strings) to each message."""

    def __init__(self, logger: logging.Logger, extra_fields: Callable[[str], List[str]]):
        super().__init__(logger, {})
        self._extra_fields = extra_fields

    def process(self, msg, kwargs):
        msg = str(msg)
        return "  ".join([msg.rstrip()] + self._extra_fields(msg)), kwargs


def segment_seed(seed: int, segment: int) -> int:
    """Seed of data segment ``segment`` of a run seeded with ``seed`` (a pure function, < 2**31)."""
    return int(np.random.SeedSequence([int(seed), int(segment)]).generate_state(1)[0] % (2**31 - 1024))


class FinishedRunEvalHook(EvalHook):
    """Detectron2's ``EvalHook`` whose final evaluation runs only after a finished run.

    Detectron2 evaluates in ``after_train`` when ``iter + 1 >= max_iter``. That also holds when the last
    iteration raised (``TrainerBase.train`` leaves ``iter`` at ``max_iter - 1`` then, at ``max_iter`` after
    success): the failed rank would run a whole evaluation before its error is reported, and in a
    multi-process job enter the evaluation's collectives while its peers are still in the failed step's.
    """

    def after_train(self):
        if self.trainer.iter >= self.trainer.max_iter:
            super().after_train()
        else:
            del self._func  # as Detectron2 does: the closure holds the trainer

    @classmethod
    def replacing(cls, hooks: list) -> list:
        """``hooks`` with every Detectron2 ``EvalHook`` replaced by one of this class (same period and function)."""
        return [
            cls(h._period, h._func, h._eval_after_train) if type(h) is EvalHook else h for h in hooks
        ]


class DeterministicDataStream(HookBase):
    """Make the training data stream a function of ``(SEED, iteration)``, so resuming is exact.

    Detectron2's ``TrainingSampler`` restarts from the beginning of its stream when a job is resumed, and
    the augmentation RNG state (global numpy/random/torch, or the worker seeds) is not restored either.
    This hook splits training into segments of ``period`` iterations (the checkpoint period, so every
    periodic checkpoint sits at a segment boundary). At the first iteration of each segment ``s`` it
    re-seeds every RNG with ``segment_seed(seed, s) + rank`` and rebuilds the training loader with
    ``build_loader(segment_seed(seed, s))``; both an uninterrupted run and a run resumed at that boundary
    therefore see identical batches. A run resumed off a boundary restarts the segment and skips the
    already consumed batches (at most ``period - 1``).

    Args:
        seed: the run's ``SEED`` (>= 0).
        period: segment length in iterations (``SOLVER.CHECKPOINT_PERIOD``).
        build_loader: callable ``seed -> data loader`` (the loader must draw its randomness from that seed
            or from the freshly seeded global RNGs).
        device_type: device whose RNGs are seeded as well.
    """

    def __init__(self, seed: int, period: int, build_loader: Callable, device_type: str):
        if seed < 0:
            raise ValueError("DeterministicDataStream needs SEED >= 0")
        self.seed = int(seed)
        self.period = max(1, int(period))
        self.build_loader = build_loader
        self.device_type = device_type

    def _restart(self, iteration: int) -> None:
        segment = iteration // self.period
        seed = segment_seed(self.seed, segment)
        seed_all_rng(seed + comm.get_rank())
        manual_seed_all(self.device_type, seed + comm.get_rank())
        logger.info(f"Data stream restarted for iterations {iteration}..{iteration + self.period - 1} (seed {seed})")
        self.trainer._trainer.reset_data_loader(lambda: self.build_loader(seed))

    def before_train(self):
        start = self.trainer.start_iter
        segment_start = (start // self.period) * self.period
        self._restart(segment_start)
        skip = start - segment_start
        if skip:
            logger.warning(
                f"Resuming at iteration {start}, inside a data segment starting at {segment_start}: "
                f"skipping {skip} already consumed batches"
            )
            loader_iter = self.trainer._trainer._data_loader_iter
            for _ in range(skip):
                next(loader_iter)

    def before_step(self):
        it = self.trainer.iter
        if it != self.trainer.start_iter and it % self.period == 0:
            self._restart(it)


class PreemptionHook(HookBase):
    """Stop cleanly when the scheduler asks: SIGTERM or SIGUSR1 (Slurm, Kubernetes) before a kill.

    The signal only sets a flag. After the current step (and the hooks before this one, so the EMA and
    evaluation of that step are done) the ranks agree whether any of them was signalled
    (:func:`~fsaf_d2.engine.comm.any_rank`); if so every rank stops at that same iteration: the main process
    writes ``model_<iteration>.pth`` atomically (unless the periodic checkpointer just did) and tags it, all
    ranks wait for it and raise :class:`~fsaf_d2.engine.faults.Preempted`, i.e. exit with
    :data:`~fsaf_d2.engine.faults.EXIT_PREEMPTED`. ``--resume`` continues from the next iteration. A signal
    during the last step lets training end normally. The handlers are installed for ``train()`` only, from
    the main thread: :class:`~fsaf_d2.engine.trainer.Trainer` installs them (:meth:`install`) before any
    hook's ``before_train``, so that a signal while the data stream is being rebuilt on resume is kept too;
    on its own the hook installs them in its ``before_train``.

    Args:
        checkpointer: the trainer's checkpointer (writes on the main process only).
        signals: the signals that mean "preempted".
    """

    def __init__(self, checkpointer, signals=PREEMPTION_SIGNALS):
        self.checkpointer = checkpointer
        self.signals = tuple(signals)
        self._received = None
        self._previous = {}

    def _on_signal(self, signum, frame):
        self._received = signum

    def install(self):
        """Record the signals from now on (main thread only; a second call keeps the first installation)."""
        if self._previous:
            return
        self._received = None
        if threading.current_thread() is not threading.main_thread():
            logger.warning("PreemptionHook: training runs outside the main thread; preemption signals not handled")
            return
        self._previous = {s: signal.signal(s, self._on_signal) for s in self.signals}

    def restore(self):
        """Give the signals their previous handlers back."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def before_train(self):
        self.install()

    def after_train(self):
        self.restore()

    def after_step(self):
        if not any_rank(self._received is not None):
            return
        iteration = self.trainer.iter
        if iteration + 1 >= self.trainer.max_iter:
            logger.warning("Preemption signal during the last iteration: finishing training normally")
            return
        name = f"model_{iteration:07d}"
        path = os.path.join(self.checkpointer.save_dir, f"{name}.pth")
        if comm.is_main_process():
            tagged = self.checkpointer.has_checkpoint() and self.checkpointer.get_checkpoint_file() == path
            if not tagged:  # the periodic checkpointer may have saved this very iteration already
                self.checkpointer.save(name, iteration=iteration)
        comm.synchronize()
        # every rank has saved and stops here: one leaving first (rank 0 hosts the store) is not a lost peer
        stop_peer_watchdog()
        why = signal.Signals(self._received).name if self._received else "a preemption signal on another rank"
        logger.warning(
            f"Preempted ({why}): stopped after iteration {iteration}, saved {path}; exiting with code "
            f"{EXIT_PREEMPTED}. Rerun the same command with --resume to continue from iteration {iteration + 1}."
        )
        raise Preempted(iteration, path)
