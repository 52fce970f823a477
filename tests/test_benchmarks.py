"""The benchmark commands of docs/benchmarks.md run end to end on CPU (tiny settings; no timing asserted)."""
import json
import os
import subprocess
import sys

import pytest

from fsaf_d2.benchmarking import combine_rounds
from fsaf_d2.data.quickstart import generate_split
from tools_testing import REPO, load_tool, tool_env

benchmark = load_tool("benchmark")


def test_combine_rounds_takes_medians_and_reports_failures():
    rounds = [
        [{"model": "a", "train_ms_per_iter": t, "train_images_per_sec": 2000 / t, "infer_ms_per_iter": 10.0 * k,
          "infer_images_per_sec": 100.0 / k, "train_peak_mem_gib": None, "infer_peak_mem_gib": None,
          "max_rss_gib": float(k), "train_loss_finite": True},
         {"model": "b", "error": "boom"} if k == 2 else
         {"model": "b", "train_ms_per_iter": 50.0, "train_images_per_sec": 40.0, "infer_ms_per_iter": 5.0,
          "infer_images_per_sec": 200.0, "train_peak_mem_gib": None, "infer_peak_mem_gib": None,
          "max_rss_gib": 1.0, "train_loss_finite": True}]
        for k, t in ((1, 100.0), (2, 300.0), (3, 200.0))
    ]
    a, b = combine_rounds(rounds)
    assert a["train_ms_per_iter"] == 200.0 and a["infer_ms_per_iter"] == 20.0
    assert a["max_rss_gib"] == 3.0 and a["rounds"] == 3
    assert b == {"model": "b", "error": "boom"}


@pytest.mark.timeout(600)
def test_model_benchmark_runs_every_model_in_alternating_rounds(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["tools/benchmark.py"])
    rc = benchmark.main(
        ["--device", "cpu", "--batch", "1", "--size", "96x128", "--depth", "18", "--iters", "2", "--warmup", "1",
         "--infer-iters", "1", "--models", "fsaf", "retinanet", "--rounds", "2", "--profile", "--threads", "1",
         "--out", str(out)]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert [[r["model"] for r in rnd] for rnd in data["rounds"]] == [["fsaf", "retinanet"]] * 2
    fsaf, retina = data["results"]
    for r in (fsaf, retina):
        assert r["train_loss_finite"] and r["train_ms_per_iter"] > 0 and r["infer_images_per_sec"] > 0
        assert len(r["train_ms_all"]) == 2
    # profile: every phase of the FSAF step, the ResNet and the FPN split out of the backbone range
    phases = fsaf["profile_ms_per_iter"]
    for key in ("fsaf.backbone", "bench.resnet", "bench.fpn", "fsaf.head", "fsaf.assignment", "fsaf.dense_losses",
                "fsaf.selection", "bench.backward", "bench.optimizer"):
        assert phases[key] >= 0, key
    assert phases["bench.resnet"] < phases["fsaf.backbone"]
    # and the operators with the most self time (a compiled step's only profile: its ranges are compiled away)
    top = fsaf["profile_top_ops_ms_per_iter"]
    assert 0 < len(top) <= 10 and not set(top) & set(phases) and min(top.values()) >= 0
    assert list(top.values()) == sorted(top.values(), reverse=True)
    assert "step time ratio per round" in data["table"] and "top self times of fsaf" in data["table"]


@pytest.mark.timeout(600)
def test_paired_benchmark_compares_a_config_change_in_one_process(tmp_path, monkeypatch):
    out = tmp_path / "paired.json"
    monkeypatch.setattr(sys, "argv", ["tools/benchmark.py"])
    variant = "fsaf+MODEL.FSAF.MEMORY_FORMAT=contiguous"
    rc = benchmark.main(
        ["--device", "cpu", "--batch", "1", "--size", "96x128", "--depth", "18", "--iters", "2", "--warmup", "1",
         "--infer-iters", "1", "--models", variant, "fsaf", "--paired", "--threads", "1", "--out", str(out)]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["model"] for r in data["results"]] == [variant, "fsaf"]
    assert all(r["train_loss_finite"] and len(r["train_ms_all"]) == 2 for r in data["results"])
    assert f"fsaf / {variant}: training step time x" in data["table"]


def test_model_spec_errors_name_the_problem():
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--models", "yolo"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--models", "fsaf+MODEL.FSAF.FOLD_FROZEN_BN"])
    assert benchmark._split_spec("fsaf+A.B=1+C=x") == ("fsaf", ["A.B", "1", "C", "x"])


def test_data_benchmark_times_the_training_loader(tmp_path):
    """``python -m fsaf_d2.benchmark_data`` (the tools/ script is the same program): the training loader's
    images/s with the batches delivered as uint8 and normalised on the device, and the decoders alone."""
    out = tmp_path / "data.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fsaf_d2.benchmark_data", "--images", "4", "--size", "120x160", "--batch", "2",
         "--workers", "0", "--backends", "pil", "cv2", "--batches", "2", "--warmup", "1",
         "--decoders", "pil", "torchvision", "torchvision-cuda", "--out", str(out)],
        env=tool_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [(r["backend"], r["workers"], r["pin_memory"]) for r in data["results"]] == [("pil", 0, False), ("cv2", 0, False)]
    for r in data["results"]:
        assert r["images_per_sec"] > 0 and r["loader_image_dtypes"] == ["torch.uint8"]
        # the R50 config's resize (reference): shortest edge 800, longest at most 1333: 120x160 -> 800x1067
        assert r["mean_output_hw"] == [800.0, 1067.0]
    decoders = data["decoders_ms_per_image"]
    assert decoders["pil"] > 0 and decoders["torchvision"] > 0 and decoders["torchvision-cuda"] is None
    assert "| cv2 | 0 | False |" in proc.stdout and "decoder torchvision-cuda: not available" in proc.stdout
    assert data["machine"]["cpu_capability"] in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "fsaf_d2.benchmark_data", "--pin-memory", "1"], env=tool_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--pin-memory 1 needs an accelerator --device" in bad.stderr


@pytest.mark.timeout(600)
def test_inference_benchmark_loads_post_processing_like_a_trained_model(tmp_path):
    """The calibrated classifiers put about --candidates pairs above 0.05 per image for both models, so NMS
    has real work; counts, detections and the machine are reported next to the times. fp16 autocast, as in
    the GPU command of docs/benchmarks.md (scripts/gpu_benchmark.sh)."""
    benchmark_inference = load_tool("benchmark_inference")
    out = tmp_path / "inference.json"
    rc = benchmark_inference.main(
        ["--batches", "1", "2", "--size", "96x128", "--depth", "18", "--iters", "1", "--warmup", "0",
         "--candidates", "400", "--threads", "1", "--amp", "fp16", "--out", str(out)]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert [(r["model"], r["batch"]) for r in data["results"]] == [
        ("fsaf", 1), ("retinanet", 1), ("fsaf", 2), ("retinanet", 2)
    ]
    for r in data["results"]:
        assert 390 <= r["pairs_above_thresh_per_image"] <= 410, r
        assert 0 < r["nms_candidates_per_image"] <= r["pairs_above_thresh_per_image"]
        assert r["detections_per_image"] == 100 and r["images_per_sec"] > 0 and r["postprocess_ms_per_call"] > 0
    assert data["machine"]["cpu_capability"] and data["machine"]["cpu"]


@pytest.mark.timeout(600)
def test_inference_benchmark_counts_retinanet_candidates_in_channels_last(tmp_path):
    """Detectron2's RetinaNet takes the sigmoid of its logits in place, which in channels-last reaches the
    stored head outputs (its transpose is then a view): the counts and the post-processing timing must still
    see the calibrated logits, not scores squashed twice (every pair above 0.05)."""
    benchmark_inference = load_tool("benchmark_inference")
    out = tmp_path / "inference_cl.json"
    rc = benchmark_inference.main(
        ["--batches", "1", "--size", "96x128", "--depth", "18", "--iters", "2", "--warmup", "1",
         "--candidates", "400", "--threads", "1", "--memory-format", "channels_last", "--out", str(out)]
    )
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    assert [r["model"] for r in results] == ["fsaf", "retinanet"]
    for r in results:
        assert 390 <= r["pairs_above_thresh_per_image"] <= 410, r
        assert r["nms_candidates_per_image"] <= r["pairs_above_thresh_per_image"] and r["detections_per_image"] == 100


def test_inference_benchmark_compares_nms_per_image_with_one_call_per_batch(capsys):
    benchmark_inference = load_tool("benchmark_inference")
    assert benchmark_inference.main(["--compare-nms", "300", "--batches", "3", "--iters", "1"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["same_detections"] and r["images"] == 3 and r["per_image_ms"] > 0 and r["one_call_ms"] > 0


def test_eval_benchmark_times_both_backends_and_checks_they_agree(tmp_path, capsys):
    pytest.importorskip("faster_coco_eval")
    benchmark_eval = load_tool("benchmark_eval")
    generate_split(str(tmp_path / "qs"), "val", 6, seed=0)
    out = tmp_path / "eval.json"
    rc = benchmark_eval.main(
        ["--images", "30", "--dets", "20", "--quickstart-root", str(tmp_path / "qs"), "--quickstart-results",
         str(tmp_path / "none.json"), "--repeats", "2", "--out", str(out)]
    )
    assert rc == 0
    assert "| coco_synthetic | 30 | 600 |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [r["set"] for r in data["results"]] == ["coco_synthetic", "quickstart_val"]
    for r in data["results"]:
        assert r["agree"] and r["max_stat_difference"] <= 1e-4
        for backend in ("pycocotools", "faster_coco_eval"):
            assert len(r["backends"][backend]["runs"]) == 2 and len(r["backends"][backend]["stats"]) == 12
    assert data["results"][1]["source"].startswith("drawn from the ground truth")
    assert data["machine"]["cpu"] and data["versions"]["faster_coco_eval"].startswith("faster-coco-eval ")


@pytest.mark.parametrize("benchmark_rc", [0, 1])
def test_gpu_script_reports_a_failed_section_in_its_exit_code(tmp_path, benchmark_rc):
    """scripts/gpu_benchmark.sh goes on after a failing section (a short lease measures what it can) but
    must not end with 0 then: its exit code is how a run's success is judged."""
    fake = tmp_path / "python"  # the real interpreter, except that tools/benchmark.py exits with benchmark_rc
    fake.write_text(f'#!/bin/sh\ncase "$1" in tools/benchmark.py) exit {benchmark_rc} ;; esac\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    env = tool_env(PY=str(fake), OUT=str(tmp_path / "out"), LAYOUTS="config", SKIP_PAIRED="1", SKIP_COMPILE="1",
                   SKIP_INFER="1", SKIP_DATA="1", SKIP_TRAIN="1")
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_benchmark.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    if benchmark_rc:
        assert proc.returncode == 1 and "FAILED sections: benchmark (config)" in proc.stderr, proc.stderr[-2000:]
    else:
        assert proc.returncode == 0 and "all sections passed" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("spec", ["fsfa", "fcos", "fsaf+MODEL.FSAF.MEMORY_FORMAT"])
def test_inference_benchmark_refuses_models_it_would_mislabel(spec, capsys):
    """Any name but retinanet used to build FSAF: a typo measured FSAF under another label."""
    benchmark_inference = load_tool("benchmark_inference")
    with pytest.raises(SystemExit):
        benchmark_inference.parse_args(["--models", spec, "retinanet"])
    assert "--models" in capsys.readouterr().err
