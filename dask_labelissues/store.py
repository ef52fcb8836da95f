"""The results store: a Zarr v3 group written atomically.

Layout of ``OUT.zarr``:

``label_quality_scores`` (float64, N), ``is_label_issue`` (bool, N),
``given_label`` and ``predicted_label`` (int32, N), ``issues`` (int64, ranked),
``issue_scores`` (float64, the scores of ``issues``), ``confident_thresholds``
(float64, K), ``per_class_count`` and ``per_class_issues`` (int64, K); the
group's attributes hold the counts, settings, inputs, versions and timing.

The N-long arrays are written chunk by chunk by whoever holds them: Dask
workers for the dask engine (``dask.array.store``), this process for the
fork and serial engines.  The group is built under a hidden temporary name
beside ``OUT`` and renamed into place only when complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .api import LabelIssues

N_LONG = {
    "label_quality_scores": np.float64,
    "is_label_issue": np.bool_,
    "given_label": np.int32,
    "predicted_label": np.int32,
}
#: Rows per chunk of the N-long arrays written from numpy.
LOCAL_CHUNK_ROWS = 1 << 20


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if _is_remote(path):
        raise ValueError(
            f"the results store must be a local or shared-filesystem path, got {path!r}"
        )
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.abspath(path)


def _versions() -> dict[str, str]:
    import dask
    import distributed
    import zarr

    from . import __version__

    return {
        "dask_labelissues": __version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
    }


def write_results(
    result: "LabelIssues",
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    attrs: dict[str, Any] | None = None,
    client: Any = None,
) -> str:
    """Write ``result`` to a Zarr v3 store at ``path``, atomically.

    Parameters
    ----------
    result
        What :func:`~dask_labelissues.find_label_issues` returned.
    path
        The store's path (local, or a filesystem every worker shares).
    overwrite
        Replace an existing store; otherwise an existing ``path`` is an error.
    attrs
        Extra attributes (input sources, timing).
    client
        The distributed Client that holds the result's lazy arrays, if any.

    Returns
    -------
    str
        The absolute path written.
    """
    import dask
    import zarr

    target = _local(path)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} already exists (use --overwrite / overwrite=True to replace it)")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"directory {parent} does not exist")
    tmp = os.path.join(parent, f".{os.path.basename(target)}.partial-{uuid.uuid4().hex[:8]}")
    try:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        small = {
            "issues": np.asarray(result.issues, dtype=np.int64),
            "issue_scores": np.asarray(result.issue_scores, dtype=np.float64),
            "confident_thresholds": result.confident_thresholds,
            "per_class_count": result.per_class_count,
            "per_class_issues": result.per_class_issues,
        }
        for name, values in small.items():
            group.create_array(name, data=values, chunks=(max(1, min(len(values), LOCAL_CHUNK_ROWS)),))
        if result.confident_joint is not None:
            group.create_array("confident_joint", data=np.asarray(result.confident_joint, dtype=np.int64))

        sources, targets = [], []
        for name, dtype in N_LONG.items():
            values = getattr(result, name)
            if hasattr(values, "dask"):
                values = values.astype(dtype)
                rows = int(max(values.chunks[0]))
                if len(set(values.chunks[0][:-1])) > 1:
                    values = values.rechunk(rows)
                arr = group.create_array(name, shape=values.shape, chunks=(rows,), dtype=dtype)
                sources.append(values)
                targets.append(arr)
            else:
                values = np.asarray(values)
                arr = group.create_array(
                    name, shape=values.shape, chunks=(min(len(values), LOCAL_CHUNK_ROWS),), dtype=dtype
                )
                for a in range(0, len(values), LOCAL_CHUNK_ROWS):
                    arr[a : a + LOCAL_CHUNK_ROWS] = values[a : a + LOCAL_CHUNK_ROWS].astype(dtype)
        if sources:
            import dask.array as da

            stored = da.store(sources, targets, lock=False, compute=False)
            if client is not None:
                dask.compute(stored, scheduler=client)
            else:
                dask.compute(stored)

        meta = {
            "format": "dask_labelissues results 1",
            "rows": result.n_rows,
            "classes": result.n_classes,
            "num_issues": result.num_issues,
            "estimated_num_issues": result.estimated_num_issues,
            "method": result.method,
            "adjust_pred_probs": result.adjust_pred_probs,
            "estimation_method": result.estimation_method,
            "backend": result.backend,
            "filter_by": result.filter_by,
            "reads": result.reads,
            "versions": _versions(),
        }
        meta.update(attrs or {})
        group.attrs.update(meta)

        if os.path.exists(target):
            trash = f"{tmp}.old"
            os.rename(target, trash)
            os.rename(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def open_results(path: str | os.PathLike) -> "LabelIssues":
    """Open a results store as a :class:`~dask_labelissues.LabelIssues`.

    The small arrays are loaded; the N-long ones are dask arrays over the
    store, read only when used.  The store's attributes are in ``metadata``.
    """
    import dask.array as da
    import zarr
    import zarr.errors

    from .api import LabelIssues

    target = _local(path)
    if not os.path.exists(target):
        raise FileNotFoundError(f"no results store at {target}")
    try:
        group = zarr.open_group(target, mode="r")
        attrs = dict(group.attrs)
        if not str(attrs.get("format", "")).startswith("dask_labelissues results"):
            raise ValueError("not written by dask_labelissues")
        lazy = {name: da.from_zarr(group[name]) for name in N_LONG}
        small = {name: group[name][:] for name in (
            "issues", "issue_scores", "confident_thresholds", "per_class_count", "per_class_issues")}
    except (KeyError, ValueError, TypeError, zarr.errors.BaseZarrError) as exc:
        raise ValueError(f"{target} is not a dask_labelissues results store ({exc})") from None
    return LabelIssues(
        issues=small["issues"],
        is_label_issue=lazy["is_label_issue"],
        label_quality_scores=lazy["label_quality_scores"],
        confident_thresholds=small["confident_thresholds"],
        num_issues=int(attrs["num_issues"]),
        estimated_num_issues=int(attrs["estimated_num_issues"]),
        per_class_count=small["per_class_count"],
        per_class_issues=small["per_class_issues"],
        issue_scores=small["issue_scores"],
        given_label=lazy["given_label"],
        predicted_label=lazy["predicted_label"],
        n_rows=int(attrs["rows"]),
        n_classes=int(attrs["classes"]),
        method=attrs["method"],
        adjust_pred_probs=bool(attrs["adjust_pred_probs"]),
        estimation_method=attrs["estimation_method"],
        backend=attrs["backend"],
        metadata=attrs,
        filter_by=attrs.get("filter_by"),
        confident_joint=group["confident_joint"][:] if "confident_joint" in group else None,
        reads=int(attrs.get("reads", 1)),
    )
