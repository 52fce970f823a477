"""Helpers of the fault tests: ``train_net.py`` jobs as real processes, signals, and what they leave behind.

Bitwise comparisons between processes need identical numerics in each: ``PYTORCH_JIT=0`` keeps fvcore's
jit-scripted losses in the Python interpreter (TorchScript's profiling executor would switch to optimised
graphs after a few calls per process, which moves gradients in the last bit).
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import torch

import engine_testutils as U

FAULT_INJECT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_inject")
#: seconds any fault-test job may run before the test kills it and fails
JOB_TIMEOUT = 300


#: a narrow ResNet-18 (checkpoints of ~10 MiB instead of ~90)
NARROW = dict(MODEL__BACKBONE__NAME="build_fsaf_narrow_resnet_fpn_backbone", MODEL__RESNETS__STEM_OUT_CHANNELS=32,
              MODEL__RESNETS__RES2_OUT_CHANNELS=32)


def job_opts(out: str, **overrides):
    """Opts of a small 2-process-capable job on the builtin-layout tiny COCO (``DETECTRON2_DATASETS``): a
    narrow ResNet-18 (small checkpoints), seeded, the deterministic data stream, checkpoints every 2 steps."""
    overrides = dict(
        dict(SEED=3, SOLVER__MAX_ITER=20, SOLVER__CHECKPOINT_PERIOD=2, SOLVER__BASE_LR=0.02,
             SOLVER__MOMENTUM=0.9, INPUT__RANDOM_FLIP="horizontal", **NARROW),
        **overrides,
    )
    return U.tiny_opts(out, "coco_2017_train", "coco_2017_val", 80, **overrides)


def write_job_config(directory: str, out: str, **overrides) -> str:
    return U.opts_to_yaml(job_opts(out, **overrides), os.path.join(directory, f"job_{os.path.basename(out)}.yaml"))


def job_env(coco_root: str, **extra):
    """Child environment: the repository and the fault-injection folder importable, no TorchScript."""
    env = U.subprocess_env(DETECTRON2_DATASETS=coco_root, PYTORCH_JIT=0, **extra)
    env["PYTHONPATH"] = os.pathsep.join([FAULT_INJECT_DIR, env["PYTHONPATH"]])
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """A ``train_net.py`` process (its own session, so a signal can reach all its processes), output to a file."""

    def __init__(self, config: str, *args, env, cwd: str, num_gpus: int = 1, port: int = 0, resume=False):
        self.log_path = os.path.join(cwd, f"job_{time.monotonic_ns()}.out")
        cmd = [sys.executable, U.TRAIN_NET, "--config-file", config, "--num-gpus", str(num_gpus)]
        if num_gpus > 1:
            cmd += ["--dist-url", f"tcp://127.0.0.1:{port or free_port()}"]
        if resume:
            cmd.append("--resume")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd + list(map(str, args)), env=env, cwd=cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait(self, timeout: float = JOB_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"job still running after {timeout} s:\n{self.output[-4000:]}")
        finally:
            self._log.close()

    def wait_for(self, pattern: str, path: str = None, timeout: float = JOB_TIMEOUT) -> re.Match:
        """Wait until ``pattern`` (a regex) appears in ``path`` (default: the job's output)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = ""
            if os.path.exists(path or self.log_path):
                with open(path or self.log_path) as f:
                    text = f.read()
            match = re.search(pattern, text)
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"job ended (rc {self.proc.returncode}) before {pattern!r}:\n{self.output[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen in {timeout} s")


def run_job(config, *args, **kwargs):
    """Run a job to its end; returns (returncode, output)."""
    job = Job(config, *args, **kwargs)
    return job.wait(), job.output


def final_weights(out: str):
    return torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)["model"]


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def last_checkpoint(out: str) -> str:
    with open(os.path.join(out, "last_checkpoint")) as f:
        return f.read()


def temp_files(out: str):
    return sorted(f for f in os.listdir(out) if f.endswith(".tmp"))


def _stat(pid) -> list:
    """Fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, ... ([] if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return []


def pids_alive(pids) -> list:
    """The pids of ``pids`` that still exist as processes (zombies excluded)."""
    return [pid for pid in pids if _stat(pid)[:1] not in ([], ["Z"])]


def _cmdline(pid) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def session_processes(session: int, settle_s: float = 10.0) -> list:
    """``(pid, command line)`` of the live processes of a session (a :class:`Job`'s session id is its pid):
    workers, helpers, orphans. Helpers that exit on their own right after the job (multiprocessing's
    resource tracker) get ``settle_s`` seconds to do so."""
    deadline = time.monotonic() + settle_s
    while True:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        left = [pid for pid in pids if (lambda st: len(st) > 3 and st[0] != "Z" and int(st[3]) == session)(_stat(pid))]
        if not left or time.monotonic() > deadline:
            return [(pid, _cmdline(pid)) for pid in left]
        time.sleep(0.2)


def worker_pid(out: str, rank: int, job: Job) -> int:
    """The pid of worker ``rank`` of a multi-process job, from its log line written by ``setup``."""
    log = os.path.join(out, "log.txt" if rank == 0 else f"log.txt.rank{rank}")
    return int(job.wait_for(rf"rank {rank}/\d+, .*pid (\d+)", path=log).group(1))


def listening_ports() -> set:
    """TCP ports in the LISTEN state on this machine (IPv4 and IPv6), from /proc/net."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            with open(table) as f:
                rows = [line.split() for line in f.readlines()[1:]]
            ports |= {int(r[1].rsplit(":", 1)[1], 16) for r in rows if r[3] == "0A"}
    return ports
