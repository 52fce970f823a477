#!/usr/bin/env python
"""Convert an mmdetection FSAF checkpoint to an fsaf_d2 (Detectron2) checkpoint.

    python tools/convert_mmdet.py INPUT OUTPUT [-v]      (installed: fsaf-convert-mmdet INPUT OUTPUT)

``INPUT`` is an mmdetection FSAF checkpoint: a raw state dict, or a dict holding ``state_dict`` (the
published files, e.g. ``fsaf_r50_fpn_1x_coco-94ccc51f.pth``). ``OUTPUT`` is a ``.pth`` file that
``MODEL.WEIGHTS`` / ``DetectionCheckpointer(model).load(OUTPUT)`` loads by exact name into the fsaf_d2 model
built from the matching config. The key mapping and what is supported: :mod:`fsaf_d2.weights.mmdet`. A key
without a mapping is an error: the command exits non-zero, names the keys and writes nothing. The summary
printed at the end lists the config keys the weights imply.
"""
import argparse
import sys

import torch

from fsaf_d2.weights.mmdet import ConversionError, convert_mmdet_checkpoint, load_checkpoint_file


def _print_summary(summary, output=None):
    print(f"mmdet -> fsaf_d2: {summary['num_input_keys']} input keys, {summary['num_output_keys']} converted")
    for group, n in summary["groups"].items():
        print(f"  {group:28s} {n:5d}")
    print(f"  {'dropped (num_batches_tracked)':28s} {len(summary['dropped']):5d}")
    info = summary.get("backbone")
    if info:
        arch = f"{info['block']} blocks {info['blocks_per_stage']}"
        if info.get("depth"):
            arch = f"ResNet-{info['depth']} ({arch})"
        if info.get("num_groups", 1) > 1:
            arch += f", ResNeXt {info['num_groups']}x{info['width_per_group']}d"
        print(f"backbone: {arch}")
    if "p6_input" in summary:
        print(f"P6 input: {summary['p6_input']}")
    if summary.get("meta"):
        print("meta: " + ", ".join(f"{k}={v}" for k, v in summary["meta"].items()))
    if "classes" in summary:
        print(f"classes: {len(summary['classes'])} ({', '.join(map(str, summary['classes'][:3]))}, ...)")
    if summary.get("config"):
        print("config keys implied by the weights:")
        for k, v in summary["config"].items():
            print(f"  {k}: {v}")
    if output:
        print(f"saved {output}")


def main(argv=None):
    """Command-line entry point; returns the exit status (1 if the checkpoint has keys without a mapping)."""
    parser = argparse.ArgumentParser(
        description="Convert an mmdetection FSAF checkpoint to an fsaf_d2 (Detectron2) .pth checkpoint.",
    )
    parser.add_argument("input", metavar="INPUT", help="mmdet checkpoint (.pth): raw state dict or dict with 'state_dict'")
    parser.add_argument("output", metavar="OUTPUT", help="output .pth for DetectionCheckpointer / MODEL.WEIGHTS")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every renamed key")
    args = parser.parse_args(argv)
    if not args.output.endswith(".pth"):
        print(
            f"warning: {args.output} does not end in .pth; Detectron2 treats .pkl files as Caffe2 "
            "checkpoints with heuristic name matching",
            file=sys.stderr,
        )
    try:
        ckpt = load_checkpoint_file(args.input)
        out, summary = convert_mmdet_checkpoint(ckpt, verbose=args.verbose)
    except ConversionError as e:
        print(f"error: cannot convert {args.input}:\n{e}", file=sys.stderr)
        return 1
    torch.save(out, args.output)
    _print_summary(summary, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
