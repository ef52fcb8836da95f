"""Opening and checking the inputs.

Everything a user may pass (numpy arrays, ``np.memmap``, ``.npy`` paths,
Zarr arrays, h5py datasets, dask arrays, lists of labels) becomes a
*row source*: a picklable, read-only object with ``shape``, ``dtype`` and
row slicing that returns numpy.  File-backed sources keep only the path and
reopen the file in each process, so a Dask worker or a forked process reads
the blocks it needs straight from storage and nothing is copied up front.
"""

from __future__ import annotations

import mmap
import os
import uuid
import warnings
from typing import Any

import numpy as np

#: Target size of one block of pred_probs when chunk_rows is not given.
TARGET_BLOCK_BYTES = 64 * 2**20


class RowSource:
    """A read-only 1-D or 2-D array read by row ranges.

    Subclasses set ``shape``, ``dtype`` and ``storage_rows`` (the row chunk of
    the underlying storage, or None) and implement :meth:`_open`.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    storage_rows: int | None = None
    description: str = "array"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _open(self) -> Any:
        raise NotImplementedError

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._open()[key])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description} shape={self.shape} dtype={self.dtype}>"


class InMemory(RowSource):
    """A numpy array or any array-like with ``shape``, ``dtype`` and slicing.

    Wrapping hides the array's ``copy`` method from ``dask.array.from_array``,
    which would otherwise copy the whole input before anything runs.
    """

    def __init__(self, array: Any, description: str = "in-memory array") -> None:
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        chunks = getattr(array, "chunks", None)
        if isinstance(chunks, tuple) and chunks and isinstance(chunks[0], int):
            self.storage_rows = int(chunks[0])
        self.description = description

    def _open(self) -> Any:
        return self.array


class RawFile(RowSource):
    """A memory-mapped array in a file (``.npy`` or a raw ``np.memmap``).

    Only the path, offset, dtype and shape are pickled; each process maps
    the file itself, and reading a block touches only that block's pages.
    """

    def __init__(self, path: str, offset: int, dtype: Any, shape: tuple, order: str = "C") -> None:
        self.path = os.fspath(path)
        self.offset = int(offset)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.order = order
        self.description = self.path
        self._pid: int | None = None
        self._map: np.ndarray | None = None

    @classmethod
    def from_npy(cls, path: str | os.PathLike) -> "RawFile":
        path = os.fspath(path)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {path}") from None
        except ValueError as exc:
            raise ValueError(f"{path} is not a numpy .npy array of numbers: {exc}") from None
        if not isinstance(arr, np.memmap):
            raise ValueError(f"{path} could not be memory-mapped")
        return cls.from_memmap(arr)

    @classmethod
    def from_memmap(cls, arr: np.memmap) -> "RawFile":
        """The file region behind a C-contiguous ``np.memmap`` (or a row slice of one)."""
        mm = getattr(arr, "_mmap", None)
        if arr.filename is None or mm is None or not arr.flags.c_contiguous:
            raise ValueError("not a C-contiguous view of a memory-mapped file")
        # A slice inherits its parent's ``offset``; locate it from the pointers.
        map_start = arr.offset - arr.offset % mmap.ALLOCATIONGRANULARITY
        map_ptr = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        offset = map_start + (arr.ctypes.data - map_ptr)
        return cls(arr.filename, offset, arr.dtype, arr.shape, "C")

    def _open(self) -> np.ndarray:
        if self._map is None or self._pid != os.getpid():
            self._map = np.memmap(
                self.path, dtype=self.dtype, mode="r", offset=self.offset,
                shape=self.shape, order=self.order,
            )
            self._pid = os.getpid()
        return self._map

    def __getitem__(self, key: Any) -> np.ndarray:
        # A plain ndarray view on the mapping: no copy, and no np.memmap subclass.
        return np.asarray(self._open()[key]).view(np.ndarray)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_map"] = None
        state["_pid"] = None
        return state

    def __dask_tokenize__(self) -> tuple:
        st = os.stat(self.path)
        return (type(self).__name__, self.path, st.st_mtime_ns, st.st_size, self.offset, self.shape, str(self.dtype))


class HDF5Dataset(RowSource):
    """A dataset in an HDF5 file, opened by name in each process."""

    def __init__(self, filename: str, name: str) -> None:
        import h5py

        self.filename = os.fspath(filename)
        self.name = name
        with h5py.File(self.filename, "r") as f:
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise ValueError(f"{self.filename} has no dataset {name!r}")
            dset = f[name]
            self.shape = tuple(int(s) for s in dset.shape)
            self.dtype = np.dtype(dset.dtype)
            self.storage_rows = int(dset.chunks[0]) if dset.chunks else None
        self.description = f"{self.filename}:{name}"
        self._pid: int | None = None
        self._dset: Any = None

    def _open(self) -> Any:
        if self._dset is None or self._pid != os.getpid():
            import h5py

            self._dset = h5py.File(self.filename, "r")[self.name]
            self._pid = os.getpid()
        return self._dset

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_dset"] = None
        state["_pid"] = None
        return state

    def __dask_tokenize__(self) -> tuple:
        st = os.stat(self.filename)
        return (type(self).__name__, self.filename, self.name, st.st_mtime_ns, st.st_size)


class ZarrArray(RowSource):
    """A Zarr array (format 3, or format 2 opened through zarr 3).

    The zarr object pickles as its store and path, so workers open it
    themselves; zarr resets its I/O thread after a fork.
    """

    def __init__(self, array: Any) -> None:
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        shards = getattr(array, "shards", None)
        self.storage_rows = int((shards or array.chunks)[0])
        self.description = f"zarr {getattr(array, 'store_path', '')}".strip()

    def _open(self) -> Any:
        return self.array


class DaskRows(RowSource):
    """A dask array read block by block by the fork and serial engines."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.storage_rows = int(array.chunks[0][0]) if array.chunks[0] else None
        self.description = "dask array"

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.array[key].compute(scheduler="sync"))


def _is_dask_array(obj: Any) -> bool:
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, da.Array)


def open_source(obj: Any, name: str) -> RowSource | Any:
    """Turn one user input into a row source (dask arrays are returned as they are).

    Parameters
    ----------
    obj
        A numpy array, ``np.memmap``, path of a ``.npy`` file, Zarr array,
        h5py dataset, dask array, array-like, or (labels) a list.
    name
        ``"labels"`` or ``"pred_probs"``, for error messages.
    """
    if isinstance(obj, RowSource) or _is_dask_array(obj):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if path.endswith(".npy"):
            return RawFile.from_npy(path)
        raise ValueError(
            f"{name}: cannot open {path!r}; pass a .npy path or an opened array "
            "(Zarr, h5py, numpy or dask)"
        )
    if isinstance(obj, np.memmap) and obj.filename is not None and obj.flags.c_contiguous:
        return RawFile.from_memmap(obj)
    if isinstance(obj, np.ndarray):
        return InMemory(obj)
    module = type(obj).__module__
    if module.startswith("zarr"):
        return ZarrArray(obj)
    if module.startswith("h5py"):
        return HDF5Dataset(obj.file.filename, obj.name)
    if isinstance(obj, (list, tuple)):
        return InMemory(np.asarray(obj))
    if hasattr(obj, "shape") and hasattr(obj, "dtype") and hasattr(obj, "__getitem__"):
        return InMemory(obj, description=type(obj).__name__)
    raise TypeError(
        f"{name} must be an array (numpy, memmap, Zarr, h5py, dask), a .npy path"
        f"{' or a list' if name == 'labels' else ''}; got {type(obj).__name__}"
    )


def check_shapes(labels: Any, pred_probs: Any) -> tuple[int, int]:
    """Check what can be checked without reading data; return ``(N, K)``.

    Raises TypeError for wrong dtypes and ValueError for wrong shapes.
    """
    ldt, pdt = np.dtype(labels.dtype), np.dtype(pred_probs.dtype)
    if pdt == object:
        raise TypeError("pred_probs has object dtype; it must hold floating-point numbers")
    if ldt == object:
        raise TypeError("labels has object dtype; they must be integer class indices")
    if len(pred_probs.shape) != 2:
        raise ValueError(f"pred_probs must be 2-D (N, K), got shape {tuple(pred_probs.shape)}")
    if len(labels.shape) != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    if pdt.kind != "f":
        raise TypeError(f"pred_probs must be floating point, got dtype {pdt}")
    if ldt.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got dtype {ldt}")
    n, k = (int(s) for s in pred_probs.shape)
    if k < 2:
        raise ValueError(f"pred_probs must have at least 2 classes (columns), got {k}")
    if n == 0:
        raise ValueError("pred_probs has no rows (N = 0)")
    if int(labels.shape[0]) != n:
        raise ValueError(
            f"labels has {int(labels.shape[0])} rows but pred_probs has {n}; they must match"
        )
    return n, k


def auto_chunk_rows(k: int, itemsize: int, storage_rows: int | None) -> int:
    """Rows per block: about :data:`TARGET_BLOCK_BYTES` of pred_probs,
    rounded to whole storage chunks so no chunk is decoded twice."""
    rows = max(1, TARGET_BLOCK_BYTES // (k * itemsize))
    if storage_rows:
        rows = max(storage_rows, rows // storage_rows * storage_rows)
    return int(rows)


def as_dask_arrays(labels: Any, pred_probs: Any, chunk_rows: int | None) -> tuple[Any, Any]:
    """Dask arrays of the two inputs with the same row chunks and whole rows.

    Row sources become dask arrays whose tasks slice the source, so
    memory-mapped and on-disk inputs are read block by block by whichever
    worker runs the task.
    """
    import dask.array as da

    token = uuid.uuid4().hex[:12]

    def to_dask(src: Any, label: str, rows: int) -> Any:
        if _is_dask_array(src):
            return src
        chunks = (rows,) + tuple(src.shape[1:])
        return da.from_array(
            src, chunks=chunks, name=f"{label}-{token}", asarray=True, lock=False,
            inline_array=False, meta=np.empty((0,) * src.ndim, dtype=src.dtype),
        )

    k = int(pred_probs.shape[1])
    if chunk_rows is None:
        if _is_dask_array(pred_probs):
            rows = int(max(pred_probs.chunks[0]))
        else:
            rows = auto_chunk_rows(k, np.dtype(pred_probs.dtype).itemsize, pred_probs.storage_rows)
    else:
        rows = int(chunk_rows)
        if rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    probs = to_dask(pred_probs, "pred_probs", rows)
    if len(probs.chunks[1]) != 1:
        warnings.warn(
            f"pred_probs is split into {len(probs.chunks[1])} chunks along the class axis; "
            "rechunking to whole rows (each block of rows needs all K classes)",
            UserWarning,
            stacklevel=3,
        )
        probs = probs.rechunk({1: -1})
    if chunk_rows is not None and _is_dask_array(pred_probs):
        probs = probs.rechunk({0: rows})
    labs = to_dask(labels, "labels", rows)
    if labs.chunks[0] != probs.chunks[0]:
        labs = labs.rechunk({0: probs.chunks[0]})
    return labs, probs


def as_row_source(obj: Any) -> RowSource:
    """The fork and serial engines read row sources; wrap a dask array for them."""
    return DaskRows(obj) if _is_dask_array(obj) else obj


def local_chunk_rows(pred_probs: Any, chunk_rows: int | None) -> int:
    """Block size for the fork and serial engines."""
    if chunk_rows is not None:
        if int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return int(chunk_rows)
    k = int(pred_probs.shape[1])
    return auto_chunk_rows(k, np.dtype(pred_probs.dtype).itemsize, getattr(pred_probs, "storage_rows", None))
