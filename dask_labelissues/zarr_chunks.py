"""Whole chunks of a local Zarr array, decoded straight into the block.

zarr-python decodes each chunk into a fresh buffer and then copies it into
the output, so a 50 MB chunk costs two fresh allocations (each page faulted
in and zeroed by the kernel) and one extra copy: about 200 ms per chunk on
the benchmark machine where reading the file and decompressing it take
about 100 ms.  For the common layout of a label-issues input (format 3, a
local store, no sharding, row chunks that span every column, a little-endian
``bytes`` codec then at most one of zstd, blosc or gzip) this module reads
each chunk file and decompresses it into its place in the block with
numcodecs, the library zarr itself decodes with.  Anything else, and any
chunk whose header does not promise exactly one chunk of bytes, is left to
zarr, so the values read are always the ones zarr would return.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from typing import Any, Callable

import numpy as np

#: Decoders: ``decode(raw, out)`` fills ``out`` (C-contiguous) from ``raw``
#: and returns True, or returns False when ``raw`` does not hold exactly
#: ``out.nbytes`` bytes (the caller then asks zarr).
Decoder = Callable[[bytes, np.ndarray], bool]

_ZSTD_MAGIC = 0xFD2FB528


def zstd_content_size(raw: bytes) -> int | None:
    """The decompressed size a zstd frame header declares, or None if absent."""
    if len(raw) < 6 or struct.unpack_from("<I", raw)[0] != _ZSTD_MAGIC:
        return None
    descriptor = raw[4]
    fcs_flag = descriptor >> 6
    single_segment = (descriptor >> 5) & 1
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]
    width = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if width == 0 or len(raw) < pos + width:
        return None
    value = int.from_bytes(raw[pos : pos + width], "little")
    return value + 256 if width == 2 else value


def _zstd(codec: Any) -> Decoder:
    from numcodecs import Zstd

    numcodec = Zstd(level=codec.level, checksum=codec.checksum)

    def decode(raw: bytes, out: np.ndarray) -> bool:
        # A frame without a declared size, or followed by a second frame,
        # could leave part of ``out`` unwritten; zarr decodes those.
        if zstd_content_size(raw) != out.nbytes:
            return False
        numcodec.decode(raw, out=out)
        return True

    return decode


def _blosc(codec: Any) -> Decoder:
    from numcodecs import Blosc

    numcodec = Blosc()  # decompression reads its settings from the chunk's header

    def decode(raw: bytes, out: np.ndarray) -> bool:
        # A blosc 1 header keeps the decompressed size in bytes 4-7.
        if len(raw) < 16 or struct.unpack_from("<I", raw, 4)[0] != out.nbytes:
            return False
        numcodec.decode(raw, out=out)
        return True

    return decode


def _gzip(codec: Any) -> Decoder:
    from numcodecs import GZip

    numcodec = GZip(level=codec.level)

    def decode(raw: bytes, out: np.ndarray) -> bool:
        data = numcodec.decode(raw)
        if len(data) != out.nbytes:
            return False
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
        return True

    return decode


def _raw(codec: Any) -> Decoder:
    def decode(raw: bytes, out: np.ndarray) -> bool:
        if len(raw) != out.nbytes:
            return False
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)
        return True

    return decode


def _decoder(codecs: tuple) -> Decoder | None:
    import zarr.codecs as zc

    if not codecs or not isinstance(codecs[0], zc.BytesCodec) or len(codecs) > 2:
        return None
    endian = codecs[0].endian
    if endian is not None and endian.value != sys.byteorder:
        return None
    if len(codecs) == 1:
        return _raw(None)
    makers = {zc.ZstdCodec: _zstd, zc.BloscCodec: _blosc, zc.GzipCodec: _gzip}
    maker = makers.get(type(codecs[1]))
    return maker(codecs[1]) if maker else None


_local = threading.local()


def _read_file(path: str) -> memoryview:
    """The bytes of ``path`` in this thread's reusable buffer (valid until the
    thread's next call): a fresh buffer per chunk would be page faulted in
    and zeroed every time."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buf = getattr(_local, "buffer", None)
        if buf is None or len(buf) < size:
            buf = _local.buffer = bytearray(size)
        view = memoryview(buf)[:size]
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        return view[:got]


class ChunkReader:
    """Reads row ranges that start on a chunk boundary, one chunk file at a time.

    Build it with :meth:`for_array`, which returns None for the layouts it
    does not handle.
    """

    def __init__(self, array: Any, directory: str, decode: Decoder) -> None:
        self.array = array
        self.directory = directory
        self.decode = decode
        self.metadata = array.metadata
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.rows = int(self.metadata.chunk_grid.chunk_shape[0])
        self.fill_value = self.metadata.fill_value

    @classmethod
    def for_array(cls, array: Any) -> "ChunkReader | None":
        """A reader for ``array`` (a ``zarr.Array``), or None to read through zarr."""
        try:
            from zarr.core.chunk_grids import RegularChunkGrid
            from zarr.storage import LocalStore
        except ImportError:  # pragma: no cover - zarr 3 is a dependency
            return None
        meta = getattr(array, "metadata", None)
        if getattr(meta, "zarr_format", None) != 3 or getattr(array, "shards", None) is not None:
            return None
        store = array.store_path.store
        if not isinstance(store, LocalStore) or not isinstance(meta.chunk_grid, RegularChunkGrid):
            return None
        chunk_shape = tuple(meta.chunk_grid.chunk_shape)
        if len(chunk_shape) not in (1, 2) or tuple(chunk_shape[1:]) != tuple(array.shape[1:]):
            return None
        dtype = np.dtype(array.dtype)
        if dtype.kind not in "biuf" or not dtype.isnative:
            return None
        decode = _decoder(tuple(meta.codecs))
        if decode is None:
            return None
        return cls(array, os.path.join(str(store.root), array.path), decode)

    def read(self, start: int, stop: int) -> np.ndarray | None:
        """Rows ``start:stop`` (``start`` on a chunk boundary), or None when a
        chunk is not what its layout promises and zarr should read the range."""
        n = self.shape[0]
        stop = min(stop, n)
        if start % self.rows or not 0 <= start < stop:
            return None
        first, last = start // self.rows, -(-stop // self.rows)
        # Whole chunks, the last one padded as stored; the caller sees a view.
        out = np.empty(((last - first) * self.rows,) + self.shape[1:], dtype=self.dtype)
        per_chunk = out.reshape(last - first, -1)
        tail = (0,) * (len(self.shape) - 1)
        for c in range(first, last):
            key = self.metadata.encode_chunk_key((c,) + tail)
            try:
                raw = _read_file(os.path.join(self.directory, key))
            except FileNotFoundError:
                per_chunk[c - first] = self.fill_value
                continue
            if not self.decode(raw, per_chunk[c - first]):
                return None
        return out[: stop - start]
