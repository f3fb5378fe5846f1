"""ChunkReader returns exactly what zarr returns, by the direct path where it can."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from hpcpath.chunkread import ChunkReader
from hpcpath.codecs import array_codecs


def _array(tmp_path, codec: str, n: int = 21, chunk: int = 8, **extra):
    rng = np.random.default_rng(0)
    # smooth RGB images, so JPEG and Blosc both have something to do
    base = rng.integers(0, 255, (n, 4, 4, 3)).astype(np.uint8)
    data = np.kron(base, np.ones((1, 8, 8, 1), np.uint8))
    arr = zarr.create_array(str(tmp_path / f"{codec}.zarr"), shape=data.shape, chunks=(chunk, 32, 32, 3),
                            dtype="uint8", **array_codecs(codec), **extra)
    arr[:] = data
    return zarr.open_array(str(tmp_path / f"{codec}.zarr"), mode="r")


@pytest.mark.parametrize("codec", ["blosc-lz4", "blosc-zstd", "jpeg", "none"])
def test_direct_reads_equal_zarr_reads(tmp_path, codec):
    arr = _array(tmp_path, codec)
    reader = ChunkReader(arr)
    assert reader.direct
    for lo, hi in [(0, 8), (3, 7), (8, 16), (16, 21), (20, 21), (5, 13), (0, 21)]:  # incl. partial last chunk, spans
        got = reader.read(lo, hi)
        assert got.shape == (hi - lo, 32, 32, 3)
        np.testing.assert_array_equal(got, arr[lo:hi])


def test_unwritten_chunk_reads_as_fill_value(tmp_path):
    arr = zarr.create_array(str(tmp_path / "sparse.zarr"), shape=(16, 4, 4, 3), chunks=(8, 4, 4, 3),
                            dtype="uint8", fill_value=7, **array_codecs("blosc-lz4"))
    arr[:8] = 1
    reader = ChunkReader(zarr.open_array(str(tmp_path / "sparse.zarr"), mode="r"))
    assert (reader.read(0, 8) == 1).all() and (reader.read(8, 16) == 7).all()


def test_layouts_it_cannot_decode_go_through_zarr(tmp_path):
    sharded = _array(tmp_path, "blosc-lz4", shards=(16, 32, 32, 3))
    split_rows = zarr.create_array(str(tmp_path / "split.zarr"), shape=(8, 32, 32, 3), chunks=(4, 16, 32, 3), dtype="uint8")
    split_rows[:] = 3
    for arr in (sharded, split_rows):
        reader = ChunkReader(arr)
        assert not reader.direct
        np.testing.assert_array_equal(reader.read(1, 4), arr[1:4])


def test_a_corrupt_chunk_is_reported_by_zarr(tmp_path):
    arr = _array(tmp_path, "blosc-lz4")
    (tmp_path / "blosc-lz4.zarr" / "c" / "1" / "0" / "0" / "0").write_bytes(b"not blosc")
    with pytest.raises(Exception):  # noqa: B017 - whichever decoder error the codec raises
        ChunkReader(arr).read(8, 16)
