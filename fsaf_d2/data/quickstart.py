"""Command line of the bundled quickstart dataset, and its generator's names (:mod:`fsaf_d2.data.shapes`)::

    python -m fsaf_d2.data.quickstart --root datasets/fsaf_quickstart [--num-train 1500 --num-val 200 --seed 0]

``--if-missing`` does nothing when the dataset under the root is complete and written by this generator
version. The generator lives in :mod:`fsaf_d2.data.shapes`, which :mod:`fsaf_d2.data` imports to register
the datasets; this module is imported by nothing in the package, so ``python -m`` runs it only once.
"""
import argparse
import os
import time
from typing import Dict, List, Optional

from . import shapes
from .shapes import *  # noqa: F401,F403  (the generator's public names, which importers of this module use)
from .shapes import (
    DEFAULT_NUM_TRAIN,
    DEFAULT_NUM_VAL,
    DEFAULT_SEED,
    GENERATOR_VERSION,
    _json_version,
    dataset_statistics,
    default_quickstart_root,
    format_statistics,
    generate_quickstart,
    quickstart_exists,
    quickstart_paths,
)

__all__ = shapes.__all__ + ["main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_argument_parser() -> argparse.ArgumentParser:
    """Argument parser of ``python -m fsaf_d2.data.quickstart``."""
    parser = argparse.ArgumentParser(
        prog="python -m fsaf_d2.data.quickstart",
        description="Generate fsaf_d2's quickstart dataset (synthetic shapes, COCO format).",
    )
    parser.add_argument(
        "--root",
        default=None,
        help="output directory (default: $FSAF_D2_DATASETS, else $DETECTRON2_DATASETS/fsaf_quickstart, "
        "else ./datasets/fsaf_quickstart: where fsaf_quickstart_train/val are registered)",
    )
    parser.add_argument("--num-train", type=_positive_int, default=DEFAULT_NUM_TRAIN)
    parser.add_argument("--num-val", type=_positive_int, default=DEFAULT_NUM_VAL)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--if-missing", action="store_true", help="do nothing when the dataset under --root is already complete"
    )
    return parser


def main(argv: Optional[List[str]] = None) -> Dict[str, dict]:
    """Command-line entry point; returns the statistics of both splits."""
    args = build_argument_parser().parse_args(argv)
    root = args.root
    if root is None:
        root = default_quickstart_root()
    if args.if_missing:
        if quickstart_exists(root):
            print(f"The fsaf_d2 quickstart dataset is already complete in {os.path.abspath(root)}")
            return {}
        found = _json_version(quickstart_paths(root)["val"]["json_file"])
        if found is not None:
            print(f"Regenerating the fsaf_d2 quickstart dataset in {os.path.abspath(root)}: it was written by "
                  f"generator version {found}, this is version {GENERATOR_VERSION}")
    start = time.perf_counter()
    cocos = generate_quickstart(root, args.num_train, args.num_val, args.seed, show_progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    stats = {split: dataset_statistics(coco) for split, coco in cocos.items()}
    print(f"Wrote the fsaf_d2 quickstart dataset to {os.path.abspath(root)} in {elapsed:.1f} s (seed {args.seed})")
    for split, s in stats.items():
        print(format_statistics(split, s))
    return stats


if __name__ == "__main__":
    main()
