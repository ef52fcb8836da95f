"""Data kinds: how a block of stored rows becomes items x classes.

The kernels see items: a label per item and a row of K probabilities.  A
kind says what the items of its storage are.  Classification's are its
rows; a segmentation mask's are its pixels, stored as ``(N, K, H, W)``
pred_probs and ``(N, H, W)`` labels; a multi-label class's are its rows
seen as a binary problem (:class:`OneVsRest`).  Engines cut blocks on
stored rows (images, for pixels), so a block never splits what a row
holds, and call :meth:`Kind.labels` and :meth:`Kind.probs` (or
:meth:`Kind.scan_view`) inside the task that reads the block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import kernels
from .kernels import InputProblem, Planes


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

    def probs(self, block: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """A block of stored pred_probs as items x classes; ``labels``, the
        same stored rows' labels, where :attr:`probs_need_labels`."""
        return np.asarray(block)

    def scan_view(self, block: np.ndarray, labels: np.ndarray | None = None) -> Any:
        """A block of stored pred_probs as pass one's scan reads it: items x
        classes (:meth:`probs`), or a view the kernels read in place
        (:class:`~dask_labelissues.kernels.Planes`)."""
        return self.probs(block, labels)

    @property
    def probs_need_labels(self) -> bool:
        """:meth:`probs` needs the block's stored labels."""
        return False

    def ignored(self, labels: np.ndarray) -> np.ndarray | None:
        """Where stored ``labels`` mark values left out of the job (None:
        nowhere)."""
        return None

    @property
    def ignored_class(self) -> int | None:
        """The items' class that holds the values left out, after the real
        ones (None: nothing is left out)."""
        return None

    @property
    def checks_stored(self) -> bool:
        """Bad values are named from the stored values
        (:meth:`stored_problem`), not the items made from them (pooled
        tiles, ignored pixels or one class of a row would hide them, move
        them or misname them)."""
        return False

    @property
    def pools(self) -> bool:
        """Items pool several stored values, which can hide a bad one: the
        stored values are checked in every block.  Other kinds that check
        stored values do so only where the scan or
        :meth:`label_problem` found something, to name it."""
        return False

    def label_problem(self, labels: np.ndarray) -> bool:
        """Whether stored labels hold a value the items would not show as
        bad (a cheap check of the labels alone)."""
        return False

    @property
    def one_column(self) -> bool:
        """Items are made from one column of the stored rows: read fastest
        from a block stored column by column."""
        return False

    def where(self, item: int, probs_shape: Sequence[int]) -> str:
        """Where item ``item`` is, in words."""
        return f"row {item}"

    def stored_problem(
        self, labels: np.ndarray, probs: np.ndarray, start_row: int, tolerance: float | None
    ) -> InputProblem | None:
        """The first bad stored value of a block, for kinds that check them
        (:attr:`checks_stored`)."""
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

    With ``ignore_index`` (and ``classes``, K), pixels labelled
    ``ignore_index`` are left out: they become items of an extra class K
    with probability 1 of it and 0 of every real class.  Such an item
    adds nothing to a real class's threshold, count or sum, is confident
    only in class K (whose threshold is 1) and so always on the confident
    joint's diagonal, scores 1 and is its own argmax, so it is never
    flagged; and no real pixel is confident in class K (its probability 0
    is below 1).  A tile pools only its pixels that are not ignored, and is
    ignored where all are.
    """

    name: str = "pixels"
    downsample: int = 1
    ignore_index: int | None = None
    classes: int = 0

    def __post_init__(self) -> None:
        if self.ignore_index is not None and self.classes < 2:
            raise ValueError("Pixels(ignore_index=...) needs classes, the number of real classes")

    def items_per_row(self, probs_shape: Sequence[int]) -> int:
        f = self.downsample
        return int(np.prod([s // f for s in probs_shape[2:]], dtype=np.int64))

    def n_classes(self, probs_shape: Sequence[int]) -> int:
        return int(probs_shape[1]) + (self.ignore_index is not None)

    def ignored(self, labels: np.ndarray) -> np.ndarray | None:
        return None if self.ignore_index is None else np.asarray(labels) == self.ignore_index

    @property
    def ignored_class(self) -> int | None:
        return None if self.ignore_index is None else self.classes

    @property
    def probs_need_labels(self) -> bool:
        return self.ignore_index is not None

    def labels(self, block: np.ndarray) -> np.ndarray:
        block = np.asarray(block)
        f = self.downsample
        if self.ignore_index is not None:
            return self._kept_labels(block)
        if f == 1:
            return block.reshape(-1)
        n, h, w = block.shape
        pooled = np.round(block.reshape(n, h // f, f, w // f, f).mean(axis=(4, 2)))
        return pooled.astype(np.int64).reshape(-1)

    def _kept_labels(self, block: np.ndarray) -> np.ndarray:
        kept = block != self.ignore_index
        f = self.downsample
        if f == 1:
            return np.where(kept, block, self.classes).astype(np.int64, copy=False).reshape(-1)
        n, h, w = block.shape
        counts = kept.reshape(n, h // f, f, w // f, f).sum(axis=(4, 2))
        sums = np.where(kept, block, 0).reshape(n, h // f, f, w // f, f).sum(axis=(4, 2), dtype=np.float64)
        pooled = np.round(sums / np.maximum(counts, 1)).astype(np.int64)
        pooled[counts == 0] = self.classes
        return pooled.reshape(-1)

    def probs(self, block: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        return self.planes(block, labels).items()

    def scan_view(self, block: np.ndarray, labels: np.ndarray | None = None) -> Planes:
        # Images keep their classes in planes: pass one reads them in place.
        return self.planes(block, labels)

    def planes(self, block: np.ndarray, labels: np.ndarray | None = None) -> Planes:
        """A block of images' pred_probs as the items' class planes: pooled
        (and renormalized) to tiles, and with the class of ignored pixels
        added, where the kind says so; else a view of the block."""
        block = np.asarray(block)
        f = self.downsample
        kept = None
        if self.ignore_index is not None:
            if labels is None:
                raise ValueError("Pixels(ignore_index=...) needs the block's labels to read its pred_probs")
            kept = np.asarray(labels) != self.ignore_index
        # A block with no pixel ignored is pooled as without ignore_index, to the same bits.
        partial = kept is not None and not kept.all()
        if f > 1:
            n, k, h, w = block.shape
            stored = block.dtype
            if not partial:
                block = block.reshape(n, k, h // f, f, w // f, f).mean(axis=(5, 3))
                if kept is not None:
                    kept = np.ones((n, h // f, w // f), dtype=bool)
            else:
                # Ignored pixels' predictions are left out of their tile's mean
                # (not multiplied by 0: an ignored pixel's values may be NaN).
                weights = kept.reshape(n, 1, h // f, f, w // f, f)
                block = np.where(weights, block.reshape(n, k, h // f, f, w // f, f), 0).sum(axis=(5, 3), dtype=np.float64)
                kept = weights.any(axis=(5, 3))[:, 0]
            with np.errstate(invalid="ignore", divide="ignore"):
                block = block / np.expand_dims(block.sum(axis=1), 1)
            if partial and stored in (np.float32, np.float64):
                block = block.astype(stored)  # the input's precision, as the tiles of other blocks
        n, k = block.shape[:2]
        if kept is not None:
            # Ignored items: probability 0 of every real class, 1 of class K.
            dtype = np.float32 if block.dtype == np.float16 else block.dtype
            planes = np.empty((n, k + 1, *block.shape[2:]), dtype=dtype)
            planes[:, :k] = np.where(kept[:, None], block, 0)
            planes[:, k] = ~kept
            block = planes
        # The pixel count named, not inferred: a block of no images (a dask
        # array's empty chunk) has none to infer it from.
        return Planes(block.reshape(block.shape[0], block.shape[1], int(np.prod(block.shape[2:]))))

    @property
    def checks_stored(self) -> bool:
        return self.downsample > 1 or self.ignore_index is not None

    @property
    def pools(self) -> bool:
        return self.downsample > 1

    def label_problem(self, labels: np.ndarray) -> bool:
        if self.ignore_index is None:
            return False
        labels = np.asarray(labels)
        return bool((((labels < 0) | (labels >= self.classes)) & (labels != self.ignore_index)).any())

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
        good tile's sum by up to 2e-3.  Ignored pixels are not checked, and
        the others against the K real classes (the items have one more)."""
        labels, probs = np.asarray(labels), np.asarray(probs)
        ignored = self.ignored(labels)
        if ignored is not None and ignored.any():
            # An ignored pixel is checked as a good one: label 0, certain of it.
            labels = np.where(ignored, 0, labels)
            probs = np.where(ignored[:, None], np.eye(1, probs.shape[1], dtype=probs.dtype)[0][:, None, None], probs)
        pixels = Pixels()
        start = start_row * int(np.prod(np.shape(labels)[1:]))
        labels, probs = pixels.labels(labels), pixels.probs(probs)
        return kernels.find_problem(
            labels, probs, start, tolerance,
            probs.sum(axis=1, dtype=np.float64), probs.min(axis=1), probs.max(axis=1).astype(np.float64),
        )


#: Semantic segmentation's kind.
PIXELS = Pixels()


@dataclass(frozen=True)
class OneVsRest(Kind):
    """Multi-label data, class ``k`` against the rest: labels are an
    ``(N, K)`` 0/1 matrix and pred_probs ``(N, K)`` independent per-class
    probabilities; row ``i``'s item has label ``labels[i, k]`` and the two
    probabilities ``[1 - p, p]`` of ``p = pred_probs[i, k]`` (1 - p in the
    input's dtype, as cleanlab stacks them).  The stored values of column
    ``k`` are checked: labels 0 or 1, probabilities in [0, 1]."""

    name: str = "one-vs-rest"
    k: int = 0

    @property
    def one_column(self) -> bool:
        return True

    def n_classes(self, probs_shape: Sequence[int]) -> int:
        return 2

    def labels(self, block: np.ndarray) -> np.ndarray:
        return np.asarray(block)[:, self.k].astype(np.int64)

    def probs(self, block: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        p = np.asarray(block)[:, self.k]
        # float16 becomes float32 (exactly; the compiled kernels take it)
        # after 1 - p is made in float16, as cleanlab makes it.
        out = np.empty((p.shape[0], 2), dtype=np.float32 if p.dtype == np.float16 else p.dtype)
        out[:, 0] = 1 - p
        out[:, 1] = p
        return out

    @property
    def checks_stored(self) -> bool:
        return True

    def stored_problem(
        self, labels: np.ndarray, probs: np.ndarray, start_row: int, tolerance: float | None
    ) -> InputProblem | None:
        y = np.asarray(labels)[:, self.k]
        p = np.asarray(probs)[:, self.k]
        bad_label = (y != 0) & (y != 1)
        bad_prob = ~((p >= 0) & (p <= 1))
        bad = bad_label | bad_prob
        if not bad.any():
            return None
        i = int(np.argmax(bad))
        row = start_row + i
        if bad_label[i]:
            return InputProblem(row, f"labels[{row}, {self.k}] = {y[i]} is not 0 or 1 (class {self.k} absent or present)")
        hint = ""
        if np.isfinite(p[i]) and p[i] > 1:
            hint = ": this looks like a logit or score, not a probability (apply a sigmoid)"
        return InputProblem(row, f"pred_probs[{row}, {self.k}] = {p[i]} is not a probability in [0, 1]{hint}")
