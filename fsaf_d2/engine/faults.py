"""The exit codes and errors of the faults a training job meets (docs/training.md#faults).

Each fault is handled where it happens (preemption: :class:`~fsaf_d2.engine.hooks.PreemptionHook` and
:mod:`~fsaf_d2.engine.worker_shield`; a dead worker: :mod:`~fsaf_d2.engine.launch` and
:class:`~fsaf_d2.engine.comm.PeerWatchdog`; disk and checkpoint files: :mod:`~fsaf_d2.engine.checkpoint`;
non-finite losses: :class:`~fsaf_d2.engine.train_loop.DeviceTrainer`).
This module only names the outcomes, so that a scheduler script can tell them apart by exit code.
"""

import signal

__all__ = [
    "PREEMPTION_SIGNALS",
    "EXIT_PREEMPTED",
    "EXIT_WORKER_LOST",
    "Preempted",
    "WorkerLostError",
    "CheckpointWriteError",
    "CheckpointLoadError",
    "CheckpointMismatchError",
    "OutputDirError",
    "NonFiniteLossError",
]

#: the signals schedulers send before killing a job (Slurm: SIGTERM, or SIGUSR1 with ``--signal``;
#: Kubernetes: SIGTERM): the trainer saves the current iteration and exits with EXIT_PREEMPTED
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: exit code of a job stopped by SIGTERM/SIGUSR1 after saving its current iteration: requeue with --resume
#: (75 is EX_TEMPFAIL of sysexits.h, "temporary failure, try again")
EXIT_PREEMPTED = 75
#: exit code of a worker whose peer rank stopped answering (PeerWatchdog); the launcher then fails too
EXIT_WORKER_LOST = 76


class Preempted(SystemExit):
    """Raised on every rank after the checkpoint of a preempted run is written; exits with EXIT_PREEMPTED.

    A ``SystemExit``: Detectron2's training loop runs the hooks' ``after_train`` and lets it through
    without logging a traceback, and the process exits with :data:`EXIT_PREEMPTED`.
    """

    def __init__(self, iteration: int, checkpoint: str):
        super().__init__(EXIT_PREEMPTED)
        self.iteration = iteration
        self.checkpoint = checkpoint


class WorkerLostError(RuntimeError):
    """A worker process of a multi-process job died (names its rank and how it ended)."""


class CheckpointWriteError(OSError):
    """A checkpoint (or ``last_checkpoint``) could not be written; the previous one is intact."""


class CheckpointLoadError(RuntimeError):
    """A checkpoint file cannot be read (truncated/corrupt) or does not fit the model (names keys/shapes)."""


class CheckpointMismatchError(CheckpointLoadError):
    """A readable checkpoint whose keys or shapes do not fit the model (another architecture/class count)."""


class OutputDirError(OSError):
    """``OUTPUT_DIR`` cannot be created or written (checked before the first iteration)."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf (names the iteration and the loss terms); no step was taken with it."""
