"""Helpers shared by every test folder (``import helpers``: pytest puts ``tests/`` on ``sys.path``, as the
directory of the top-level conftest.py).

:func:`make_cfg` is the one config builder of the tests; the folder presets build on it
(``modeling/fsaf_testing.tiny_cfg``, ``data/fsaf_data_helpers.loader_cfg``, ``engine/engine_testutils.tiny_cfg``
and the parity test's ``fsaf_cfg``).
"""
import json
import os
from typing import Sequence

import numpy as np
from detectron2.config import get_cfg
from PIL import Image

from fsaf_d2.config import add_fsaf_config
from fsaf_d2.engine.config import add_engine_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def override_opts(overrides: dict) -> list:
    """``{"A.B": value}`` (or ``A__B=value`` keyword style) as a ``KEY VALUE`` list for ``merge_from_list``."""
    opts = []
    for key, value in overrides.items():
        opts += [key.replace("__", "."), value]
    return opts


def make_cfg(config_file: str = "", opts: Sequence = (), freeze: bool = False, **overrides):
    """A Detectron2 config with fsaf_d2's model and engine keys (no device rules applied: tests choose).

    Args:
        config_file: yaml merged first (a relative path is relative to the repository root); "" for none.
        opts: ``KEY VALUE`` list merged next (``cfg.merge_from_list``).
        freeze: freeze the result.
        overrides: merged last, by ``merge_from_list`` too (unknown keys fail); keys "A.B" or ``A__B``.
    """
    cfg = get_cfg()
    add_fsaf_config(cfg)
    add_engine_config(cfg)
    if config_file:
        cfg.merge_from_file(os.path.join(REPO_ROOT, config_file))
    cfg.merge_from_list(list(opts))
    cfg.merge_from_list(override_opts(overrides))
    if freeze:
        cfg.freeze()
    return cfg


# ---------------------------------------------------------------------------------------------- data


def write_tiny_coco(image_dir: str, json_path: str, num_images: int, categories, seed: int = 0):
    """Write ``num_images`` PNGs (64-96 px) with 1-2 coloured boxes each, and a COCO instances json.

    Args:
        categories: COCO ``categories`` list; boxes use the first two ids.
    """
    rng = np.random.RandomState(seed)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        h, w = (64, 96) if i % 2 == 0 else (96, 64)
        img = np.full((h, w, 3), 40, dtype=np.uint8) + rng.randint(0, 20, (h, w, 3)).astype(np.uint8)
        for j in range(1 + i % 2):
            bw, bh = rng.randint(16, 32), rng.randint(16, 32)
            x0, y0 = rng.randint(0, w - bw), rng.randint(0, h - bh)
            img[y0 : y0 + bh, x0 : x0 + bw] = (200, 60, 60) if j == 0 else (60, 200, 60)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": categories[j]["id"],
                    "bbox": [float(x0), float(y0), float(bw), float(bh)],
                    "area": float(bw * bh),
                    "iscrowd": 0,
                }
            )
        name = f"{i:04d}.png"
        Image.fromarray(img).save(os.path.join(image_dir, name))
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    with open(json_path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_path


def write_coco_2017(coco_dir: str, image_dir: str = "{split}", num_train: int = 4, num_val: int = 4) -> str:
    """Tiny COCO 2017 train/val with the 80 COCO categories in ``coco_dir``: ``annotations/instances_
    {train,val}2017.json`` and images in ``image_dir`` ("{split}": Detectron2's layout, "images/{split}": the
    Ascend ModelZoo's). Returns ``coco_dir``."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    cats = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    for split, num, seed in (("train2017", num_train, 1), ("val2017", num_val, 2)):
        write_tiny_coco(os.path.join(coco_dir, image_dir.format(split=split)),
                        os.path.join(coco_dir, "annotations", f"instances_{split}.json"), num, cats, seed=seed)
    return coco_dir
