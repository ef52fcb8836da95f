"""The ``segment`` command, run as a user runs it: a subprocess on files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from dask_labelissues import segmentation
from dask_labelissues.synthetic import SegmentationSpec, segmentation_images

from .conftest import run_cli as run

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


def segment_here(monkeypatch, capsys, labels_path, probs_path, out, *options: str):
    """``segment`` run in this process, pred_probs served by an array that
    counts the bytes it serves: that array."""
    from dask_labelissues import cli, inputs

    from .test_single_read import CountingArray

    opened = {}
    original = inputs.open_path

    def counting_open(text, name):
        if name != "pred_probs":
            return original(text, name)
        opened["probs"] = CountingArray(np.load(text))
        return opened["probs"]

    monkeypatch.setattr(inputs, "open_path", counting_open)
    code = cli.main(["segment", "--labels", str(labels_path), "--pred-probs", str(probs_path), "--output", str(out),
                     "--images-per-block", "5", "--no-progress", "--json", *options])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return opened["probs"]


@pytest.mark.parametrize(("downsample", "reads"), [(1, 1), (2, 3)])
@pytest.mark.parametrize("backend", ["threads", "dask"])
def test_segment_reads_pred_probs_once_without_downsample(files, tmp_path, monkeypatch, capsys, backend, downsample,
                                                          reads):
    """The mask and the scores from one read; downsampled, the mask's job
    reads twice (tiles, then their pixels) and the scores once more."""
    root, _, probs = files
    counted = segment_here(monkeypatch, capsys, root / "labels.npy", root / "probs.npy", tmp_path / "out.zarr",
                           "--backend", backend, "--downsample", str(downsample))
    assert counted.served.value == reads * probs.nbytes


@pytest.mark.parametrize("ignore", [False, True], ids=["every-pixel", "ignore-index"])
@pytest.mark.parametrize("backend", ["threads", "dask"])
def test_segments_one_job_writes_the_store_of_two(files, tmp_path, monkeypatch, capsys, backend, ignore):
    _, labels, probs = files
    options = ["--backend", backend, "--temperature", "0.3"]
    if ignore:
        labels = labels.astype(np.uint8)
        labels[2:5, :4, :] = 255
        options += ["--ignore-index", "255"]
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "probs.npy", probs)
    paths = (tmp_path / "labels.npy", tmp_path / "probs.npy")

    one = segment_here(monkeypatch, capsys, *paths, tmp_path / "one.zarr", *options)
    original = segmentation.find_issues

    def without_scores(*args, temperature=None, **kwargs):
        return original(*args, **kwargs)

    # As segment ran before the mask's job made the scores: the mask, then
    # get_label_quality_scores.
    monkeypatch.setattr(segmentation, "find_issues", without_scores)
    two = segment_here(monkeypatch, capsys, *paths, tmp_path / "two.zarr", *options)
    assert (one.served.value, two.served.value) == (probs.nbytes, 2 * probs.nbytes)

    one, two = (zarr.open_group(str(tmp_path / name), mode="r") for name in ("one.zarr", "two.zarr"))
    assert sorted(one.array_keys()) == sorted(two.array_keys())
    for name in two.array_keys():
        assert (one[name].dtype, one[name].shape, one[name].chunks) == (two[name].dtype, two[name].shape,
                                                                         two[name].chunks), name
        assert np.array_equal(one[name][:], two[name][:]), name
    assert {**one.attrs, "seconds": None} == {**two.attrs, "seconds": None}
    assert one["is_label_issue"][:].any()
