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

from . import kernels
from .kernels import InputProblem


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

    @property
    def pools(self) -> bool:
        """Items are made from several stored values (pooled tiles): bad
        values are looked for in the stored ones (:meth:`stored_problem`)."""
        return False

    def where(self, item: int, probs_shape: Sequence[int]) -> str:
        """Where item ``item`` is, in words."""
        return f"row {item}"

    def stored_problem(
        self, labels: np.ndarray, probs: np.ndarray, start_row: int, tolerance: float | None
    ) -> InputProblem | None:
        """The first bad stored value of a block, for kinds that pool."""
        return None


#: Classification's kind.
ROWS = Kind()


@dataclass(frozen=True)
class Pixels(Kind):
    """Every pixel of an image is an item: pred_probs ``(N, K, H, W)``,
    labels ``(N, H, W)``; items run image by image, in row-major pixel
    order within an image.

    With ``downsample`` f > 1 the items are f x f tiles instead, as
    cleanlab.segmentation pools them: a tile's label is the mean of its
    labels, rounded; its probabilities the mean of its pixels',
    renormalized to sum to 1.
    """

    name: str = "pixels"
    downsample: int = 1

    def items_per_row(self, probs_shape: Sequence[int]) -> int:
        f = self.downsample
        return int(np.prod([s // f for s in probs_shape[2:]], dtype=np.int64))

    def labels(self, block: np.ndarray) -> np.ndarray:
        block = np.asarray(block)
        f = self.downsample
        if f == 1:
            return block.reshape(-1)
        n, h, w = block.shape
        pooled = np.round(block.reshape(n, h // f, f, w // f, f).mean(axis=(4, 2)))
        return pooled.astype(np.int64).reshape(-1)

    def probs(self, block: np.ndarray) -> np.ndarray:
        block = np.asarray(block)
        f = self.downsample
        if f > 1:
            n, k, h, w = block.shape
            block = block.reshape(n, k, h // f, f, w // f, f).mean(axis=(5, 3))
            block = block / np.expand_dims(block.sum(axis=1), 1)
        # The class axis moves last: one copy of the block, C-ordered so the
        # kernels read each pixel's K values together.  float16 becomes
        # float32 in the same copy (exactly: every float16 is a float32),
        # which the compiled kernels take.
        dtype = np.float32 if block.dtype == np.float16 else block.dtype
        moved = np.empty((block.shape[0], *block.shape[2:], block.shape[1]), dtype=dtype)
        moved[...] = np.moveaxis(block, 1, -1)
        return moved.reshape(-1, block.shape[1])

    @property
    def pools(self) -> bool:
        return self.downsample > 1

    def where(self, item: int, probs_shape: Sequence[int]) -> str:
        """Where pixel ``item`` is, in words (a pooling kind's bad values
        are pixels too: :meth:`stored_problem`)."""
        h, w = probs_shape[2:]
        image, rest = divmod(int(item), h * w)
        y, x = divmod(rest, w)
        return f"image {image}, pixel ({y}, {x})"

    def stored_problem(
        self, labels: np.ndarray, probs: np.ndarray, start_row: int, tolerance: float | None
    ) -> InputProblem | None:
        """The first bad pixel of a block of images, as pass one names a bad
        item; its index is the pixel's.  Tiles are pooled, then renormalized,
        which would hide a pixel's bad sum or label, and in float16 move a
        good tile's sum by up to 2e-3."""
        pixels = Pixels()
        start = start_row * int(np.prod(np.shape(labels)[1:]))
        labels, probs = pixels.labels(labels), pixels.probs(probs)
        return kernels.find_problem(
            labels, probs, start, tolerance,
            probs.sum(axis=1, dtype=np.float64), probs.min(axis=1), probs.max(axis=1).astype(np.float64),
        )


#: Semantic segmentation's kind.
PIXELS = Pixels()
