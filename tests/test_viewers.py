"""Viewers: `hpcpath tile --pyramid-downsample 1` writes the OME-NGFF pyramid from full
resolution, so napari (napari-ome-zarr) and other OME-Zarr viewers show the slide pixel for
pixel.  Read back here with ome-zarr-py, the reader those viewers use."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

HPCPATH = [sys.executable, "-m", "hpcpath.cli.main"]


@pytest.mark.slow
def test_full_resolution_pyramid_reads_back_with_ome_zarr_equal_to_the_tiles(tmp_path):
    pytest.importorskip("ome_zarr", reason="pip install ome-zarr (in the dev extra)")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from hpcpath.store import open_store

    subprocess.run([*HPCPATH, "synth", "-o", str(tmp_path / "s"), "-n", "1", "--size", "2048x1536"],
                   check=True, capture_output=True)
    subprocess.run([*HPCPATH, "tile", str(tmp_path / "s"), "-o", str(tmp_path / "o"), "--tile-size", "128",
                    "--pyramid-downsample", "1", "--workers", "1"], check=True, capture_output=True)
    store = tmp_path / "o" / "slide_000.zarr"
    (node,) = [n for n in Reader(parse_url(str(store / "image")))() if n.data]
    levels = node.data
    assert [tuple(a.shape) for a in levels][:3] == [(3, 1536, 2048), (3, 768, 1024), (3, 384, 512)]
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales[0] == [1.0, 0.5, 0.5] and scales[1] == [1.0, 1.0, 1.0]  # um per pixel: the slide's 0.5
    st = open_store(store)
    assert len(st) > 20
    level0 = np.asarray(levels[0])
    for i, (x, y) in enumerate(st.index[:, :2]):  # every tile is level 0's pixels at its place
        np.testing.assert_array_equal(np.moveaxis(level0[:, y:y + 128, x:x + 128], 0, -1), st.tiles[i])
    # level 1 is level 0 halved (2x2 means)
    half = level0.reshape(3, 768, 2, 1024, 2).astype(np.float32).mean(axis=(2, 4))
    assert np.abs(np.asarray(levels[1]).astype(np.float32) - half).max() <= 1.0
