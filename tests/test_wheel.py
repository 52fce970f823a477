"""The built wheel, installed (not editable) into a fresh virtual environment, works outside the source tree.

The wheel is built from a copy of the checkout (``pip wheel --no-deps --no-build-isolation``) and installed with
``pip install --no-deps`` into a new venv. That venv then sees this environment's packages (torch, Detectron2,
...) through a path line in a ``.pth`` file: a plain path, so that the ``.pth`` files of this environment, among
them the editable fsaf_d2's finder, are not run. Every command runs from an empty directory with no
PYTHONPATH: nothing of the source tree can be imported. Checked: ``import fsaf_d2`` and its tools resolve into
the venv, the configs ship with the package, every console script answers ``--help``, and the installed
programs train (YAML and LazyConfig), benchmark, convert, draw and export for real on a small quickstart set.
"""
import configparser
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from test_convert_mmdet import mmdet_state_dict
from tools_testing import REPO

pytestmark = pytest.mark.slow

#: what the wheel is not built from (a fresh clone has none of these: .gitignore's entries and .git)
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "datasets", "build", "dist", "output*", ".pytest_cache", "__pycache__", "*.egg-info", "gpu_out",
    ".whl", "runs",
)


def run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(venv folder, its site-packages, the environment and working directory to run it with)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCES, symlinks=True)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", src, "-w", tmp / "dist"], tmp)
    (wheel,) = glob.glob(str(tmp / "dist" / "fsaf_d2-*.whl"))
    venv = tmp / "venv"
    # no PYTHONPATH: the source tree (and its egg-info) must stay out of sight of the venv's pip and programs
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               FSAF_D2_DATASETS=str(tmp / "quickstart"))
    run([sys.executable, "-m", "venv", venv], tmp, env)
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], tmp, env)
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).strip()
    # the dependencies, as a path line only (added after the venv's own site-packages)
    with open(os.path.join(site, "fsaf_d2_test_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    cwd = tmp / "work"
    cwd.mkdir()
    run([python, "-m", "fsaf_d2.data.quickstart", "--num-train", "6", "--num-val", "2", "--no-progress"], cwd, env)
    return venv, site, env, cwd


def console_scripts(site):
    (entry_points,) = glob.glob(os.path.join(site, "fsaf_d2-*.dist-info", "entry_points.txt"))
    parser = configparser.ConfigParser()
    parser.read(entry_points)
    return dict(parser["console_scripts"])


def test_installed_package_and_configs_come_from_the_venv(venv):
    root, site, env, cwd = venv
    code = (
        "import json, fsaf_d2, fsaf_d2.tools.benchmark as tool; from fsaf_d2 import model_zoo; "
        "print(json.dumps([fsaf_d2.__file__, tool.__file__, model_zoo.get_config_file('fsaf_R50_FPN_1x.yaml'), "
        "model_zoo.get_config_file('common/fsaf.py'), model_zoo.list_configs()]))"
    )
    package, tool, config, common, names = json.loads(run([root / "bin" / "python", "-c", code], cwd, env).splitlines()[-1])
    for path in (package, tool, config, common):
        assert path.startswith(os.path.join(site, "fsaf_d2") + os.sep), path
    assert {"fsaf_R50_FPN_1x.yaml", "fsaf_R50_FPN_1x.py", "quickstart_R18_FPN.py", "fsaf_X101_64x4d_FPN_1x.py"} <= set(names)


def test_every_console_script_answers_help(venv):
    """Each console script's target, loaded from the installed metadata, parses ``--help`` and exits 0 (in one
    process: the wrappers in bin/ themselves run in the next test)."""
    root, site, env, cwd = venv
    scripts = console_scripts(site)
    assert {"fsaf-benchmark", "fsaf-demo", "fsaf-export", "fsaf-convert-mmdet", "fsaf-train", "fsaf-lazy-train"} <= set(scripts)
    code = (
        "import contextlib, io, json, sys; from importlib.metadata import distribution\n"
        "codes = {}\n"
        "for ep in distribution('fsaf_d2').entry_points:\n"
        "    out = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(out):\n"
        "            ep.load()(['--help'])\n"
        "    except SystemExit as e:\n"
        "        codes[ep.name] = [e.code, out.getvalue().startswith('usage: ')]\n"
        "print(json.dumps(codes))\n"
    )
    codes = json.loads(run([root / "bin" / "python", "-c", code], cwd, env).splitlines()[-1])
    assert codes == {name: [0, True] for name in scripts}


def test_installed_programs_train_benchmark_convert_draw_and_export(venv):
    root, site, env, cwd = venv
    bin_ = root / "bin"
    # train_net.py from the package, on the shipped YAML named as in the README
    run([bin_ / "fsaf-train", "--config-file", "configs/quickstart_R18_FPN.yaml", "SOLVER.MAX_ITER", "2",
         "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", "yaml_run"], cwd, env)
    weights = cwd / "yaml_run" / "model_final.pth"
    assert weights.is_file()
    # the LazyConfig entry point, on the shipped LazyConfig by name
    log = run([bin_ / "fsaf-lazy-train", "--config-file", "quickstart_R18_FPN.py", "train.max_iter=2",
               "dataloader.train.total_batch_size=2", "train.output_dir=lazy_run"], cwd, env)
    assert (cwd / "lazy_run" / "model_final.pth").is_file() and "copypaste: AP,AP50" in log
    # a benchmark on its default config, which it finds in the package
    run([bin_ / "fsaf-benchmark", "--device", "cpu", "--batch", "1", "--size", "96x128", "--depth", "18", "--iters",
         "1", "--warmup", "0", "--infer-iters", "1", "--models", "fsaf", "--threads", "1", "--out", "bench.json"],
        cwd, env)
    (result,) = json.loads((cwd / "bench.json").read_text())["results"]
    assert result["train_loss_finite"] and result["train_ms_per_iter"] > 0
    # mmdetection checkpoint conversion
    torch.save({"state_dict": mmdet_state_dict(18)}, cwd / "mmdet_r18.pth")
    assert "saved" in run([bin_ / "fsaf-convert-mmdet", "mmdet_r18.pth", "converted.pth"], cwd, env)
    assert (cwd / "converted.pth").is_file()
    # the trained model drawn and exported
    (image,) = glob.glob(os.path.join(env["FSAF_D2_DATASETS"], "val", "*"))[:1]
    run([bin_ / "fsaf-demo", "--config-file", "configs/quickstart_R18_FPN.yaml", "--input", image, "--output",
         "demo", "--confidence-threshold", "0.0", "MODEL.WEIGHTS", weights], cwd, env)
    assert os.listdir(cwd / "demo")
    run([bin_ / "fsaf-export", "--config-file", "configs/quickstart_R18_FPN.yaml", "--format", "torchscript",
         "--export-method", "tracing", "--output", "export", "--input-size", "128", "128", "MODEL.WEIGHTS", weights],
        cwd, env)
    assert (cwd / "export" / "model.ts").is_file()
