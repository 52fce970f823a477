#!/usr/bin/env python
"""Draw a detector's detections on images with Detectron2's ``Visualizer``.

Usage::

    python tools/demo.py --config-file configs/fsaf_R50_FPN_1x.yaml \\
        --input img1.jpg photos/ "more/*.png" --output out/ [--confidence-threshold 0.3] \\
        MODEL.WEIGHTS model.pth [KEY VALUE ...]

(installed: ``fsaf-demo ...``). ``--input`` takes files, directories (their images, sorted) and glob patterns;
each result is written to ``OUTPUT/<image name>.jpg``. The config is built as ``train_net.py`` builds it
(:func:`fsaf_d2.engine.build_config`). The model runs on ``cfg.MODEL.DEVICE`` and sees the same preprocessing
as in evaluation (``INPUT.FORMAT``, ``INPUT.MIN/MAX_SIZE_TEST``, ``INPUT.RESIZE_BACKEND``;
:class:`fsaf_d2.predictor.Predictor`). Class names come from the metadata of ``cfg.DATASETS.TEST[0]`` when it
is registered. Any Detectron2 meta-architecture works (``import fsaf_d2`` registers "FSAF"). Needs OpenCV
(``pip install opencv-python-headless``) for drawing (:func:`fsaf_d2.visualization.draw_detections`).
"""
import argparse
import glob
import os
import re
import sys
from typing import List, Optional, Sequence

from fsaf_d2.engine import build_config
from fsaf_d2.predictor import Predictor
from fsaf_d2.visualization import draw_detections

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def collect_images(inputs: Sequence[str]) -> List[str]:
    """Expand files, directories and glob patterns into a list of image paths (order kept, no duplicates)."""
    paths: List[str] = []
    seen = set()
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(glob.glob(os.path.expanduser(item)))
        if not found:
            raise FileNotFoundError(f"--input {item!r}: no such file, no image in that directory, or no glob match")
        for p in found:
            if p not in seen:
                seen.add(p)
                paths.append(p)
    return paths


def build_argument_parser() -> argparse.ArgumentParser:
    """Argument parser of ``tools/demo.py``."""
    parser = argparse.ArgumentParser(description="Draw detections of a Detectron2/fsaf_d2 model on images.")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to the config file")
    parser.add_argument("--input", required=True, nargs="+", help="image files, directories or glob patterns")
    parser.add_argument("--output", required=True, help="output directory (created)")
    parser.add_argument("--confidence-threshold", type=float, default=0.3, help="minimum score drawn (0.3)")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth",
    )
    return parser


_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; config overrides written right after ``--input`` images are moved to ``opts``."""
    args = build_argument_parser().parse_args(argv)
    for i, item in enumerate(args.input):  # "--input a.jpg MODEL.WEIGHTS w.pth": nargs="+" took the overrides
        if _CONFIG_KEY.match(item) and not os.path.exists(item):
            args.opts = list(args.input[i:]) + list(args.opts)
            args.input = args.input[:i]
            break
    if not args.input:
        build_argument_parser().error("--input needs at least one image, directory or glob pattern")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Command-line entry point; returns the written file paths."""
    from detectron2.utils.logger import setup_logger

    args = parse_args(argv)
    setup_logger(name="fsaf_d2")
    setup_logger(name="detectron2", abbrev_name="d2")
    cfg = build_config(args.config_file, args.opts)
    images = collect_images(args.input)
    predictor = Predictor(cfg)
    written = draw_detections(cfg, predictor.model, images, args.output, args.confidence_threshold)
    print(f"Wrote {len(written)} image(s) to {args.output}")
    return written


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Console-script entry point (``fsaf-demo``): :func:`main`, exit status 0 (``main`` returns what it wrote,
    which ``sys.exit`` would print and turn into status 1)."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
