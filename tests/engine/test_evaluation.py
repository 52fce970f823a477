"""COCO evaluation backends: faster-coco-eval gives pycocotools' numbers; the evaluator and its errors;
the inference throughput line of ``Trainer.test``."""
import contextlib
import logging
import sys

import numpy as np
import pytest
import torch

import engine_testutils as U
from fsaf_d2.data.quickstart import generate_split
from fsaf_d2.engine import build_config, evaluation
from fsaf_d2.engine.coco_synthetic import coco_from_dataset, run_cocoeval, synthetic_coco_gt, synthetic_detections
from fsaf_d2.engine.evaluation import (
    FASTER_COCO_EVAL_HINT,
    BackendCOCOEvaluator,
    faster_coco_eval_available,
    resolve_coco_eval_backend,
)

needs_faster = pytest.mark.skipif(not faster_coco_eval_available(), reason="faster-coco-eval is not installed")

STATS_TOL = 1e-4


@contextlib.contextmanager
def fsaf_log():
    """Messages (str) logged to the "fsaf_d2" logger at INFO or above in the block (it may not propagate)."""
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger("fsaf_d2")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _stats_of_both(dataset, results):
    coco_gt = coco_from_dataset(dataset)
    reference, _ = run_cocoeval("pycocotools", coco_gt, results)
    fast, _ = run_cocoeval("faster_coco_eval", coco_gt, results)
    return reference, fast


@needs_faster
def test_faster_coco_eval_matches_pycocotools_on_quickstart_val(tmp_path):
    # the first images of the quickstart val split (image i depends only on the seed and i)
    dataset = generate_split(str(tmp_path), "val", 40, seed=0)
    results = synthetic_detections(dataset, dets_per_image=20, seed=1)
    reference, fast = _stats_of_both(dataset, results)
    assert reference[0] > 0.05 and reference[1] > reference[0]  # neither empty nor perfect
    np.testing.assert_allclose(fast, reference, rtol=0, atol=STATS_TOL)


@needs_faster
@pytest.mark.slow
def test_faster_coco_eval_matches_pycocotools_at_coco_size():
    """5000 images x 100 detections, 10 classes, crowd boxes, all three size ranges (about 30 s)."""
    dataset = synthetic_coco_gt(5000, num_categories=10, seed=0)
    assert sum(a["iscrowd"] for a in dataset["annotations"]) > 100
    results = synthetic_detections(dataset, dets_per_image=100, seed=0)
    assert len(results) == 500000
    reference, fast = _stats_of_both(dataset, results)
    assert (reference > 0).all(), reference  # AP and AR of small, medium and large are all defined
    np.testing.assert_allclose(fast, reference, rtol=0, atol=STATS_TOL)


def _perfect_and_noisy_predictions(dataset_name):
    """Detectron2-format predictions of the registered dataset: its boxes, some jittered, plus false positives."""
    from detectron2.data import DatasetCatalog
    from detectron2.structures import Boxes, Instances

    rng = np.random.default_rng(0)
    inputs, outputs = [], []
    for record in DatasetCatalog.get(dataset_name):
        boxes = np.array([a["bbox"] for a in record["annotations"]], dtype=np.float32)  # XYWH
        boxes[:, 2:] += boxes[:, :2]
        classes = [a["category_id"] for a in record["annotations"]]
        boxes = np.concatenate([boxes, boxes + rng.normal(0, 3, boxes.shape).astype(np.float32), boxes[::-1] + 9])
        classes = classes + classes + [1 - c for c in classes[::-1]]
        instances = Instances((record["height"], record["width"]))
        instances.pred_boxes = Boxes(torch.from_numpy(boxes))
        instances.scores = torch.from_numpy(rng.uniform(0.1, 1.0, len(boxes)).astype(np.float32))
        instances.pred_classes = torch.tensor(classes)
        inputs.append({"image_id": record["image_id"]})
        outputs.append({"instances": instances})
    return inputs, outputs


@needs_faster
@pytest.mark.parametrize("max_dets", [100, 300])  # 300: Detectron2's custom-maxDets COCOeval
def test_evaluator_gives_the_same_results_with_either_backend(tiny_dataset, tmp_path, max_dets, monkeypatch):
    inputs, outputs = _perfect_and_noisy_predictions(tiny_dataset)
    built, build = [], evaluation.build_cocoeval
    monkeypatch.setattr(evaluation, "build_cocoeval", lambda backend, *a: built.append(backend) or build(backend, *a))
    results = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        evaluator = BackendCOCOEvaluator(
            tiny_dataset, tasks=("bbox",), distributed=False, output_dir=str(tmp_path / backend),
            max_dets_per_image=max_dets, backend=backend,
        )
        evaluator.reset()
        evaluator.process(inputs, outputs)
        with fsaf_log() as messages:
            results[backend] = evaluator.evaluate()["bbox"]
        name = "faster-coco-eval" if backend == "faster_coco_eval" else "pycocotools"
        assert any(m.startswith(f"COCO evaluation by {name} ") for m in messages), messages
        # pycocotools: Detectron2's own COCOeval; custom maxDets: Detectron2 builds a second one, used
        assert set(built) == (set() if backend == "pycocotools" else {"faster_coco_eval"})
    assert results["pycocotools"].keys() == results["faster_coco_eval"].keys()
    assert 0 < results["pycocotools"]["AP"] < 100
    for key, value in results["pycocotools"].items():
        assert results["faster_coco_eval"][key] == pytest.approx(value, abs=100 * STATS_TOL, nan_ok=True), key


@needs_faster
def test_fewer_than_10_detections_per_image_are_evaluated_by_pycocotools(tiny_dataset):
    assert BackendCOCOEvaluator(tiny_dataset, max_dets_per_image=5, backend="faster_coco_eval").backend == "pycocotools"
    assert BackendCOCOEvaluator(tiny_dataset, max_dets_per_image=10, backend="faster_coco_eval").backend != "pycocotools"


def test_missing_faster_coco_eval_fails_early_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import raises ImportError
    assert resolve_coco_eval_backend("auto") == "pycocotools"
    with pytest.raises(ImportError, match=FASTER_COCO_EVAL_HINT):
        resolve_coco_eval_backend("faster_coco_eval")
    cfg = build_config(opts=["TEST.COCO_EVAL_BACKEND", "faster_coco_eval"])
    from fsaf_d2.engine.trainer import check_config

    with pytest.raises(ImportError, match="TEST.COCO_EVAL_BACKEND"):
        check_config(cfg)
    with pytest.raises(ValueError, match="TEST.COCO_EVAL_BACKEND"):
        build_config(opts=["TEST.COCO_EVAL_BACKEND", "fast"])


def test_eval_logs_inference_throughput_and_evaluation_time(tiny_dataset, tmp_path):
    from fsaf_d2.engine import Trainer

    cfg = build_config(opts=U.tiny_opts(str(tmp_path / "out"), tiny_dataset, tiny_dataset, 2))
    model = Trainer.build_model(cfg)
    with fsaf_log() as messages:
        results = Trainer.test(cfg, model)
    assert "AP" in results["bbox"]
    [line] = [m for m in messages if m.startswith("Inference on")]
    assert line.startswith(f"Inference on {tiny_dataset}: 4 images in ")
    assert "images/s (all devices); evaluation (evaluate()) " in line
    assert any(m.startswith("COCO evaluation by ") for m in messages), messages


def test_eval_accepts_evaluator_lists_and_stores_throughput_during_training(tiny_dataset, tmp_path):
    """As Detectron2's inference_on_dataset: a list of evaluators (or an empty one) per test set; inside a
    training run the images/s and evaluate() seconds also reach the event storage (metrics.json)."""
    from detectron2.utils.events import EventStorage

    from fsaf_d2.engine import Trainer

    cfg = build_config(opts=U.tiny_opts(str(tmp_path / "out"), tiny_dataset, tiny_dataset, 2))
    model = Trainer.build_model(cfg)
    evaluator = Trainer.build_evaluator(cfg, tiny_dataset)
    with EventStorage(0) as storage:
        results = Trainer.test(cfg, model, evaluators=[[evaluator]])
    assert "AP" in results["bbox"]
    latest = storage.latest()
    assert latest[f"inference/{tiny_dataset}/images_per_sec"][0] > 0
    assert latest[f"inference/{tiny_dataset}/evaluate_seconds"][0] >= 0
    assert Trainer.test(cfg, model, evaluators=[[]]) == {}
