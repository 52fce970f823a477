"""Summary of a finished run: throughput and box AP, as printed at the end of the scripts/train_*.sh runs.

Command line::

    python -m fsaf_d2.engine.summary OUTPUT_DIR [--prefer-log]
"""
import argparse
import json
import os
from typing import List, Optional

__all__ = ["summarize_run", "format_summary", "main"]


def _last_copypaste_ap(log_path: str) -> Optional[dict]:
    """The last ``copypaste:`` AP table of a Detectron2 log (written by every evaluation)."""
    header = values = None
    try:
        with open(log_path) as f:
            lines = [line.split("copypaste: ", 1)[1].strip() for line in f if "copypaste: " in line]
    except OSError:
        return None
    for i, line in enumerate(lines[:-1]):
        if line.startswith("AP,"):
            header, values = line.split(","), lines[i + 1].split(",")
    if header is None:
        return None
    try:
        return {k: float(v) for k, v in zip(header, values)}
    except ValueError:
        return None


def summarize_run(output_dir: str, prefer_log: bool = False) -> dict:
    """Throughput and box AP of a finished run in ``output_dir``.

    Reads ``throughput.json`` (written by :class:`ThroughputHook`), the last ``bbox/*`` entry of
    ``metrics.json``, and falls back to the last ``copypaste`` AP table of ``log.txt`` (``--eval-only``
    runs write no metrics.json entry).

    Args:
        output_dir: the run's ``OUTPUT_DIR``.
        prefer_log: take the AP from the log's last evaluation even if metrics.json has one (for
            ``--eval-only`` runs in a training directory).

    Returns:
        dict with optional keys ``throughput`` (the throughput.json content) and ``bbox`` (AP metrics).
    """
    out = {}
    tp = os.path.join(output_dir, "throughput.json")
    if os.path.exists(tp):
        with open(tp) as f:
            out["throughput"] = json.load(f)
    if prefer_log:
        ap = _last_copypaste_ap(os.path.join(output_dir, "log.txt"))
        if ap:
            out["bbox"] = ap
    metrics = os.path.join(output_dir, "metrics.json")
    if "bbox" not in out and os.path.exists(metrics):
        with open(metrics) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                bbox = {k.split("/", 1)[1]: v for k, v in entry.items() if k.startswith("bbox/")}
                if bbox:
                    out["bbox"] = bbox
    if "bbox" not in out:
        ap = _last_copypaste_ap(os.path.join(output_dir, "log.txt"))
        if ap:
            out["bbox"] = ap
    return out


def format_summary(summary: dict) -> str:
    """Human-readable lines for :func:`summarize_run` (the end of the train_*.sh scripts)."""
    lines = []
    tp = summary.get("throughput")
    if tp:
        n = tp["num_devices"]
        lines.append(
            f"FPS: {tp['images_per_sec_per_device']:.2f} images/s per {tp['device_type']} device (1 card) / "
            f"{tp['images_per_sec']:.2f} images/s on {n} card{'s' if n > 1 else ''} "
            f"(total batch {tp['total_batch_size']}, {tp['seconds_per_iter']:.4f} s/iter, "
            f"{tp['measured_iters']} iterations after {tp['warmup_iters']} warm-up)"
        )
    else:
        lines.append("FPS: not available (no throughput.json: training did not run past the warm-up)")
    bbox = summary.get("bbox")
    if bbox:
        keys = [k for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if k in bbox]
        lines.append("bbox " + "  ".join(f"{k}: {float(bbox[k]):.2f}" for k in keys))
    else:
        lines.append("AP: not available (no evaluation results)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m fsaf_d2.engine.summary OUTPUT_DIR [--prefer-log]``: print the run's summary."""
    parser = argparse.ArgumentParser(
        prog="python -m fsaf_d2.engine.summary", description="FPS and box AP of a finished fsaf_d2 run."
    )
    parser.add_argument("output_dir", help="the run's OUTPUT_DIR")
    parser.add_argument(
        "--prefer-log", action="store_true", help="AP from the log's last evaluation (--eval-only runs)"
    )
    args = parser.parse_args(argv)
    print(format_summary(summarize_run(args.output_dir, prefer_log=args.prefer_log)))


if __name__ == "__main__":
    main()
