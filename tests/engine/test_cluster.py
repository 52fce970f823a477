"""Cluster jobs with submitit (fsaf_d2.engine.cluster, tools/submit_slurm.py).

The end-to-end test submits ``train_net.py``'s main through tools/submit_slurm.py to submitit's local
executor: 2 tasks (gloo), a few iterations with a checkpoint every 5. Once the first checkpoint is written it
sends the tasks the preemption signal that Slurm would send (submitit's ``USR2``); submitit calls the job's
``checkpoint()``, requeues it, and the second start must resume from ``last_checkpoint`` and finish.
"""
import argparse
import json
import os
import re
import signal
import time

import pytest
import submitit

import engine_testutils as U
from fsaf_d2.engine.cluster import TrainingJob, dist_env_of, master_port
from tools_testing import load_tool

MAX_ITER, PERIOD = 30, 5
TIMEOUT_S = 400


class FakeJobEnvironment:
    def __init__(self, global_rank, local_rank, num_tasks, num_nodes, hostnames=("node-a", "node-b")):
        self.global_rank, self.local_rank = global_rank, local_rank
        self.num_tasks, self.num_nodes, self.hostnames = num_tasks, num_nodes, list(hostnames)


def test_dist_env_of_a_task():
    env = dist_env_of(FakeJobEnvironment(global_rank=11, local_rank=3, num_tasks=16, num_nodes=2), 23456)
    assert env == {"RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "node-a", "MASTER_PORT": "23456"}
    assert dist_env_of(FakeJobEnvironment(1, 1, 2, 1), 1)["MASTER_ADDR"] == "127.0.0.1"
    with pytest.raises(ValueError, match="same number of tasks per node"):
        dist_env_of(FakeJobEnvironment(0, 0, 3, 2), 1)


def test_master_port_changes_per_start():
    ports = [master_port("4242", attempt) for attempt in range(3)]
    assert len(set(ports)) == 3 and all(20000 <= p < 40000 for p in ports)
    assert master_port("4242", 1) == ports[1]  # every task of a start computes the same port


def test_checkpoint_requeues_with_resume():
    args = argparse.Namespace(resume=False, num_gpus=2, opts=["SOLVER.MAX_ITER", "3"])
    job = TrainingJob(print, args)
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    resumed = delayed.function
    assert isinstance(resumed, TrainingJob) and resumed.main_func is print
    assert resumed.args.resume is True and resumed.attempt == 1 and resumed.args.opts == args.opts
    assert args.resume is False  # the first start's arguments are left alone


def test_a_restart_by_slurm_resumes(monkeypatch):
    """A requeue that did not go through checkpoint() (e.g. a node failure) still resumes."""
    job = TrainingJob(print, argparse.Namespace(resume=False, num_gpus=1))
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert job.args_for_this_start().resume is False
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert job.args_for_this_start().resume is False
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert job.args_for_this_start().resume is True and job.args.resume is False


def test_bad_config_fails_before_submitting(tmp_path):
    """The submitting process checks the config (here a missing dataset file): nothing reaches the queue."""
    opts = ["DATASETS.REGISTER_COCO", repr([("mine", str(tmp_path / "missing.json"), str(tmp_path))])]
    with pytest.raises(FileNotFoundError, match="DATASETS.REGISTER_COCO entry 'mine': annotation file"):
        load_tool("submit_slurm").main(["--cluster", "local", "--job-dir", str(tmp_path / "jobs"), *opts])
    assert not (tmp_path / "jobs").exists()


def _task_pids(controller_pid):
    """The task processes of submitit's local controller (its children)."""
    with open(f"/proc/{controller_pid}/task/{controller_pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _wait_for(predicate, what, job):
    deadline = time.time() + TIMEOUT_S
    while not predicate():
        if job.done() or time.time() > deadline:
            raise AssertionError(f"{what}: not reached (job {job.state}).\n{job.stdout()}\n{job.stderr()}")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"), reason="needs /proc")
def test_local_job_is_requeued_and_resumes(tmp_path, monkeypatch):
    data = tmp_path / "data"
    U.write_tiny_coco(str(data / "images"), str(data / "ann.json"), 4, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    out = tmp_path / "out"
    opts = U.tiny_opts(str(out), "tiny_train", "tiny_train", 2, SOLVER__MAX_ITER=MAX_ITER,
                       SOLVER__CHECKPOINT_PERIOD=PERIOD, SEED=3)
    opts += ["DATASETS.REGISTER_COCO", [["tiny_train", str(data / "ann.json"), str(data / "images")]]]
    config = U.opts_to_yaml(opts, str(tmp_path / "tiny.yaml"))
    for key, value in U.subprocess_env().items():  # the tasks inherit this environment
        monkeypatch.setenv(key, value)

    # a 60-min limit: the signal then reads as a preemption (submitit calls it a timeout after 80 % of it)
    job = load_tool("submit_slurm").main([
        "--config-file", config, "--cluster", "local", "--num-gpus", "2", "--timeout", "60",
        "--job-dir", str(tmp_path / "jobs"), "--cpus-per-task", "1",
    ])  # fmt: skip
    try:
        last_checkpoint = out / "last_checkpoint"
        _wait_for(last_checkpoint.exists, "first checkpoint", job)
        checkpoint_at_signal = last_checkpoint.read_text()
        tasks = _task_pids(job._process.pid)
        assert len(tasks) == 2
        for pid in tasks:
            os.kill(pid, signal.SIGUSR2)  # what Slurm sends before preemption (submitit's --signal=USR2@...)
        assert len(job.results()) == 2  # waits for the job; raises if a task of the last start failed
    finally:
        if not job.done():
            job.cancel()  # the controller stops its tasks
    log = job.stdout()  # submitit logs to the tasks' stdout
    assert "this job is preempted" in log and "Requeued job" in log

    train_log = (out / "log.txt").read_text()
    starts = [int(i) for i in re.findall(r"Starting training from iteration (\d+)", train_log)]
    assert len(starts) == 2 and starts[0] == 0, starts
    resumed_at = starts[1]
    assert resumed_at > 0 and resumed_at % PERIOD == 0, starts  # resumed from a periodic checkpoint, not from 0
    assert resumed_at >= int(re.search(r"model_(\d+)\.pth", checkpoint_at_signal).group(1)) + 1
    assert train_log.count("World size: 2") == 2 and "process group backend gloo" in train_log
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    iterations = [m["iteration"] for m in metrics if "total_loss" in m]
    assert iterations[-1] == MAX_ITER - 1
