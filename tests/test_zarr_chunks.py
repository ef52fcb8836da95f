"""The direct chunk reader returns exactly what zarr returns, or steps aside."""

from __future__ import annotations

import os
import weakref

import numpy as np
import pytest
import zarr
import zarr.codecs as zc
from numcodecs import Zstd

from dask_labelissues import find_label_issues
from dask_labelissues.inputs import open_path
from dask_labelissues.zarr_chunks import ChunkReader, zstd_content_size

from .conftest import make_dataset

RANGES = [(0, 64), (64, 192), (192, 250), (192, 10_000), (5, 100), (64, 71), (0, 250)]

COMPRESSORS = {
    "none": None,
    "zstd": zc.ZstdCodec(level=1),
    "zstd-checksum": zc.ZstdCodec(level=3, checksum=True),
    "blosc": zc.BloscCodec(cname="lz4", shuffle="shuffle"),
    "gzip": zc.GzipCodec(level=1),
}


def _write(path, values, chunks, **kwargs):
    arr = zarr.create_array(str(path), shape=values.shape, chunks=chunks, dtype=values.dtype, **kwargs)
    arr[...] = values
    return str(path)


def _same_as_zarr(path):
    src = open_path(path, "x")
    for a, b in RANGES:
        np.testing.assert_array_equal(src[a:b], src.array[a:b], err_msg=f"rows {a}:{b}")
        if src.ndim == 2:
            np.testing.assert_array_equal(src[a:b, :], src.array[a:b])
            # How dask.array.from_array asks for a block.
            np.testing.assert_array_equal(src[a:b, 0 : src.shape[1]], src.array[a:b])
    return src


def test_dask_style_keys_take_the_direct_path(tmp_path, monkeypatch):
    values = np.random.default_rng(4).random((250, 6)).astype(np.float32)
    src = open_path(_write(tmp_path / "a.zarr", values, (64, 6), compressors=zc.ZstdCodec(level=1)), "x")
    calls = []
    original = ChunkReader.read
    monkeypatch.setattr(ChunkReader, "read", lambda self, a, b: calls.append((a, b)) or original(self, a, b))
    np.testing.assert_array_equal(src[64:192, 0:6], values[64:192])
    np.testing.assert_array_equal(src[(slice(0, 64), slice(None))], values[:64])
    np.testing.assert_array_equal(src[0:64, 1:3], values[:64, 1:3])  # not whole rows: zarr
    assert calls == [(64, 192), (0, 64)]


def test_blocks_that_start_inside_a_chunk_are_read_directly(tmp_path, monkeypatch):
    """Blocks cut at sentence offsets (token scores) start inside chunks."""
    values = np.random.default_rng(6).random((250, 6)).astype(np.float32)
    src = open_path(_write(tmp_path / "a.zarr", values, (64, 6), compressors=zc.ZstdCodec(level=1)), "x")
    monkeypatch.setattr(type(src.array), "__getitem__", lambda *a: pytest.fail("read through zarr"))
    for a, b in [(5, 100), (70, 250), (63, 65), (100, 120), (1, 250)]:
        np.testing.assert_array_equal(src[a:b], values[a:b])


def test_a_small_block_does_not_keep_its_whole_chunk(tmp_path):
    values = np.random.default_rng(5).random((250, 6)).astype(np.float32)
    src = open_path(_write(tmp_path / "a.zarr", values, (64, 6), compressors=zc.ZstdCodec(level=1)), "x")
    small = src[64:70]
    np.testing.assert_array_equal(small, values[64:70])
    assert small.base is None  # a copy of 6 rows, not a view of 64
    assert src[0:128].base is not None  # whole chunks: no copy


def test_a_thread_reads_into_its_last_buffer_only_once_no_block_refers_to_it(tmp_path):
    values = np.random.default_rng(9).random((256, 6)).astype(np.float32)
    src = open_path(_write(tmp_path / "a.zarr", values, (64, 6), compressors=zc.ZstdCodec(level=1)), "x")
    first = src[0:64]
    held = src[64:128]  # the first block is alive: a buffer of its own
    np.testing.assert_array_equal(first, values[:64])
    np.testing.assert_array_equal(held, values[64:128])
    assert not np.shares_memory(first, held)
    base = weakref.ref(held.base)
    del first, held
    again = src[128:192]  # nothing refers to the last buffer: read into it
    assert again.base is base()
    np.testing.assert_array_equal(again, values[128:192])
    view = again[3:5]
    del again
    other = src[192:256]  # a view keeps it
    assert other.base is not base()
    np.testing.assert_array_equal(view, values[131:133])
    np.testing.assert_array_equal(other, values[192:256])


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_codecs_read_directly_and_match_zarr(tmp_path, name, dtype):
    rng = np.random.default_rng(1)
    values = (rng.random((250, 7)) * 100).astype(dtype)
    compressors = COMPRESSORS[name]
    path = _write(tmp_path / "a.zarr", values, (64, 7), compressors=compressors)
    src = _same_as_zarr(path)
    assert isinstance(src._reader, ChunkReader)
    np.testing.assert_array_equal(src[0:250], values)
    labels = _write(tmp_path / "l.zarr", values[:, 0].astype(np.int64), (64,), compressors=compressors)
    assert isinstance(_same_as_zarr(labels)._reader, ChunkReader)


def test_missing_chunks_read_as_the_fill_value(tmp_path):
    values = np.ones((250, 4), dtype=np.float32)
    values[64:128] = 0.5
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=values.shape, chunks=(64, 4),
                            dtype=np.float32, fill_value=0.5)
    arr[...] = values  # the chunk equal to the fill value is not written
    assert not os.path.exists(tmp_path / "a.zarr" / "c" / "1" / "0")
    src = _same_as_zarr(str(tmp_path / "a.zarr"))
    assert isinstance(src._reader, ChunkReader)


@pytest.mark.parametrize("compressors", [None, zc.ZstdCodec(level=1)], ids=["none", "zstd"])
def test_images_chunked_whole_are_read_directly(tmp_path, compressors, monkeypatch):
    """Segmentation's (N, K, H, W) pred_probs and (N, H, W) labels, chunked
    by whole images: zarr-python's read of these took twice as long."""
    rng = np.random.default_rng(7)
    probs = rng.random((11, 3, 4, 5)).astype(np.float32)
    labels = rng.integers(0, 3, (11, 4, 5)).astype(np.uint8)
    p = open_path(_write(tmp_path / "p.zarr", probs, (4, 3, 4, 5), compressors=compressors), "x")
    lab = open_path(_write(tmp_path / "l.zarr", labels, (4, 4, 5), compressors=compressors), "x")
    monkeypatch.setattr(type(p.array), "__getitem__", lambda *a: pytest.fail("read through zarr"))
    for a, b in [(0, 11), (0, 4), (4, 8), (3, 9), (8, 11), (10, 11)]:
        np.testing.assert_array_equal(p[a:b], probs[a:b])
        np.testing.assert_array_equal(lab[a:b], labels[a:b])
    assert isinstance(p._reader, ChunkReader) and isinstance(lab._reader, ChunkReader)


def test_images_chunked_within_are_read_by_zarr(tmp_path):
    probs = np.random.default_rng(8).random((11, 3, 4, 6)).astype(np.float32)
    src = open_path(_write(tmp_path / "p.zarr", probs, (4, 3, 2, 6)), "x")
    np.testing.assert_array_equal(src[0:11], probs)
    assert src._reader is False


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chunks": (64, 4), "shards": (128, 8)},  # sharded
        {"chunks": (64, 4)},  # columns split across chunks
        {"chunks": (64, 8), "serializer": zc.BytesCodec(endian="big")},
        {"chunks": (64, 8), "filters": [zc.TransposeCodec(order=(1, 0))]},
        {"chunks": (64, 8), "compressors": [zc.Crc32cCodec()]},
        {"chunks": (64, 8), "zarr_format": 2},
    ],
    ids=["sharded", "column-chunks", "big-endian", "transpose", "crc32c", "format-2"],
)
def test_other_layouts_are_read_by_zarr(tmp_path, kwargs):
    values = np.random.default_rng(2).random((250, 8)).astype(np.float32)
    path = _write(tmp_path / "a.zarr", values, **kwargs)
    src = _same_as_zarr(path)
    assert src._reader is False
    np.testing.assert_array_equal(src[0:250], values)


def test_a_chunk_that_does_not_hold_one_chunk_is_left_to_zarr(tmp_path):
    values = np.random.default_rng(3).random((250, 8)).astype(np.float32)
    path = _write(tmp_path / "a.zarr", values, (64, 8), compressors=zc.ZstdCodec(level=1))
    # A frame of the right format but half the size: ours must not return a
    # half-filled block; zarr rejects the chunk.
    with open(os.path.join(path, "c", "1", "0"), "wb") as f:
        f.write(Zstd(level=1).encode(values[:32].copy()))
    src = open_path(path, "x")
    np.testing.assert_array_equal(src[0:64], values[:64])
    with pytest.raises(Exception) as ours:
        src[64:128]
    with pytest.raises(Exception) as theirs:
        src.array[64:128]
    assert type(ours.value) is type(theirs.value)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 65_791, 65_792, 1 << 20, 52_428_800])
def test_zstd_content_size(n):
    frame = Zstd(level=1).encode(np.zeros(n, dtype=np.uint8))
    assert zstd_content_size(frame) == n


def test_zstd_content_size_rejects_non_frames():
    assert zstd_content_size(b"not a zstd frame") is None
    assert zstd_content_size(b"\x28\xb5\x2f\xfd\x00") is None  # truncated header


def test_job_on_directly_read_zarr_equals_in_memory(tmp_path):
    data = make_dataset(20_000, 9, seed=5, dtype=np.float32)
    probs = _write(tmp_path / "p.zarr", data.pred_probs, (3000, 9), compressors=zc.ZstdCodec(level=1))
    labels = _write(tmp_path / "l.zarr", data.labels, (3000,), compressors=zc.ZstdCodec(level=1))
    assert isinstance(ChunkReader.for_array(open_path(probs, "pred_probs").array), ChunkReader)
    reference = find_label_issues(data.labels, data.pred_probs, backend="serial").compute()
    for backend in ("dask", "fork", "serial"):
        for chunk_rows in (None, 3000, 4500):  # 4500: blocks that start inside a chunk
            got = find_label_issues(labels, probs, backend=backend, chunk_rows=chunk_rows).compute()
            np.testing.assert_array_equal(got.issues, reference.issues)
            np.testing.assert_array_equal(got.label_quality_scores, reference.label_quality_scores)


def test_zstd_content_size_reads_headers_with_a_dictionary_id():
    magic = (0xFD2FB528).to_bytes(4, "little")
    # FCS flag 2 (4 bytes), no single segment (so a window byte), a 2-byte dictionary id.
    header = magic + bytes([0b1000_0010, 0x40]) + (7).to_bytes(2, "little") + (123_456).to_bytes(4, "little")
    assert zstd_content_size(header) == 123_456
    # Single segment, FCS flag 0 (1 byte), 4-byte dictionary id.
    header = magic + bytes([0b0010_0011]) + (9).to_bytes(4, "little") + bytes([200])
    assert zstd_content_size(header) == 200


def _chunk_files(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name != "zarr.json":
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.mark.parametrize("rows", [65536 + 4464, 2 * 65536])
def test_synthetic_chunks_written_directly_are_the_files_zarr_writes(tmp_path, monkeypatch, rows):
    from dask_labelissues import zarr_chunks
    from dask_labelissues.synthetic import SyntheticSpec, write_zarr

    spec = SyntheticSpec(rows=rows, classes=7, seed=3)
    written = []
    real = zarr_chunks.ChunkWriter.write
    monkeypatch.setattr(zarr_chunks.ChunkWriter, "write", lambda self, *a: written.append(1) or real(self, *a))
    write_zarr(spec, tmp_path / "direct.zarr", chunk_rows=16384, compress=False)
    assert written  # the direct path wrote the chunks
    monkeypatch.setattr(zarr_chunks.ChunkWriter, "for_array", classmethod(lambda cls, array: None))
    write_zarr(spec, tmp_path / "zarr.zarr", chunk_rows=16384, compress=False)
    direct = _chunk_files(tmp_path / "direct.zarr" / "pred_probs")
    through_zarr = _chunk_files(tmp_path / "zarr.zarr" / "pred_probs")
    assert len(direct) == -(-rows // 16384)
    assert direct == through_zarr
    a = zarr.open_group(str(tmp_path / "direct.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "zarr.zarr"), mode="r")
    for name in ("labels", "pred_probs", "flipped"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_only_whole_chunks_of_uncompressed_arrays_are_written_directly(tmp_path):
    from dask_labelissues.zarr_chunks import ChunkWriter

    plain = zarr.create_array(str(tmp_path / "plain.zarr"), shape=(10, 3), chunks=(4, 3), dtype="float32",
                              compressors=None)
    writer = ChunkWriter.for_array(plain)
    values = np.arange(30, dtype=np.float32).reshape(10, 3)
    assert not writer.write(1, values[1:5])  # not on a chunk boundary
    assert not writer.write(0, values[:6])  # ends inside a chunk that is not the last
    assert not writer.write(8, values[:6])  # past the end
    assert writer.write(0, values[:8]) and writer.write(8, values[8:])
    np.testing.assert_array_equal(plain[:], values)
    zstd = zarr.create_array(str(tmp_path / "zstd.zarr"), shape=(10, 3), chunks=(4, 3), dtype="float32")
    assert ChunkWriter.for_array(zstd) is None
    sharded = zarr.create_array(str(tmp_path / "sharded.zarr"), shape=(16, 3), chunks=(4, 3), shards=(8, 3),
                                dtype="float32", compressors=None)
    assert ChunkWriter.for_array(sharded) is None


@pytest.mark.parametrize(
    "case",
    ["1-D", "float64 rows into float32", "dotted keys", "v2 keys", "NaN fill value"],
)
def test_direct_chunk_writes_are_the_files_zarr_writes(tmp_path, case):
    from dask_labelissues.zarr_chunks import ChunkWriter

    rng = np.random.default_rng(8)
    shape, chunks, dtype, kwargs = (10, 3), (4, 3), "float32", {}
    values = rng.random(shape)
    if case == "1-D":
        shape, chunks, values = (10,), (4,), values[:, 0]
    if case == "dotted keys":
        kwargs["chunk_key_encoding"] = {"name": "default", "separator": "."}
    if case == "v2 keys":
        kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "."}
    if case == "NaN fill value":
        kwargs["fill_value"] = np.nan
    if case != "float64 rows into float32":
        values = values.astype(dtype)

    def make(name):
        return zarr.create_array(str(tmp_path / name), shape=shape, chunks=chunks, dtype=dtype,
                                 compressors=None, **kwargs)

    direct, through_zarr = make("direct.zarr"), make("zarr.zarr")
    writer = ChunkWriter.for_array(direct)
    assert writer.write(0, values[:8]) and writer.write(8, values[8:])
    through_zarr[0:8] = values[:8]
    through_zarr[8:] = values[8:]
    got, want = _chunk_files(tmp_path / "direct.zarr"), _chunk_files(tmp_path / "zarr.zarr")
    assert len(got) == 3 and got == want
    np.testing.assert_array_equal(direct[:], through_zarr[:])
    assert not [p for p in os.listdir(tmp_path / "direct.zarr") if "partial" in p]


@pytest.mark.parametrize("keep", ["array", "export"])
def test_a_view_of_the_chunk_kept_past_its_decoding_does_not_fail_the_read(tmp_path, keep):
    """A view of a chunk file's mapping that outlives the decoder's return
    (as one did on a busy Dask worker) leaves the read's result intact: the
    mapping stays while the view does, instead of failing to close.  An
    array over the decoder's memoryview, or an export of that memoryview
    itself (which makes releasing it fail too)."""
    import pickle

    from dask_labelissues import zarr_chunks

    path = tmp_path / "chunk"
    path.write_bytes(np.arange(8, dtype=np.int64).tobytes())
    kept = []

    def decode(raw, out):
        kept.append(np.frombuffer(raw, dtype=np.uint8) if keep == "array" else pickle.PickleBuffer(raw))
        return zarr_chunks._copy(raw, out)

    out = np.empty(8, dtype=np.int64)
    assert zarr_chunks._decode_file(str(path), decode, out)
    np.testing.assert_array_equal(out, np.arange(8))
    np.testing.assert_array_equal(np.frombuffer(kept[0], dtype=np.int64), np.arange(8))
