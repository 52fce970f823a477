"""Slurm jobs with submitit: ``train_net.py``'s ``main`` on N nodes x M devices, requeued on preemption.

submitit (``pip install submitit``) starts one task per device (``tasks_per_node = M``). Each task runs a
:class:`TrainingJob`, which turns submitit's ``JobEnvironment`` (global rank, local rank, number of tasks
and nodes, the first node's host name) into the variables torchrun exports (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and calls
:func:`~fsaf_d2.engine.launch.launch`, which initialises the device and process group of the task
(nccl, hccl or gloo) as under torchrun and runs ``main(args)``.

When Slurm is about to preempt or time out the job, submitit signals the tasks (``USR2``, or
``$SUBMITIT_PREEMPT_SIGNAL``) and calls :meth:`TrainingJob.checkpoint` in task 0: it returns the same job
with ``args.resume = True``, which submitit pickles and requeues (a restart by Slurm itself, seen in
``SLURM_RESTART_COUNT``, resumes too). The requeued tasks resume from
``OUTPUT_DIR/last_checkpoint`` (the last periodic checkpoint: ``SOLVER.CHECKPOINT_PERIOD`` bounds the
work lost), on a new ``MASTER_PORT``. :func:`build_executor` prepares submitit's executor (``slurm``, or
``local`` for one machine without Slurm, which tests use).
"""
import copy
import logging
import os
import zlib
from typing import Callable, Dict, Optional

from .launch import launch
from .trainer import pre_launch

__all__ = ["TrainingJob", "build_executor", "dist_env_of", "import_submitit", "master_port"]

logger = logging.getLogger(__name__)

#: range of the rendezvous ports chosen by :func:`master_port`
PORT_BASE, PORT_RANGE = 20000, 20000


def import_submitit():
    """``import submitit``, or an ImportError that says how to install it."""
    try:
        import submitit
    except ImportError as e:
        raise ImportError(
            "Cluster jobs need submitit, which is not installed: `pip install submitit` "
            "(or `pip install 'fsaf_d2[cluster]'`)."
        ) from e
    return submitit


def master_port(job_id: str, attempt: int) -> int:
    """The rendezvous port of one start of a job: the same in all its tasks, another one after a requeue
    (the previous start's port may still be held by a dying process)."""
    return PORT_BASE + (zlib.crc32(str(job_id).encode()) + attempt) % PORT_RANGE


def dist_env_of(job_env, port: int) -> Dict[str, str]:
    """The torchrun-style variables of the submitit task ``job_env`` (a ``submitit.JobEnvironment``).

    One task per device: ``WORLD_SIZE`` is the number of tasks and ``LOCAL_WORLD_SIZE`` the tasks per node;
    rank 0 is the first task of the first node, whose host name is ``MASTER_ADDR`` (127.0.0.1 on one node).
    """
    num_tasks, num_nodes = job_env.num_tasks, job_env.num_nodes
    if num_tasks % num_nodes:
        raise ValueError(f"{num_tasks} tasks on {num_nodes} nodes: fsaf_d2 runs the same number of tasks per node")
    return {
        "RANK": str(job_env.global_rank),
        "LOCAL_RANK": str(job_env.local_rank),
        "WORLD_SIZE": str(num_tasks),
        "LOCAL_WORLD_SIZE": str(num_tasks // num_nodes),
        "MASTER_ADDR": job_env.hostnames[0] if num_nodes > 1 else "127.0.0.1",
        "MASTER_PORT": str(port),
    }


class TrainingJob:
    """The callable submitted to submitit: runs ``main_func(args)`` as one worker of a distributed job.

    Args:
        main_func: ``train_net.py``'s ``main`` (any picklable function of the parsed arguments).
        args: ``train_net.py``'s parsed arguments (``config_file``, ``opts``, ``resume``, ``eval_only``,
            ``num_gpus`` = tasks per node).
        attempt: how many times the job was requeued (picks the rendezvous port).
    """

    def __init__(self, main_func: Callable, args, attempt: int = 0):
        self.main_func = main_func
        self.args = args
        self.attempt = attempt

    def args_for_this_start(self):
        """``args``, with ``resume`` set when Slurm restarted the job by itself (``SLURM_RESTART_COUNT`` > 0,
        e.g. a requeue after a node failure, which does not go through :meth:`checkpoint`)."""
        if self.args.resume or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) == 0:
            return self.args
        args = copy.deepcopy(self.args)
        args.resume = True
        return args

    def __call__(self):
        submitit = import_submitit()
        job_env = submitit.JobEnvironment()
        os.environ.update(dist_env_of(job_env, master_port(job_env.job_id, self.attempt)))
        args = self.args_for_this_start()
        logger.info(f"{job_env}, start {self.attempt + 1}, resume={args.resume}")
        return launch(self.main_func, args.num_gpus, args=(args,), device_type=pre_launch(args))

    def checkpoint(self, *args, **kwargs):
        """Called by submitit in task 0 before a requeue: the same job, resuming from ``last_checkpoint``."""
        submitit = import_submitit()
        resumed_args = copy.deepcopy(self.args)
        resumed_args.resume = True
        logger.info(f"Requeuing with --resume (start {self.attempt + 2})")
        return submitit.helpers.DelayedSubmission(type(self)(self.main_func, resumed_args, self.attempt + 1))


def build_executor(
    folder: str,
    *,
    nodes: int,
    tasks_per_node: int,
    device_type: str,
    cluster: Optional[str] = None,
    timeout_min: int = 4320,
    partition: str = "",
    cpus_per_task: int = 10,
    mem_gb: Optional[int] = None,
    max_num_timeout: int = 3,
    job_name: str = "fsaf_d2",
    slurm_params: Optional[Dict[str, object]] = None,
):
    """submitit's executor for ``nodes`` x ``tasks_per_node`` workers (one task per device).

    Args:
        folder: submitit's folder (logs, pickles); ``%j`` is replaced by the job id.
        cluster: "slurm", "local" (one machine, no Slurm) or "debug"; None = Slurm when available.
        device_type: "cuda" requests ``tasks_per_node`` GPUs per node; other devices request none (name
            them in ``slurm_params``, e.g. ``{"gres": "npu:8"}``).
        timeout_min: the job's time limit; submitit signals ``signal_delay_s`` before it (120 s here).
        max_num_timeout: requeues allowed after the time limit (preemptions are not counted).
        slurm_params: more sbatch options by submitit's name (``account``, ``qos``, ``constraint``, ...).
    """
    submitit = import_submitit()
    executor = submitit.AutoExecutor(
        folder=folder, cluster=cluster, slurm_max_num_timeout=max_num_timeout, local_max_num_timeout=max_num_timeout
    )
    if executor.cluster != "slurm" and nodes > 1:
        raise ValueError(f"{nodes} nodes need Slurm; the {executor.cluster!r} executor runs on this machine only")
    params = {
        "name": job_name,
        "nodes": nodes,
        "tasks_per_node": tasks_per_node,
        "gpus_per_node": tasks_per_node if device_type == "cuda" else 0,
        "cpus_per_task": cpus_per_task,
        "timeout_min": timeout_min,
        "slurm_signal_delay_s": 120,
    }
    if mem_gb:
        params["mem_gb"] = mem_gb
    if partition:
        params["slurm_partition"] = partition
    params.update({f"slurm_{k}": v for k, v in (slurm_params or {}).items()})
    executor.update_parameters(**params)
    return executor
