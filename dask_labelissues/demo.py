"""The built-in demos: a synthetic noisy dataset, the job, its score.

The data are written to a Zarr store chunk by chunk on every core (never
whole in memory), the job runs where the command says (threads in this
process by default, or a Dask cluster), and the result is scored against
the labels that were changed on purpose: flipped rows for
:func:`run_demo`, relabelled pixels for :func:`run_segmentation_demo`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .synthetic import SegmentationSpec, SyntheticSpec, segmentation_images, write_zarr


@dataclass
class DemoReport:
    rows: int
    classes: int
    seconds: float
    write_seconds: float
    num_issues: int
    flipped: int
    precision: float
    recall: float
    worst: list[dict[str, Any]]
    data_path: str | None
    results_path: str | None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


def run_demo(
    *,
    rows: int = 2_000_000,
    classes: int = 100,
    noise: float = 0.1,
    seed: int = 0,
    backend: str = "auto",
    client: Any = None,
    keep: str | None = None,
    progress: bool = False,
    log: Any = sys.stderr,
) -> DemoReport:
    """Write a synthetic dataset, find its label issues, score them.

    Parameters
    ----------
    rows, classes, noise, seed
        The synthetic dataset (float32 pred_probs; ``noise`` of the labels flipped).
    backend, client
        Where the job runs, as for :func:`dask_labelissues.find_label_issues`
        (default: threads in this process, or the Dask cluster ``client``
        belongs to).
    keep
        Directory to keep the data (``data.zarr``) and results
        (``results.zarr``) in; default: a temporary directory, removed after.
    progress
        Progress bars on stderr.
    log
        Where to print what is happening.
    """
    from .api import find_label_issues

    spec = SyntheticSpec(rows=rows, classes=classes, noise=noise, seed=seed)
    workdir = os.path.abspath(keep) if keep else tempfile.mkdtemp(prefix="dask-labelissues-demo-")
    os.makedirs(workdir, exist_ok=True)
    data_path = os.path.join(workdir, "data.zarr")
    try:
        print(f"writing {rows:,} x {classes} synthetic rows to {data_path} ...", file=log, flush=True)
        t0 = time.perf_counter()
        chunk_rows = _storage_chunk_rows(classes)
        # The probabilities are random noise that zstd would shrink by 8%
        # at a quarter of the writing time: stored uncompressed.
        write_zarr(spec, data_path, chunk_rows=chunk_rows, compress=False)
        write_seconds = time.perf_counter() - t0

        import zarr

        group = zarr.open_group(data_path, mode="r")
        t0 = time.perf_counter()
        result = find_label_issues(
            group["labels"], group["pred_probs"], backend=backend, client=client, progress=progress
        )
        seconds = time.perf_counter() - t0
        results_path = None
        if keep:
            results_path = result.to_zarr(
                os.path.join(workdir, "results.zarr"), overwrite=True, client=client,
                attrs={"labels": f"{data_path}:labels", "pred_probs": f"{data_path}:pred_probs"},
            )
        worst = worst_rows(result, 10)
        flipped = group["flipped"][:]
        hits = np.intersect1d(result.issues, flipped).size
        return DemoReport(
            rows=rows,
            classes=classes,
            seconds=seconds,
            write_seconds=write_seconds,
            num_issues=result.num_issues,
            flipped=int(flipped.size),
            precision=hits / result.num_issues if result.num_issues else float("nan"),
            recall=hits / flipped.size if flipped.size else float("nan"),
            worst=worst,
            data_path=data_path if keep else None,
            results_path=results_path,
        )
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _storage_chunk_rows(classes: int) -> int:
    """About 32 MB of float32 per chunk, in whole generation blocks."""
    from .synthetic import GENERATION_ROWS

    blocks = max(1, (32 * 2**20) // (classes * 4 * GENERATION_ROWS))
    return blocks * GENERATION_ROWS


def worst_rows(result: Any, top: int) -> list[dict[str, Any]]:
    """The ``top`` most likely mislabeled rows with their labels and scores."""
    # Issues may be stored in row order (--row-order): pick by score.
    pick = np.lexsort((result.issues, result.issue_scores))[:top]
    rows = result.rows(result.issues[pick])
    return [
        {"index": int(i), "given_label": int(g), "predicted_label": int(p), "score": float(s)}
        for i, g, p, s in zip(rows["index"], rows["given_label"], rows["predicted_label"],
                              result.issue_scores[pick])
    ]


# -- semantic segmentation ----------------------------------------------------------------
@dataclass
class SegmentationDemoReport:
    """What :func:`run_segmentation_demo` found, scored against the pixels
    relabelled on purpose.

    An image counts as *relabelled* if any of its pixels was, and as
    *flagged* if any of its pixels was flagged.  Precisions and recalls are
    NaN where their denominator is 0.
    """

    images: int
    classes: int
    height: int
    width: int
    noise: float
    #: Seconds to write the Zarr store.
    write_seconds: float
    #: Seconds of ``find_issues`` and of ``get_label_quality_scores``.
    find_seconds: float
    score_seconds: float
    #: T: confident learning's estimate of the number of pixel issues.
    estimated_num_issues: int
    flagged_pixels: int
    relabelled_pixels: int
    #: Pixels both flagged and relabelled.
    found_pixels: int
    pixel_precision: float
    pixel_recall: float
    flagged_images: int
    relabelled_images: int
    #: Images both flagged and relabelled.
    found_images: int
    image_precision: float
    image_recall: float
    #: Share of relabelled images among the ``relabelled_images`` lowest
    #: image scores (ties by index).
    ranking_precision: float
    #: The lowest-scored images: ``index``, ``score``, ``flagged_pixels``,
    #: ``relabelled_pixels``.
    worst: list[dict[str, Any]]
    #: The store, when ``path`` was given (else it was removed).
    data_path: str | None

    @property
    def seconds(self) -> float:
        """Seconds of the two jobs together."""
        return self.find_seconds + self.score_seconds


def segmentation_chunk_images(spec: SegmentationSpec, target_bytes: int = 8 * 2**20) -> int:
    """Images per storage chunk: about ``target_bytes`` of pred_probs, at least one."""
    per_image = spec.classes * spec.height * spec.width * np.dtype(spec.dtype).itemsize
    return int(max(1, min(spec.images, target_bytes // per_image)))


def write_segmentation_zarr(
    spec: SegmentationSpec,
    path: str | os.PathLike,
    chunk_images: int | None = None,
    threads: int | None = None,
) -> None:
    """Write a synthetic segmentation dataset to a Zarr v3 group, a chunk at a time.

    Parameters
    ----------
    spec
        The dataset (:class:`dask_labelissues.synthetic.SegmentationSpec`).
    path
        The group to create (replaced if it exists).
    chunk_images
        Images per storage chunk; default about 8 MB of pred_probs
        (:func:`segmentation_chunk_images`).
    threads
        Threads generating and writing chunks (default: two per core).
        Each writes whole chunks, so memory holds about ``threads``
        chunks; the data do not depend on it.

    Notes
    -----
    The group holds ``labels`` ``(N, H, W)`` (uint8 up to 256 classes,
    else int64), ``pred_probs`` ``(N, K, H, W)`` (``spec.dtype``, stored
    uncompressed: random probabilities barely compress) and
    ``relabelled`` ``(N, H, W)`` bool, the pixels whose label was changed
    on purpose, all chunked by images.  Like
    :func:`dask_labelissues.synthetic.write_zarr`, sets this process's
    allocator to keep freed arrays for reuse.
    """
    import zarr

    from .system import keep_freed_memory, usable_cores

    keep_freed_memory()

    n, k, h, w = spec.images, spec.classes, spec.height, spec.width
    chunk = int(chunk_images or segmentation_chunk_images(spec))
    if chunk < 1:
        raise ValueError(f"chunk_images must be >= 1, got {chunk_images}")
    label_dtype = "uint8" if k <= 256 else "int64"
    group = zarr.open_group(str(path), mode="w")
    labels = group.create_array("labels", shape=(n, h, w), chunks=(chunk, h, w), dtype=label_dtype)
    probs = group.create_array(
        "pred_probs", shape=(n, k, h, w), chunks=(chunk, k, h, w), dtype=spec.dtype, compressors=None,
    )
    relabelled = group.create_array("relabelled", shape=(n, h, w), chunks=(chunk, h, w), dtype="bool")

    def write(start: int) -> None:
        stop = min(start + chunk, n)
        lab, pp, rel = segmentation_images(spec, start, stop)
        labels[start:stop] = lab.astype(label_dtype, copy=False)
        probs[start:stop] = pp
        relabelled[start:stop] = rel

    starts = range(0, n, chunk)
    with ThreadPoolExecutor(min(threads or 2 * usable_cores(), len(starts)), thread_name_prefix="segmentation") as pool:
        list(pool.map(write, starts))
    group.attrs.update({
        "images": n, "classes": k, "height": h, "width": w, "noise": spec.noise, "seed": spec.seed,
    })


def run_segmentation_demo(
    images: int = 500,
    classes: int = 10,
    height: int = 64,
    width: int = 64,
    noise: float = 0.3,
    client: Any = None,
    path: str | os.PathLike | None = None,
    seed: int = 0,
) -> SegmentationDemoReport:
    """Write a synthetic segmentation dataset, find its pixel issues, score them.

    The dataset (:class:`dask_labelissues.synthetic.SegmentationSpec`):
    label maps of a few rectangles, a model that knows the true map but is
    less sure near region boundaries, and in a share ``noise`` of the
    images one region relabelled to a wrong class.  It is written to a
    Zarr store chunk by chunk (:func:`write_segmentation_zarr`), then
    :func:`dask_labelissues.segmentation.find_issues` and
    :func:`~dask_labelissues.segmentation.get_label_quality_scores` run on
    the stored arrays, and their results are compared with the relabelled
    pixels.

    Parameters
    ----------
    images, classes, height, width, noise, seed
        The synthetic dataset.  The defaults (82 MB of float32 pred_probs)
        run in a few seconds on two cores.
    client
        A ``distributed.Client`` to run the jobs on; default: threads in
        this process (or the current Client, if there is one).
    path
        Where to write the store (and keep it); default: a temporary
        directory, removed after.

    Returns
    -------
    SegmentationDemoReport
        Counts, precisions and recalls, per pixel and per image, and the
        worst-scored images.

    Notes
    -----
    At the defaults (seed 0) the flagged pixels are almost all relabelled
    ones (pixel precision about 0.99) and about two thirds of the
    relabelled pixels are found: confident learning's estimate T is below
    their true number.  Every relabelled image has flagged pixels, but so
    do about a third of the clean images, with one or two flagged pixels
    each on a region boundary, where the synthetic model is unsure: image
    precision is about 0.57.  The image scores rank the relabelled images
    first (ranking precision about 1.0).
    """
    import zarr

    from . import segmentation

    spec = SegmentationSpec(images=images, classes=classes, height=height, width=width, noise=noise, seed=seed)
    workdir = None
    if path is None:
        workdir = tempfile.mkdtemp(prefix="dask-labelissues-segmentation-")
        store = os.path.join(workdir, "data.zarr")
    else:
        store = os.path.abspath(os.fspath(path))
    try:
        t0 = time.perf_counter()
        write_segmentation_zarr(spec, store)
        write_seconds = time.perf_counter() - t0

        group = zarr.open_group(store, mode="r")
        labels, pred_probs = group["labels"], group["pred_probs"]
        t0 = time.perf_counter()
        found = segmentation.find_issues(labels, pred_probs, client=client)
        find_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        image_scores, _ = segmentation.get_label_quality_scores(labels, pred_probs, client=client)
        score_seconds = time.perf_counter() - t0
        image_scores = np.asarray(image_scores)
        mask = found.mask

        # Scored a storage chunk at a time against the relabelled pixels.
        relabelled = group["relabelled"]
        step = int(relabelled.chunks[0])
        flagged_per_image = np.zeros(images, dtype=np.int64)
        relabelled_per_image = np.zeros(images, dtype=np.int64)
        found_pixels = 0
        for a in range(0, images, step):
            b = min(a + step, images)
            m = np.asarray(mask[a:b], dtype=bool)
            r = np.asarray(relabelled[a:b], dtype=bool)
            flagged_per_image[a:b] = m.sum(axis=(1, 2))
            relabelled_per_image[a:b] = r.sum(axis=(1, 2))
            found_pixels += int(np.count_nonzero(m & r))
        flagged_pixels = int(flagged_per_image.sum())
        relabelled_pixels = int(relabelled_per_image.sum())
        flagged_images = flagged_per_image > 0
        relabelled_images = relabelled_per_image > 0
        found_images = int(np.count_nonzero(flagged_images & relabelled_images))
        ranking = np.argsort(image_scores, kind="stable")
        n_relabelled = int(relabelled_images.sum())
        worst = [
            {"index": int(i), "score": float(image_scores[i]),
             "flagged_pixels": int(flagged_per_image[i]), "relabelled_pixels": int(relabelled_per_image[i])}
            for i in ranking[:10]
        ]
        return SegmentationDemoReport(
            images=images,
            classes=classes,
            height=height,
            width=width,
            noise=noise,
            write_seconds=write_seconds,
            find_seconds=find_seconds,
            score_seconds=score_seconds,
            estimated_num_issues=int(found.estimated_num_issues),
            flagged_pixels=flagged_pixels,
            relabelled_pixels=relabelled_pixels,
            found_pixels=found_pixels,
            pixel_precision=_ratio(found_pixels, flagged_pixels),
            pixel_recall=_ratio(found_pixels, relabelled_pixels),
            flagged_images=int(flagged_images.sum()),
            relabelled_images=n_relabelled,
            found_images=found_images,
            image_precision=_ratio(found_images, int(flagged_images.sum())),
            image_recall=_ratio(found_images, n_relabelled),
            ranking_precision=_ratio(int(relabelled_images[ranking[:n_relabelled]].sum()), n_relabelled),
            worst=worst,
            data_path=store if path is not None else None,
        )
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")
