"""The segmentation plot: ``summary STORE --plot`` on a store ``segment``
wrote, and :func:`dask_labelissues.segmentation.display_issues`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.image  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

from dask_labelissues import inputs, plot, segmentation  # noqa: E402
from dask_labelissues.synthetic import SegmentationSpec, segmentation_images  # noqa: E402

from .conftest import run_cli as run  # noqa: E402

N, K, H, W = 24, 4, 16, 24
NAMES = ["background", "road", "car", "person"]


@pytest.fixture(scope="module")
def data():
    labels, probs, _ = segmentation_images(SegmentationSpec(N, K, H, W, seed=11, noise=0.5), 0, N)
    mask = segmentation.find_label_issues(labels, probs)
    assert mask.any(axis=(1, 2)).sum() >= 5  # enough images with flagged pixels to choose among
    return labels, probs, mask


@pytest.fixture(scope="module")
def store(data, tmp_path_factory):
    """A store ``segment`` wrote from .npy inputs (absolute paths) and Zarr inputs."""
    labels, probs, _ = data
    root = tmp_path_factory.mktemp("segplot")
    np.save(root / "labels.npy", labels)
    group = zarr.open_group(str(root / "data.zarr"), mode="w", zarr_format=3)
    group.create_array("pred_probs", data=probs, chunks=(5, K, 8, 8))
    out = root / "out.zarr"
    proc = run("segment", "--labels", str(root / "labels.npy"), "--pred-probs", f"{root / 'data.zarr'}:pred_probs",
               "--output", str(out), "--class-names", ",".join(NAMES), "--images-per-block", "5", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return root, out


def red_pixels(rgb: np.ndarray) -> np.ndarray:
    """Where an image (float RGB(A) in [0, 1]) is the flags' colour."""
    return np.all(np.abs(rgb[..., :3] - np.array(to_rgb(plot.FLAG_COLOR))) < 0.02, axis=-1)


def flagged_panels(fig) -> dict[int, np.ndarray]:
    """The flagged-pixels panel's picture of each image drawn, by image index."""
    return {
        int(ax.get_label().split()[1]): np.asarray(ax.get_images()[0].get_array())
        for ax in fig.axes if ax.get_label().startswith("flagged ")
    }


def drawn_images(fig) -> list[int]:
    return [int(ax.get_label().split()[1]) for ax in fig.axes if ax.get_label().startswith("given ")]


# -- summary --plot -------------------------------------------------------------------
@pytest.mark.parametrize("top", [3, 5])
def test_summary_plot_draws_the_worst_images(data, store, tmp_path, top):
    labels, probs, mask = data
    _, out = store
    png = tmp_path / "seg.png"
    proc = run("summary", str(out), "--top", str(top), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert f"plot of the {top} worst images written to {png}" in proc.stderr
    assert "worst images" in proc.stdout  # the text summary is printed as before
    assert png.exists()

    picture = matplotlib.image.imread(str(png))
    ranked = zarr.open_group(str(out), mode="r")["ranked_images"][:top]
    expected = plot.segmentation_figure(
        ranked, labels[ranked], probs[ranked].argmax(axis=1), mask[ranked], class_names=NAMES,
        scores=np.zeros(top),
    )
    width, height = expected.get_size_inches() * plot.DPI
    assert abs(picture.shape[0] - height) <= 1 and abs(picture.shape[1] - width) <= 1
    # One row per image of three panels side by side, each at the images' aspect ratio (H / W),
    # with room for titles and the legend.
    image_row = picture.shape[1] / 3 * H / W
    assert top * image_row < picture.shape[0] < top * image_row * 1.6 + 150, picture.shape
    # Not one colour: the classes' colours, greys, and the flags.
    colours = np.unique((picture[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 10
    flagged = int(mask[ranked].sum())
    assert flagged > 0
    # Each flagged pixel is drawn as a square of about 13 x 13 screen pixels (far more than
    # the legend's patch of the flags' colour).
    assert red_pixels(picture).sum() >= 100 * flagged


def test_summary_plot_draws_at_most_six_images_by_default(store, tmp_path):
    _, out = store
    png4, png20 = tmp_path / "four.png", tmp_path / "default.png"
    assert run("summary", str(out), "--top", "4", "--plot", str(png4)).returncode == 0
    proc = run("summary", str(out), "--plot", str(png20))  # --top 20, the text's default
    assert proc.returncode == 0, proc.stderr
    four, default = matplotlib.image.imread(str(png4)), matplotlib.image.imread(str(png20))
    assert four.shape[1] == default.shape[1]
    rows = (default.shape[0] - four.shape[0]) / (four.shape[0] / 4)  # about 2 more rows of about 4
    assert 1.5 < rows < 2.5, (four.shape, default.shape)


def test_plot_segmentation_reads_only_the_images_it_draws(data, store, tmp_path, monkeypatch):
    labels, probs, mask = data
    _, out = store
    reads: dict[str, list] = {"labels": [], "pred_probs": []}
    open_path = inputs.open_path

    class Recording:
        def __init__(self, source, name):
            self.source, self.name, self.shape = source, name, source.shape

        def __getitem__(self, key):
            reads[self.name].append(key)
            return self.source[key]

    monkeypatch.setattr(inputs, "open_path", lambda text, name: Recording(open_path(text, name), name))
    drawn = {}
    figure = plot.segmentation_figure

    def recording_figure(images, labels, predicted, issues, **kwargs):
        drawn.update(images=images, labels=labels, predicted=predicted, issues=issues, **kwargs)
        return figure(images, labels, predicted, issues, **kwargs)

    monkeypatch.setattr(plot, "segmentation_figure", recording_figure)
    png = tmp_path / "seg.png"
    assert plot.plot_segmentation(out, png, top=4) == str(png)
    assert png.exists()

    group = zarr.open_group(str(out), mode="r")
    worst = group["ranked_images"][:4]
    np.testing.assert_array_equal(drawn["images"], worst)
    np.testing.assert_array_equal(drawn["labels"], labels[worst])
    np.testing.assert_array_equal(drawn["predicted"], probs[worst].argmax(axis=1))
    np.testing.assert_array_equal(drawn["issues"], mask[worst])
    np.testing.assert_allclose(drawn["scores"], group["image_scores"][:][worst])
    assert drawn["class_names"] == NAMES
    for name in reads:  # one image a read, only the images drawn
        assert [(k.start, k.stop) for k in reads[name]] == [(int(i), int(i) + 1) for i in worst], reads[name]


def test_summary_plot_names_a_missing_input(data, store, tmp_path):
    root, _ = store
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(root / "labels.npy", moved / "labels.npy")
    shutil.copytree(root / "data.zarr", moved / "data.zarr")
    out = moved / "out.zarr"
    # Relative input paths are recorded absolute: the plot is drawn from
    # any directory.
    proc = run("segment", "--labels", "labels.npy", "--pred-probs", "data.zarr:pred_probs", "--output", "out.zarr",
               "--no-progress", cwd=str(moved))
    assert proc.returncode == 0, proc.stderr
    assert zarr.open_group(str(out), mode="r").attrs["inputs"]["labels"] == str(moved / "labels.npy")
    assert run("summary", str(out), "--plot", "ok.png", cwd=str(tmp_path)).returncode == 0
    assert (tmp_path / "ok.png").exists()

    os.remove(moved / "labels.npy")
    png = tmp_path / "seg.png"
    proc = run("summary", str(out), "--plot", str(png), cwd=str(tmp_path))
    assert proc.returncode == 2
    error = proc.stderr.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: ")
    assert f"'{moved / 'labels.npy'}'" in error
    assert "needs the inputs the store was made from" in error
    assert not png.exists()

    # A Zarr input named with its inner path: the error names it as the store records it.
    shutil.copy(root / "labels.npy", moved / "labels.npy")
    shutil.rmtree(moved / "data.zarr")
    with pytest.raises(FileNotFoundError, match=r"data.zarr:pred_probs'.*needs the inputs the store was made from"):
        plot.plot_segmentation(out, png)
    assert not png.exists()


def test_summary_plot_refuses_inputs_of_another_shape(data, store, tmp_path):
    root, out = store
    labels, probs, _ = data
    copy = tmp_path / "out.zarr"
    shutil.copytree(out, copy)
    group = zarr.open_group(str(copy), mode="r+")
    np.save(tmp_path / "other.npy", labels[:5])
    group.attrs["inputs"] = {"labels": str(tmp_path / "other.npy"), "pred_probs": group.attrs["inputs"]["pred_probs"]}
    with pytest.raises(ValueError, match=r"other.npy has shape \(5, 16, 24\).*of shape \(24, 16, 24\)"):
        plot.plot_segmentation(copy, tmp_path / "seg.png")


def test_summary_without_plot_does_not_import_matplotlib(store):
    _, out = store
    code = (
        "import sys; from dask_labelissues.cli import main; "
        f"assert main(['summary', {str(out)!r}]) == 0; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


# -- display_issues -------------------------------------------------------------------
def test_display_issues_shows_the_images_of_most_flagged_pixels(data):
    labels, probs, mask = data
    counts = mask.sum(axis=(1, 2))
    fig = segmentation.display_issues(mask, labels, probs, top=4, class_names=NAMES)
    assert len(fig.axes) == 3 * 4
    expected = np.argsort(-counts, kind="stable")[:4]
    assert drawn_images(fig) == expected.tolist()
    titles = [ax.get_title() for ax in fig.axes if ax.get_label().startswith("flagged ")]
    assert titles == [f"flagged pixels ({counts[i]:,} of {H * W:,})" for i in expected]
    for i, picture in flagged_panels(fig).items():
        np.testing.assert_array_equal(red_pixels(picture), mask[i])
    given = {int(ax.get_label().split()[1]): np.asarray(ax.get_images()[0].get_array())
             for ax in fig.axes if ax.get_label().startswith("given ")}
    predicted = {int(ax.get_label().split()[1]): np.asarray(ax.get_images()[0].get_array())
                 for ax in fig.axes if ax.get_label().startswith("predicted ")}
    for i in expected:
        # Same class, same colour, in both panels; a different class, another colour.
        colour_of = {}
        for classes, picture in ((labels[i], given[i]), (probs[i].argmax(axis=0), predicted[i])):
            for c in np.unique(classes):
                colours = np.unique(picture[classes == c].reshape(-1, 3), axis=0)
                assert len(colours) == 1
                assert tuple(colour_of.setdefault(int(c), tuple(colours[0]))) == tuple(colours[0])
        assert len(set(colour_of.values())) == len(colour_of)


def test_display_issues_breaks_ties_by_index_and_skips_images_with_none(data):
    labels, probs, _ = data
    mask = np.zeros((N, H, W), dtype=bool)
    for image, flagged in ((1, 5), (2, 5), (4, 9), (7, 1), (9, 5)):
        mask[image].flat[:flagged] = True
    fig = segmentation.display_issues(mask, labels, probs, top=4)
    assert drawn_images(fig) == [4, 1, 2, 9]
    fig = segmentation.display_issues(mask, labels, probs, top=10)
    assert drawn_images(fig) == [4, 1, 2, 9, 7]  # 5 images have flags: no row for the others
    assert len(fig.axes) == 15
    fig = segmentation.display_issues(np.zeros_like(mask), labels, probs)
    assert fig.axes == []


def test_display_issues_exclude_hides_the_flagged_pixels_of_those_classes(data):
    labels, probs, mask = data
    counts = mask.sum(axis=(1, 2))
    chosen = np.argsort(-counts, kind="stable")[:3]
    # The class of most flagged pixels in the images drawn, so that hiding it shows.
    excluded = int(np.bincount(labels[chosen][mask[chosen]], minlength=K).argmax())
    everything = flagged_panels(segmentation.display_issues(mask, labels, probs, top=3))
    fig = segmentation.display_issues(mask, labels, probs, top=3, exclude=[excluded])
    assert drawn_images(fig) == chosen.tolist()  # chosen by all their flagged pixels, as cleanlab
    some_hidden = False
    for i, picture in flagged_panels(fig).items():
        shown = mask[i] & (labels[i] != excluded)
        np.testing.assert_array_equal(red_pixels(picture), shown)
        np.testing.assert_array_equal(red_pixels(everything[i]), mask[i])
        some_hidden |= bool((mask[i] & (labels[i] == excluded)).any())
        title = next(ax.get_title() for ax in fig.axes if ax.get_label() == f"flagged {i}")
        assert title.startswith(f"flagged pixels ({int(shown.sum()):,} of ")
    assert some_hidden
    with pytest.raises(ValueError, match="exclude must hold classes in 0..3"):
        segmentation.display_issues(mask, labels, probs, exclude=[K])


def test_display_issues_reads_lazy_inputs_and_saves(data, tmp_path):
    da = pytest.importorskip("dask.array")
    labels, probs, mask = data
    group = zarr.open_group(str(tmp_path / "in.zarr"), mode="w")
    group.create_array("labels", data=labels, chunks=(5, 8, 8))
    group.create_array("issues", data=mask, chunks=(7, 16, 24))
    np.save(tmp_path / "probs.npy", probs)
    png = tmp_path / "issues.png"
    lazy = segmentation.display_issues(
        da.from_array(mask, chunks=(5, H, W)), group["labels"], str(tmp_path / "probs.npy"), top=3, path=png,
    )
    stored = segmentation.display_issues(group["issues"], labels, da.from_array(probs, chunks=(4, K, H, W)), top=3)
    eager = segmentation.display_issues(mask, labels, probs, top=3)
    for fig in (lazy, stored):
        assert drawn_images(fig) == drawn_images(eager)
        for a, b in zip(fig.axes, eager.axes):
            np.testing.assert_array_equal(a.get_images()[0].get_array(), b.get_images()[0].get_array())
    assert png.exists()
    picture = matplotlib.image.imread(str(png))
    assert red_pixels(picture).sum() >= 100 * mask[drawn_images(eager)].sum()


def test_display_issues_refuses_shapes_that_disagree(data):
    labels, probs, mask = data
    with pytest.raises(ValueError, match="labels have shape"):
        segmentation.display_issues(mask, labels[:3], probs)
    with pytest.raises(ValueError, match="pred_probs must be"):
        segmentation.display_issues(mask, labels, probs[:, :, :8])
    with pytest.raises(ValueError, match="class_names has 2 names for 4 classes"):
        segmentation.display_issues(mask, labels, probs, class_names=["a", "b"])
    with pytest.raises(ValueError, match="top must be"):
        segmentation.display_issues(mask, labels, probs, top=0)


def test_ignored_pixels_are_drawn_apart_from_the_classes(data, tmp_path):
    labels, probs, _ = data
    labels = labels.astype(np.uint8)
    labels[:, :3, :] = 255  # a band of pixels to leave out, in every image
    mask = segmentation.find_label_issues(labels, probs, ignore_index=255)
    assert mask.any() and not mask[:, :3].any()
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "probs.npy", probs)
    out, png = tmp_path / "out.zarr", tmp_path / "seg.png"
    proc = run("segment", "--labels", str(tmp_path / "labels.npy"), "--pred-probs", str(tmp_path / "probs.npy"),
               "--output", str(out), "--ignore-index", "255", "--class-names", ",".join(NAMES), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    proc = run("summary", str(out), "--top", "3", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert png.exists()

    fig = segmentation.display_issues(mask, labels, probs, top=3, class_names=NAMES, ignore_index=255)
    ignored = np.array(to_rgb(plot.IGNORED_COLOR))
    for ax in fig.axes:
        picture = np.asarray(ax.get_images()[0].get_array())
        is_ignored = np.all(np.abs(picture - ignored) < 0.02, axis=-1)
        if ax.get_label().startswith("predicted "):
            assert not is_ignored.any()
        else:  # the given labels, and the grey map under the flags
            np.testing.assert_array_equal(is_ignored, labels[int(ax.get_label().split()[1])] == 255)
    legend = [t.get_text() for sub in fig.subfigs for lg in sub.legends for t in lg.get_texts()]
    assert "ignored (label 255)" in legend and "class 255" not in legend and len(legend) == K + 2
