"""dask_labelissues.segmentation against cleanlab.segmentation (the oracle).

The masks, scores and summaries must equal cleanlab 2.9's wherever the
module does not document a difference; where it does (absent classes,
ties at the cut-off, bad values, :func:`issues_from_scores`' extra image,
zarr 3), the tests pin this package's behaviour and show cleanlab's.

Parity with cleanlab's masks holds only where cleanlab's own answer is
determined: its batched thresholds must give the same estimated number of
issues T as exact ones, and no two scores may tie across the cut-off
(cleanlab ranks with an unstable sort, so it takes any of tied pixels).
:func:`cut_is_determined` checks both on the very batches cleanlab saw
before a mask is compared.
"""

from __future__ import annotations

import collections
import functools
import re

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import zarr
from cleanlab.experimental.label_issues_batched import LabelInspector
from cleanlab.segmentation import filter as cl_filter
from cleanlab.segmentation import rank as cl_rank
from cleanlab.segmentation import summary as cl_summary

import dask_labelissues
from dask_labelissues import segmentation
from dask_labelissues.synthetic import SegmentationSpec, segmentation_images

from .conftest import runs_on

# A real cluster for the last test; importing the fixture (not copying it)
# keeps one definition of how the package's LocalCluster is started.

N_IMAGES = 25  # not a multiple of 2, 3 or 4: every chunking has a ragged last block
SIDE = 32
# Seed 2 is the first whose every (K, dtype, downsample) case has a determined
# cut-off (seed 1's float16 K=5 data tie there); cut_is_determined checks it.
SEED = 2


@functools.lru_cache(maxsize=None)
def images(k: int, dtype: str = "float32", n: int = N_IMAGES, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic ``(labels, pred_probs)``, read-only so that no function
    under test can change another test's data."""
    labels, probs, _ = segmentation_images(SegmentationSpec(n, k, SIDE, SIDE, seed=seed, dtype=dtype), 0, n)
    labels.setflags(write=False)
    probs.setflags(write=False)
    return labels, probs


class RecordingInspector(LabelInspector):
    """cleanlab's LabelInspector, keeping the batches it was given."""

    made: list["RecordingInspector"] = []

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.batches: list[tuple[np.ndarray, np.ndarray]] = []
        RecordingInspector.made.append(self)

    def update_confident_thresholds(self, labels, pred_probs):
        self.batches.append((np.asarray(labels), np.asarray(pred_probs)))
        return super().update_confident_thresholds(labels, pred_probs)


@pytest.fixture
def cleanlab_find(monkeypatch):
    """cleanlab's find_label_issues, returning ``(mask, inspector)``: the
    inspector holds the (downsampled, flattened) items cleanlab ranked."""
    monkeypatch.setattr(cl_filter, "LabelInspector", RecordingInspector)

    def run(labels, probs, **kwargs):
        RecordingInspector.made.clear()
        mask = cl_filter.find_label_issues(labels, probs, n_jobs=1, verbose=False, **kwargs)
        (inspector,) = RecordingInspector.made
        return mask, inspector

    return run


def exact_num_issues(labels: np.ndarray, probs: np.ndarray) -> int:
    """T from exact float64 thresholds (2.0 for a class no item has): the
    items whose argmax c is not their label, with p_c >= t_c - 1e-6."""
    p = probs.astype(np.float64)
    k = p.shape[1]
    thresholds = np.array([p[labels == c, c].mean() if (labels == c).any() else 2.0 for c in range(k)])
    pred = p.argmax(axis=1)
    confident = p[np.arange(len(labels)), pred] >= thresholds[pred] - 1e-6
    return int(np.count_nonzero((pred != labels) & confident))


def cut_is_determined(inspector: RecordingInspector) -> None:
    """Fail (as a precondition of the data, not of the package) unless
    cleanlab's result on this data is the only right one: every class has
    an item, cleanlab's T is the exact T, and the T-th lowest score is
    strictly below the next one."""
    labels = np.concatenate([b[0] for b in inspector.batches])
    probs = np.concatenate([b[1] for b in inspector.batches])
    k = probs.shape[1]
    assert np.array_equal(np.unique(labels), np.arange(k)), "precondition: every class labels an item"
    t = inspector.get_num_issues(silent=True)
    assert t == exact_num_issues(labels, probs), "precondition: cleanlab's batched T is the exact T"
    scores = np.sort(inspector.get_quality_scores())
    assert 0 < t < len(scores), "precondition: some but not all items are issues"
    assert scores[t - 1] < scores[t], "precondition: no tie across the cut-off"


def flat(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels as rows: labels ``(N*H*W,)``, pred_probs ``(N*H*W, K)``."""
    return labels.reshape(-1), np.moveaxis(probs, 1, -1).reshape(-1, probs.shape[1])


# -- 1. find_label_issues: parity with cleanlab, engines, chunkings ---------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("downsample", [1, 2, 4])
@pytest.mark.parametrize("k", [2, 5, 20])
def test_find_label_issues_equals_cleanlab(cleanlab_find, k, downsample, dtype):
    labels, probs = images(k, dtype)
    # Every input pixel is within the default row_sum_tolerance (float16
    # rounding moves a sum by at most 2**-11), so nothing may be refused.
    assert np.abs(probs.astype(np.float64).sum(axis=1) - 1).max() < 5e-4
    expected, inspector = cleanlab_find(labels, probs, downsample=downsample)
    cut_is_determined(inspector)
    assert expected.any()

    mask = segmentation.find_label_issues(labels, probs, downsample=downsample, backend="serial")

    assert isinstance(mask, np.ndarray) and mask.dtype == np.bool_ and mask.shape == labels.shape
    np.testing.assert_array_equal(mask, expected)


ENGINES = [
    ("serial", {}),
    ("threads", {"n_jobs": 2}),
    ("fork", {"n_jobs": 2}),
    ("dask", {}),
]


@pytest.mark.parametrize("downsample", [1, 2])
@pytest.mark.parametrize(("backend", "options"), ENGINES, ids=[e[0] for e in ENGINES])
def test_every_engine_and_chunking_gives_cleanlabs_mask(cleanlab_find, backend, options, downsample):
    labels, probs = images(5)
    expected, inspector = cleanlab_find(labels, probs, downsample=downsample)
    cut_is_determined(inspector)
    reference_scores = segmentation.get_label_quality_scores(labels, probs, backend="serial")

    # The local threaded scheduler, whatever an earlier test left current.
    with dask.config.set(scheduler="threads"):
        for per_block in (1, 3, N_IMAGES):
            mask = segmentation.find_label_issues(
                labels, probs, downsample=downsample, backend=backend, images_per_block=per_block, **options
            )
            assert isinstance(mask, np.ndarray)
            np.testing.assert_array_equal(mask, expected, err_msg=f"images_per_block={per_block}")
            image_scores, pixel_scores = segmentation.get_label_quality_scores(
                labels, probs, backend=backend, images_per_block=per_block, **options
            )
            assert isinstance(pixel_scores, np.ndarray)
            np.testing.assert_array_equal(image_scores, reference_scores[0])
            np.testing.assert_array_equal(pixel_scores, reference_scores[1])


@pytest.mark.parametrize("downsample", [1, 2])
def test_dask_arrays_with_empty_chunks_give_the_numpy_results(downsample):
    labels, probs = images(5)
    chunks = (3, 0, 10, 0, 12)  # a dask array's empty chunks (after a filter, say) are blocks of no image
    lab = da.from_array(labels, chunks=(chunks, SIDE, SIDE))
    pp = da.from_array(probs, chunks=(chunks, 5, SIDE, SIDE))
    expected = segmentation.find_label_issues(labels, probs, downsample=downsample, backend="serial")
    assert expected.any()
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(np.asarray(segmentation.find_label_issues(lab, pp, downsample=downsample)), expected)
        if downsample == 1:
            found = segmentation.find_issues(lab, pp, temperature=0.1)
            image_scores, pixel_scores = segmentation.get_label_quality_scores(labels, probs, backend="serial")
            np.testing.assert_array_equal(found.image_scores, image_scores)
            np.testing.assert_array_equal(np.asarray(found.pixel_scores), pixel_scores)


def test_batch_size_counts_values_of_pred_probs_as_cleanlabs_does(cleanlab_find, monkeypatch):
    labels, probs = images(5)
    per_image = int(np.prod(probs.shape[1:]))  # K * H * W values
    chosen = []
    real = segmentation.make_engine

    def recording(*args, **kwargs):
        chosen.append(kwargs["chunk_rows"])
        return real(*args, **kwargs)

    monkeypatch.setattr(segmentation, "make_engine", recording)
    # cleanlab: batch_size // (K*H*W) images per batch, at least one.
    cases = [(1, 1), (3 * per_image - 1, 2), (3 * per_image, 3), (10**9, 10**9 // per_image)]
    for batch_size, per_block in cases:
        expected, inspector = cleanlab_find(labels, probs, batch_size=batch_size)
        cut_is_determined(inspector)
        mask = segmentation.find_label_issues(labels, probs, batch_size=batch_size, backend="threads")
        assert chosen[-1] == per_block, batch_size
        np.testing.assert_array_equal(mask, expected, err_msg=f"batch_size={batch_size}")
    # images_per_block, where given, wins over batch_size.
    segmentation.find_label_issues(labels, probs, batch_size=1, images_per_block=4, backend="threads")
    assert chosen[-1] == 4
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        segmentation.find_label_issues(labels, probs, batch_size=0)


# -- 2. an absent class; near ties ------------------------------------------------------
ABSENT = 4


@functools.lru_cache(maxsize=None)
def absent_class_images() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images of classes 0..3 with a fifth class, 4, that labels no pixel.

    Class 4 gets 1e-3 everywhere, and a few patches predict it (p = 1 - s)
    with the given label's probability s chosen between the T-th and the
    (T+1)-th lowest score of the other pixels: the patches are then exactly
    the pixels a T that counts them (cleanlab's) adds to the selection.
    Returns ``(labels, pred_probs, patch)``.
    """
    labels, base = images(4, seed=2, n=16)
    probs = np.zeros((labels.shape[0], 5) + labels.shape[1:], dtype=np.float32)
    probs[:, :4] = base * np.float32(1 - 1e-3)
    probs[:, ABSENT] = 1e-3
    patch = np.zeros(labels.shape, dtype=bool)
    patch[[1, 5, 9], 10:12, 20:22] = True
    img, row, col = np.nonzero(patch)

    def with_patch(s: float) -> np.ndarray:
        out = probs.copy()
        out[img, :, row, col] = 0
        out[img, labels[patch], row, col] = s
        out[img, ABSENT, row, col] = 1 - s
        return out

    # The patch's own scores move its labels' thresholds a little; take T
    # with a placeholder first, then check it held.
    y, p = flat(labels, with_patch(np.float32(0.3)))
    t = exact_num_issues(y, p)
    others = np.sort(p[np.arange(len(y)), y][~patch.reshape(-1)].astype(np.float64))
    s = np.float32((others[t - 1] + others[t]) / 2)
    assert others[t - 1] < s < others[t], "precondition: a gap at the cut-off"
    probs = with_patch(s)
    assert exact_num_issues(*flat(labels, probs)) == t, "precondition: the patch leaves T alone"
    assert not (labels == ABSENT).any()
    for a in (labels, probs, patch):
        a.setflags(write=False)
    return labels, probs, patch


def test_absent_class_follows_the_classification_pipeline_where_cleanlab_over_flags():
    labels, probs, patch = absent_class_images()
    y, p = flat(labels, probs)

    mask = segmentation.find_label_issues(labels, probs, backend="serial")

    # The reference, from the classification pipeline on the same pixels.
    # Its is_label_issue drops the T lowest-scored rows whose given label
    # would win the argmax with 1e-6 more (cleanlab's _reduce_issues), where
    # segmentation drops only the pixels whose argmax is their label: the
    # two differ on near ties, so the reference is the T lowest scores
    # (ties by index), minus argmax == label, rebuilt from the result's
    # scores and T rather than its mask.
    rows = dask_labelissues.find_label_issues(y, p, backend="serial")
    assert rows.confident_thresholds[ABSENT] == 2.0
    lowest = np.argsort(rows.label_quality_scores, kind="stable")[: rows.estimated_num_issues]
    reference = np.zeros(len(y), dtype=bool)
    reference[lowest] = True
    reference &= p.argmax(axis=1) != y
    np.testing.assert_array_equal(mask, reference.reshape(labels.shape))
    assert (rows.is_label_issue <= reference).all()

    # cleanlab's batched threshold of the absent class is about 0, so every
    # pixel predicted as it counts towards T: cleanlab flags those pixels
    # on top of ours, and nothing else.
    theirs = cl_filter.find_label_issues(labels, probs, n_jobs=1, verbose=False)
    assert (mask <= theirs).all() and theirs.sum() > mask.sum()
    extra = theirs & ~mask
    assert (probs.argmax(axis=1)[extra] == ABSENT).all()
    np.testing.assert_array_equal(extra, patch)


def near_tie_images() -> tuple[np.ndarray, np.ndarray]:
    """Two classes, 26 pixels, made so that the near ties are selected.

    Class 0's threshold is 0.5, so pixels labelled 1 at (0.5, 0.5) (an exact
    tie: argmax 0) and at (0.5 + 3e-7, 0.5 - 3e-7) count towards T, and the
    only lower scores are ten confident errors: T = 14 is exactly those.
    """
    rows = (
        [(0, (0.45, 0.55))] * 10  # errors: score 0.45
        + [(0, (0.55, 0.45))] * 10
        + [(1, (0.5, 0.5))] * 2  # exact ties
        + [(1, (0.5000003, 0.4999997))] * 2  # within 1e-6
        + [(1, (0.4, 0.6))] * 2
    )
    order = np.random.default_rng(0).permutation(len(rows))
    labels = np.array([rows[i][0] for i in order]).reshape(2, 1, 13)
    probs = np.array([rows[i][1] for i in order], dtype=np.float32).reshape(2, 1, 13, 2)
    return labels, np.ascontiguousarray(np.moveaxis(probs, -1, 1))


def test_near_ties_are_flagged_by_segmentations_argmax_rule(cleanlab_find):
    labels, probs = near_tie_images()
    y, p = flat(labels, probs)
    tie = (y == 1) & (np.abs(p[:, 0] - p[:, 1]) < 1e-6)
    assert tie.sum() == 4 and (p.argmax(axis=1)[tie] == 0).all()
    expected, inspector = cleanlab_find(labels, probs)
    cut_is_determined(inspector)
    assert inspector.get_num_issues(silent=True) == 14

    mask = segmentation.find_label_issues(labels, probs, backend="serial")

    np.testing.assert_array_equal(mask, expected)
    assert mask.reshape(-1)[tie].all() and mask.sum() == 14
    rows = dask_labelissues.find_label_issues(y, p, backend="serial")
    assert not rows.is_label_issue[tie].any() and rows.num_issues == 10


# -- 3. get_label_quality_scores ------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_softmin_scores_equal_cleanlabs(dtype, temperature):
    labels, probs = images(5, dtype)
    cl_images, cl_pixels = cl_rank.get_label_quality_scores(labels, probs, verbose=False, temperature=temperature)

    image_scores, pixel_scores = segmentation.get_label_quality_scores(
        labels, probs, temperature=temperature, backend="threads", images_per_block=3
    )

    assert image_scores.dtype == np.float64 and image_scores.shape == (N_IMAGES,)
    np.testing.assert_allclose(image_scores, cl_images, rtol=0, atol=1e-9)
    assert pixel_scores.dtype == np.float64 and pixel_scores.shape == labels.shape
    np.testing.assert_array_equal(pixel_scores, cl_pixels)
    # A weighted mean of the image's pixel scores: never below its worst one.
    assert (image_scores >= pixel_scores.min(axis=(1, 2))).all()


@pytest.mark.parametrize("downsample", [1, 2])
def test_num_pixel_issues_scores_equal_cleanlabs(cleanlab_find, downsample):
    labels, probs = images(5)
    _, inspector = cleanlab_find(labels, probs, downsample=downsample)
    cut_is_determined(inspector)
    cl_images, cl_pixels = cl_rank.get_label_quality_scores(
        labels, probs, method="num_pixel_issues", downsample=downsample, n_jobs=1, verbose=False
    )

    image_scores, pixel_scores = segmentation.get_label_quality_scores(
        labels, probs, method="num_pixel_issues", downsample=downsample, backend="threads"
    )

    assert image_scores.min() < 1
    np.testing.assert_array_equal(image_scores, cl_images)
    # cleanlab's pixel scores keep pred_probs' dtype here; the values agree.
    assert pixel_scores.dtype == np.float64
    np.testing.assert_array_equal(pixel_scores, cl_pixels.astype(np.float64))


def test_score_arguments_are_checked():
    labels, probs = images(2)
    with pytest.raises(ValueError, match="method='margin' is not one of"):
        segmentation.get_label_quality_scores(labels, probs, method="margin")
    with pytest.raises(ValueError, match="temperature"):
        segmentation.get_label_quality_scores(labels, probs, temperature=0)
    # As cleanlab: downsample with softmin is ignored, with a warning.
    with pytest.warns(UserWarning, match="downsample=2 applies to method='num_pixel_issues' only"):
        got = segmentation.get_label_quality_scores(labels, probs, downsample=2)
    expected = segmentation.get_label_quality_scores(labels, probs)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


# -- 4. issues_from_scores ------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.9])
def test_issues_from_pixel_scores_equal_cleanlabs(threshold):
    labels, probs = images(5)
    image_scores, pixel_scores = segmentation.get_label_quality_scores(labels, probs, backend="serial")

    mask = segmentation.issues_from_scores(image_scores, pixel_scores, threshold=threshold)

    expected = cl_rank.issues_from_scores(image_scores, pixel_scores, threshold=threshold)
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(mask, expected)


def test_issues_from_image_scores_are_the_images_below_the_threshold_ranked():
    scores = np.array([0.3, 0.05, 0.3, 0.05, 0.9, 0.0, 0.5])

    ranked = segmentation.issues_from_scores(scores, threshold=0.5)

    # Lowest first, equal scores in index order; 0.5 itself is not below 0.5.
    np.testing.assert_array_equal(ranked, [5, 1, 3, 0, 2])
    # cleanlab's also holds the first image at or above the threshold.
    theirs = cl_rank.issues_from_scores(scores, threshold=0.5)
    assert len(theirs) == len(ranked) + 1
    assert set(theirs[:-1].tolist()) == set(ranked.tolist()) and scores[theirs[-1]] >= 0.5
    # With every image below the threshold there is no further one to add.
    np.testing.assert_array_equal(segmentation.issues_from_scores(scores, threshold=1.0), [5, 1, 3, 0, 2, 6, 4])
    assert len(cl_rank.issues_from_scores(scores, threshold=1.0)) == len(scores)


def test_issues_from_real_image_scores_differ_from_cleanlabs_by_its_extra_image():
    labels, probs = images(5)
    image_scores, _ = segmentation.get_label_quality_scores(labels, probs, backend="serial")
    threshold = float(np.median(image_scores))

    ranked = segmentation.issues_from_scores(image_scores, threshold=threshold)

    below = np.flatnonzero(image_scores < threshold)
    np.testing.assert_array_equal(ranked, below[np.argsort(image_scores[below], kind="stable")])
    theirs = cl_rank.issues_from_scores(image_scores, threshold=threshold)
    np.testing.assert_array_equal(theirs[:-1], ranked)
    assert image_scores[theirs[-1]] >= threshold


def test_issues_from_scores_arguments_are_checked():
    with pytest.raises(ValueError, match="image_scores must be given"):
        segmentation.issues_from_scores(None)
    for bad in (-0.1, 1.5, None):
        with pytest.raises(ValueError, match="threshold must be in"):
            segmentation.issues_from_scores(np.array([0.5]), threshold=bad)


# -- 5. summaries -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"class_names": ["sky", "road", "car", "tree", "person"]},
        {"exclude": [0, 3]},
        {"top": 11},  # cuts among four pairs of one issue each: the order of ties counts
        {"class_names": list("abcde"), "exclude": [2], "top": 4},
    ],
)
def test_common_label_issues_equal_cleanlabs(options, capsys):
    labels, probs = images(5)
    issues = segmentation.find_label_issues(labels, probs, backend="serial")
    expected = cl_summary.common_label_issues(issues, labels, probs, verbose=True, **options)
    printed = capsys.readouterr().out

    table = segmentation.common_label_issues(issues, labels, probs, verbose=True, **options)

    pd.testing.assert_frame_equal(table, expected)
    assert capsys.readouterr().out == printed
    assert len(table) > 1


def test_common_label_issues_reads_lazy_inputs():
    labels, probs = images(5)
    issues = segmentation.find_label_issues(labels, probs, backend="serial")
    lazy_labels = da.from_array(labels, chunks=(4, SIDE, SIDE))
    lazy_probs = da.from_array(probs, chunks=(4, 5, SIDE, SIDE))
    with dask.config.set(scheduler="threads"):
        lazy_issues = segmentation.find_label_issues(lazy_labels, lazy_probs)
        table = segmentation.common_label_issues(lazy_issues, lazy_labels, lazy_probs)
    pd.testing.assert_frame_equal(table, cl_summary.common_label_issues(issues, labels, probs, verbose=False))


def test_filter_by_class_equals_cleanlabs():
    labels, probs = images(5)
    issues = segmentation.find_label_issues(labels, probs, backend="serial")
    for c in range(5):
        subset = segmentation.filter_by_class(c, issues, labels, probs)
        expected = cl_summary.filter_by_class(c, issues, labels, probs)
        assert expected.any()
        np.testing.assert_array_equal(subset, expected)


# -- 6. inputs ----------------------------------------------------------------------------
def zarr_pair(directory, labels, probs, chunks):
    """Zarr v3 arrays of labels and pred_probs, with pred_probs' ``chunks``
    (N, K, H, W) and the labels' matching (N, H, W) ones, opened read-only."""
    paths = str(directory / "labels.zarr"), str(directory / "probs.zarr")
    label_chunks = (chunks[0], *chunks[2:])
    zarr.create_array(paths[0], shape=labels.shape, dtype=labels.dtype, chunks=label_chunks)[:] = labels
    zarr.create_array(paths[1], shape=probs.shape, dtype=probs.dtype, chunks=chunks)[:] = probs
    opened = zarr.open_array(paths[0], mode="r"), zarr.open_array(paths[1], mode="r")
    assert all(a.metadata.zarr_format == 3 for a in opened)
    return opened


@pytest.mark.parametrize("within", [False, True], ids=["image-chunks", "chunks-within-images"])
@pytest.mark.parametrize("backend", ["serial", "threads", "dask"])
def test_zarr3_input_gives_numpys_results(tmp_path, backend, within):
    labels, probs = images(5)
    chunks = (2, 5, SIDE // 2, SIDE // 2) if within else (1, 5, SIDE, SIDE)
    z_labels, z_probs = zarr_pair(tmp_path, labels, probs, chunks)

    with dask.config.set(scheduler="threads"):
        for downsample in (1, 2):
            mask = segmentation.find_label_issues(
                z_labels, z_probs, downsample=downsample, backend=backend, images_per_block=3
            )
            expected = segmentation.find_label_issues(labels, probs, downsample=downsample, backend="serial")
            assert isinstance(mask, np.ndarray)
            np.testing.assert_array_equal(mask, expected)
        image_scores, pixel_scores = segmentation.get_label_quality_scores(z_labels, z_probs, backend=backend)
    expected_images, expected_pixels = segmentation.get_label_quality_scores(labels, probs, backend="serial")
    np.testing.assert_array_equal(image_scores, expected_images)
    np.testing.assert_array_equal(pixel_scores, expected_pixels)


def test_cleanlab_fails_on_zarr3_arrays(tmp_path):
    labels, probs = images(5)
    z_labels, z_probs = zarr_pair(tmp_path, labels, probs, (1, 5, SIDE, SIDE))
    # cleanlab takes len() of the labels, which a zarr 3 array lacks.
    with pytest.raises(TypeError, match="has no len"):
        cl_filter.find_label_issues(z_labels, z_probs, n_jobs=1, verbose=False)


def test_npy_paths_give_numpys_results(tmp_path):
    labels, probs = images(5, "float16")
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "probs.npy", probs)
    paths = str(tmp_path / "labels.npy"), str(tmp_path / "probs.npy")

    mask = segmentation.find_label_issues(*paths, backend="threads", images_per_block=4)
    scores = segmentation.get_label_quality_scores(*paths, backend="threads")

    assert isinstance(mask, np.ndarray)
    np.testing.assert_array_equal(mask, segmentation.find_label_issues(labels, probs, backend="serial"))
    expected = segmentation.get_label_quality_scores(labels, probs, backend="serial")
    np.testing.assert_array_equal(scores[0], expected[0])
    np.testing.assert_array_equal(scores[1], expected[1])


@pytest.mark.parametrize(("downsample", "reads"), [(1, 1), (2, 2)])
def test_dask_arrays_in_give_a_dask_mask_out(downsample, reads):
    """The thresholds and T need every pixel, so the call reads the input
    (it cannot return before they are known); what it returns is a dask
    array of whole images, and computing it reads no input again: one read
    in all, two with ``downsample`` (the flagged tiles' pixels are checked
    against their own argmax)."""
    labels, probs = images(5)
    expected = segmentation.find_label_issues(labels, probs, downsample=downsample, backend="serial")
    counted = collections.Counter()

    def counting(block, block_info=None):
        counted[block.ndim, block_info[0]["chunk-location"][0]] += 1
        return block

    lazy_labels = da.from_array(labels, chunks=(3, SIDE, SIDE)).map_blocks(counting, dtype=labels.dtype)
    lazy_probs = da.from_array(probs, chunks=(3, 5, SIDE, SIDE)).map_blocks(counting, dtype=probs.dtype)
    with dask.config.set(scheduler="threads"):
        mask = segmentation.find_label_issues(lazy_labels, lazy_probs, downsample=downsample)
        assert isinstance(mask, da.Array)
        assert mask.shape == labels.shape and mask.dtype == np.bool_
        assert mask.chunks[1:] == ((SIDE,), (SIDE,)) and sum(mask.chunks[0]) == N_IMAGES
        computed = mask.compute()
    assert isinstance(computed, np.ndarray)
    np.testing.assert_array_equal(computed, expected)
    chunks = -(-N_IMAGES // 3)
    assert counted == {(ndim, i): reads for ndim in (3, 4) for i in range(chunks)}


def test_dask_in_lazy_pixel_scores_out_and_numpy_in_numpy_out():
    labels, probs = images(5)
    expected = segmentation.get_label_quality_scores(labels, probs, backend="serial")
    assert all(isinstance(a, np.ndarray) for a in expected)

    # One dask input is enough.
    with dask.config.set(scheduler="threads"):
        image_scores, pixel_scores = segmentation.get_label_quality_scores(
            labels, da.from_array(probs, chunks=(5, 5, SIDE, SIDE))
        )
        assert isinstance(image_scores, np.ndarray) and isinstance(pixel_scores, da.Array)
        np.testing.assert_array_equal(image_scores, expected[0])
        np.testing.assert_array_equal(pixel_scores.compute(), expected[1])
        mask = segmentation.find_label_issues(da.from_array(labels, chunks=(5, SIDE, SIDE)), probs)
        assert isinstance(mask, da.Array)


# -- 7. bad input -------------------------------------------------------------------------
def bad_input(case: str) -> tuple[np.ndarray, np.ndarray]:
    """Small non-square images (8 x 12, so that rows and columns cannot be
    mixed up in a message) with one defect."""
    labels, probs, _ = segmentation_images(SegmentationSpec(6, 5, 8, 12, seed=3), 0, 6)
    if case == "nan":
        probs[3, 2, 4, 5] = np.nan
    elif case == "255":
        labels = labels.astype(np.uint8)
        labels[2, 1, 7] = 255
    elif case == "sum 2":
        probs[4, :, 6, 3] *= 2
    elif case == "negative":
        probs[1, 0, 0, 11] = -0.001  # small enough for its 2x2 tile's mean to be positive
    elif case == "label 5":
        labels[2, 0:2, 6:8] = 0
        labels[2, 1, 7] = 5  # the 2x2 tile's mean rounds to 1, a class
    return labels, probs


BAD_VALUES = [
    ("nan", r"image 3, pixel \(4, 5\), class 2 = nan"),
    ("255", r"labels at image 2, pixel \(1, 7\) = 255 is not a class"),
    ("sum 2", r"image 4, pixel \(6, 3\) sums to 2\.0"),
    ("negative", r"image 1, pixel \(0, 11\), class 0 = -0\.001\d* is negative"),
    ("label 5", r"image 2, pixel \(1, 7\) = 5 is not a class"),
]


@pytest.mark.parametrize(("case", "message"), BAD_VALUES, ids=[c for c, _ in BAD_VALUES])
@pytest.mark.parametrize("backend", ["threads", "dask"])
def test_bad_values_are_refused_naming_image_and_pixel(backend, case, message):
    labels, probs = bad_input(case)
    with dask.config.set(scheduler="threads"):
        with pytest.raises(ValueError, match=message):
            segmentation.find_label_issues(labels, probs, backend=backend, images_per_block=2)
        with pytest.raises(ValueError, match=message):
            segmentation.get_label_quality_scores(labels, probs, backend=backend, images_per_block=2)
        # From dask arrays too, whose blocks are read where the engine runs.
        with pytest.raises(ValueError, match=message):
            segmentation.find_label_issues(
                da.from_array(labels, chunks=(2, *labels.shape[1:])), da.from_array(probs, chunks=(2, *probs.shape[1:]))
            )


@pytest.mark.parametrize(
    ("case", "image", "shown"),
    [("nan", 3, "= nan"), ("255", 2, r"\b255\b"), ("sum 2", 4, "sums to"), ("negative", 1, "is negative"),
     ("label 5", 2, r"= 5\b")],
    ids=["nan", "255", "sum 2", "negative", "label 5"],
)
@pytest.mark.parametrize("backend", ["threads", "dask"])
def test_downsampling_does_not_hide_bad_values(backend, case, image, shown):
    """Tiles are checked, not pixels (documented), but a tile holding a bad
    pixel must still be refused, by the value the input has: the pooled
    tile's mean can be a valid label, and renormalizing makes any tile sum
    to 1."""
    labels, probs = bad_input(case)
    with dask.config.set(scheduler="threads"):
        with pytest.raises(ValueError, match=f"image {image}") as caught:
            segmentation.find_label_issues(labels, probs, downsample=2, backend=backend, images_per_block=2)
    assert re.search(shown, str(caught.value))


@pytest.mark.parametrize("backend", ["threads", "dask"])
def test_malformed_inputs_are_refused(backend):
    labels, probs, _ = segmentation_images(SegmentationSpec(4, 3, 8, 12, seed=3), 0, 4)
    run = functools.partial(segmentation.find_label_issues, backend=backend)
    with dask.config.set(scheduler="threads"):
        with pytest.raises(ValueError, match=r"labels have shape \(4, 8, 11\) but pred_probs \(4, 3, 8, 12\)"):
            run(labels[:, :, :11], probs)
        with pytest.raises(ValueError, match=r"labels have shape \(3, 8, 12\)"):
            run(labels[:3], probs)
        with pytest.raises(ValueError, match="must both divide by downsample=5"):
            run(labels, probs, downsample=5)
        with pytest.raises(ValueError, match="downsample must be a whole number"):
            run(labels, probs, downsample=0)
        with pytest.raises(ValueError, match=r"labels must be 3-D \(N, H, W\)"):
            run(labels.reshape(4, -1), probs)
        with pytest.raises(ValueError, match=r"pred_probs must be 4-D \(N, K, H, W\)"):
            run(labels, probs.reshape(4, 3, -1))
        with pytest.raises(TypeError, match="labels must be integer class indices"):
            run(labels.astype(np.float32), probs)
        with pytest.raises(TypeError, match="pred_probs must be floating point"):
            run(labels, (probs * 100).astype(np.int64))
        with pytest.raises(ValueError, match="at least 2 classes"):
            run(labels * 0, probs[:, :1])
        with pytest.raises(TypeError, match="labels must be integer class indices"):
            segmentation.get_label_quality_scores(labels.astype(np.float64), probs, backend=backend)


def test_axes_in_another_order_get_a_hint():
    labels, probs, _ = segmentation_images(SegmentationSpec(4, 3, 8, 12, seed=3), 0, 4)
    with pytest.raises(ValueError, match=r"labels have shape \(4, 12, 8\).*labels look like \(N, W, H\)"):
        segmentation.find_label_issues(np.ascontiguousarray(labels.transpose(0, 2, 1)), probs)
    # pred_probs (N, H, W, K), as many models write them: read as (N, K, H, W)
    # its shape is (4, K=8, H=12, W=3), which the labels (4, 8, 12) do not match.
    # The message blames pred_probs, whose shape is wrong, not the labels.
    with pytest.raises(ValueError, match=(r"^pred_probs has shape \(4, 8, 12, 3\) and labels \(4, 8, 12\): pred_probs "
                                          r"looks like \(N, H, W, K\).*np.moveaxis\(pred_probs, -1, 1\), to "
                                          r"\(N, K, H, W\) = \(4, 3, 8, 12\)$")):
        segmentation.find_label_issues(labels, np.ascontiguousarray(np.moveaxis(probs, 1, -1)))


# -- 8. a real cluster (last: its fixture starts worker processes) ------------------------
def test_distributed_cluster_gives_cleanlabs_mask(local_cluster, cleanlab_find, tmp_path):
    labels, probs = images(5)
    expected, inspector = cleanlab_find(labels, probs)
    cut_is_determined(inspector)
    # The workers read the Zarr stores from disk themselves.
    z_labels, z_probs = zarr_pair(tmp_path, labels, probs, (2, 5, SIDE // 2, SIDE // 2))

    mask = segmentation.find_label_issues(z_labels, z_probs, client=local_cluster, images_per_block=3)
    image_scores, pixel_scores = segmentation.get_label_quality_scores(
        z_labels, z_probs, client=local_cluster, images_per_block=3
    )

    assert isinstance(mask, np.ndarray)
    np.testing.assert_array_equal(mask, expected)
    cl_images, cl_pixels = cl_rank.get_label_quality_scores(labels, probs, verbose=False)
    np.testing.assert_allclose(image_scores, cl_images, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(pixel_scores, cl_pixels)
    # The mask and the scores from one job on the cluster: the same results.
    found = segmentation.find_issues(z_labels, z_probs, temperature=0.1, client=local_cluster, images_per_block=3)
    np.testing.assert_array_equal(np.asarray(found.mask), mask)
    np.testing.assert_array_equal(found.image_scores, image_scores)
    np.testing.assert_array_equal(np.asarray(found.pixel_scores), pixel_scores)


def test_a_client_that_is_not_the_current_one_computes_the_results(local_cluster):
    """The job's results are computed on the cluster given, not on whatever
    scheduler is current (here the synchronous one): numpy in, numpy out;
    dask in, a dask array whose blocks that cluster holds."""
    from distributed import Client

    labels, probs = images(5)
    expected = segmentation.find_label_issues(labels, probs, backend="serial")
    scores = segmentation.get_label_quality_scores(labels, probs, backend="serial")

    with Client(local_cluster.cluster, set_as_default=False) as other, dask.config.set(scheduler="sync"):
        with runs_on(other):
            mask = segmentation.find_label_issues(labels, probs, client=other, images_per_block=2)
        assert isinstance(mask, np.ndarray)
        np.testing.assert_array_equal(mask, expected)
        with runs_on(other):
            _, pixel_scores = segmentation.get_label_quality_scores(labels, probs, client=other, images_per_block=2)
        np.testing.assert_array_equal(pixel_scores, scores[1])
        lazy = segmentation.find_label_issues(da.from_array(labels, chunks=(2, -1, -1)), probs, client=other)
        np.testing.assert_array_equal(other.compute(lazy).result(), expected)
        # What takes such a mask computes it on that cluster too.
        with runs_on(other):
            table = segmentation.common_label_issues(lazy, labels, probs)
        pd.testing.assert_frame_equal(table, segmentation.common_label_issues(expected, labels, probs))
        with runs_on(other):
            by_class = segmentation.filter_by_class(1, lazy, labels, probs)
        np.testing.assert_array_equal(by_class, segmentation.filter_by_class(1, expected, labels, probs))
        with runs_on(other):
            by_issues, _ = segmentation.get_label_quality_scores(
                da.from_array(labels, chunks=(2, -1, -1)), probs, method="num_pixel_issues", client=other
            )
        np.testing.assert_array_equal(by_issues, 1.0 - expected.mean(axis=(1, 2)))


# -- ignore_index -----------------------------------------------------------------------
IGNORE = 255


def ignored_images(k: int = 5, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic images with an irregular set of pixels labelled 255 (whole
    2x2 tiles, partial tiles and one whole image), and NaN predictions at
    some of them: an ignored pixel's values are not the job's."""
    labels, probs = images(k, dtype)
    labels, probs = labels.astype(np.int64), probs.copy()
    rng = np.random.default_rng(11)
    ignored = rng.random(labels.shape) < 0.15
    ignored[3, 4:12, 8:20] = True
    ignored[7] = True
    labels[ignored] = IGNORE
    probs[:, :, ][np.broadcast_to(ignored[:, None], probs.shape) & (rng.random(probs.shape) < 0.05)] = np.nan
    return labels, probs, ignored


def kept_reference(labels: np.ndarray, probs: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The classification pipeline on the kept items alone (in item order):
    the T lowest scores (ties by index), minus argmax == label, put back in
    place; items not kept are False."""
    y, p = labels[kept], probs[kept]
    rows = dask_labelissues.find_label_issues(y, p, backend="serial")
    lowest = np.argsort(rows.label_quality_scores, kind="stable")[: rows.estimated_num_issues]
    chosen = np.zeros(len(y), dtype=bool)
    chosen[lowest] = True
    chosen &= p.argmax(axis=1) != y
    out = np.zeros(kept.shape, dtype=bool)
    out[kept] = chosen
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ignored_pixels_are_left_out_as_if_absent(dtype):
    labels, probs, ignored = ignored_images(5, dtype)
    y, p = flat(labels, probs)
    kept = ~ignored.reshape(-1)

    found = segmentation.find_issues(labels, probs, backend="serial", ignore_index=IGNORE)

    reference = kept_reference(y, p, kept)
    assert 0 < reference.sum() < kept.sum()
    np.testing.assert_array_equal(found.mask, reference.reshape(labels.shape))
    assert not found.mask[ignored].any()
    rows = dask_labelissues.find_label_issues(y[kept], p[kept], backend="serial")
    assert found.estimated_num_issues == rows.estimated_num_issues
    np.testing.assert_array_equal(found.thresholds, rows.confident_thresholds)
    np.testing.assert_array_equal(found.per_class_count, np.bincount(y[kept], minlength=5))
    assert found.pair_counts.shape == (5, 5)
    assert found.pair_counts.sum() == found.mask.sum()


def test_ignored_tiles_pool_only_the_pixels_kept():
    labels, probs, ignored = ignored_images(5)
    f = 2
    n, k, h, w = probs.shape

    mask = segmentation.find_label_issues(labels, probs, downsample=f, backend="serial", ignore_index=IGNORE)

    # Tiles by hand: the kept pixels' mean label, rounded, and their mean
    # probabilities, renormalized; a tile of ignored pixels only is left out.
    kept = ~ignored
    tiles = kept.reshape(n, h // f, f, w // f, f)
    count = tiles.sum(axis=(4, 2))
    label_sum = np.where(kept, labels, 0).reshape(n, h // f, f, w // f, f).sum(axis=(4, 2))
    tile_labels = np.round(label_sum / np.maximum(count, 1)).astype(np.int64)
    weights = kept[:, None].reshape(n, 1, h // f, f, w // f, f)
    clean = np.where(kept[:, None], probs.astype(np.float64), 0.0)
    tile_probs = clean.reshape(n, k, h // f, f, w // f, f).sum(axis=(5, 3))
    with np.errstate(invalid="ignore"):
        tile_probs = tile_probs / tile_probs.sum(axis=1, keepdims=True)
    assert weights.shape[1] == 1
    y, p = flat(tile_labels, tile_probs)
    selected = kept_reference(y, p, (count > 0).reshape(-1)).reshape(n, h // f, w // f)
    # A selected tile already dropped argmax == label on the tile; the
    # pixel check is the one of segmentation, on every kept pixel.
    lowest_tiles = selected | _dropped_tiles(y, p, (count > 0).reshape(-1)).reshape(n, h // f, w // f)
    up = np.repeat(np.repeat(lowest_tiles, f, axis=1), f, axis=2)
    reference = up & (probs.argmax(axis=1) != labels) & kept
    np.testing.assert_array_equal(mask, reference)
    assert mask.any() and not mask[ignored].any()


def _dropped_tiles(y: np.ndarray, p: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The kept tiles among the T lowest whose argmax is their label."""
    rows = dask_labelissues.find_label_issues(y[kept], p[kept], backend="serial")
    lowest = np.argsort(rows.label_quality_scores, kind="stable")[: rows.estimated_num_issues]
    chosen = np.zeros(int(kept.sum()), dtype=bool)
    chosen[lowest] = True
    chosen &= p[kept].argmax(axis=1) == y[kept]
    out = np.zeros(kept.shape, dtype=bool)
    out[kept] = chosen
    return out


@pytest.mark.parametrize(
    ("backend", "options"),
    [("serial", {"images_per_block": 1}), ("threads", {"images_per_block": 3}), ("fork", {"images_per_block": 4}),
     ("dask", {"images_per_block": 2})],
)
@pytest.mark.parametrize("downsample", [1, 2])
def test_ignored_pixels_give_one_result_on_every_engine_and_chunking(backend, options, downsample):
    labels, probs, _ = ignored_images(5)
    expected = segmentation.find_label_issues(labels, probs, downsample=downsample, backend="serial",
                                              ignore_index=IGNORE)
    with dask.config.set(scheduler="threads"):
        got = segmentation.find_label_issues(
            labels, probs, downsample=downsample, backend=backend, ignore_index=IGNORE, **options
        )
        lazy = segmentation.find_label_issues(
            da.from_array(labels, chunks=(3, SIDE, SIDE)), da.from_array(probs, chunks=(3, 5, SIDE, SIDE)),
            downsample=downsample, ignore_index=IGNORE,
        )
        np.testing.assert_array_equal(lazy.compute(), expected)
    np.testing.assert_array_equal(got, expected)


def test_ignored_pixels_weigh_nothing_in_image_scores():
    labels, probs, ignored = ignored_images(5)
    temperature = 0.1

    image_scores, pixel_scores = segmentation.get_label_quality_scores(
        labels, probs, backend="threads", ignore_index=IGNORE, temperature=temperature
    )

    kept = ~ignored
    safe = np.where(kept, labels, 0)
    own = np.take_along_axis(probs.astype(np.float64), safe[:, None], axis=1)[:, 0]
    np.testing.assert_array_equal(pixel_scores[kept], own[kept])
    assert (pixel_scores[ignored] == 1.0).all()
    for i in range(len(labels)):
        s = own[i][kept[i]]
        if s.size == 0:
            assert image_scores[i] == 1.0  # image 7: every pixel ignored
            continue
        x = (1.0 - s) / temperature
        weights = np.exp(x - x.max())
        assert image_scores[i] == pytest.approx((s * weights).sum() / weights.sum(), rel=1e-12, abs=1e-12)

    by_issues, _ = segmentation.get_label_quality_scores(
        labels, probs, method="num_pixel_issues", backend="serial", ignore_index=IGNORE
    )
    mask = segmentation.find_label_issues(labels, probs, backend="serial", ignore_index=IGNORE)
    share = mask.sum(axis=(1, 2)) / np.maximum(kept.sum(axis=(1, 2)), 1)
    np.testing.assert_allclose(by_issues, 1.0 - share, rtol=0, atol=1e-15)


def test_without_ignore_index_255_is_refused_with_the_option_named():
    labels, probs, _ = ignored_images(5)
    with pytest.raises(ValueError, match=r"= 255 is not a class index in 0\.\.4 .*ignore_index=255"):
        segmentation.find_label_issues(labels, probs, backend="serial")


@pytest.mark.parametrize("downsample", [1, 2])
def test_with_ignore_index_other_bad_values_are_still_refused_by_pixel(downsample):
    labels, probs, ignored = ignored_images(5)
    # Label 5 is the class the ignored pixels are counted in; given, it is
    # not a class of the data.
    image = 2
    y, x = (int(v) for v in np.argwhere(~ignored[image])[40])
    bad = labels.copy()
    bad[image, y, x] = 5
    with pytest.raises(ValueError, match=rf"image {image}, pixel \({y}, {x}\) = 5 is not a class index in 0\.\.4"):
        segmentation.find_label_issues(bad, probs, backend="threads", ignore_index=IGNORE, downsample=downsample)
    nan = probs.copy()
    y, x = (int(v) for v in np.argwhere(~ignored[4])[60])
    nan[4, 2, y, x] = np.nan
    with pytest.raises(ValueError, match=rf"image 4, pixel \({y}, {x}\), class 2 = nan"):
        segmentation.find_label_issues(labels, nan, backend="dask", ignore_index=IGNORE, downsample=downsample)
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        segmentation.find_label_issues(labels, probs, ignore_index=255.0)


@pytest.mark.parametrize("backend", ["serial", "threads", "fork"])
def test_numpy_pixel_scores_do_not_keep_the_jobs_records(backend):
    """The pixel scores are 8 bytes a pixel of their own, not a view of the
    job's records (32 bytes a pixel), which would stay alive with them."""
    labels, probs = images(5)
    _, pixel_scores = segmentation.get_label_quality_scores(labels, probs, backend=backend)
    assert pixel_scores.dtype == np.float64 and pixel_scores.flags.c_contiguous
    base = pixel_scores
    while base.base is not None and isinstance(base.base, np.ndarray):
        base = base.base
    assert base.dtype.names is None and base.nbytes == pixel_scores.nbytes


@pytest.mark.parametrize("downsample", [1, 2])
def test_ignore_index_with_nothing_ignored_changes_nothing(downsample):
    labels, probs = images(5)
    expected = segmentation.find_issues(labels, probs, downsample=downsample, backend="serial")
    got = segmentation.find_issues(labels, probs, downsample=downsample, backend="serial", ignore_index=255)
    np.testing.assert_array_equal(got.mask, expected.mask)
    np.testing.assert_array_equal(got.thresholds, expected.thresholds)
    assert got.estimated_num_issues == expected.estimated_num_issues


# -- the mask and the scores in one job ------------------------------------------------------
@pytest.mark.parametrize("ignore_index", [None, IGNORE], ids=["every-pixel", "ignore-index"])
@pytest.mark.parametrize(("backend", "options"), ENGINES, ids=[e[0] for e in ENGINES])
def test_scores_of_the_masks_job_are_get_label_quality_scores(backend, options, ignore_index):
    labels, probs = images(5) if ignore_index is None else ignored_images(5)[:2]
    # Not the default temperature: the one given must be the one used.
    temperature = 0.3
    common = dict(backend=backend, images_per_block=3, ignore_index=ignore_index, **options)
    with dask.config.set(scheduler="threads"):
        expected = segmentation.get_label_quality_scores(labels, probs, temperature=temperature, **common)
        alone = segmentation.find_issues(labels, probs, **common)
        found = segmentation.find_issues(labels, probs, temperature=temperature, **common)
    assert alone.image_scores is None and alone.pixel_scores is None
    assert found.image_scores.dtype == np.float64 and np.array_equal(found.image_scores, expected[0])
    assert isinstance(found.pixel_scores, np.ndarray) and found.pixel_scores.flags.c_contiguous
    assert found.pixel_scores.dtype == np.float64 and np.array_equal(found.pixel_scores, expected[1])
    # The scores change nothing else.
    assert np.array_equal(found.mask, alone.mask) and found.mask.any()
    assert np.array_equal(found.pair_counts, alone.pair_counts)
    assert np.array_equal(found.thresholds, alone.thresholds)
    assert found.estimated_num_issues == alone.estimated_num_issues


@pytest.mark.parametrize(("downsample", "reads"), [(1, 1), (2, 2)])
@pytest.mark.parametrize(("backend", "options"), ENGINES, ids=[e[0] for e in ENGINES])
def test_find_issues_with_scores_reads_pred_probs_as_often_as_it_says(backend, options, downsample, reads):
    """Once for the mask and the scores; with ``downsample``, twice for the
    mask and no scores (its items are tiles, the scores per pixel)."""
    from .test_single_read import CountingArray

    labels, probs = images(5)
    counted = CountingArray(probs)
    with dask.config.set(scheduler="threads"):
        found = segmentation.find_issues(
            labels, counted, downsample=downsample, temperature=0.1, backend=backend, images_per_block=3, **options
        )
    assert found.reads == reads
    assert counted.served.value == reads * probs.nbytes
    assert (found.image_scores is None) == (downsample > 1) == (found.pixel_scores is None)


def test_lazy_inputs_give_lazy_pixel_scores_of_the_masks_job():
    """Computing the pixel scores reads no input again: pass one's records
    hold them."""
    labels, probs = images(5)
    expected = segmentation.get_label_quality_scores(labels, probs, backend="serial")
    counted = collections.Counter()

    def counting(block, block_info=None):
        counted[block_info[0]["chunk-location"][0]] += 1
        return block

    lazy_probs = da.from_array(probs, chunks=(3, 5, SIDE, SIDE)).map_blocks(counting, dtype=probs.dtype)
    with dask.config.set(scheduler="threads"):
        found = segmentation.find_issues(labels, lazy_probs, temperature=0.1)
        assert isinstance(found.mask, da.Array) and isinstance(found.pixel_scores, da.Array)
        pixel_scores = found.pixel_scores.compute()
    assert np.array_equal(found.image_scores, expected[0]) and np.array_equal(pixel_scores, expected[1])
    assert counted == {i: 1 for i in range(-(-N_IMAGES // 3))}


def test_find_issues_refuses_a_temperature_of_zero():
    labels, probs = images(2)
    with pytest.raises(ValueError, match="temperature must be a number other than 0"):
        segmentation.find_issues(labels, probs, temperature=0)
