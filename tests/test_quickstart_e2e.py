"""End-to-end: the README's main command (scripts/quickstart.sh), as a new user runs it.

One long test (marked ``slow``; it runs in CI): the script with its full default schedule (3-4 minutes on
an AVX-512 Xeon, 7-9 on an AVX2-only EPYC), checked the way a new user reads it: data generation, training
through train_net.py, COCO evaluation with the AP table, the closing summary, the demo pictures, and the
box AP against the range of runs stated in docs/quickstart.md. (A shortened run of the same pipeline was a
second test; this one asserts everything it did, and the suite is shorter by one training run.)
"""
import json
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# docs/quickstart.md#results: the lowest of the measured runs (3 seeds on a 2-core Xeon with AVX-512 kernels
# and 3 with the kernels capped at AVX2, the AVX2-only kind's numerics; evaluated at 144 px) was AP 69.7 /
# AP50 91.06; the check sits 4 points below it, for the CPU kinds whose trajectories were not measured with
# this recipe. A broken model stays far below: the same schedule with SGD instead of AdamW reaches AP 37.
LOWEST_MEASURED_AP = 69.7
LOWEST_MEASURED_AP50 = 91.06
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
def test_quickstart_job_end_to_end(tmp_path):
    log, out = run_quickstart(tmp_path)
    assert re.search(r"\|\s*AP\s*\|\s*AP50\s*\|", log), "the AP table is printed"
    assert "images/s" in log
    # the closing summary: FPS and AP, where the pictures are, the CPU, the whole job's time
    assert re.search(r"^bbox AP: \d+\.\d+\s+AP50: \d+\.\d+", log, re.M), log[-2000:]
    assert f"detections drawn in {out}/demo/" in log
    assert re.search(r"\[quickstart\] CPU: .+, \d+ cores, torch CPU capability \w+", log)
    assert re.search(r"whole job \d+ min \d+ s", log)
    assert os.path.isfile(out / "model_final.pth")
    demo = sorted(os.listdir(out / "demo"))
    assert len(demo) == 4 and all(name.endswith(".jpg") for name in demo)
    # the data was generated where FSAF_D2_DATASETS points
    assert os.path.isfile(tmp_path / "data" / "annotations" / "instances_val.json")
    # the detector clearly works: the AP of the measured runs, less the tolerance
    metrics = final_bbox_metrics(out)
    assert metrics["bbox/AP"] >= LOWEST_MEASURED_AP - TOLERANCE, metrics
    assert metrics["bbox/AP50"] >= LOWEST_MEASURED_AP50 - TOLERANCE, metrics
