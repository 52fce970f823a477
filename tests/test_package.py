"""The package as a plugin: registration on import, every config loads, bad keys and values fail clearly."""
import glob
import os
import subprocess
import sys

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

import fsaf_d2
from fsaf_d2.engine import build_config
from tools_testing import run_side_by_side, tool_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
TOOLS = ["benchmark", "benchmark_data", "benchmark_eval", "benchmark_inference", "benchmark_layout", "compile_report", "convert_mmdet", "demo", "export",
         "lazyconfig_train_net", "submit_slurm"]


def test_import_registers_everything():
    assert META_ARCH_REGISTRY.get("FSAF") is fsaf_d2.FSAF
    assert BACKBONE_REGISTRY.get("build_fsaf_resnet_fpn_backbone") is not None
    assert BACKBONE_REGISTRY.get("build_fsaf_narrow_resnet_fpn_backbone") is not None
    from detectron2.data import DatasetCatalog

    assert {"fsaf_quickstart_train", "fsaf_quickstart_val"} <= set(DatasetCatalog.list())


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_config_loads_and_validates(path):
    cfg = build_config(path)  # as every fsaf_d2 program loads it: all keys, validated
    assert cfg.MODEL.META_ARCHITECTURE == "FSAF"


def test_configs_found():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {
        "Base-FSAF.yaml",
        "fsaf_R50_FPN_1x.yaml",
        "fsaf_R101_FPN_1x.yaml",
        "fsaf_X101_64x4d_FPN_1x.yaml",
        "fsaf_R50_FPN_1x_paper_ignore.yaml",
        "fsaf_retinanet_R50_FPN_1x.yaml",
        "quickstart_R18_FPN.yaml",
    } <= names


def test_reference_hyper_parameters_in_r50_config():
    cfg = get_cfg()
    fsaf_d2.add_fsaf_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "fsaf_R50_FPN_1x.yaml"))
    s = cfg.SOLVER
    assert (s.BASE_LR, s.MOMENTUM, s.WEIGHT_DECAY, s.IMS_PER_BATCH, s.MAX_ITER) == (0.01, 0.9, 1e-4, 16, 90000)
    assert tuple(s.STEPS) == (60000, 80000) and (s.WARMUP_ITERS, s.WARMUP_FACTOR) == (500, 0.001)
    assert s.CLIP_GRADIENTS.ENABLED and s.CLIP_GRADIENTS.CLIP_TYPE == "full_model" and s.CLIP_GRADIENTS.CLIP_VALUE == 10
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (800,) and cfg.INPUT.MAX_SIZE_TRAIN == 1333
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2 and cfg.MODEL.RESNETS.NORM == "FrozenBN"
    f = cfg.MODEL.FSAF
    assert (f.POS_SCALE, f.NEG_SCALE, f.MIN_POS_IOF, f.REG_BIAS_INIT, f.BBOX_NORMALIZER) == (0.2, 0.2, 0.01, 0.25, 4.0)


def test_unknown_key_fails_with_its_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('_BASE_: "%s"\nMODEL:\n  FSAF:\n    POS_SCALEE: 0.3\n' % os.path.join(REPO, "configs", "Base-FSAF.yaml"))
    cfg = get_cfg()
    fsaf_d2.add_fsaf_config(cfg)
    with pytest.raises(KeyError, match="POS_SCALEE"):
        cfg.merge_from_file(str(bad))
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.FSAF.NO_SUCH_KEY"):  # yacs
        cfg.merge_from_list(["MODEL.FSAF.NO_SUCH_KEY", 1])


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("MODEL.FSAF.LOSS_NORMALIZER", "mean", "MODEL.FSAF.LOSS_NORMALIZER"),
        ("MODEL.FSAF.NEG_SCALE", 0.1, "NEG_SCALE"),
        ("INPUT.FIXED_SIZES", [[800, 1333]], "INPUT.FIXED_SIZES"),
        ("SOLVER.AMP.PRECISION", "int8", "SOLVER.AMP.PRECISION"),
        ("TEST.COCO_EVAL_BACKEND", "cocoapi", "TEST.COCO_EVAL_BACKEND"),
    ],
)
def test_bad_values_fail_early_with_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_config(os.path.join(REPO, "configs", "fsaf_R50_FPN_1x.yaml"), [key, value])


def test_import_without_detectron2_says_how_to_install():
    code = "import sys; sys.modules['detectron2'] = None; import fsaf_d2"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    assert "scripts/setup_env.sh" in proc.stderr and "sal-detectron2" in proc.stderr


def test_tools_are_all_tested_here():
    assert sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "tools", "[!_]*.py"))) == TOOLS


#: a function scripted by "user code" after ``import fsaf_d2``: torch's deprecation warning must still reach it
_USER_SCRIPT = (
    "import fsaf_d2, torch\n"
    "def double(x: torch.Tensor) -> torch.Tensor:\n"
    "    return x * 2\n"
    "torch.jit.script(double)\n"
)


def test_every_tool_answers_help_from_another_directory_without_warnings(tmp_path):
    """``python tools/<name>.py --help`` (and ``train_net.py``, ``python -m fsaf_d2.data.quickstart``) needs no
    particular working directory (configs are found next to tools/) and prints no warning: neither runpy's
    (the quickstart module is not imported by the package) nor the deprecation warnings that fvcore's and
    Detectron2's import-time ``torch.jit.script`` calls raise, which ``import fsaf_d2`` keeps quiet, and only
    those. The programs run concurrently: each spends its few seconds importing torch on one core."""
    commands = {name: tool_command(name, "--help") for name in TOOLS}
    commands["train_net"] = [sys.executable, os.path.join(REPO, "train_net.py"), "--help"]
    commands["quickstart data"] = [sys.executable, "-m", "fsaf_d2.data.quickstart", "--help"]  # no runpy warning
    (tmp_path / "user_code.py").write_text(_USER_SCRIPT)  # a file: torch.jit.script reads the function's source
    commands["user code"] = [sys.executable, str(tmp_path / "user_code.py")]

    procs = dict(zip(commands, run_side_by_side(commands.values(), cwd=tmp_path)))
    user = procs.pop("user code")
    failed = {name: p.stderr[-2000:] for name, p in procs.items()
              if p.returncode != 0 or not p.stdout.startswith("usage: ")}
    assert not failed, failed
    warned = {name: p.stderr[-2000:] for name, p in procs.items() if "Warning" in p.stderr}
    assert not warned, warned
    assert user.returncode == 0, user.stderr[-2000:]
    assert user.stderr.count("`torch.jit.script` is deprecated") == 1, user.stderr[-2000:]
