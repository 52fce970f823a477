"""Multi-process faults with real processes: a worker killed (SIGKILL) or frozen (SIGSTOP) does not leave
its peer waiting for the process-group timeout; a loop of 2-process trainings leaks no process and no port."""
import os
import signal
import threading
import time

import pytest
import torch.multiprocessing as mp

import engine_testutils as U
import engine_workers
import fault_testutils as F
from fsaf_d2.engine.faults import EXIT_PREEMPTED, EXIT_WORKER_LOST
from fsaf_d2.engine.launch import wait_for_workers

pytestmark = pytest.mark.slow

#: a job long enough never to finish by itself during these tests
LONG = dict(SOLVER__MAX_ITER=100000, SOLVER__CHECKPOINT_PERIOD=100000)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return U.write_builtin_coco_layout(str(tmp_path_factory.mktemp("datasets")), num_train=8, num_val=4)


def test_killed_worker_stops_the_spawned_job_naming_the_rank(tmp_path, coco_root):
    out = str(tmp_path / "out")
    job = F.Job(F.write_job_config(str(tmp_path), out, **LONG), env=F.job_env(coco_root), cwd=str(tmp_path),
                num_gpus=2)
    pids = [F.worker_pid(out, rank, job) for rank in (0, 1)]
    job.wait_for(r"iter: \d+", path=os.path.join(out, "log.txt"))  # both ranks are inside training
    os.kill(pids[1], signal.SIGKILL)
    rc = job.wait(timeout=120)  # bounded: the launcher ends rank 0 within 2 x WORKER_EXIT_GRACE_S
    assert rc != 0
    assert "WorkerLostError: Worker rank 1" in job.output and "was killed by SIGKILL" in job.output
    assert F.pids_alive(pids) == [] and F.session_processes(job.proc.pid) == []


def test_frozen_worker_ends_its_peer_within_the_peer_timeout(tmp_path, coco_root):
    """torchrun-style workers (no launcher watching them): rank 1 frozen by SIGSTOP, as a lost machine would
    be (its sockets stay open), so only the PeerWatchdog can end rank 0's wait inside a collective."""
    out = str(tmp_path / "out")
    config = F.write_job_config(str(tmp_path), out, DIST__PEER_TIMEOUT_S=5, **LONG)
    port = F.free_port()
    jobs = []
    for rank in (0, 1):
        env = F.job_env(coco_root, RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2,
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        jobs.append(F.Job(config, env=env, cwd=str(tmp_path)))
    try:
        jobs[0].wait_for(r"iter: \d+", path=os.path.join(out, "log.txt"))
        os.kill(jobs[1].proc.pid, signal.SIGSTOP)
        assert jobs[0].wait(timeout=120) == EXIT_WORKER_LOST, jobs[0].output[-4000:]
        assert "Worker lost: rank 1 has not answered for" in jobs[0].output
    finally:
        os.kill(jobs[1].proc.pid, signal.SIGKILL)
        jobs[1].wait()


def test_soak_two_process_trainings_leak_nothing(tmp_path, coco_root):
    """FSAF_SOAK_RUNS x FSAF_SOAK_ITERS 2-process gloo trainings with evaluation (CI: 3 x 6; the figure in
    docs/devices.md is 20 x 30): every run succeeds, and none leaves a process or a listening port."""
    runs = int(os.environ.get("FSAF_SOAK_RUNS", 3))
    iters = int(os.environ.get("FSAF_SOAK_ITERS", 6))
    started = time.monotonic()
    for i in range(runs):
        out = str(tmp_path / f"out{i}")
        config = F.write_job_config(str(tmp_path), out, SOLVER__MAX_ITER=iters, SOLVER__CHECKPOINT_PERIOD=iters,
                                    TEST__EVAL_PERIOD=iters)
        port = F.free_port()
        job = F.Job(config, env=F.job_env(coco_root), cwd=str(tmp_path), num_gpus=2, port=port)
        pids = [F.worker_pid(out, rank, job) for rank in (0, 1)]
        assert job.wait() == 0, job.output[-4000:]
        assert "copypaste: AP,AP50" in job.output  # evaluated
        assert F.session_processes(job.proc.pid) == [] and F.pids_alive(pids) == [], f"run {i}: processes left"
        assert port not in F.listening_ports(), f"run {i}: rendezvous port {port} still listening"
    print(f"soak: {runs} runs x {iters} iterations, 2 processes, {time.monotonic() - started:.0f} s")


def test_preempted_workers_get_time_to_finish_and_the_launcher_exits_75():
    """All ranks agreed to stop, but one tears down slower than the failure grace: it is not killed (which
    made the launcher report a lost worker and exit 1), and the launcher exits 75."""
    context = mp.start_processes(engine_workers.preempted_after_worker, args=({0: 0.0, 1: 4.0},), nprocs=2,
                                 join=False, start_method="spawn")
    with pytest.raises(SystemExit) as stopped:
        wait_for_workers(context, grace_s=0.5, preempted_grace_s=60)
    assert stopped.value.code == EXIT_PREEMPTED
    assert [p.exitcode for p in context.processes] == [EXIT_PREEMPTED, EXIT_PREEMPTED]


def test_a_preemption_signal_before_training_still_exits_75():
    """SIGTERM to the launcher while its workers are still setting up: they end by the forwarded signal
    (there is nothing to save yet) and the job exits 75, so a requeue-on-75 script requeues it."""
    context = mp.start_processes(engine_workers.setting_up_worker, nprocs=2, join=False, start_method="spawn")
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(SystemExit) as stopped:
            wait_for_workers(context, grace_s=5)
    finally:
        timer.cancel()
        for p in context.processes:
            p.kill()
    assert stopped.value.code == EXIT_PREEMPTED
    assert [p.exitcode for p in context.processes] == [-signal.SIGTERM, -signal.SIGTERM]
