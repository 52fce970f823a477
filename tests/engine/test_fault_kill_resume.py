"""Killed and preempted ``train_net.py`` jobs (real processes, real signals) resume to the weights of an
uninterrupted run: SIGKILL at random times and inside checkpoint writes, SIGTERM/SIGUSR1 in 1 and 2 processes."""
import os
import random
import signal
import time

import pytest

import engine_testutils as U
import fault_testutils as F
from fsaf_d2.engine.faults import EXIT_PREEMPTED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return U.write_builtin_coco_layout(str(tmp_path_factory.mktemp("datasets")), num_train=8, num_val=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, coco_root):
    """Final weights of uninterrupted runs, by number of processes and of data-loader workers (computed on
    first use)."""
    root = tmp_path_factory.mktemp("reference")
    cache = {}

    def get(num_gpus, workers=0):
        if (num_gpus, workers) not in cache:
            out = str(root / f"out{num_gpus}_{workers}")
            config = F.write_job_config(str(root), out, DATALOADER__NUM_WORKERS=workers)
            rc, output = F.run_job(config, env=F.job_env(coco_root), cwd=str(root), num_gpus=num_gpus)
            assert rc == 0, output[-4000:]
            cache[num_gpus, workers] = F.final_weights(out)
        return cache[num_gpus, workers]

    return get


def _random_delay(rng, low, high):
    delay = rng.uniform(low, high)
    print(f"signal after {delay:.2f} s")
    return delay


def _tagged_iteration(out):
    """Iteration of the checkpoint last_checkpoint names (-1: none yet)."""
    if not os.path.exists(os.path.join(out, "last_checkpoint")):
        return -1
    return int(F.last_checkpoint(out)[len("model_"):-len(".pth")])


def test_sigkill_at_random_and_inside_checkpoint_writes_then_resume(tmp_path, coco_root, reference):
    out = str(tmp_path / "out")
    config = F.write_job_config(str(tmp_path), out)
    seed = random.randrange(2**32)
    print(f"random kill times from seed {seed}")  # the draws of a failed run can be replayed
    rng = random.Random(seed)
    # 1. kill -9 at a random moment of training: a random time after a randomly chosen early checkpoint
    job = F.Job(config, env=F.job_env(coco_root), cwd=str(tmp_path))
    first = rng.choice([1, 3, 5])
    job.wait_for(f"model_{first:07d}.pth", path=os.path.join(out, "last_checkpoint"))
    time.sleep(_random_delay(rng, 0.0, 0.5))
    os.kill(job.proc.pid, signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL
    # the three kills below need 3 more checkpoint periods; a late random kill would leave no room
    assert _tagged_iteration(out) <= 20 - 8, "training ran too far before the random kill"
    # 2.-4. kill -9 inside the next checkpoint writes: the file written but not renamed; the rename of the
    # second one; the rename of last_checkpoint (model file published, tag not)
    for kill_at in ["fsync:model_0*.pth:1", "replace:model_0*.pth:2", "replace:last_checkpoint:1"]:
        before = _tagged_iteration(out)
        job = F.Job(config, env=F.job_env(coco_root, FSAF_TEST_KILL_AT=kill_at), cwd=str(tmp_path), resume=True)
        assert job.wait() == -signal.SIGKILL, f"{kill_at}: the kill point was not reached\n{job.output[-3000:]}"
        following = f"model_{before + 2:07d}.pth"  # the checkpoint after the tagged one (period 2)
        if kill_at.startswith("fsync"):  # written, not renamed: a temp file, the tag unchanged
            assert _tagged_iteration(out) == before and any(following in f for f in F.temp_files(out))
        elif kill_at.startswith("replace:model"):  # the first save completed, the second's rename did not
            assert _tagged_iteration(out) == before + 2
        else:  # the model file was published, its tag was not: resume uses the previous one
            assert _tagged_iteration(out) == before and following in os.listdir(out)
        assert "model_final.pth" not in os.listdir(out)
    # 5. resume to the end: the stale temp files go, the weights are those of the uninterrupted run
    rc, output = F.run_job(config, env=F.job_env(coco_root), cwd=str(tmp_path), resume=True)
    assert rc == 0, output[-4000:]
    assert F.temp_files(out) == []
    assert F.same_weights(F.final_weights(out), reference(1))


@pytest.mark.parametrize("num_gpus,sig,to_group,workers", [
    (1, signal.SIGTERM, True, 0),
    (2, signal.SIGUSR1, False, 0),
    (1, signal.SIGTERM, True, 2),  # the signal reaches the data-loader workers too: they must not die of it
])
def test_preemption_saves_the_current_iteration_and_resumes(tmp_path, coco_root, reference, num_gpus, sig, to_group,
                                                            workers):
    """SIGTERM to every process (Slurm), or SIGUSR1 to the launcher only (forwarded to the workers)."""
    out = str(tmp_path / "out")
    config = F.write_job_config(str(tmp_path), out, DATALOADER__NUM_WORKERS=workers)
    job = F.Job(config, env=F.job_env(coco_root), cwd=str(tmp_path), num_gpus=num_gpus)
    job.wait_for("model_0000001.pth", path=os.path.join(out, "last_checkpoint"))
    time.sleep(_random_delay(random.Random(), 0.0, 0.5))
    (os.killpg if to_group else os.kill)(job.proc.pid, sig)
    assert job.wait() == EXIT_PREEMPTED, job.output[-4000:]
    match = job.wait_for(rf"Preempted \({signal.Signals(sig).name}\): stopped after iteration (\d+), saved (\S+);")
    iteration = int(match.group(1))
    assert F.last_checkpoint(out) == f"model_{iteration:07d}.pth" == os.path.basename(match.group(2))
    assert "model_final.pth" not in os.listdir(out)

    resumed = F.Job(config, env=F.job_env(coco_root), cwd=str(tmp_path), num_gpus=num_gpus, resume=True)
    assert resumed.wait() == 0, resumed.output[-4000:]
    assert f"Starting training from iteration {iteration + 1}" in resumed.output
    # (loader workers draw other random flips than the main process: the reference has as many workers)
    assert F.same_weights(F.final_weights(out), reference(num_gpus, workers))
