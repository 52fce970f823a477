"""FSAF priors: one square box of side s (the level stride) per feature location, and their valid mask.

The prior of cell (i, j) at stride s is centred at ((j + offset) * s, (i + offset) * s) with offset 0
as in the reference (the top-left corner of the cell). Grids are cached per feature-map size, so a
static-shape run builds them once.
"""
from collections import OrderedDict
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["PointPriors", "point_prior_grid", "prior_valid_mask"]


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


def prior_valid_mask(
    shapes: List[Tuple[int, int]], strides: List[int], image_sizes: Tensor, size_divisibility: int
) -> Tensor:
    """(N, R) bool: the prior lies inside its image's own padded extent.

    An image's own extent is its size padded to ``size_divisibility`` (the reference pads every image to
    32); locations beyond it, ceil(extent / stride) per level, exist only because of batch padding.

    Args:
        shapes: (H_l, W_l) of every level; strides: the levels' strides (pixels).
        image_sizes: (N, 2) integer (H, W) of every image before batch padding, on the device the mask is
            wanted on. Tensor arithmetic only, so that a compiled training step keeps one graph for every
            image size that fits its fixed input size.
    """
    d = max(int(size_divisibility), 1)
    padded = (image_sizes.long() + d - 1) // d * d  # (N, 2)
    parts = []
    for (h, w), s in zip(shapes, strides):
        extent = (padded + s - 1) // s  # (N, 2) rows and columns of this level inside the image
        rows = torch.arange(h, device=image_sizes.device)
        cols = torch.arange(w, device=image_sizes.device)
        inside = (rows[None, :, None] < extent[:, 0, None, None]) & (cols[None, None, :] < extent[:, 1, None, None])
        parts.append(inside.reshape(image_sizes.shape[0], h * w))
    return torch.cat(parts, dim=1)


class PointPriors:
    """Prior boxes and their bookkeeping for a list of levels with the given strides."""

    def __init__(self, strides: Sequence[int], offset: float = 0.0, cache_size: int = 64):
        self.strides = [int(s) for s in strides]
        self.offset = float(offset)
        self._cache: "OrderedDict[tuple, object]" = OrderedDict()
        self._cache_size = cache_size

    def _cached(self, key, build):
        if torch.compiler.is_compiling():  # traced once per input size: the graph holds the result
            return build()
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
        image_sizes,
        size_divisibility: int,
        device: torch.device,
    ) -> Tensor:
        """(N, R) bool: the prior lies inside its image's own padded extent (:func:`prior_valid_mask`).

        ``image_sizes``: Python (H, W) pairs, for which the mask is built on the host, cached and copied to
        the device without a synchronisation; or an (N, 2) tensor on the device (the compiled training
        step), for which it is computed there.
        """
        if isinstance(image_sizes, Tensor):
            return prior_valid_mask(list(shapes), self.strides, image_sizes, size_divisibility)

        def build():
            sizes = torch.tensor([[int(h), int(w)] for h, w in image_sizes], dtype=torch.int64).reshape(-1, 2)
            mask = prior_valid_mask(list(shapes), self.strides, sizes, size_divisibility)
            if torch.device(device).type == "cpu":
                return mask
            return mask.pin_memory().to(device, non_blocking=True)

        key = ("valid", tuple(shapes), tuple(tuple(int(v) for v in s) for s in image_sizes), size_divisibility, str(device))
        return self._cached(key, build)
