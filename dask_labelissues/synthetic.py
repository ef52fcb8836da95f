"""Seeded synthetic noisy-label data, generated block by block.

Used by the demo, the tests and the benchmarks: any number of rows can be
written to a ``.npy`` file or a Zarr store without ever holding them all.
Block ``b`` of rows is drawn from its own generator seeded with
``(seed, b)``, so the data do not depend on how they are written.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np

#: Rows drawn per generator; fixed so the data depend only on the seed.
GENERATION_ROWS = 65536
#: Width of the uniform noise on every logit.
NOISE_SPREAD = 4.0
#: Cap on the true class's logit boost; with the noise, logits stay below 88.
MAX_BOOST = 60.0


@dataclass(frozen=True)
class SyntheticSpec:
    """A noisy dataset: a model that mostly knows the true class, and a
    fraction ``noise`` of labels flipped to another class."""

    rows: int
    classes: int
    noise: float = 0.1
    seed: int = 0
    signal: float = 6.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.rows < 1 or self.classes < 2:
            raise ValueError("need rows >= 1 and classes >= 2")
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise must be in [0, 1), got {self.noise}")


def generate_block(spec: SyntheticSpec, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``block * GENERATION_ROWS`` onwards: ``(labels, pred_probs, flipped)``."""
    start = block * GENERATION_ROWS
    n = min(GENERATION_ROWS, spec.rows - start)
    rng = np.random.default_rng([spec.seed, block])
    k = spec.classes
    true = rng.integers(0, k, n)
    # Uniform logit noise costs a quarter of normal noise to draw, and with
    # this spread gives the same accuracy and the same share of flips found.
    logits = rng.random((n, k), dtype=np.float32)
    logits *= np.float32(NOISE_SPREAD)
    # The true class's logit is raised by a gamma-distributed amount (mean
    # ``signal``): most rows are easy, some are hard, as with a real model
    # (about 92% accuracy at 100 classes with the default).  Capped so that
    # no logit reaches float32's exp overflow (88), which lets softmax skip
    # its usual subtraction of the row maximum.
    boost = np.minimum(rng.gamma(4.0, spec.signal / 4.0, n), MAX_BOOST)
    logits[np.arange(n), true] += boost.astype(np.float32)
    probs = np.exp(logits, out=logits)
    probs /= probs.sum(axis=1, keepdims=True)
    flipped = rng.random(n) < spec.noise
    labels = true.copy()
    labels[flipped] = (true[flipped] + rng.integers(1, k, int(flipped.sum()))) % k
    return labels.astype(np.int64), probs.astype(spec.dtype, copy=False), flipped


def blocks(spec: SyntheticSpec) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Every generation block as ``(start, labels, pred_probs, flipped)``."""
    for b in range(-(-spec.rows // GENERATION_ROWS)):
        labels, probs, flipped = generate_block(spec, b)
        yield b * GENERATION_ROWS, labels, probs, flipped


def write_npy(spec: SyntheticSpec, directory: str | os.PathLike) -> dict[str, str]:
    """Write ``labels.npy``, ``pred_probs.npy`` and ``flipped.npy`` (row indices
    of the flipped labels) into ``directory``; returns their paths."""
    from numpy.lib.format import open_memmap

    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, f"{name}.npy") for name in ("labels", "pred_probs", "flipped")}
    labels = open_memmap(paths["labels"], mode="w+", dtype=np.int64, shape=(spec.rows,))
    probs = open_memmap(paths["pred_probs"], mode="w+", dtype=spec.dtype, shape=(spec.rows, spec.classes))
    flipped = []
    for start, lab, pp, fl in blocks(spec):
        labels[start : start + len(lab)] = lab
        probs[start : start + len(lab)] = pp
        flipped.append(np.flatnonzero(fl) + start)
    labels.flush()
    probs.flush()
    del labels, probs
    np.save(paths["flipped"], np.concatenate(flipped).astype(np.int64))
    return paths


def write_zarr(
    spec: SyntheticSpec,
    path: str | os.PathLike,
    chunk_rows: int = GENERATION_ROWS,
    threads: int | None = None,
    compress: bool = True,
) -> None:
    """Write a Zarr v3 group with arrays ``labels``, ``pred_probs`` and
    ``flipped`` (row indices of flipped labels).

    Storage chunks are generated and written on ``threads`` threads
    (default: two per core, so that one thread generates while another
    waits on its write; the generator, the codec and the writes release
    the GIL), each task a run of whole chunks, so no chunk is written
    twice and memory holds about ``threads`` chunks.  The data do not
    depend on ``threads``.  ``compress=False`` stores pred_probs without
    zarr's default compressor: zstd shrinks these random probabilities by
    about 8% and takes a quarter of the writing time.

    Sets this process's allocator to keep freed arrays for reuse, as a job
    does (:func:`~dask_labelissues.system.keep_freed_memory`): each
    generation block's arrays (about 26 MB at 100 classes) were otherwise
    mapped and zeroed anew, and writing the demo's 2,000,000 x 100 rows in a
    fresh process spent 0.6 to 1.2 s of system time against 0.25 to 0.45 s.
    """
    import zarr

    from .system import keep_freed_memory, usable_cores
    from .zarr_chunks import ChunkWriter

    keep_freed_memory()

    if chunk_rows % GENERATION_ROWS and GENERATION_ROWS % chunk_rows:
        raise ValueError(f"chunk_rows must divide or be a multiple of {GENERATION_ROWS}")
    group = zarr.open_group(str(path), mode="w")
    labels = group.create_array("labels", shape=(spec.rows,), chunks=(chunk_rows,), dtype="int64")
    probs = group.create_array(
        "pred_probs", shape=(spec.rows, spec.classes), chunks=(chunk_rows, spec.classes), dtype=spec.dtype,
        **({} if compress else {"compressors": None}),
    )
    n_blocks = -(-spec.rows // GENERATION_ROWS)
    per_task = max(1, chunk_rows // GENERATION_ROWS)
    writer = ChunkWriter.for_array(probs)

    def write(first: int) -> np.ndarray:
        parts = [generate_block(spec, b) for b in range(first, min(first + per_task, n_blocks))]
        start = first * GENERATION_ROWS
        stop = start + sum(len(p[0]) for p in parts)
        lab, pp, fl = (p[0] if len(parts) == 1 else np.concatenate(p) for p in zip(*parts))
        labels[start:stop] = lab
        if writer is None or not writer.write(start, pp):
            probs[start:stop] = pp
        return np.flatnonzero(fl) + start

    with ThreadPoolExecutor(threads or 2 * usable_cores(), thread_name_prefix="synthetic") as pool:
        flipped = list(pool.map(write, range(0, n_blocks, per_task)))
    flips = np.concatenate(flipped).astype(np.int64)
    group.create_array("flipped", data=flips, chunks=(max(1, min(len(flips), 1 << 20)),))
    group.attrs.update({"rows": spec.rows, "classes": spec.classes, "noise": spec.noise, "seed": spec.seed})


@dataclass(frozen=True)
class SegmentationSpec:
    """A noisy segmentation dataset: label maps of a few rectangles on a
    background, a model whose soft predictions follow the true map (less
    sure near region boundaries), and a fraction ``noise`` of images with
    one region relabelled to another class."""

    images: int
    classes: int
    height: int = 32
    width: int = 32
    noise: float = 0.3
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.images < 1 or self.classes < 2 or self.height < 4 or self.width < 4:
            raise ValueError("need images >= 1, classes >= 2, height and width >= 4")
        if not 0 <= self.noise <= 1:
            raise ValueError(f"noise must be in [0, 1], got {self.noise!r}")


def segmentation_images(spec: SegmentationSpec, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images ``start:stop``: ``(labels (n, H, W), pred_probs (n, K, H, W),
    relabelled (n, H, W) bool)``; image ``i`` is drawn from a generator
    seeded with ``(seed, i)``, so the data do not depend on how they are
    written."""
    k, h, w = spec.classes, spec.height, spec.width
    n = stop - start
    labels = np.empty((n, h, w), dtype=np.int64)
    probs = np.empty((n, k, h, w), dtype=spec.dtype)
    relabelled = np.zeros((n, h, w), dtype=bool)
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    for j in range(n):
        rng = np.random.default_rng([spec.seed, start + j])
        truth = np.full((h, w), rng.integers(0, k), dtype=np.int64)
        for _ in range(int(rng.integers(2, 6))):
            y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
            y1, x1 = y0 + rng.integers(2, h // 2 + 2), x0 + rng.integers(2, w // 2 + 2)
            truth[y0:y1, x0:x1] = rng.integers(0, k)
        # Distance to the nearest pixel of another class, up to 3: the model
        # is surest inside regions.
        edge = np.zeros((h, w), dtype=bool)
        edge[1:] |= truth[1:] != truth[:-1]
        edge[:-1] |= truth[:-1] != truth[1:]
        edge[:, 1:] |= truth[:, 1:] != truth[:, :-1]
        edge[:, :-1] |= truth[:, :-1] != truth[:, 1:]
        logits = rng.normal(0.0, 1.0, (k, h, w))
        logits[truth, rows, cols] += np.where(edge, 1.0, 4.0) + rng.gamma(2.0, 0.5, (h, w))
        e = np.exp(logits - logits.max(axis=0))
        probs[j] = e / e.sum(axis=0)
        labels[j] = truth
        if rng.random() < spec.noise:
            y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
            y1, x1 = y0 + rng.integers(3, h // 3 + 4), x0 + rng.integers(3, w // 3 + 4)
            labels[j, y0:y1, x0:x1] = (truth[y0:y1, x0:x1] + rng.integers(1, k)) % k
            relabelled[j] = labels[j] != truth
    return labels, probs, relabelled
