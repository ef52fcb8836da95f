"""Opening and checking the inputs.

Everything a user may pass (numpy arrays, ``np.memmap``, ``.npy`` paths,
Zarr arrays, h5py datasets, dask arrays, lists of labels) becomes a
*row source*: a picklable, read-only object with ``shape``, ``dtype`` and
row slicing that returns numpy.  File-backed sources keep only the path and
reopen the file in each process, so a Dask worker or a forked process reads
the blocks it needs straight from storage and nothing is copied up front.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
from typing import Any

import numpy as np


def _split_key(key: Any) -> tuple[Any, tuple]:
    """``(rows, rest)``: an index's part on rows and its parts on other axes."""
    return (key[0], key[1:]) if isinstance(key, tuple) else (key, ())


class RowSource:
    """A read-only 1-D or 2-D array read by row ranges.

    Subclasses set ``shape``, ``dtype`` and ``storage_rows`` (the row chunk of
    the underlying storage, or None) and implement :meth:`_open`.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    storage_rows: int | None = None
    description: str = "array"
    #: Attributes that hold this process's open handles or caches: pickled
    #: as None, so each process opens the source itself.
    _per_process: tuple[str, ...] = ()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _open(self) -> Any:
        raise NotImplementedError

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self._open()[key])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in self._per_process:
            state[name] = None
        return state

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

    _per_process = ("_map", "_pid")

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
        # Fortran-ordered files are read the same way; a block of rows then
        # touches one stretch of each column.
        order = "C" if arr.flags.c_contiguous else "F"
        return cls(path, arr.offset, arr.dtype, arr.shape, order)

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

    def mapped(self) -> np.ndarray:
        """The whole file as one read-only mapping, kept for this process
        while this object lives; slicing it reads only the rows sliced.
        :meth:`release` lets go of rows read from it."""
        return self._open()

    def release(self, start: int, stop: int) -> None:
        """Drop rows ``start:stop`` of :meth:`mapped` from this process's
        resident memory: they stay in the page cache, and a later read
        maps them again.  Without it a job's resident size would grow to
        the file's as it reads."""
        # Forked workers release from the mapping they inherited, as they
        # read from it: it is this process's too.
        mm = getattr(self._map, "_mmap", None)
        if mm is None or self.order != "C" or not hasattr(mmap, "MADV_DONTNEED"):
            return
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        # np.memmap maps from the allocation boundary below the data.
        lead = self.offset % mmap.ALLOCATIONGRANULARITY
        a, b = lead + start * row_bytes, lead + stop * row_bytes
        a -= a % mmap.PAGESIZE
        if b > a:
            mm.madvise(mmap.MADV_DONTNEED, a, b - a)

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, rest = _split_key(key)
        if self.order == "C" and isinstance(rows, slice) and rows.step in (None, 1):
            # Map just these rows, and unmap them when the block is dropped:
            # pages of a long-lived mapping would stay resident and count
            # against a Dask worker's memory limit as the job moves on.
            start, stop, _ = rows.indices(self.shape[0])
            stop = max(start, stop)
            inner = self.shape[1:]
            if stop == start:
                out = np.empty((0,) + inner, dtype=self.dtype)
            else:
                row_bytes = int(np.prod(inner, dtype=np.int64)) * self.dtype.itemsize
                out = np.asarray(np.memmap(
                    self.path, dtype=self.dtype, mode="r", offset=self.offset + start * row_bytes,
                    shape=(stop - start,) + inner,
                ))
            return out[(slice(None),) + rest] if rest else out
        # Anything else (Fortran order, fancy keys): the whole mapping, no copy.
        return np.asarray(self._open()[key])

    def __dask_tokenize__(self) -> tuple:
        st = os.stat(self.path)
        return (type(self).__name__, self.path, st.st_mtime_ns, st.st_size, self.offset, self.shape, str(self.dtype))


class HDF5Dataset(RowSource):
    """A dataset in an HDF5 file, opened by name in each process."""

    _per_process = ("_dset", "_pid")

    def __init__(self, filename: str, name: str) -> None:
        try:
            import h5py
        except ImportError:
            raise ImportError("reading HDF5 needs h5py: pip install 'dask-labelissues[hdf5]'") from None

        self.filename = os.fspath(filename)
        self.name = name
        with self._file() as f:
            if name not in f or not isinstance(f[name], h5py.Dataset):
                found: list[str] = []
                f.visititems(lambda path, obj: found.append("/" + path) if isinstance(obj, h5py.Dataset) else None)
                hint = f"; it holds {', '.join(sorted(found))}" if found else "; it holds no datasets"
                raise ValueError(f"{self.filename} has no dataset {name!r}{hint}")
            dset = f[name]
            self.shape = tuple(int(s) for s in dset.shape)
            self.dtype = np.dtype(dset.dtype)
            self.storage_rows = int(dset.chunks[0]) if dset.chunks else None
        self.description = f"{self.filename}:{name}"
        self._pid: int | None = None
        self._dset: Any = None

    def _file(self) -> Any:
        import h5py

        if "://" in self.filename:
            import fsspec

            return h5py.File(fsspec.open(self.filename, "rb").open(), "r")
        if not os.path.exists(self.filename):
            raise FileNotFoundError(f"no such file: {self.filename}")
        return h5py.File(self.filename, "r")

    def _open(self) -> Any:
        if self._dset is None or self._pid != os.getpid():
            self._dset = self._file()[self.name]
            self._pid = os.getpid()
        return self._dset

    def __dask_tokenize__(self) -> tuple:
        return (type(self).__name__, self.filename, self.name, self.shape, str(self.dtype))


class ZarrArray(RowSource):
    """A Zarr array (format 3, or format 2 opened through zarr 3).

    The zarr object pickles as its store and path, so workers open it
    themselves; zarr resets its I/O thread after a fork.
    """

    _per_process = ("_reader",)

    def __init__(self, array: Any) -> None:
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        shards = getattr(array, "shards", None)
        self.storage_rows = int((shards or array.chunks)[0])
        self.description = f"zarr {getattr(array, 'store_path', '')}".strip()
        self._reader: Any = None

    def _open(self) -> Any:
        return self.array

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, rest = _split_key(key)
        whole_rows = len(rest) < len(self.shape) and all(
            isinstance(r, slice) and r.indices(n) == (0, n, 1) for r, n in zip(rest, self.shape[1:])
        )
        if isinstance(rows, slice) and rows.step in (None, 1) and whole_rows:
            if self._reader is None:
                from .zarr_chunks import ChunkReader

                self._reader = ChunkReader.for_array(self.array) or False
            if self._reader:
                start, stop, _ = rows.indices(self.shape[0])
                block = self._reader.read(start, stop)
                if block is not None:
                    return block
        return np.asarray(self.array[key])


class RemoteNpy(RowSource):
    """A ``.npy`` file behind an fsspec URL, read by byte ranges.

    Rows are contiguous in a C-order ``.npy``, so a block of rows is one
    range request; nothing but the header is read up front.
    """

    _per_process = ("_fs",)

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url
        fs, path = fsspec.core.url_to_fs(url)
        with fs.open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"{url}: Fortran-ordered .npy files cannot be read by rows")
        if dtype.hasobject:
            raise TypeError(f"{url} holds Python objects; only numeric .npy files are read")
        self.shape = tuple(int(x) for x in shape)
        self.dtype = np.dtype(dtype)
        self.description = url
        self._fs: Any = None

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, rest = _split_key(key)
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("remote .npy sources are read by contiguous row slices")
        start, stop, _ = rows.indices(self.shape[0])
        stop = max(start, stop)
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if self._fs is None:
            import fsspec

            self._fs, self._path = fsspec.core.url_to_fs(self.url)
        raw = self._fs.cat_file(
            self._path, start=self.offset + start * row_bytes, end=self.offset + stop * row_bytes
        )
        out = np.frombuffer(raw, dtype=self.dtype).reshape((stop - start,) + self.shape[1:])
        return out[(slice(None),) + rest] if rest else out

    def __dask_tokenize__(self) -> tuple:
        return (type(self).__name__, self.url, self.offset, self.shape, str(self.dtype))


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


def is_dask_array(obj: Any) -> bool:
    # No dask array exists before dask.array is imported, and importing it
    # (with scipy.sparse behind it, where installed) costs a fresh process
    # about half a second that the fork and serial engines never need.
    da = sys.modules.get("dask.array")
    return da is not None and isinstance(obj, da.Array)


def to_numpy(x: Any) -> np.ndarray:
    """``x`` as numpy; a dask array computed by the client whose cluster
    holds its persisted blocks, if any (the default scheduler would not
    find them when that client is not the current one)."""
    return np.asarray(compute_all(x)[0] if is_dask_array(x) else x)


def compute_all(*collections: Any, like: Any = None) -> tuple[Any, ...]:
    """``dask.compute(*collections)``, by the client whose cluster holds
    their persisted blocks (or ``like``'s), if any (as :func:`to_numpy`)."""
    import dask

    try:
        from distributed import futures_of
    except ImportError:
        return dask.compute(*collections)
    held = futures_of(like if like is not None else list(collections))
    if not held:
        return dask.compute(*collections)
    return tuple(held[0].client.compute(list(collections), sync=True))


_H5_SUFFIXES = (".h5", ".hdf5", ".he5", ".hdf")


def open_path(text: str, name: str) -> RowSource:
    """Open a source given as text, as on the command line.

    Forms: ``file.npy``; ``store.zarr`` or ``store.zarr:path/in/group``;
    ``file.h5:/dataset``; and any of these behind a URL fsspec understands
    (``s3://``, ``gs://``, ``https://``, ``file://``) when its backend is
    installed.
    """
    text = os.fspath(text)
    if text.startswith("file://"):
        text = text[len("file://"):]
    remote = "://" in text
    lowered = text.lower()
    base, inner = text, ""
    for suffix in (".zarr",) + _H5_SUFFIXES:
        marker = suffix + ":"
        if marker in lowered:
            cut = lowered.rindex(marker) + len(suffix)
            base, inner = text[:cut], text[cut + 1 :]
            break
    if base.lower().endswith(".npy"):
        if inner:
            raise ValueError(f"{name}: a .npy file has no inner path ({text!r})")
        return RemoteNpy(base) if remote else RawFile.from_npy(base)
    if base.lower().endswith(_H5_SUFFIXES):
        if not inner:
            raise ValueError(f"{name}: name the dataset inside the HDF5 file, as {base}:/dataset")
        return HDF5Dataset(base, inner)
    return _open_zarr(base, inner, name, remote=remote)


def _open_zarr(base: str, inner: str, name: str, remote: bool) -> RowSource:
    import zarr
    import zarr.errors

    if not remote and not os.path.exists(base):
        raise FileNotFoundError(f"no such file or store: {base}")
    try:
        node = zarr.open(store=base, path=inner or "", mode="r")
    except (FileNotFoundError, zarr.errors.BaseZarrError, KeyError, ValueError) as exc:
        where = f"{base}:{inner}" if inner else base
        raise ValueError(f"{name}: cannot open {where} as a Zarr array ({_absent(base, inner) or exc})") from None
    if isinstance(node, zarr.Group):
        arrays = sorted(k for k, _ in node.arrays())
        hint = f"; it holds {', '.join(arrays)}" if arrays else ""
        raise ValueError(
            f"{name}: {base}{':' + inner if inner else ''} is a Zarr group, not an array; "
            f"name the array as {base}:path/in/group{hint}"
        )
    return ZarrArray(node)


def _absent(base: str, inner: str) -> str | None:
    """Where ``inner`` names nothing in the group that would hold it, a
    message saying so and what that group holds (a misspelt array is the
    usual cause); None where it is there, or the group does not open."""
    import zarr

    parent, _, leaf = inner.strip("/").rpartition("/")
    try:
        group = zarr.open_group(store=base, path=parent, mode="r")
        members = sorted(k for k, _ in group.members())
    except Exception:
        return None
    if not leaf or leaf in members:
        return None
    where = f"{base}:{parent}" if parent else base
    return f"{where} has no member {leaf!r}; it holds {', '.join(members) if members else 'nothing'}"


def _reopenable(dataset: Any) -> str | None:
    """The absolute path of an h5py dataset's file where opening that path
    again opens the file the dataset is read from, else None.

    h5py keeps the name the file was opened by: relative to the working
    directory of that moment, and naming whatever file is there now (one
    moved into place since), so the path is only taken where it still
    leads to the open file (the same device and inode).
    """
    f = dataset.file
    if f.driver != "sec2":  # stdio's handle is a FILE pointer, not a descriptor
        return None
    path = os.path.abspath(f.filename)
    try:
        same = os.path.samestat(os.stat(path), os.fstat(f.id.get_vfd_handle()))
    except (OSError, TypeError, ValueError):
        return None
    return path if same else None


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
    if isinstance(obj, RowSource) or is_dask_array(obj):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return open_path(os.fspath(obj), name)
    if (
        isinstance(obj, np.memmap)
        and obj.filename is not None
        and obj.flags.c_contiguous
        and getattr(obj, "mode", "r") != "c"  # copy-on-write: the file is not the data
    ):
        return RawFile.from_memmap(obj)
    if isinstance(obj, np.ndarray):
        return InMemory(obj)
    module = type(obj).__module__
    if module.startswith("zarr"):
        return ZarrArray(obj)
    if module.startswith("h5py"):
        path = _reopenable(obj)
        if path is not None:
            with contextlib.suppress(OSError):  # open here with other flags (locking=False)
                return HDF5Dataset(path, obj.name)
        # In memory, a file object, or a path that leads elsewhere now: read
        # through this handle (one process).
        return InMemory(obj, description=f"h5py {obj.name}")
    if isinstance(obj, (list, tuple)):
        return InMemory(np.asarray(obj))
    if hasattr(obj, "shape") and hasattr(obj, "dtype") and hasattr(obj, "__getitem__"):
        return InMemory(obj, description=type(obj).__name__)
    raise TypeError(
        f"{name} must be an array (numpy, memmap, Zarr, h5py, dask), a .npy path"
        f"{' or a list' if name == 'labels' else ''}; got {type(obj).__name__}"
    )


def open_pair(labels: Any, pred_probs: Any) -> tuple[Any, Any, int, int]:
    """Both inputs opened (:func:`open_source`) and shape-checked
    (:func:`check_shapes`): ``(labels, pred_probs, N, K)``."""
    lab = open_source(labels, "labels")
    probs = open_source(pred_probs, "pred_probs")
    n, k = check_shapes(lab, probs)
    return lab, probs, n, k


def known_shape(arr: Any, name: str) -> None:
    """ValueError naming the remedy where ``arr`` is a dask array whose
    chunk sizes are unknown (after boolean indexing, say)."""
    if any(isinstance(s, float) and np.isnan(s) for s in arr.shape):
        raise ValueError(f"{name} is a dask array with unknown chunk sizes; call {name}.compute_chunk_sizes() first")


def check_shapes(labels: Any, pred_probs: Any) -> tuple[int, int]:
    """Check what can be checked without reading data; return ``(N, K)``.

    Raises TypeError for wrong dtypes and ValueError for wrong shapes.
    """
    for name, arr in (("labels", labels), ("pred_probs", pred_probs)):
        known_shape(arr, name)
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
        hint = ""
        if int(labels.shape[0]) == k:
            hint = f" (pred_probs is ({n}, {k}) and labels are {k} long: pred_probs transposed? use pred_probs.T)"
        raise ValueError(
            f"labels has {int(labels.shape[0])} rows but pred_probs has {n}; they must match{hint}"
        )
    return n, k


def reads_in_tasks(labels: Any, pred_probs: Any) -> bool:
    """Whether the Dask engine's tasks may read both inputs themselves: both
    are sources that pickle small (files and stores, not in-memory arrays
    or dask arrays)."""
    small = (RawFile, HDF5Dataset, ZarrArray, RemoteNpy)

    def pickles_small(source: Any) -> bool:
        if isinstance(source, LabelSetRows):
            return isinstance(source.indices, small) and isinstance(source.offsets, small)
        return isinstance(source, small)

    return pickles_small(labels) and pickles_small(pred_probs)


class LabelSetRows(RowSource):
    """Multi-label labels stored compressed, read as an ``(N, K)`` 0/1
    matrix a row range at a time: ``indices`` holds every example's classes
    one after another, example ``i``'s at ``indices[offsets[i]:offsets[i + 1]]``.
    A read of rows ``a:b`` reads ``offsets[a:b + 1]`` and those indices only."""

    def __init__(self, indices: RowSource, offsets: RowSource, n_classes: int) -> None:
        if len(indices.shape) != 1 or len(offsets.shape) != 1:
            raise ValueError(f"label indices and offsets must be 1-D, got {indices.shape} and {offsets.shape}")
        for name, src in (("label indices", indices), ("label offsets", offsets)):
            if np.dtype(src.dtype).kind not in "iu":
                raise TypeError(f"{name} must be integers, got dtype {np.dtype(src.dtype)}")
        self.indices, self.offsets, self.n_classes = indices, offsets, int(n_classes)
        self.shape = (int(offsets.shape[0]) - 1, self.n_classes)
        first, last = (int(np.asarray(offsets[i : i + 1])[0]) for i in (0, self.shape[0]))
        if first != 0 or last != int(indices.shape[0]):
            raise ValueError(f"label offsets must run from 0 to the number of label indices, "
                             f"{int(indices.shape[0])}; they run from {first} to {last}")
        self.dtype = np.dtype(np.uint8)
        self.description = "label sets"

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        a, b, step = rows.indices(self.shape[0]) if isinstance(rows, slice) else (None, None, None)
        if step != 1:
            raise TypeError("label sets are read by row ranges")
        bounds = np.asarray(self.offsets[a : b + 1], dtype=np.int64)
        out = np.zeros((b - a, self.n_classes), dtype=np.uint8)
        if b > a:
            if (np.diff(bounds) < 0).any() or bounds[0] < 0:
                i = int(np.argmax(np.diff(bounds) < 0)) if (np.diff(bounds) < 0).any() else 0
                raise ValueError(f"label offsets decrease at example {a + i}: {bounds[i]} then {bounds[i + 1]}")
            classes = np.asarray(self.indices[int(bounds[0]) : int(bounds[-1])], dtype=np.int64)
            row = np.repeat(np.arange(b - a), np.diff(bounds))
            bad = (classes < 0) | (classes >= self.n_classes)
            if bad.any():
                j = int(np.argmax(bad))
                raise ValueError(f"labels of example {a + int(row[j])} hold {classes[j]}, "
                                 f"not a class in 0..{self.n_classes - 1}")
            out[row, classes] = 1
        return out[(slice(None), *rest)] if rest else out


def stored_rows(array: Any) -> RowSource | None:
    """The Zarr array a dask array only reads, as a row source; None for
    any other dask array or object.

    ``da.from_zarr``, and ``da.from_array`` of a Zarr array, make a graph
    of two layers: the Zarr array, and a task a chunk that slices it
    (Dask's getter).  A job then reads the stored rows itself, in its own
    blocks, as it does given the Zarr array: through the dask array, a job
    on 1,000,000 x 100 took 2.7 times as long as given the Zarr array in
    160,000-row chunks, and 4.9 times in 2,000-row chunks, each chunk a
    task of its own and a new array.  Computations on the array, another
    getter and chunks held in the graph keep the dask array, and so do
    h5py datasets, which a job would reopen by their file's path: not
    always the file the dataset was read from.
    """
    zarr = sys.modules.get("zarr")
    if zarr is None or not is_dask_array(array):
        return None
    from dask.array.core import getter, getter_inline, getter_nofancy, slices_from_chunks
    from dask.core import flatten

    graph = array.__dask_graph__()
    original = f"original-{array.name}"
    if set(graph.layers) != {original, array.name} or graph.dependencies.get(array.name) != {original}:
        return None
    stored = list(graph.layers[original].values())
    if len(stored) != 1 or type(stored[0]) is not zarr.Array:
        return None
    if tuple(stored[0].shape) != array.shape or np.dtype(stored[0].dtype) != array.dtype:
        return None
    # Each chunk's task must slice the Zarr array at that chunk's place, as
    # from_array makes them; a graph this cannot read keeps the dask array.
    tasks = graph.layers[array.name]
    for key, place in zip(flatten(array.__dask_keys__()), slices_from_chunks(array.chunks)):
        task = tasks[key]
        args = getattr(task, "args", ())
        if getattr(task, "func", None) not in (getter, getter_nofancy, getter_inline) or len(args) < 2:
            return None
        if getattr(args[0], "key", None) != original or getattr(args[1], "value", None) != tuple(place):
            return None
    return ZarrArray(stored[0])


def as_row_source(obj: Any) -> RowSource:
    """The one-machine engines read row sources: a dask array's stored rows
    (:func:`stored_rows`) where it only reads them, else the dask array
    wrapped."""
    if is_dask_array(obj):
        stored = stored_rows(obj)
        return stored if stored is not None else DaskRows(obj)
    return obj
