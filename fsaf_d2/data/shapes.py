"""Generator of the bundled "quickstart" dataset: coloured shapes on textured backgrounds, COCO format.

The dataset lets new users train and evaluate FSAF without COCO and without a GPU. Every image is
128 x 128 px and holds 1-8 filled shapes of five classes (the class is the *shape*; colours are random),
of sizes from 16 px to half the image side (64 px: the strides 8-32 of P3-P5), on a noisy background
with sine-grating texture and clutter lines. Objects may touch and overlap (also objects of the same
class) and be truncated by the image border, but every object keeps at least 70 % of its pixels visible
and no two boxes of an image have an IoU above 0.3 (so that NMS at 0.5 can keep both).

Layout written under ``ROOT`` (the names registered by :mod:`fsaf_d2.data.datasets` point here)::

    ROOT/train/000001.jpg ...            ROOT/val/000001.jpg ...
    ROOT/annotations/instances_train.json    ROOT/annotations/instances_val.json

Boxes are amodal (the full shape, clipped to the image) in COCO ``[x, y, w, h]`` pixels; ``area`` is the
number of visible pixels; ``iscrowd`` is 0. Category ids are 1..5 in the order of :data:`QUICKSTART_CLASSES`.

Determinism: image ``i`` of a split is drawn from its own random stream ``(seed, split, i)``, so the same
seed gives byte-identical files with the same numpy/Pillow versions, and image ``i`` does not depend on
how many images are generated. Each json file is written last and atomically: its presence means the
split is complete.

Command line: :mod:`fsaf_d2.data.quickstart` (``python -m fsaf_d2.data.quickstart --root ROOT``), a module of
its own so that running it does not execute a module that importing :mod:`fsaf_d2.data` has already loaded.
"""
import io
import json
import logging
import math
import os
from typing import Dict, List, Optional

import numpy as np
from PIL import Image, ImageDraw

from ..utils.io import atomic_write_bytes

__all__ = [
    "QUICKSTART_CLASSES",
    "DEFAULT_NUM_TRAIN",
    "DEFAULT_NUM_VAL",
    "DEFAULT_SEED",
    "quickstart_paths",
    "default_quickstart_root",
    "quickstart_exists",
    "generate_command",
    "generate_image",
    "generate_split",
    "generate_quickstart",
    "dataset_statistics",
    "format_statistics",
]

logger = logging.getLogger(__name__)

QUICKSTART_CLASSES = ("square", "circle", "triangle", "cross", "star")
DEFAULT_NUM_TRAIN = 1500
DEFAULT_NUM_VAL = 200
DEFAULT_SEED = 0
# 2: 128 x 128 images, objects of 16-64 px (the strides 8-32 of P3-P5), occlusion and box overlap capped
GENERATOR_VERSION = 2

_SPLIT_CODES = {"train": 0, "val": 1}
_IMAGE_SIDES = (128,)  # width and height are drawn independently from these
_MIN_OBJECT_SIZE = 16.0  # longer side of an object's box, pixels (the largest is half the short image side)
_NUM_OBJECTS = (1, 8)  # objects tried per image: uniform in this range (fewer are placed when no position fits)
_SUPERSAMPLE = 4  # shapes are rasterised at 4x and box-filtered down (anti-aliased edges)
_MIN_VISIBLE_FRACTION = 0.7  # every object keeps >= this fraction of its in-image pixels visible
_MIN_IN_IMAGE_FRACTION = 0.75  # truncation by the border: >= this fraction of the shape inside the image
_MAX_BOX_IOU = 0.3  # boxes of one image overlap at most this much (NMS at 0.5 can keep both)
_OVERLAP_PROB = 0.4  # chance that a new object is placed against an existing one
_SAME_CLASS_PROB = 0.5  # ... and then the chance that it copies that object's class
_PLACEMENT_TRIES = 30
_JPEG_QUALITY = 92


# --------------------------------------------------------------------------------------------- paths
def quickstart_paths(root: str) -> Dict[str, Dict[str, str]]:
    """Return ``{split: {"image_root": ..., "json_file": ...}}`` for the quickstart layout under ``root``."""
    return {
        split: {
            "image_root": os.path.join(root, split),
            "json_file": os.path.join(root, "annotations", f"instances_{split}.json"),
        }
        for split in _SPLIT_CODES
    }


def default_quickstart_root() -> str:
    """The quickstart root selected by the environment; not made absolute. In this order of precedence:

    1. ``$FSAF_D2_DATASETS`` (the quickstart root itself),
    2. ``$DETECTRON2_DATASETS/fsaf_quickstart``,
    3. ``datasets/fsaf_quickstart``, relative to the current directory at load time (as Detectron2's builtins).
    """
    own = os.environ.get("FSAF_D2_DATASETS", "")
    if own:
        return os.path.expanduser(own)
    d2 = os.environ.get("DETECTRON2_DATASETS", "")
    if d2:
        return os.path.join(os.path.expanduser(d2), "fsaf_quickstart")
    return os.path.join("datasets", "fsaf_quickstart")


def generate_command(root: str) -> str:
    """The shell command that generates the quickstart dataset under ``root``."""
    return f"python -m fsaf_d2.data.quickstart --root {root}"


def quickstart_exists(root: str) -> bool:
    """Whether both splits under ``root`` are complete (each json is written last, after its images) and were
    written by this generator version (an older dataset is regenerated: its images differ)."""
    return all(
        os.path.isdir(p["image_root"]) and _json_version(p["json_file"]) == str(GENERATOR_VERSION)
        for p in quickstart_paths(root).values()
    )


def _json_version(json_file: str) -> Optional[str]:
    """The generator version recorded in a split's json, None if the file is missing or unreadable."""
    try:
        with open(json_file, "rb") as f:
            return str(json.load(f)["info"]["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------- shapes
def _unit_shape(class_id: int, rng: np.random.Generator) -> np.ndarray:
    """Polygon (N, 2) of one shape class around the origin, before scaling; may be rotated at random."""
    name = QUICKSTART_CLASSES[class_id]
    if name == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    if name == "circle":
        angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if name == "triangle":
        angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        poly = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        rotation = rng.uniform(0, 2 * np.pi)
    elif name == "cross":
        t = rng.uniform(0.28, 0.38)  # half-thickness of the arms, relative to the half-length
        poly = np.array(
            [[t, 1], [t, t], [1, t], [1, -t], [t, -t], [t, -1],
             [-t, -1], [-t, -t], [-1, -t], [-1, t], [-t, t], [-t, 1]],
            dtype=np.float64,
        )  # fmt: skip
        rotation = rng.uniform(0, np.pi / 2)
    elif name == "star":
        inner = rng.uniform(0.38, 0.5)
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        poly = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        rotation = rng.uniform(0, 2 * np.pi / 5)
    else:  # pragma: no cover - QUICKSTART_CLASSES and this function are edited together
        raise ValueError(f"No drawing rule for quickstart class {name!r}")
    c, s = math.cos(rotation), math.sin(rotation)
    return poly @ np.array([[c, s], [-s, c]])


def _rasterise(poly: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (H, W) in [0, 1] of a simple polygon given in patch pixel coordinates.

    Scanline fill at ``_SUPERSAMPLE``^2 samples per pixel: a sample is inside if its *centre* is inside
    (even-odd rule, half-open spans), so the coverage has no outward bias (unlike PIL's inclusive edges)
    and a box-aligned square of side s covers exactly s^2 pixels.
    """
    ss = _SUPERSAMPLE
    width = int(math.ceil(poly[:, 0].max())) + 1
    height = int(math.ceil(poly[:, 1].max())) + 1
    x0, y0 = poly[:, 0] * ss, poly[:, 1] * ss
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    ys = np.arange(height * ss)[:, None] + 0.5  # sample-row centres
    crosses = (ys >= np.minimum(y0, y1)) & (ys < np.maximum(y0, y1))  # horizontal edges never cross
    t = (ys - y0) / np.where(y1 != y0, y1 - y0, 1.0)
    xs = np.sort(np.where(crosses, x0 + t * (x1 - x0), np.inf), axis=1)
    if xs.shape[1] % 2:
        xs = np.concatenate([xs, np.full((xs.shape[0], 1), np.inf)], axis=1)
    starts, ends = xs[:, 0::2], xs[:, 1::2]  # inside spans [start, end) of each row
    rows, cols = np.nonzero(np.isfinite(ends))
    n = width * ss
    first = np.clip(np.ceil(starts[rows, cols] - 0.5), 0, n).astype(np.int64)  # first sample inside
    stop = np.clip(np.ceil(ends[rows, cols] - 0.5), 0, n).astype(np.int64)  # first sample after
    diff = np.zeros((height * ss, n + 1), dtype=np.int32)
    np.add.at(diff, (rows, first), 1)
    np.add.at(diff, (rows, stop), -1)
    inside = np.cumsum(diff, axis=1)[:, :n] > 0
    return inside.reshape(height, ss, width, ss).mean(axis=(1, 3), dtype=np.float32)


class _Shape:
    """One object to place: its class, polygon in patch coordinates and rasterised coverage."""

    def __init__(self, class_id: int, size: float, rng: np.random.Generator):
        poly = _unit_shape(class_id, rng)
        poly = poly - (poly.min(axis=0) + poly.max(axis=0)) / 2  # centre the bounding box
        poly = poly * (size / (poly.max(axis=0) - poly.min(axis=0)).max())  # longer box side = size
        # sub-pixel position of the shape in its patch, plus 1 px margin
        poly = poly - poly.min(axis=0) + rng.uniform(0, 1, size=2) + 1.0
        self.class_id = class_id
        self.size = size
        self.poly = poly
        self.alpha = _rasterise(poly)
        self.hard = self.alpha >= 0.5
        self.num_pixels = int(self.hard.sum())
        self.box_centre = (poly.min(axis=0) + poly.max(axis=0)) / 2


# --------------------------------------------------------------------------------------------- images
def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Float (H, W, 3) background: colour gradient + sine gratings + clutter lines + pixel noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) / max(height, width)
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    theta = rng.uniform(0, 2 * np.pi)
    ramp = xx * math.cos(theta) + yy * math.sin(theta)
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min() + 1e-9)
    image = c0 + (c1 - c0) * ramp[..., None]
    for _ in range(int(rng.integers(1, 4))):
        amplitude = rng.uniform(4, 24)
        frequency = rng.uniform(2, 14)  # cycles per image
        phi, psi = rng.uniform(0, 2 * np.pi, size=2)
        wave = np.sin(2 * np.pi * frequency * (xx * math.cos(phi) + yy * math.sin(phi)) + psi)
        image += amplitude * wave[..., None] * rng.uniform(-1, 1, size=3)
    for _ in range(int(rng.integers(0, 4))):  # thin clutter lines, not objects
        mask = Image.new("L", (width, height), 0)
        ends = rng.uniform(0, 1, size=4) * [width, height, width, height]
        ImageDraw.Draw(mask).line(ends.tolist(), fill=255, width=int(rng.integers(1, 3)))
        alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
        image = image * (1 - alpha) + rng.uniform(0, 255, size=3) * alpha
    image += rng.normal(0, rng.uniform(3, 12), size=image.shape)
    return image


def _pick_colour(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour that stands out from the mean colour of ``region`` (best of 10 draws)."""
    mean = region.reshape(-1, 3).mean(axis=0)
    best, best_dist = None, -1.0
    for _ in range(10):
        colour = rng.uniform(0, 255, size=3)
        dist = float(np.linalg.norm(colour - mean))
        if dist > best_dist:
            best, best_dist = colour, dist
        if dist >= 90:
            break
    return best


def _propose_centre(anchor, shape: _Shape, width: int, height: int, rng: np.random.Generator):
    """Box centre for a new object: next to ``anchor`` (a placed object, so that they overlap) or anywhere."""
    if anchor is None:
        return rng.uniform(0, [width, height])
    direction = rng.uniform(0, 2 * np.pi)
    distance = rng.uniform(0.2, 0.75) * (anchor["size"] + shape.size) / 2
    return anchor["centre"] + distance * np.array([math.cos(direction), math.sin(direction)])


def generate_image(rng: np.random.Generator):
    """Draw one image.

    Args:
        rng: the random stream of this image (the only source of randomness).

    Returns:
        (image, objects): a uint8 RGB array (H, W, 3), and a list of dicts with keys ``category_id``
        (0-based index into :data:`QUICKSTART_CLASSES`), ``bbox`` (XYXY, float pixels, inside the image)
        and ``area`` (visible pixels), in drawing order (later objects are on top).
    """
    width, height = (int(v) for v in rng.choice(_IMAGE_SIDES, size=2))
    image = _background(height, width, rng)
    owner = np.full((height, width), -1, dtype=np.int32)  # index of the object visible at each pixel
    placed: List[dict] = []
    max_size = min(width, height) / 2
    for _ in range(int(rng.integers(_NUM_OBJECTS[0], _NUM_OBJECTS[1] + 1))):
        anchor = None
        if placed and rng.random() < _OVERLAP_PROB:
            anchor = placed[int(rng.integers(len(placed)))]
        if anchor is not None and rng.random() < _SAME_CLASS_PROB:
            class_id = anchor["category_id"]
        else:
            class_id = int(rng.integers(len(QUICKSTART_CLASSES)))
        size = math.exp(rng.uniform(math.log(_MIN_OBJECT_SIZE), math.log(max_size)))
        shape = _Shape(class_id, size, rng)
        obj = _place(shape, anchor, image, owner, placed, rng)
        if obj is not None:
            placed.append(obj)
    image = image + rng.normal(0, rng.uniform(2, 8), size=image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    objects = [
        {"category_id": o["category_id"], "bbox": o["bbox"], "area": float(o["visible"])} for o in placed
    ]
    return image, objects


def _place(shape: _Shape, anchor, image: np.ndarray, owner: np.ndarray, placed: List[dict], rng):
    """Try to paste ``shape`` into ``image`` (in place); return its record, or None if no position fits."""
    height, width = owner.shape
    ph, pw = shape.hard.shape
    for _ in range(_PLACEMENT_TRIES):
        centre = _propose_centre(anchor, shape, width, height, rng)
        tx, ty = (int(round(v)) for v in centre - shape.box_centre)  # patch origin in the image
        x0, y0, x1, y1 = max(tx, 0), max(ty, 0), min(tx + pw, width), min(ty + ph, height)
        if x1 <= x0 or y1 <= y0:
            continue
        crop = (slice(y0 - ty, y1 - ty), slice(x0 - tx, x1 - tx))
        hard = shape.hard[crop]
        in_image = int(hard.sum())
        if in_image == 0 or in_image < _MIN_IN_IMAGE_FRACTION * shape.num_pixels:
            continue
        bx0, by0 = np.clip(shape.poly.min(axis=0) + (tx, ty), 0, (width, height))
        bx1, by1 = np.clip(shape.poly.max(axis=0) + (tx, ty), 0, (width, height))
        if bx1 - bx0 < 1 or by1 - by0 < 1:
            continue
        boxes = np.array([[bx0, by0, bx1, by1]] + [o["bbox"] for o in placed], dtype=np.float64)
        if len(placed) and _pairwise_iou(boxes)[0, 1:].max() > _MAX_BOX_IOU:
            continue
        region = owner[y0:y1, x0:x1]
        covered = region[hard]
        lost = np.bincount(covered[covered >= 0], minlength=len(placed))
        if any(o["visible"] - lost[i] < _MIN_VISIBLE_FRACTION * o["in_image"] for i, o in enumerate(placed)):
            continue
        for i, o in enumerate(placed):
            o["visible"] -= int(lost[i])
        region[hard] = len(placed)
        alpha = shape.alpha[crop][..., None]
        patch = image[y0:y1, x0:x1]
        colour = _pick_colour(patch, rng)
        image[y0:y1, x0:x1] = patch * (1 - alpha) + colour * alpha
        return {
            "category_id": shape.class_id,
            "bbox": [float(bx0), float(by0), float(bx1), float(by1)],
            "size": shape.size,
            "centre": np.array([(bx0 + bx1) / 2, (by0 + by1) / 2]),
            "in_image": in_image,
            "visible": in_image,
        }
    return None


def _encode_jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma keeps the colours of 8 px shapes; no optimize/progressive: deterministic bytes
    Image.fromarray(image).save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- splits
def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index)])


def _round(v: float) -> float:
    return float(round(v, 2))


def generate_split(root: str, split: str, num_images: int, seed: int = DEFAULT_SEED, progress=None) -> dict:
    """Write the images and the COCO json of one split under ``root``; return the COCO dict.

    Args:
        root: dataset root (see :func:`quickstart_paths`).
        split: "train" or "val".
        num_images: number of images (>= 1).
        seed: dataset seed.
        progress: an optional ``tqdm`` bar, advanced by one per image.
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {list(_SPLIT_CODES)}, got {split!r}")
    if num_images < 1:
        raise ValueError(f"The {split} split needs at least 1 image, got {num_images}")
    paths = quickstart_paths(root)[split]
    os.makedirs(paths["image_root"], exist_ok=True)
    os.makedirs(os.path.dirname(paths["json_file"]), exist_ok=True)
    images, annotations = [], []
    for index in range(1, num_images + 1):
        image, objects = generate_image(_image_rng(seed, split, index))
        file_name = f"{index:06d}.jpg"
        atomic_write_bytes(os.path.join(paths["image_root"], file_name), _encode_jpeg(image), durable=False)
        height, width = image.shape[:2]
        images.append({"id": index, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            x0, y0, x1, y1 = obj["bbox"]
            x0, y0, x1, y1 = _round(x0), _round(y0), _round(x1), _round(y1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": obj["category_id"] + 1,
                    "bbox": [x0, y0, _round(x1 - x0), _round(y1 - y0)],
                    "area": obj["area"],
                    "iscrowd": 0,
                }
            )
        if progress is not None:
            progress.update(1)
    coco = {
        "info": {
            "description": "fsaf_d2 quickstart: synthetic coloured shapes (class = shape)",
            "version": str(GENERATOR_VERSION),
            "split": split,
            "seed": int(seed),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(QUICKSTART_CLASSES)
        ],
    }
    atomic_write_bytes(paths["json_file"], json.dumps(coco, separators=(",", ":")).encode("utf-8"), durable=False)
    return coco


def generate_quickstart(
    root: str,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = DEFAULT_SEED,
    show_progress: bool = True,
) -> Dict[str, dict]:
    """Generate both splits under ``root`` (overwriting files of the same names).

    Returns:
        ``{"train": coco_dict, "val": coco_dict}``.
    """
    import sys

    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    with tqdm(
        total=num_train + num_val,
        desc="fsaf_quickstart",
        unit="img",
        disable=not show_progress,
        mininterval=0.1 if interactive else 2.0,  # few lines in log files
    ) as bar:
        return {
            "train": generate_split(root, "train", num_train, seed, progress=bar),
            "val": generate_split(root, "val", num_val, seed, progress=bar),
        }


# --------------------------------------------------------------------------------------------- stats
def _pairwise_iou(boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(axis=1)
    return inter / (areas[:, None] + areas[None, :] - inter)


def dataset_statistics(coco: dict) -> dict:
    """Summary of a COCO detection dict: counts, objects per image, box sizes, overlaps, class histogram.

    ``box_side`` is the longer side of each box; ``overlapping_pairs`` counts pairs of boxes of the same
    image with IoU > 0 (``same_class_overlapping_pairs`` those of equal category); ``coco_area_bins``
    uses COCO's small / medium / large thresholds (32^2, 96^2) on ``area``.
    """
    per_image: Dict[int, list] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann)
    counts = np.array([len(v) for v in per_image.values()])
    sides, pairs, same_pairs = [], 0, 0
    for anns in per_image.values():
        if not anns:
            continue
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64)
        sides.extend(xywh[:, 2:].max(axis=1).tolist())
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        iou = np.triu(_pairwise_iou(boxes), k=1)
        cats = np.array([a["category_id"] for a in anns])
        pairs += int((iou > 0).sum())
        same_pairs += int(((iou > 0) & (cats[:, None] == cats[None, :])).sum())
    areas = np.array([a["area"] for a in coco["annotations"]], dtype=np.float64)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    return {
        "images": len(per_image),
        "annotations": len(coco["annotations"]),
        "objects_per_image": {
            "min": int(counts.min()) if len(counts) else 0,
            "mean": float(counts.mean()) if len(counts) else 0.0,
            "max": int(counts.max()) if len(counts) else 0,
        },
        "box_side": {
            "min": float(min(sides)) if sides else 0.0,
            "median": float(np.median(sides)) if sides else 0.0,
            "max": float(max(sides)) if sides else 0.0,
        },
        "coco_area_bins": {
            "small": int((areas < 32**2).sum()),
            "medium": int(((areas >= 32**2) & (areas < 96**2)).sum()),
            "large": int((areas >= 96**2).sum()),
        },
        "overlapping_pairs": pairs,
        "same_class_overlapping_pairs": same_pairs,
        "per_class": {names[k]: int(v) for k, v in sorted(_count(coco["annotations"]).items())},
    }


def _count(annotations) -> Dict[int, int]:
    out: Dict[int, int] = {}
    for a in annotations:
        out[a["category_id"]] = out.get(a["category_id"], 0) + 1
    return out


def format_statistics(split: str, stats: dict) -> str:
    """One human-readable paragraph of :func:`dataset_statistics` output."""
    opi, side, bins = stats["objects_per_image"], stats["box_side"], stats["coco_area_bins"]
    return (
        f"{split}: {stats['images']} images, {stats['annotations']} objects "
        f"({opi['min']}-{opi['max']} per image, mean {opi['mean']:.2f}); box side {side['min']:.1f}-"
        f"{side['max']:.1f} px (median {side['median']:.1f}); COCO area bins small/medium/large "
        f"{bins['small']}/{bins['medium']}/{bins['large']}; overlapping box pairs {stats['overlapping_pairs']} "
        f"(same class {stats['same_class_overlapping_pairs']}); per class {stats['per_class']}"
    )
