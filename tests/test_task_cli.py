"""``find --task multilabel`` and ``find --task token``, run as a user runs them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from dask_labelissues import dataset, multilabel_classification as ml, token_classification as tc

from .conftest import run_cli as run

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    truth = rng.random((3000, 5)) < 0.3
    probs = np.where(truth, rng.beta(5, 2, truth.shape), rng.beta(2, 5, truth.shape)).astype(np.float32)
    given = (truth ^ (rng.random(truth.shape) < 0.03)).astype(np.uint8)
    np.save(root / "ml_labels.npy", given)
    np.save(root / "ml_probs.npy", probs)
    lengths = rng.integers(1, 25, 400)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = int(offsets[-1])
    t_truth = rng.integers(0, 4, tokens)
    t_probs = rng.dirichlet(np.ones(4) * 0.4, size=tokens)
    t_probs[np.arange(tokens), t_truth] += 1.5
    t_probs /= t_probs.sum(axis=1, keepdims=True)
    t_given = np.where(rng.random(tokens) < 0.05, rng.integers(0, 4, tokens), t_truth)
    group = zarr.open_group(str(root / "tokens.zarr"), mode="w", zarr_format=3)
    group.create_array("labels", data=t_given, chunks=(1000,))
    group.create_array("pred_probs", data=t_probs, chunks=(1000, 4))
    group.create_array("offsets", data=offsets, chunks=(100,))
    return root, given, probs, t_given, t_probs, offsets


def test_multilabel_store_holds_what_the_api_finds(files):
    root, given, probs, *_ = files
    out = root / "ml.zarr"
    proc = run("find", "--task", "multilabel", "--labels", str(root / "ml_labels.npy"),
               "--pred-probs", str(root / "ml_probs.npy"), "--output", str(out), "--json", "--top", "4",
               "--filter-by", "both", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    mask = ml.find_label_issues(given, probs, filter_by="both")
    ranked = ml.find_label_issues(given, probs, filter_by="both", return_indices_ranked_by="self_confidence")
    store = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(store["is_label_issue"][:], mask)
    np.testing.assert_array_equal(store["issues"][:], ranked)
    np.testing.assert_array_equal(store["label_quality_scores"][:], ml.get_label_quality_scores(given, probs))
    common = dataset.common_multilabel_issues(given, probs)
    for row in common.itertuples(index=False):
        name = "given_flagged" if row[1] else "left_out_flagged"
        assert store[name][row[0]] == row[3]
    assert printed["num_issues"] == int(mask.sum())
    assert [w["row"] for w in printed["worst_examples"]] == ranked[:4].tolist()

    summary = run("summary", str(out), "--top", "3")
    assert summary.returncode == 0, summary.stderr
    assert f"label issues    {int(mask.sum()):,} examples" in summary.stdout
    assert "most common issues:" in summary.stdout
    # No plot of these yet: the summary is printed, then the plot refused.
    plotted = run("summary", str(out), "--top", "3", "--plot", str(out.parent / "ml.png"))
    assert plotted.returncode == 2 and plotted.stdout == summary.stdout
    assert plotted.stderr.strip() == ("error: --plot draws classification and segmentation stores; there is no plot "
                                      "of multilabel results yet (the summary above is all)")
    assert not (out.parent / "ml.png").exists()


def test_token_store_holds_what_the_api_finds(files):
    root, *_, t_given, t_probs, offsets = files
    z = root / "tokens.zarr"
    out = root / "tok.zarr"
    proc = run("find", "--task", "token", "--labels", f"{z}:labels", "--pred-probs", f"{z}:pred_probs",
               "--sentence-offsets", f"{z}:offsets", "--output", str(out), "--top", "3", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    pairs = tc.find_label_issues(t_given, t_probs, sentence_offsets=offsets, as_array=True)
    scores, token_scores = tc.get_label_quality_scores(t_given, t_probs, sentence_offsets=offsets)
    store = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(store["issues"][:], pairs)
    np.testing.assert_array_equal(store["sentence_scores"][:], scores)
    np.testing.assert_array_equal(store["token_scores"][:], token_scores)
    worst = int(np.argsort(scores, kind="stable")[0])
    flagged = ", ".join(str(t) for t in sorted(pairs[pairs[:, 0] == worst, 1].tolist())) or "-"
    assert f"label issues    {len(pairs):,} tokens" in proc.stdout
    assert any(line.split()[:1] == [str(worst)] and line.endswith(flagged) for line in proc.stdout.splitlines())
    summary = run("summary", str(out), "--json", "--top", "2")
    assert json.loads(summary.stdout)["worst_sentences"][0]["sentence"] == worst


def test_bad_token_input_is_refused_in_one_line_and_nothing_is_written(files, tmp_path):
    root, *_, t_given, t_probs, offsets = files
    bad = t_probs.copy()
    bad[offsets[7] + 2, 1] = np.nan
    np.save(tmp_path / "labels.npy", t_given)
    np.save(tmp_path / "probs.npy", bad)
    np.save(tmp_path / "offsets.npy", offsets)
    inputs = ["--labels", str(tmp_path / "labels.npy"), "--pred-probs", str(tmp_path / "probs.npy")]
    proc = run("find", "--task", "token", *inputs, "--sentence-offsets", str(tmp_path / "offsets.npy"),
               "--output", str(tmp_path / "out.zarr"))
    assert proc.returncode != 0
    assert "sentence 7, token 2, class 1 = nan" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    missing = run("find", "--task", "token", *inputs, "--output", str(tmp_path / "out.zarr"))
    assert missing.returncode != 0 and "--sentence-offsets" in missing.stderr
    wrong = run("find", "--task", "multilabel", *inputs, "--output", str(tmp_path / "out.zarr"), "--health")
    assert wrong.returncode != 0 and "--health does not go with --task multilabel" in wrong.stderr
    assert not (tmp_path / "out.zarr").exists()


def test_multilabel_low_score_filters_store_the_libraries_issues(files, tmp_path):
    root, given, probs, *_ = files
    out = tmp_path / "low.zarr"
    proc = run("find", "--task", "multilabel", "--labels", str(root / "ml_labels.npy"),
               "--pred-probs", str(root / "ml_probs.npy"), "--output", str(out), "--filter-by",
               "low_self_confidence", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    mask = ml.find_label_issues(given, probs, filter_by="low_self_confidence")
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["is_label_issue"][:], mask)
    assert not np.array_equal(mask, ml.find_multilabel_issues_per_class(
        given, probs, filter_by="low_self_confidence").any(axis=1))


def test_multilabel_labels_compressed_with_offsets(files, tmp_path):
    root, given, probs, *_ = files
    indices = np.concatenate([np.flatnonzero(row) for row in given]).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(given.sum(axis=1))]).astype(np.int64)
    np.save(tmp_path / "indices.npy", indices)
    np.save(tmp_path / "offsets.npy", offsets)
    out = tmp_path / "sets.zarr"
    proc = run("find", "--task", "multilabel", "--labels", str(tmp_path / "indices.npy"),
               "--label-offsets", str(tmp_path / "offsets.npy"), "--pred-probs", str(root / "ml_probs.npy"),
               "--output", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["is_label_issue"][:],
                                  ml.find_label_issues(given, probs))
