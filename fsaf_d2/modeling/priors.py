"""FSAF priors: one square box of side s (the level stride) per feature location, and their valid mask.

The prior of cell (i, j) at stride s is centred at ((j + offset) * s, (i + offset) * s) with offset 0
as in the reference (the top-left corner of the cell). Grids are cached per feature-map size, so a
static-shape run builds them once.
"""
import math
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["PointPriors", "level_valid_extent", "point_prior_grid"]


def level_valid_extent(image_size: Tuple[int, int], size_divisibility: int, stride: int) -> Tuple[int, int]:
    """Rows and columns of a stride-``stride`` level that belong to an image of ``image_size`` (H, W).

    The image's own extent is its size padded to ``size_divisibility`` (the reference pads every image to
    32); locations beyond it exist only because of batch padding.
    """
    d = max(int(size_divisibility), 1)
    padded_h = int(math.ceil(image_size[0] / d) * d)
    padded_w = int(math.ceil(image_size[1] / d) * d)
    return int(math.ceil(padded_h / stride)), int(math.ceil(padded_w / stride))


def point_prior_grid(
    shapes: List[Tuple[int, int]], strides: List[int], offset: float, device: torch.device
) -> List[Tensor]:
    """Per level, (H_l * W_l, 4) XYXY priors in row-major (i, j) order; uncached and TorchScript-compatible
    (the scripted inference path calls it directly, :class:`PointPriors` caches it in eager mode)."""
    out: List[Tensor] = []
    for shape, s in zip(shapes, strides):
        ys = (torch.arange(shape[0], dtype=torch.float32, device=device) + offset) * s
        xs = (torch.arange(shape[1], dtype=torch.float32, device=device) + offset) * s
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        cx, cy = cx.reshape(-1), cy.reshape(-1)
        half = s / 2.0
        out.append(torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1))
    return out


class PointPriors:
    """Prior boxes and their bookkeeping for a list of levels with the given strides."""

    def __init__(self, strides: Sequence[int], offset: float = 0.0, cache_size: int = 64):
        self.strides = [int(s) for s in strides]
        self.offset = float(offset)
        self._cache: "OrderedDict[tuple, object]" = OrderedDict()
        self._cache_size = cache_size

    def _cached(self, key, build):
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = build()
        self._cache[key] = value
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return value

    def level_priors(self, shapes: Sequence[Tuple[int, int]], device: torch.device) -> List[Tensor]:
        """Per level, (H_l * W_l, 4) XYXY priors in row-major (i, j) order."""

        def build():
            return point_prior_grid(shapes, self.strides, self.offset, device)

        return self._cached(("level_priors", tuple(shapes), str(device)), build)

    def grid(self, shapes: Sequence[Tuple[int, int]], device: torch.device):
        """(priors (R, 4), level id of each prior (R,) int64, number of priors per level)."""

        def build():
            level = self.level_priors(shapes, device)
            sizes = [int(p.shape[0]) for p in level]
            ids = torch.cat(
                [torch.full((n,), i, dtype=torch.int64, device=device) for i, n in enumerate(sizes)]
            )
            return torch.cat(level, dim=0), ids, sizes

        return self._cached(("grid", tuple(shapes), str(device)), build)

    def valid_mask(
        self,
        shapes: Sequence[Tuple[int, int]],
        image_sizes: Sequence[Tuple[int, int]],
        size_divisibility: int,
        device: torch.device,
    ) -> Tensor:
        """(N, R) bool: the prior lies inside its image's own padded extent (see ``level_valid_extent``).

        Built on the host from Python sizes and copied to the device without a synchronisation.
        """

        def build():
            rows = []
            for size in image_sizes:
                parts = []
                for (h, w), s in zip(shapes, self.strides):
                    vh, vw = level_valid_extent(size, size_divisibility, s)
                    m = torch.zeros(h, w, dtype=torch.bool)
                    m[:vh, :vw] = True
                    parts.append(m.reshape(-1))
                rows.append(torch.cat(parts))
            mask = torch.stack(rows)
            if torch.device(device).type == "cpu":
                return mask
            return mask.pin_memory().to(device, non_blocking=True)

        key = ("valid", tuple(shapes), tuple(tuple(int(v) for v in s) for s in image_sizes), size_divisibility, str(device))
        return self._cached(key, build)
