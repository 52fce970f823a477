"""End to end: ``train_net.py`` with 2 CPU processes (gloo), spawned by ``--num-gpus 2`` and torchrun-style.

The tiny data is written in Detectron2's builtin COCO layout and selected with ``DETECTRON2_DATASETS``,
so the unmodified ``train_net.py`` finds ``coco_2017_train`` / ``coco_2017_val`` in every process.
The shipped quickstart config also trains in 2 processes, on a small generated quickstart dataset: it
uses a subset of the pyramid levels, which DistributedDataParallel fails on if an unused level is built.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import engine_testutils as U

pytestmark = pytest.mark.slow

TIMEOUT = 420


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return U.write_builtin_coco_layout(str(tmp_path_factory.mktemp("datasets")), num_train=4, num_val=4)


def _config(tmp_path, out):
    opts = U.tiny_opts(out, "coco_2017_train", "coco_2017_val", 80, SOLVER__MAX_ITER=3,
                       SOLVER__CHECKPOINT_PERIOD=2, SEED=3)
    return U.opts_to_yaml(opts, str(tmp_path / "tiny.yaml"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(procs):
    """Wait for all processes; on timeout kill them. Returns [(returncode, output)]."""
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT)
            results.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _check_run(out_dir, world_size):
    files = set(os.listdir(out_dir))
    assert {"model_0000001.pth", "model_final.pth", "last_checkpoint", "metrics.json", "throughput.json"} <= files
    assert open(os.path.join(out_dir, "last_checkpoint")).read() == "model_final.pth"
    assert not [f for f in files if f.endswith(".tmp")]
    log = open(os.path.join(out_dir, "log.txt")).read()
    assert f"World size: {world_size}" in log
    assert "[Throughput]" in log and f"on {world_size} cards" in log
    assert "Inference on coco_2017_val: 4 images in " in log and "images/s (all devices)" in log
    assert os.path.exists(os.path.join(out_dir, f"log.txt.rank{world_size - 1}"))
    throughput = json.load(open(os.path.join(out_dir, "throughput.json")))
    assert throughput["num_devices"] == world_size and throughput["images_per_sec"] > 0
    metrics = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.json"))]
    assert any("total_loss" in m for m in metrics)
    assert any("throughput/images_per_sec" in m for m in metrics)
    assert any("bbox/AP" in m for m in metrics), "COCOEvaluator results missing from metrics.json"
    # COCOEvaluator on rank 0 merged the detections of both ranks (each ran inference on 2 of 4 images)
    dets = json.load(open(os.path.join(out_dir, "inference", "coco_instances_results.json")))
    assert {d["image_id"] for d in dets} == {1, 2, 3, 4}


def test_train_net_spawns_two_cpu_workers(tmp_path, coco_root):
    out = str(tmp_path / "out")
    cmd = [sys.executable, U.TRAIN_NET, "--num-gpus", "2", "--dist-url", "auto",
           "--config-file", _config(tmp_path, out), "MODEL.DEVICE", "cpu"]
    env = U.subprocess_env(DETECTRON2_DATASETS=coco_root)
    [(rc, output)] = _run([subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True)])
    assert rc == 0, output[-6000:]
    _check_run(out, 2)


def test_shipped_quickstart_config_trains_in_two_processes(tmp_path):
    """The README's quickstart config under ``--num-gpus 2``: DDP reduces every parameter's gradient at
    every step (no unused P7), and the periodic checkpoints of both steps are written. With the weights'
    EMA on, which every process keeps while only the main one has a checkpointer."""
    data = str(tmp_path / "quickstart")
    subprocess.run([sys.executable, "-m", "fsaf_d2.data.quickstart", "--root", data, "--num-train", "32",
                    "--num-val", "4", "--no-progress"], check=True, env=U.subprocess_env(), capture_output=True)
    out = str(tmp_path / "out")
    cmd = [sys.executable, U.TRAIN_NET, "--config-file", os.path.join(U.REPO_ROOT, "configs", "quickstart_R18_FPN.yaml"),
           "--num-gpus", "2", "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3",
           "TEST.EVAL_PERIOD", "0", "MODEL_EMA.ENABLED", "True", "OUTPUT_DIR", out]
    [(rc, output)] = _run([subprocess.Popen(cmd, env=U.subprocess_env(FSAF_D2_DATASETS=data), cwd=str(tmp_path),
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)])
    assert rc == 0, output[-6000:]
    assert "Expected to have finished reduction" not in output
    assert {"model_0000002.pth", "model_0000005.pth", "model_final.pth"} <= set(os.listdir(out))
    assert "model_ema" in torch.load(os.path.join(out, "model_0000005.pth"), map_location="cpu", weights_only=False)
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    assert max(m["iteration"] for m in metrics if "total_loss" in m) == 5


def test_train_net_under_torchrun_environment(tmp_path, coco_root):
    out = str(tmp_path / "out")
    cmd = [sys.executable, U.TRAIN_NET, "--config-file", _config(tmp_path, out), "MODEL.DEVICE", "cpu"]
    port = _free_port()
    procs = []
    for rank in range(2):
        env = U.subprocess_env(DETECTRON2_DATASETS=coco_root, RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2,
                               LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = _run(procs)
    for rc, output in results:
        assert rc == 0, output[-6000:]
    _check_run(out, 2)


def test_eval_only_evaluates_the_given_weights_without_training(tmp_path, coco_root):
    """``train_net.py --eval-only MODEL.WEIGHTS ckpt`` (here in 2 processes): COCOEvaluator's table for the
    weights given, the same detections as the training run's own final evaluation, and no training."""
    out = str(tmp_path / "out")
    env = U.subprocess_env(DETECTRON2_DATASETS=coco_root)
    config = _config(tmp_path, out)
    train = [sys.executable, U.TRAIN_NET, "--config-file", config, "MODEL.DEVICE", "cpu"]
    [(rc, output)] = _run([subprocess.Popen(train, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True)])
    assert rc == 0, output[-6000:]
    evaluated = str(tmp_path / "eval")
    cmd = [sys.executable, U.TRAIN_NET, "--eval-only", "--num-gpus", "2", "--dist-url", "auto", "--config-file",
           config, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"),
           "OUTPUT_DIR", evaluated]
    [(rc, output)] = _run([subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True)])
    assert rc == 0, output[-6000:]
    assert "Inference on coco_2017_val: 4 images in " in output and "Evaluation results for bbox" in output
    assert "Starting training" not in output
    assert not [f for f in os.listdir(evaluated) if f.endswith(".pth")]

    def detections(folder):
        dets = json.load(open(os.path.join(folder, "inference", "coco_instances_results.json")))
        return sorted((d["image_id"], d["category_id"], d["score"]) for d in dets)

    trained, again = detections(out), detections(evaluated)  # the trained weights, not the initialisation
    assert trained and len(again) == len(trained)
    assert all(a[:2] == b[:2] and abs(a[2] - b[2]) <= 1e-4 for a, b in zip(trained, again))
