"""The ``segment`` command, run as a user runs it: a subprocess on files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from dask_labelissues import segmentation
from dask_labelissues.synthetic import SegmentationSpec, segmentation_images

CLI = [sys.executable, "-m", "dask_labelissues"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("segment")
    labels, probs, _ = segmentation_images(SegmentationSpec(24, 4, 16, 16, seed=5), 0, 24)
    np.save(root / "labels.npy", labels)
    np.save(root / "probs.npy", probs)
    # As Zarr v3, chunked within images as well as across them.
    group = zarr.open_group(str(root / "data.zarr"), mode="w", zarr_format=3)
    group.create_array("labels", data=labels, chunks=(5, 8, 8))
    group.create_array("pred_probs", data=probs, chunks=(5, 4, 8, 8))
    return root, labels, probs


@pytest.mark.parametrize("source", ["npy", "zarr"])
def test_segment_writes_what_the_api_finds(files, source):
    root, labels, probs = files
    if source == "npy":
        srcs = [str(root / "labels.npy"), str(root / "probs.npy")]
    else:
        srcs = [f"{root / 'data.zarr'}:labels", f"{root / 'data.zarr'}:pred_probs"]
    out = root / f"out-{source}.zarr"
    proc = run("segment", "--labels", srcs[0], "--pred-probs", srcs[1], "--output", str(out),
               "--images-per-block", "5", "--json", "--top", "3", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    mask = segmentation.find_label_issues(labels, probs)
    image_scores, pixel_scores = segmentation.get_label_quality_scores(labels, probs)
    store = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(store["is_label_issue"][:], mask)
    np.testing.assert_array_equal(store["image_scores"][:], image_scores)
    np.testing.assert_array_equal(store["pixel_scores"][:], pixel_scores.astype(np.float32))
    np.testing.assert_array_equal(store["pixel_issues_per_image"][:], mask.sum(axis=(1, 2)))
    worst = np.lexsort((np.arange(24), image_scores))
    np.testing.assert_array_equal(store["ranked_images"][:], worst)
    assert printed["num_pixel_issues"] == int(mask.sum())
    assert [w["image"] for w in printed["worst_images"]] == worst[:3].tolist()
    table = segmentation.common_label_issues(mask, labels, probs, top=3)
    assert printed["common_issues"] == table.to_dict(orient="records")

    summary = run("summary", str(out), "--top", "3")
    assert summary.returncode == 0, summary.stderr
    assert f"pixel issues    {int(mask.sum()):,} of {24 * 16 * 16:,} pixels" in summary.stdout
    assert f"{worst[0]:>10} " in summary.stdout


def test_segment_refuses_a_bad_pixel_naming_it_and_writes_nothing(files, tmp_path):
    _, labels, probs = files
    probs = probs.copy()
    probs[7, :, 3, 9] *= 3
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "probs.npy", probs)
    out = tmp_path / "out.zarr"
    proc = run("segment", "--labels", str(tmp_path / "labels.npy"), "--pred-probs", str(tmp_path / "probs.npy"),
               "--output", str(out))
    assert proc.returncode != 0
    assert "image 7, pixel (3, 9)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.npy", "probs.npy"]  # nothing half-written


def test_ignore_index_leaves_out_the_pixels_it_marks(files, tmp_path):
    _, labels, probs = files
    labels = labels.astype(np.uint8)
    labels[2:5, :4, :] = 255
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "probs.npy", probs)
    inputs = ["--labels", str(tmp_path / "labels.npy"), "--pred-probs", str(tmp_path / "probs.npy")]

    refused = run("segment", *inputs, "--output", str(tmp_path / "refused.zarr"))
    assert refused.returncode != 0
    assert "image 2, pixel (0, 0)" in refused.stderr and "--ignore-index 255" in refused.stderr
    assert not (tmp_path / "refused.zarr").exists()

    out = tmp_path / "out.zarr"
    proc = run("segment", *inputs, "--output", str(out), "--ignore-index", "255", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    mask = segmentation.find_label_issues(labels, probs, ignore_index=255)
    image_scores, _ = segmentation.get_label_quality_scores(labels, probs, ignore_index=255)
    store = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(store["is_label_issue"][:], mask)
    np.testing.assert_array_equal(store["image_scores"][:], image_scores)
    assert not store["is_label_issue"][2:5, :4, :].any()
    assert store.attrs["ignore_index"] == 255
