"""Semantic segmentation: cleanlab.segmentation's functions, on any engine.

Every pixel is one item of batched confident learning, as in
``cleanlab.segmentation``, with labels ``(N, H, W)`` and pred_probs
``(N, K, H, W)`` (float32 or float16) read a block of whole images at a
time, from numpy, ``.npy``, Zarr (v2 or v3), HDF5 or dask arrays, on one
machine or a Dask cluster.  Differences from cleanlab:

- the confident thresholds are exact over all pixels, and a class no pixel
  is labelled with gets 2.0 (cleanlab's batched estimate gives it about
  0, which flags pixels predicted as that class);
- ties among the T lowest scores are taken by pixel index (image, row,
  column), where cleanlab's sort takes any of them;
- bad values are refused with the image and pixel they are at;
- :func:`issues_from_scores` returns the images scored below the threshold
  (cleanlab's also returns the first one at or above it);
- :func:`common_label_issues` prints its table only with ``verbose=True``
  (cleanlab's default), and :func:`display_issues` draws 4 images by
  default (cleanlab's 20) in one figure, which it returns.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Sequence

import numpy as np

from . import inputs
from .engines import make_engine
from .kernels import ScoreSpec
from .kinds import Pixels
from .pipelines import PixelResult, run_pixel_scores, run_segmentation, warm_up
from .states import located

__all__ = [
    "common_label_issues",
    "display_issues",
    "filter_by_class",
    "find_label_issues",
    "get_label_quality_scores",
    "issues_from_scores",
]

#: cleanlab.segmentation's batch size, in values of pred_probs.
CLEANLAB_BATCH_SIZE = 10000


def find_label_issues(
    labels: Any,
    pred_probs: Any,
    *,
    batch_size: int | None = None,
    n_jobs: int | None = None,
    verbose: bool = False,
    downsample: int = 1,
    backend: str = "auto",
    client: Any = None,
    images_per_block: int | None = None,
    row_sum_tolerance: float | None = 1e-3,
    ignore_index: int | None = None,
) -> Any:
    """The pixels whose given label is likely wrong, as an ``(N, H, W)`` mask.

    Parameters
    ----------
    labels
        ``(N, H, W)`` integer class indices in ``0..K-1``.
    pred_probs
        ``(N, K, H, W)`` predicted class probabilities of every pixel
        (float32 or float16), summing to 1 over axis 1.
    batch_size
        cleanlab's streaming batch, in values of pred_probs: blocks of
        ``batch_size // (K * H * W)`` images (at least one) when
        ``images_per_block`` is not given.  Changes memory and speed only.
    n_jobs
        Threads or processes of the one-machine engines.
    verbose
        Show progress bars (cleanlab's default is True; here False).
    downsample
        Find issues on ``downsample`` x ``downsample`` tiles (labels the
        rounded mean, probabilities the renormalized mean), then check
        every pixel of a flagged tile: H and W must divide by it.
    backend, client
        The engine (see :func:`dask_labelissues.find_label_issues`).
    images_per_block
        Images per block; default about 64 MB of pred_probs.
    row_sum_tolerance
        How far a pixel's K probabilities may sum from 1.  The default
        1e-3 also holds float16 predictions, whose rounding moves a sum by
        at most 2**-11 (about 4.9e-4); None skips the check.
    ignore_index
        A label that marks pixels to leave out (often 255, or -100): they
        add nothing to the thresholds, the count or the selection, their
        probabilities are not checked, and they are never flagged.  With
        ``downsample``, a tile pools only its other pixels.  cleanlab has
        no such option (it fails on such labels).

    Returns
    -------
    numpy.ndarray or dask.array.Array
        ``(N, H, W)`` bool: True where a pixel's label is likely wrong.  A
        dask array (lazy) where an input is one, else numpy.

    Raises
    ------
    ValueError
        Wrong shapes, or a bad value (NaN, inf, negative, a pixel not
        summing to 1, a label outside ``0..K-1``), named by image and pixel.
    """
    result = find_issues(
        labels, pred_probs, batch_size=batch_size, n_jobs=n_jobs, verbose=verbose, downsample=downsample,
        backend=backend, client=client, images_per_block=images_per_block, row_sum_tolerance=row_sum_tolerance,
        ignore_index=ignore_index,
    )
    return result.mask


def find_issues(
    labels: Any, pred_probs: Any, *, downsample: int = 1, temperature: float | None = None, **options: Any
) -> PixelResult:
    """:func:`find_label_issues`'s job, with what it finds besides the mask.

    Parameters
    ----------
    labels, pred_probs, downsample
        As in :func:`find_label_issues`.
    temperature
        Also score the images and pixels as :func:`get_label_quality_scores`
        does (softmin at this temperature), in the same job: the one read
        of pred_probs gives the mask and the scores.  Only without
        ``downsample``: its items are tiles, and the scores are per pixel,
        so the scores are then left as None.
    **options
        Those of :func:`find_label_issues`.

    Returns
    -------
    PixelResult
        The mask as :func:`find_label_issues` returns it; T, the
        thresholds, pixels per given label, the K x K counts of (given,
        predicted) over the flagged pixels (what :func:`common_label_issues`
        counts, here without reading pred_probs again) and the reads of
        pred_probs made; with ``temperature`` and no ``downsample``,
        ``image_scores`` and ``pixel_scores`` as
        :func:`get_label_quality_scores` returns them, else None.

    Raises
    ------
    ValueError
        As :func:`find_label_issues`; or a ``temperature`` of 0.
    """
    if temperature is not None and not temperature:
        raise ValueError("temperature must be a number other than 0")
    temperature = None if temperature is None else float(temperature)
    lab, probs, shape = _open(labels, pred_probs, downsample)
    engine, spec = _engine(lab, probs, shape, downsample, **options)
    try:
        with _located(engine, shape):
            result = run_segmentation(engine, spec, shape[2:], downsample, temperature)
    finally:
        engine.close()
    client = getattr(engine, "client", None)
    result.mask = _out(result.mask, labels, pred_probs, client)
    if result.pixel_scores is not None:
        result.pixel_scores = _out(result.pixel_scores, labels, pred_probs, client)
    return result


def get_label_quality_scores(
    labels: Any,
    pred_probs: Any,
    *,
    method: str = "softmin",
    batch_size: int | None = None,
    n_jobs: int | None = None,
    verbose: bool = False,
    temperature: float = 0.1,
    downsample: int = 1,
    backend: str = "auto",
    client: Any = None,
    images_per_block: int | None = None,
    row_sum_tolerance: float | None = 1e-3,
    ignore_index: int | None = None,
) -> tuple[np.ndarray, Any]:
    """A score per image and per pixel: lower is more likely mislabeled.

    Parameters
    ----------
    labels, pred_probs, batch_size, n_jobs, verbose, backend, client, images_per_block, row_sum_tolerance
        As in :func:`find_label_issues`.
    ignore_index
        As in :func:`find_label_issues`: ignored pixels score 1 and weigh
        nothing in their image's score (an image of nothing else scores
        1); ``"num_pixel_issues"`` counts the fraction among the others.
    method
        ``"softmin"``: each image's pixel scores weighted by a softmax of
        ``(1 - score) / temperature`` (one read of pred_probs);
        ``"num_pixel_issues"``: 1 minus the fraction of the image's pixels
        :func:`find_label_issues` flags.
    temperature
        Softmin's temperature: lower values move the image score towards
        its worst pixel's.
    downsample
        ``"num_pixel_issues"`` only, as in :func:`find_label_issues`; with
        ``"softmin"`` it is ignored with a warning, as cleanlab does.

    Returns
    -------
    image_scores : numpy.ndarray
        ``(N,)`` float64, in [0, 1].
    pixel_scores : numpy.ndarray or dask.array.Array
        ``(N, H, W)`` float64: each pixel's probability of its given label
        (1 for an ignored pixel).
    """
    if method not in ("softmin", "num_pixel_issues"):
        raise ValueError(f"method={method!r} is not one of softmin, num_pixel_issues")
    if not temperature:
        raise ValueError("temperature must be a number other than 0")
    if downsample != 1 and method != "num_pixel_issues":
        # cleanlab warns and scores every pixel; so do we.
        warnings.warn(f"downsample={downsample} applies to method='num_pixel_issues' only; "
                      f"method={method!r} scores every pixel", UserWarning, stacklevel=2)
        downsample = 1
    lab, probs, shape = _open(labels, pred_probs, 1)
    engine, spec = _engine(
        lab, probs, shape, 1, backend=backend, client=client, n_jobs=n_jobs, batch_size=batch_size,
        images_per_block=images_per_block, verbose=verbose, row_sum_tolerance=row_sum_tolerance,
        ignore_index=ignore_index,
    )
    try:
        with _located(engine, shape):
            image_scores, pixel_scores = run_pixel_scores(engine, spec, shape[2:], float(temperature))
    finally:
        engine.close()
    if method == "num_pixel_issues":
        mask = find_label_issues(
            labels, pred_probs, downsample=downsample, backend=backend, client=client, n_jobs=n_jobs,
            batch_size=batch_size, images_per_block=images_per_block, row_sum_tolerance=row_sum_tolerance,
            ignore_index=ignore_index,
        )
        if ignore_index is None:
            image_scores = 1.0 - inputs.to_numpy(mask.mean(axis=(1, 2))).astype(np.float64)
        else:
            image_scores = 1.0 - _flagged_share(mask, labels, ignore_index)
    return image_scores, _out(pixel_scores, labels, pred_probs, getattr(engine, "client", None))


def issues_from_scores(image_scores: Any, pixel_scores: Any = None, threshold: float = 0.1) -> np.ndarray:
    """The issues the scores point to.

    With ``pixel_scores``, the ``(N, H, W)`` mask of pixels scored below
    ``threshold``; else the images scored below it, lowest first (ties by
    index).
    """
    if image_scores is None:
        raise ValueError("image_scores must be given")
    if threshold is None or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if pixel_scores is not None:
        return pixel_scores < threshold
    image_scores = np.asarray(image_scores)
    ranking = np.argsort(image_scores, kind="stable")
    return ranking[: int(np.count_nonzero(image_scores < threshold))]


def pair_table(
    counts: np.ndarray, class_names: Sequence[str] | None = None, exclude: Sequence[int] | None = None,
    top: int | None = None,
) -> Any:
    """K x K counts of (given, predicted) as :func:`common_label_issues`'s
    table: its non-zero pairs, most common first (ties in class order)."""
    import pandas as pd

    counts = np.array(counts, dtype=np.int64)
    k = counts.shape[0]
    names = [str(i) for i in range(k)] if class_names is None else list(class_names)
    if exclude:
        counts[:, list(exclude)] = 0
    given, predicted = np.nonzero(counts)
    rows = sorted(
        ((names[g], names[p], int(counts[g, p])) for g, p in zip(given.tolist(), predicted.tolist())),
        key=lambda row: row[2], reverse=True,
    )[: 20 if top is None else top]
    return pd.DataFrame(rows, columns=["given_label", "predicted_label", "num_pixel_issues"])


def common_label_issues(
    issues: Any,
    labels: Any,
    pred_probs: Any,
    *,
    class_names: Sequence[str] | None = None,
    exclude: Sequence[int] | None = None,
    top: int | None = None,
    verbose: bool = False,
) -> Any:
    """How often each (given label, predicted label) pair is among the
    flagged pixels, most common first, as cleanlab's table.

    Parameters
    ----------
    issues
        ``(N, H, W)`` bool mask (:func:`find_label_issues`).
    labels, pred_probs
        As in :func:`find_label_issues`.
    class_names
        Names of the K classes (default their indices, as strings).
    exclude
        Predicted classes not counted.
    top
        Rows of the table (default 20).
    verbose
        Print a line per row.

    Returns
    -------
    pandas.DataFrame
        Columns ``given_label``, ``predicted_label``, ``num_pixel_issues``.
    """
    table = pair_table(_flagged_pairs(issues, labels, pred_probs), class_names, exclude, top)
    if verbose:
        for given_name, predicted_name, count in table.itertuples(index=False):
            print(
                f"Class '{given_name}' is potentially mislabeled as class for '{predicted_name}' "
                f"{count} pixels in the dataset"
            )
    return table


def display_issues(
    issues: Any,
    labels: Any,
    pred_probs: Any,
    *,
    class_names: Sequence[str] | None = None,
    exclude: Sequence[int] | None = None,
    top: int = 4,
    path: str | os.PathLike | None = None,
    ignore_index: int | None = None,
) -> Any:
    """The images with the most flagged pixels: given labels, predicted
    labels and flagged pixels side by side, as cleanlab's ``display_issues``.

    One row per image (:func:`dask_labelissues.plot.segmentation_figure`),
    the images with the most flagged pixels first (ties by index); images
    with no flagged pixel are not shown.  ``issues`` is read whole, in
    blocks, to count the flagged pixels per image; ``labels`` and
    ``pred_probs`` only at the images drawn, one image at a time.

    Unlike cleanlab's, this returns the figure rather than showing it
    (a notebook shows a returned figure), and needs ``labels`` and
    ``pred_probs``.  Needs matplotlib.

    Parameters
    ----------
    issues
        ``(N, H, W)`` bool mask (:func:`find_label_issues`): numpy, Zarr,
        dask or any array of these shapes.
    labels, pred_probs
        As in :func:`find_label_issues`.
    class_names
        Names of the K classes, for the legend (default ``"class <index>"``).
    exclude
        Classes whose flagged pixels are not shown: pixels flagged whose
        given label is one of these (as cleanlab).  The images are still
        chosen by all their flagged pixels, as cleanlab chooses them.
    top
        How many images at most.
    path
        Also write the figure there (PNG, or any format matplotlib writes
        by the file's extension).
    ignore_index
        The label of pixels left out (as in :func:`find_label_issues`):
        drawn in their own colour, not as a class.

    Returns
    -------
    matplotlib.figure.Figure
        With ``3 * n`` axes for the ``n`` images shown (at most ``top``),
        labelled ``"given <image>"``, ``"predicted <image>"`` and
        ``"flagged <image>"``; none when no pixel is flagged.

    Raises
    ------
    ValueError
        Shapes that do not agree, ``top`` < 1, or a class of ``exclude`` or
        ``class_names`` of the wrong length.
    """
    from .plot import DPI, segmentation_figure

    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ValueError(f"top must be a whole number >= 1, got {top!r}")
    flags = issues if inputs.is_dask_array(issues) else inputs.open_source(issues, "issues")
    lab = inputs.open_source(labels, "labels")
    probs = inputs.open_source(pred_probs, "pred_probs")
    if len(flags.shape) != 3:
        raise ValueError(f"issues must be 3-D (N, H, W), got shape {tuple(flags.shape)}")
    n, h, w = (int(s) for s in flags.shape)
    if tuple(int(s) for s in lab.shape) != (n, h, w):
        raise ValueError(f"labels have shape {tuple(lab.shape)} but issues {(n, h, w)}: they must be the same")
    if len(probs.shape) != 4 or (int(probs.shape[0]), *(int(s) for s in probs.shape[2:])) != (n, h, w):
        raise ValueError(f"pred_probs must be (N, K, H, W) = ({n}, K, {h}, {w}), got shape {tuple(probs.shape)}")
    k = int(probs.shape[1])
    if class_names is not None and len(class_names) != k:
        raise ValueError(f"class_names has {len(class_names)} names for {k} classes")
    excluded = np.asarray(list(exclude or ()), dtype=np.int64)
    if excluded.size and (excluded.min() < 0 or excluded.max() >= k):
        raise ValueError(f"exclude must hold classes in 0..{k - 1}, got {excluded.tolist()}")

    counts = _flagged_per_image(flags)
    chosen = np.argsort(-counts, kind="stable")[:top]
    chosen = chosen[counts[chosen] > 0]
    given, predicted, shown, hidden = [], [], [], []
    for i in chosen.tolist():
        label = inputs.to_numpy(lab[i : i + 1])[0]
        flagged = inputs.to_numpy(flags[i : i + 1]).astype(bool)[0]
        visible = flagged & ~np.isin(label, excluded)
        given.append(label)
        predicted.append(np.asarray(probs[i : i + 1])[0].argmax(axis=0))
        shown.append(visible)
        hidden.append(int(np.count_nonzero(flagged)) - int(np.count_nonzero(visible)))
    empty = np.zeros((0, h, w), dtype=np.int64)
    fig = segmentation_figure(
        chosen,
        np.stack(given) if given else empty,
        np.stack(predicted) if predicted else empty,
        np.stack(shown) if shown else empty.astype(bool),
        class_names=class_names,
        ignore_index=ignore_index,
    )
    for image, count in zip(chosen.tolist(), hidden):
        if count:
            ax = next(a for a in fig.axes if a.get_label() == f"flagged {image}")
            ax.set_title(f"{ax.get_title()}\n{count:,} more of excluded classes hidden", fontsize="medium")
    if path is not None:
        fig.savefig(path, dpi=DPI)
    return fig


def filter_by_class(class_index: int, issues: Any, labels: Any, pred_probs: Any) -> np.ndarray:
    """The flagged pixels given, or predicted as, class ``class_index``."""
    out = []
    for issue, label, probs in _image_blocks(issues, labels, pred_probs):
        out.append(issue & ((label == class_index) | (probs.argmax(axis=1) == class_index)))
    return np.concatenate(out)


# -- helpers ----------------------------------------------------------------------------
def _open(labels: Any, pred_probs: Any, downsample: int) -> tuple[Any, Any, tuple[int, ...]]:
    lab = inputs.open_source(labels, "labels")
    probs = inputs.open_source(pred_probs, "pred_probs")
    for name, arr in (("labels", lab), ("pred_probs", probs)):
        inputs.known_shape(arr, name)
    if len(probs.shape) != 4:
        raise ValueError(f"pred_probs must be 4-D (N, K, H, W), got shape {tuple(probs.shape)}")
    if len(lab.shape) != 3:
        raise ValueError(f"labels must be 3-D (N, H, W), got shape {tuple(lab.shape)}")
    shape = tuple(int(s) for s in probs.shape)
    n, k, h, w = shape
    if np.dtype(probs.dtype).kind != "f":
        raise TypeError(f"pred_probs must be floating point, got dtype {np.dtype(probs.dtype)}")
    if np.dtype(lab.dtype).kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got dtype {np.dtype(lab.dtype)}")
    if tuple(int(s) for s in lab.shape) != (n, h, w):
        if tuple(lab.shape) == (n, k, h):
            # The labels are right; pred_probs has its class axis last.
            raise ValueError(
                f"pred_probs has shape {shape} and labels {tuple(lab.shape)}: pred_probs looks like "
                f"(N, H, W, K) = {shape}; move its class axis second, np.moveaxis(pred_probs, -1, 1), "
                f"to (N, K, H, W) = {(n, w, k, h)}"
            )
        hint = ""
        if tuple(lab.shape) == (n, w, h):
            hint = " (labels look like (N, W, H): the pixel axes of the two differ in order)"
        raise ValueError(
            f"labels have shape {tuple(lab.shape)} but pred_probs {shape}: labels must be (N, H, W) = "
            f"{(n, h, w)}{hint}"
        )
    if k < 2:
        raise ValueError(f"pred_probs must have at least 2 classes (axis 1), got {k}")
    if n == 0:
        raise ValueError("pred_probs has no images (N = 0)")
    if not isinstance(downsample, (int, np.integer)) or downsample < 1:
        raise ValueError(f"downsample must be a whole number >= 1, got {downsample!r}")
    if h % downsample or w % downsample:
        raise ValueError(
            f"height {h} and width {w} must both divide by downsample={downsample}; "
            "set downsample=1 to work on every pixel"
        )
    return lab, probs, shape


def _engine(
    lab: Any, probs: Any, shape: tuple[int, ...], downsample: int, *, backend: str = "auto", client: Any = None,
    n_jobs: int | None = None, batch_size: int | None = None, images_per_block: int | None = None,
    verbose: bool = False, row_sum_tolerance: float | None = 1e-3, ignore_index: int | None = None,
) -> tuple[Any, ScoreSpec]:
    if images_per_block is None and batch_size is not None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        images_per_block = max(int(batch_size) // int(np.prod(shape[1:])), 1)
    spec = ScoreSpec("self_confidence", False, "off_diagonal", row_sum_tolerance)
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer))):
        raise TypeError(f"ignore_index must be an integer label, got {ignore_index!r}")
    kind = Pixels(
        downsample=int(downsample), ignore_index=None if ignore_index is None else int(ignore_index), classes=shape[1],
    )
    engine, _, _ = make_engine(
        backend, lab, probs, spec, single_read=downsample == 1, chunk_rows=images_per_block,
        n_jobs=n_jobs, client=client, progress=verbose, kind=kind,
        warm_up=lambda s: warm_up(s, None, kind.n_classes(shape), probs.dtype, planes=True),
    )
    return engine, engine.plan.spec


def _located(engine: Any, shape: tuple[int, ...]) -> Any:
    """Bad values named by the image and pixel they are at."""
    return located(lambda item: engine.kind.where(item, shape), _ignore_hint)


def _ignore_hint(message: str) -> str:
    if re.search(r"= 255 is not a class", message):
        message += " (255 often marks pixels to ignore: pass ignore_index=255, or --ignore-index 255, to leave them out)"
    return message


def _out(array: Any, labels: Any, pred_probs: Any, client: Any) -> Any:
    """Dask in, dask out (its blocks held on ``client``'s cluster when the
    job ran on one: as any collection persisted there, it is computed by
    that client, ``client.compute(array)``, or with it current); numpy
    otherwise, computed on the job's cluster."""
    if inputs.is_dask_array(labels) or inputs.is_dask_array(pred_probs):
        return array if client is None else client.persist(array)
    if client is not None:
        return np.asarray(client.compute(array).result())
    return np.asarray(array)


def _image_blocks(issues: Any, labels: Any, pred_probs: Any, rows: int = 64) -> Any:
    """``(issues, labels, pred_probs)`` of ``rows`` images at a time."""
    n = int(np.shape(issues)[0]) if hasattr(issues, "shape") else len(issues)
    lab = inputs.open_source(labels, "labels")
    probs = inputs.open_source(pred_probs, "pred_probs")
    for a in range(0, n, rows):
        b = min(a + rows, n)
        yield (inputs.to_numpy(issues[a:b]).astype(bool, copy=False), inputs.to_numpy(lab[a:b]),
               inputs.to_numpy(probs[a:b]))


def _flagged_share(mask: Any, labels: Any, ignore_index: int) -> np.ndarray:
    """Each image's flagged pixels as a share of its pixels not ignored (0
    where all are)."""
    lab = inputs.open_source(labels, "labels")
    n = int(lab.shape[0])
    flagged = inputs.to_numpy(mask.sum(axis=(1, 2))).astype(np.float64)
    kept = np.concatenate([
        (inputs.to_numpy(lab[a : a + 64]) != ignore_index).sum(axis=(1, 2)) for a in range(0, n, 64)
    ]).astype(np.float64)
    return np.divide(flagged, kept, out=np.zeros(n), where=kept > 0)


def _flagged_per_image(issues: Any, rows: int = 64) -> np.ndarray:
    """Flagged pixels of each image of an ``(N, H, W)`` mask, read ``rows`` images at a time."""
    if inputs.is_dask_array(issues):
        return inputs.to_numpy(issues.astype(bool).sum(axis=(1, 2))).astype(np.int64)
    n = int(issues.shape[0])
    counts = np.zeros(n, dtype=np.int64)
    for a in range(0, n, rows):
        counts[a : a + rows] = np.count_nonzero(np.asarray(issues[a : a + rows]), axis=(1, 2))
    return counts


def _flagged_pairs(issues: Any, labels: Any, pred_probs: Any) -> np.ndarray:
    """K x K counts of (given, argmax) over the flagged pixels."""
    k = int(pred_probs.shape[1])
    counts = np.zeros((k, k), dtype=np.int64)
    for issue, label, probs in _image_blocks(issues, labels, pred_probs):
        flagged = np.nonzero(issue)
        given = label[flagged]
        predicted = probs.transpose(0, 2, 3, 1)[flagged].argmax(axis=1)
        np.add.at(counts, (given, predicted), 1)
    return counts
