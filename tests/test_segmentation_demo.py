"""run_segmentation_demo and notebooks/segmentation.ipynb."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from dask_labelissues import segmentation
from dask_labelissues.demo import run_segmentation_demo
from dask_labelissues.synthetic import SegmentationSpec, segmentation_images

from .notebooks import assert_committed_without_outputs, execute

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "segmentation.ipynb"
SMALL = dict(images=120, classes=5, height=32, width=32, noise=0.3, seed=0)


def test_segmentation_demo_finds_the_relabelled_pixels(tmp_path, monkeypatch):
    # The temporary store goes under tmp_path, and is removed after.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    report = run_segmentation_demo(**SMALL)
    assert list(tmp_path.iterdir()) == []
    assert report.data_path is None
    # Measured at these sizes and seed: pixel precision 0.985, pixel recall
    # 0.735, image precision 0.661 (clean images with a boundary pixel
    # flagged), image recall 1.0, ranking 1.0 (seeds 0 to 9: 0.983 to 0.993,
    # 0.699 to 0.758, 0.66 to 0.82, 1.0, 1.0).
    assert report.relabelled_images > 20 and report.flagged_pixels > 0
    assert report.pixel_precision > 0.95
    assert report.pixel_recall > 0.6
    assert report.image_precision > 0.5
    assert report.image_recall > 0.95
    assert report.ranking_precision > 0.9
    assert len(report.worst) == 10
    assert [w["score"] for w in report.worst] == sorted(w["score"] for w in report.worst)
    assert report.seconds == pytest.approx(report.find_seconds + report.score_seconds)


def test_segmentation_demo_counts_agree_with_find_label_issues(tmp_path):
    path = tmp_path / "seg.zarr"
    report = run_segmentation_demo(**SMALL, path=path)
    assert report.data_path == str(path)

    # The store holds the generator's data, chunked by images.
    spec = SegmentationSpec(**SMALL)
    labels, pred_probs, relabelled = segmentation_images(spec, 0, spec.images)
    group = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(group["labels"][:], labels)
    np.testing.assert_array_equal(group["pred_probs"][:], pred_probs)
    np.testing.assert_array_equal(group["relabelled"][:], relabelled)
    assert group["pred_probs"].chunks[1:] == (5, 32, 32)
    assert group["pred_probs"].chunks[0] == group["labels"].chunks[0] == group["relabelled"].chunks[0]

    # The report's counts are those of a direct call on the in-memory data.
    mask = np.asarray(segmentation.find_label_issues(labels, pred_probs))
    assert report.estimated_num_issues == segmentation.find_issues(labels, pred_probs).estimated_num_issues
    assert report.flagged_pixels == int(mask.sum())
    assert report.relabelled_pixels == int(relabelled.sum())
    assert report.found_pixels == int((mask & relabelled).sum())
    flagged, changed = mask.any(axis=(1, 2)), relabelled.any(axis=(1, 2))
    assert report.flagged_images == int(flagged.sum())
    assert report.relabelled_images == int(changed.sum())
    assert report.found_images == int((flagged & changed).sum())
    assert report.pixel_precision == report.found_pixels / report.flagged_pixels
    assert report.image_recall == report.found_images / report.relabelled_images
    image_scores, _ = segmentation.get_label_quality_scores(labels, pred_probs)
    ranking = np.argsort(image_scores, kind="stable")
    assert [w["index"] for w in report.worst] == ranking[:10].tolist()
    assert report.ranking_precision == changed[ranking[: changed.sum()]].mean()
    for w in report.worst:
        assert w["flagged_pixels"] == int(mask[w["index"]].sum())
        assert w["relabelled_pixels"] == int(relabelled[w["index"]].sum())


def test_segmentation_demo_on_a_client():
    from distributed import Client, LocalCluster

    alone = run_segmentation_demo(**SMALL)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        on_cluster = run_segmentation_demo(**SMALL, client=client)
    for name in ("estimated_num_issues", "flagged_pixels", "found_pixels", "flagged_images", "found_images",
                 "ranking_precision", "worst"):
        assert getattr(on_cluster, name) == getattr(alone, name), name


def test_segmentation_notebook_committed_without_outputs():
    assert_committed_without_outputs(NOTEBOOK)


def test_segmentation_notebook_executes(tmp_path, monkeypatch):
    for name, value in (("IMAGES", "120"), ("CLASSES", "5"), ("HEIGHT", "32"), ("WIDTH", "32")):
        monkeypatch.setenv(f"SEGMENTATION_{name}", value)
    text, figures = execute(NOTEBOOK, tmp_path, monkeypatch)
    assert "dashboard: http" in text
    assert "| flagged pixels |" in text
    assert "| T (estimated pixel issues) |" in text
    assert "num_pixel_issues" in text  # common_label_issues' table
    assert len(figures) == 1, "display_issues' figure was not drawn"
    # The same data as the demo's: the same numbers.
    report = run_segmentation_demo(**SMALL)
    precision = float(re.search(r"\| pixel precision \| ([0-9.]+) \|", text).group(1))
    recall = float(re.search(r"\| pixel recall \| ([0-9.]+) \|", text).group(1))
    assert precision > 0.95 and recall > 0.6
    assert precision == round(report.pixel_precision, 3)
    assert recall == round(report.pixel_recall, 3)
    assert f"| flagged pixels | {report.flagged_pixels:,} |" in text
