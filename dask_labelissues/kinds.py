"""Data kinds: how a block of stored rows becomes items x classes.

The kernels see items: a label per item and a row of K probabilities.  A
kind says what the items of its storage are.  Classification's are its
rows; a segmentation mask's are its pixels, stored as ``(N, K, H, W)``
pred_probs and ``(N, H, W)`` labels.  Engines cut blocks on stored rows
(images, for pixels), so a block never splits what a row holds, and call
:meth:`Kind.items` inside the task that reads the block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Kind:
    """Classification: one item per stored row, classes on axis 1."""

    name: str = "rows"

    def items_per_row(self, probs_shape: Sequence[int]) -> int:
        """Items a stored row of pred_probs holds."""
        return 1

    def n_classes(self, probs_shape: Sequence[int]) -> int:
        return int(probs_shape[1])

    def labels(self, block: np.ndarray) -> np.ndarray:
        """A block of stored labels as one label per item."""
        return np.asarray(block)

    def probs(self, block: np.ndarray) -> np.ndarray:
        """A block of stored pred_probs as items x classes."""
        return np.asarray(block)


#: Classification's kind.
ROWS = Kind()


@dataclass(frozen=True)
class Pixels(Kind):
    """Every pixel of an image is an item: pred_probs ``(N, K, H, W)``,
    labels ``(N, H, W)``; items run image by image, in row-major pixel
    order within an image."""

    name: str = "pixels"

    def items_per_row(self, probs_shape: Sequence[int]) -> int:
        return int(np.prod(probs_shape[2:], dtype=np.int64))

    def labels(self, block: np.ndarray) -> np.ndarray:
        return np.asarray(block).reshape(-1)

    def probs(self, block: np.ndarray) -> np.ndarray:
        block = np.asarray(block)
        # The class axis moves last: one copy of the block, C-ordered so the
        # kernels read each pixel's K values together.
        return np.ascontiguousarray(np.moveaxis(block, 1, -1)).reshape(-1, block.shape[1])


#: Semantic segmentation's kind.
PIXELS = Pixels()
