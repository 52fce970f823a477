"""The LazyConfigs (configs/*.py) against their YAML twins, and training through tools/lazyconfig_train_net.py.

* Every model: the LazyConfig and the YAML build the same model (state-dict keys and shapes, trainable
  parameters, memory layout) and, loaded with the same weights, give the same losses on a fixed batch and the
  same detections.
* The R-50 and quickstart recipes: same optimizer settings, LR at every milestone, batch, schedule length,
  clipping, checkpoint period and input augmentations.
* A few CPU training steps through the lazy entry point, then ``--resume``, evaluation at the end; bfloat16
  AMP in two torchrun-started processes (slow).
"""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from detectron2.config import instantiate
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from fsaf_d2.benchmarking import training_input
from fsaf_d2.engine import Trainer, build_config
from fsaf_d2.engine.lazy import load_lazy_config
from tools_testing import REPO, tool_env, tool_path

def shipped(name):
    """The path of configs/NAME in this checkout."""
    return os.path.join(REPO, "configs", name)


MODELS = [
    "fsaf_R50_FPN_1x",
    "fsaf_R101_FPN_1x",
    "fsaf_X101_64x4d_FPN_1x",
    "fsaf_retinanet_R50_FPN_1x",
    "fsaf_retinanet_R101_FPN_1x",
    "quickstart_R18_FPN",
]


def yaml_and_lazy(name, device="cpu"):
    yaml_cfg = build_config(shipped(name + ".yaml"), ["MODEL.DEVICE", device, "MODEL.WEIGHTS", ""])
    lazy_cfg = load_lazy_config(shipped(name + ".py"), [f"train.device={device}"])
    return yaml_cfg, lazy_cfg


def fixed_batch():
    return [
        training_input(96, 128, [[10, 10, 50, 60], [20, 20, 40, 40], [60, 5, 120, 90], [2, 2, 8, 8]], [0, 0, 2, 1], 0),
        training_input(128, 96, [[30, 40, 90, 120]], [3], 1),
    ]


@pytest.mark.parametrize("name", MODELS)
def test_lazy_and_yaml_build_the_same_model(name):
    yaml_cfg, lazy_cfg = yaml_and_lazy(name)
    assert lazy_cfg.model.memory_format == yaml_cfg.MODEL.FSAF.MEMORY_FORMAT  # device rule applied alike
    yaml_model, lazy_model = build_model(yaml_cfg), instantiate(lazy_cfg.model)
    yaml_sd, lazy_sd = yaml_model.state_dict(), lazy_model.state_dict()
    assert {k: tuple(v.shape) for k, v in lazy_sd.items()} == {k: tuple(v.shape) for k, v in yaml_sd.items()}
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(lazy_model) == trainable(yaml_model)  # frozen stem + res2 alike
    assert lazy_sd[next(k for k in lazy_sd if k.endswith("stem.conv1.weight"))].is_contiguous(
        memory_format=torch.channels_last if yaml_cfg.MODEL.FSAF.MEMORY_FORMAT == "channels_last" else torch.contiguous_format
    )
    generator = torch.Generator().manual_seed(0)
    for key, value in yaml_sd.items():  # weights away from the init: scores above the test threshold
        if ".cls_score." in key or ".bbox_pred." in key or ".ab_" in key:
            value.add_(torch.randn(value.shape, generator=generator) * (2.0 if key.endswith("bias") else 0.01))
    yaml_model.load_state_dict(yaml_sd)
    lazy_model.load_state_dict(yaml_sd)

    with torch.no_grad(), EventStorage():  # RetinaNet's losses log their positive counts there
        yaml_losses, lazy_losses = yaml_model(fixed_batch()), lazy_model(fixed_batch())
        assert sorted(lazy_losses) == sorted(yaml_losses)
        assert len(yaml_losses) == (4 if "retinanet" in name else 2)  # + RetinaNet's in the combined model
        for key, value in yaml_losses.items():
            assert torch.isfinite(value) and value > 0, key
            torch.testing.assert_close(lazy_losses[key], value, rtol=0, atol=0, msg=key)

        yaml_model.eval(), lazy_model.eval()
        yaml_det, lazy_det = yaml_model(fixed_batch())[0]["instances"], lazy_model(fixed_batch())[0]["instances"]
    assert len(yaml_det) > 10
    torch.testing.assert_close(lazy_det.pred_boxes.tensor, yaml_det.pred_boxes.tensor, rtol=0, atol=0)
    torch.testing.assert_close(lazy_det.scores, yaml_det.scores, rtol=0, atol=0)


def augmentation_state(aug):
    """Type and attributes of an augmentation, sequences as lists (OmegaConf turns tuples into lists)."""
    return type(aug).__name__, {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in vars(aug).items()}


@pytest.mark.parametrize("name", ["fsaf_R50_FPN_1x", "quickstart_R18_FPN"])
def test_lazy_and_yaml_have_the_same_recipe(name):
    yaml_cfg, lazy_cfg = yaml_and_lazy(name)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    yaml_opt = Trainer.build_optimizer(yaml_cfg, model)
    lazy_cfg.optimizer.params.model = model
    lazy_opt = instantiate(lazy_cfg.optimizer)
    assert type(lazy_opt).__name__ == yaml_cfg.SOLVER.OPTIMIZER
    assert len(lazy_opt.param_groups) == len(yaml_opt.param_groups)
    for lazy_group, yaml_group in zip(lazy_opt.param_groups, yaml_opt.param_groups):
        for key in ("lr", "weight_decay", "momentum", "betas"):
            assert lazy_group.get(key) == yaml_group.get(key), key

    schedule = instantiate(lazy_cfg.lr_multiplier)
    solver = yaml_cfg.SOLVER
    assert lazy_cfg.train.max_iter == solver.MAX_ITER

    def yaml_lr(it):  # linear warmup from WARMUP_FACTOR, then x GAMMA at each of STEPS
        lr = solver.BASE_LR * solver.GAMMA ** sum(it >= step for step in solver.STEPS)
        if it < solver.WARMUP_ITERS:
            lr *= solver.WARMUP_FACTOR + (1 - solver.WARMUP_FACTOR) * it / solver.WARMUP_ITERS
        return lr

    checks = {0, solver.WARMUP_ITERS // 2, solver.WARMUP_ITERS, solver.MAX_ITER - 1}
    for it in sorted(checks | {s - 1 for s in solver.STEPS} | set(solver.STEPS)):
        assert schedule(it / solver.MAX_ITER) * lazy_cfg.optimizer.lr == pytest.approx(yaml_lr(it), rel=1e-9), it

    assert lazy_cfg.dataloader.train.total_batch_size == yaml_cfg.SOLVER.IMS_PER_BATCH
    assert lazy_cfg.dataloader.train.num_workers == yaml_cfg.DATALOADER.NUM_WORKERS
    assert lazy_cfg.train.checkpointer.period == yaml_cfg.SOLVER.CHECKPOINT_PERIOD
    assert lazy_cfg.train.clip_grad.max_norm == yaml_cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE
    assert lazy_cfg.train.seed == yaml_cfg.SEED

    from fsaf_d2.data import FSAFDatasetMapper

    for is_train, split in ((True, "train"), (False, "test")):
        yaml_mapper = FSAFDatasetMapper(yaml_cfg, is_train)
        lazy_mapper = instantiate(getattr(lazy_cfg.dataloader, split).mapper)
        assert lazy_mapper.image_format == yaml_mapper.image_format == "RGB"
        # ResizeShortestEdge(0) is a no-op: the quickstart's lazy mappers leave it out
        yaml_augs = [a for a in yaml_mapper.augmentations.augs if "short_edge_length=(0" not in repr(a)]
        assert [augmentation_state(a) for a in lazy_mapper.augmentations.augs] == [augmentation_state(a) for a in yaml_augs]


def test_npu_device_rules_give_static_shapes():
    """On npu the lazy entry point settles static shapes as build_config does (no torch_npu needed)."""
    yaml_cfg = build_config(shipped("fsaf_R50_FPN_1x.yaml"), ["MODEL.DEVICE", "npu"])
    lazy_cfg = load_lazy_config(shipped("fsaf_R50_FPN_1x.py"), ["train.device=npu"])
    assert lazy_cfg.model.fixed_sizes == [list(s) for s in yaml_cfg.INPUT.FIXED_SIZES] == [[800, 1344], [1344, 800]]
    assert lazy_cfg.model.max_gt == yaml_cfg.MODEL.FSAF.MAX_GT == 128
    assert lazy_cfg.model.memory_format == "contiguous"

    with pytest.raises(ValueError, match="model.fixed_sizes"):  # the quickstart does not resize: no sizes to derive
        load_lazy_config(shipped("quickstart_R18_FPN.py"), ["train.device=npu"])


def test_lazy_config_errors_name_the_way_forward(tmp_path):
    with pytest.raises(FileNotFoundError, match="ships no config of that name; shipped: .*quickstart_R18_FPN.py"):
        load_lazy_config(str(tmp_path / "missing.py"))
    with pytest.raises(ValueError, match=r"fsaf_R50_FPN_1x.yaml is not a LazyConfig.*train_net.py"):
        load_lazy_config(shipped("fsaf_R50_FPN_1x.yaml"))  # a YAML (yacs) config


def test_lazy_setup_errors_name_the_lazy_keys(tmp_path):
    """AMP and evaluation-backend errors on the LazyConfig path name its keys, not the YAML ones."""
    import argparse

    from fsaf_d2.engine.lazy import lazy_setup

    def setup(*opts):
        base = ["train.device=cpu", f"train.output_dir={tmp_path}"]
        lazy_setup(argparse.Namespace(config_file=shipped("quickstart_R18_FPN.py"), opts=base + list(opts)))

    with pytest.raises(ValueError, match=r"^train\.amp\.enabled with train\.amp\.precision float16 is not supported "
                                         r"on train\.device cpu.*Set train\.amp\.precision bfloat16"):
        setup("train.amp.enabled=True", "train.amp.precision=float16")
    with pytest.raises(ValueError, match=r"^Invalid config value train\.amp\.precision='half'"):
        setup("train.amp.precision=half")
    with pytest.raises(ValueError, match=r"^Invalid config value dataloader\.evaluator\.backend='fast'"):
        setup("dataloader.evaluator.backend=fast")


# ---------------------------------------------------------------------------------------------- entry point
@pytest.fixture(scope="module")
def quickstart_root(tmp_path_factory):
    from fsaf_d2.data.quickstart import main as generate

    root = str(tmp_path_factory.mktemp("quickstart"))
    generate(["--root", root, "--num-train", "8", "--num-val", "3", "--no-progress"])
    return root


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_lazy(quickstart_root, out, *opts, flags=(), launcher=(sys.executable,), config="configs/quickstart_R18_FPN.py"):
    """``tools/lazyconfig_train_net.py`` on the quickstart LazyConfig, with a batch of 2, ``flags`` (``--resume``,
    ``--eval-only``) and ``opts``."""
    cmd = [*launcher, tool_path("lazyconfig_train_net"), "--config-file", config, *flags]
    cmd += [f"train.output_dir={out}", "dataloader.train.total_batch_size=2", "train.log_period=1", *opts]
    env = tool_env(FSAF_D2_DATASETS=quickstart_root, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def iterations(out):
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["iteration"] for r in rows if "total_loss" in r], rows


def test_lazy_entry_point_trains_resumes_and_evaluates_on_cpu(quickstart_root, tmp_path):
    out = str(tmp_path / "out")
    log = run_lazy(quickstart_root, out, "train.max_iter=3", "train.checkpointer.period=2",
                   "train.throughput_warmup_iters=1")
    files = set(os.listdir(out))
    assert {"model_0000001.pth", "model_final.pth", "last_checkpoint", "config.yaml", "throughput.json"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_final.pth"
    assert "Device cpu (train.device cpu)" in log
    assert json.load(open(os.path.join(out, "throughput.json")))["measured_iters"] == 2
    its, rows = iterations(out)
    assert its == [0, 1, 2]
    assert all(r["total_loss"] > 0 and r["grad_norm"] > 0 for r in rows if "total_loss" in r)
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log  # evaluated on fsaf_quickstart_val at the end

    # a longer schedule continues from model_final.pth (iteration 3) instead of starting over
    log = run_lazy(quickstart_root, out, "train.max_iter=5", "train.checkpointer.period=2", flags=["--resume"])
    assert re.search(r"Loading from \S*model_final.pth", log)
    its, _ = iterations(out)
    assert its == [0, 1, 2, 3, 4]

    # --eval-only on the config.yaml the run saved, with its final weights
    log = run_lazy(quickstart_root, out + "_eval", f"train.init_checkpoint={out}/model_final.pth",
                   flags=["--eval-only"], config=os.path.join(out, "config.yaml"))
    assert re.search(r"Loading from \S*model_final.pth", log) and "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    assert "Starting training" not in log


@pytest.mark.slow
@pytest.mark.slow
def test_lazy_entry_point_saves_and_exits_75_when_preempted(quickstart_root, tmp_path):
    """SIGTERM to the whole job (Slurm, Kubernetes), loader workers included: the step finishes, the current
    iteration is saved and the job exits with 75; --resume continues from the next iteration."""
    import signal
    import time

    from fsaf_d2.engine.faults import EXIT_PREEMPTED

    out = str(tmp_path / "out")
    cmd = [sys.executable, tool_path("lazyconfig_train_net"), "--config-file", "configs/quickstart_R18_FPN.py",
           f"train.output_dir={out}", "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=2",
           "train.log_period=1", "train.max_iter=100000", "train.checkpointer.period=100000"]
    proc = subprocess.Popen(cmd, env=tool_env(FSAF_D2_DATASETS=quickstart_root, OMP_NUM_THREADS="1"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (os.path.exists(os.path.join(out, "metrics.json"))
                                                    and len(iterations(out)[0]) >= 2):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_PREEMPTED, log[-4000:]
    stopped = int(re.search(r"Preempted \(SIGTERM\): stopped after iteration (\d+)", log).group(1))
    saved = open(os.path.join(out, "last_checkpoint")).read()
    assert saved == f"model_{stopped:07d}.pth" and os.path.isfile(os.path.join(out, saved))
    log = run_lazy(quickstart_root, out, f"train.max_iter={stopped + 3}", flags=["--resume"])
    assert re.search(rf"Loading from \S*model_{stopped:07d}.pth", log)
    its, _ = iterations(out)
    assert its == list(range(stopped + 1)) + [stopped + 1, stopped + 2]  # continued, not restarted; max_iter exclusive


def test_lazy_entry_point_bf16_amp_under_torchrun(quickstart_root, tmp_path):
    out = str(tmp_path / "out")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    log = run_lazy(quickstart_root, out, "train.max_iter=2", "train.amp.enabled=True",
                   "train.amp.precision=bfloat16", "train.peer_timeout_s=45", launcher=torchrun)
    assert "world size 2" in log
    assert "Peer watchdog: a rank silent for 45 s ends the job (train.peer_timeout_s)" in log
    its, rows = iterations(out)
    assert its == [0, 1] and all(r["total_loss"] > 0 for r in rows if "total_loss" in r)
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
