#!/usr/bin/env python
"""Time COCO box evaluation (evaluate + accumulate + summarize) by each backend and check the numbers agree.

    python tools/benchmark_eval.py --out docs/results/cpu_coco_eval_backends.json
    python tools/benchmark_eval.py --images 500 --dets 100 --repeats 1

(installed: ``fsaf-benchmark-eval ...``.) Two result sets, each evaluated by pycocotools' ``COCOeval`` and
faster-coco-eval's ``COCOeval_faster`` as ``TEST.COCO_EVAL_BACKEND`` runs them (fsaf_d2.engine.evaluation):

* "coco_synthetic": COCO-sized synthetic data, ``--images`` images x ``--dets`` detections per image,
  ``--categories`` classes, boxes of all three size ranges and a few crowd boxes
  (fsaf_d2.engine.coco_synthetic);
* "quickstart_val": the quickstart val annotations (``--quickstart-root``) with the detections of
  ``--quickstart-results`` (a ``coco_instances_results.json``) when that file exists, else detections drawn
  from the ground-truth boxes (jittered, with false positives). Skipped when the annotations are missing.

Times are the median over ``--repeats`` runs, alternating the backends; ``loadRes`` is done once per run and
not timed. The 12 COCO stats of the backends must agree within ``--tol`` (exit code 1 otherwise).
"""
import argparse
import json
import os
import statistics
import sys
from typing import Dict, List

import numpy as np

from fsaf_d2.benchmarking import machine_description
from fsaf_d2.data.quickstart import default_quickstart_root, quickstart_paths
from fsaf_d2.engine.coco_synthetic import coco_from_dataset, run_cocoeval, synthetic_coco_gt, synthetic_detections
from fsaf_d2.engine.evaluation import backend_description, resolve_coco_eval_backend

BACKENDS = ("pycocotools", "faster_coco_eval")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=5000, help="images of the synthetic set")
    p.add_argument("--dets", type=int, default=100, help="detections per image of the synthetic set")
    p.add_argument("--categories", type=int, default=10, help="classes of the synthetic set")
    p.add_argument("--quickstart-root", default=default_quickstart_root())
    p.add_argument(
        "--quickstart-results", default=os.path.join("output", "quickstart", "inference", "coco_instances_results.json"),
        help="real detections on quickstart val; drawn from its boxes when the file does not exist",
    )
    p.add_argument("--quickstart-dets", type=int, default=20, help="detections per image drawn for quickstart val")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tol", type=float, default=1e-4, help="largest allowed difference of a stat (0..1 scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the results as JSON here")
    return p.parse_args(argv)


def result_sets(args) -> List[Dict]:
    """[{"name", "source", "dataset", "results"}] of the result sets to evaluate."""
    dataset = synthetic_coco_gt(args.images, num_categories=args.categories, seed=args.seed)
    sets = [
        {
            "name": "coco_synthetic",
            "source": f"synthetic, {args.categories} classes, seed {args.seed}",
            "dataset": dataset,
            "results": synthetic_detections(dataset, args.dets, seed=args.seed),
        }
    ]
    json_file = quickstart_paths(args.quickstart_root)["val"]["json_file"]
    if os.path.isfile(json_file):
        with open(json_file) as f:
            dataset = json.load(f)
        if os.path.isfile(args.quickstart_results):
            with open(args.quickstart_results) as f:
                results, source = json.load(f), f"model results {args.quickstart_results}"
        else:
            results = synthetic_detections(dataset, args.quickstart_dets, seed=args.seed)
            source = f"drawn from the ground truth, {args.quickstart_dets} per image, seed {args.seed}"
        sets.append({"name": "quickstart_val", "source": source, "dataset": dataset, "results": results})
    else:
        print(f"quickstart val skipped: no {json_file}")
    return sets


def time_backends(dataset: Dict, results: List[Dict], repeats: int) -> Dict[str, Dict]:
    """{backend: {"seconds" (median), "runs", "stats"}}, the backends alternating in every repeat."""
    coco_gt = coco_from_dataset(dataset)
    runs = {b: [] for b in BACKENDS}
    stats = {}
    for i in range(repeats):
        for backend in BACKENDS if i % 2 == 0 else BACKENDS[::-1]:
            stats[backend], seconds = run_cocoeval(backend, coco_gt, results)
            runs[backend].append(seconds)
    return {
        b: {"seconds": statistics.median(runs[b]), "runs": runs[b], "stats": [float(v) for v in stats[b]]}
        for b in BACKENDS
    }


def run(args) -> List[Dict]:
    rows = []
    for s in result_sets(args):
        timed = time_backends(s["dataset"], s["results"], args.repeats)
        diff = np.abs(np.array(timed["faster_coco_eval"]["stats"]) - np.array(timed["pycocotools"]["stats"]))
        rows.append(
            {
                "set": s["name"],
                "source": s["source"],
                "images": len(s["dataset"]["images"]),
                "gt_boxes": len(s["dataset"]["annotations"]),
                "detections": len(s["results"]),
                "backends": timed,
                "max_stat_difference": float(diff.max()),
                "agree": bool(diff.max() <= args.tol),
                "speedup": timed["pycocotools"]["seconds"] / timed["faster_coco_eval"]["seconds"],
            }
        )
    return rows


def table_row(row: Dict) -> str:
    """One markdown table row of a result set (see :func:`format_table`)."""
    seconds = {b: row["backends"][b]["seconds"] for b in BACKENDS}
    cells = [row["set"], row["images"], row["detections"], f"{seconds['pycocotools']:.3f}",
             f"{seconds['faster_coco_eval']:.3f}", f"x{row['speedup']:.1f}",
             f"{100 * row['backends']['pycocotools']['stats'][0]:.2f}", f"{row['max_stat_difference']:.1e}"]
    return "| " + " | ".join(map(str, cells)) + " |"


def format_table(rows: List[Dict]) -> str:
    header = "| set | images | detections | pycocotools s | faster-coco-eval s | speedup | AP | max stat diff |"
    title = "COCO box evaluation (evaluate + accumulate + summarize), median seconds"
    return "\n".join([title, header, "|---" * 8 + "|"] + [table_row(r) for r in rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    resolve_coco_eval_backend("faster_coco_eval")  # fails with the install command when missing
    rows = run(args)
    print(format_table(rows))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        versions = {b: backend_description(b) for b in BACKENDS}
        with open(args.out, "w") as f:
            json.dump(
                {"args": vars(args), "machine": machine_description(), "versions": versions,
                 "stat_names": list(STAT_NAMES), "results": rows},
                f, indent=2,
            )
        print(f"wrote {args.out}")
    disagree = [r["set"] for r in rows if not r["agree"]]
    if disagree:
        print(f"the backends disagree by more than {args.tol} on: {', '.join(disagree)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
