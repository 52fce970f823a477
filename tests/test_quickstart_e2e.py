"""End-to-end: the README's main command (scripts/quickstart.sh), as a new user runs it.

Both tests are long (marked ``slow``) and run in CI:
* ``test_quickstart_pipeline`` runs the script with a shortened schedule: data generation, training
  through train_net.py, COCO evaluation with the AP table, and the demo pictures.
* ``test_quickstart_reaches_stated_ap`` runs the full default schedule (about 8 minutes on 2 CPU cores)
  and checks the box AP against the range of runs stated in docs/quickstart.md.
"""
import json
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# docs/quickstart.md#run-to-run-spread: the AP at the end of this short from-scratch schedule depends on the
# exact trajectory (seed, and float rounding: conv layout, CPU kernels). The lowest of the measured runs
# (3 seeds x 2 layouts) was AP 32.0 / AP50 54.8; the check sits 4 points below it. A broken model
# (wrong targets, levels or losses) stays under AP 10.
LOWEST_MEASURED_AP = 32.0
LOWEST_MEASURED_AP50 = 54.8
TOLERANCE = 4.0


def run_quickstart(tmp_path, *overrides):
    out = tmp_path / "out"
    env = dict(os.environ, FSAF_D2_DATASETS=str(tmp_path / "data"), OUTPUT_DIR=str(out), PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        ["bash", "scripts/quickstart.sh", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr, out


def final_bbox_metrics(output_dir):
    """The last COCO bbox evaluation written to metrics.json."""
    metrics = {}
    with open(os.path.join(output_dir, "metrics.json")) as f:
        for line in f:
            row = json.loads(line)
            if "bbox/AP" in row:
                metrics = row
    return metrics


@pytest.mark.slow
def test_quickstart_pipeline(tmp_path):
    log, out = run_quickstart(tmp_path, "SOLVER.MAX_ITER", "30", "SOLVER.STEPS", "(20,)", "SOLVER.CHECKPOINT_PERIOD", "15")
    assert re.search(r"\|\s*AP\s*\|\s*AP50\s*\|", log), "the AP table is printed"
    assert "images/s" in log
    metrics = final_bbox_metrics(out)
    assert 0 <= metrics["bbox/AP"] <= 100
    assert os.path.isfile(out / "model_final.pth")
    demo = sorted(os.listdir(out / "demo"))
    assert len(demo) == 4 and all(name.endswith(".jpg") for name in demo)
    # the data was generated where FSAF_D2_DATASETS points, once
    assert os.path.isfile(tmp_path / "data" / "annotations" / "instances_val.json")


@pytest.mark.slow
def test_quickstart_reaches_stated_ap(tmp_path):
    _, out = run_quickstart(tmp_path)
    metrics = final_bbox_metrics(out)
    assert metrics["bbox/AP"] >= LOWEST_MEASURED_AP - TOLERANCE, metrics
    assert metrics["bbox/AP50"] >= LOWEST_MEASURED_AP50 - TOLERANCE, metrics
