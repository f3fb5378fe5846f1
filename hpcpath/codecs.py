"""Tile-array codecs: Blosc (lossless) or JPEG at a set quality, as Zarr v3 codecs.

Raw uint8 tiles under Blosc-lz4 take about ten times the bytes of the JPEG slide they came
from; at cohort scale that decides whether a dataset fits on scratch.  zarr-python ships no v3
JPEG codec, so ``JpegCodec`` wraps imagecodecs' encoder as an array->bytes codec.  A chunk of
shape (n, T, T, 3) is encoded as one (n*T, T, 3) image: with T a multiple of 16 JPEG blocks
never straddle two tiles, so a tile decodes the same whichever chunk neighbours it has.

Passthrough stores (``hpcpath.passthrough``) keep the source slide's own compressed tiles as
chunks, one tile per chunk inside Zarr v3 shards: each chunk is a standalone JPEG (tables and
colour-space marker merged in) or JPEG 2000 codestream, decoded by the same codecs.

The codec names resolve in any Python that has hpcpath installed -- ``zarr.open`` finds them
through the ``zarr.codecs`` entry points in pyproject.toml -- and on import of this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.registry import register_codec

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

__all__ = ["JpegCodec", "Jpeg2kCodec", "CODECS", "array_codecs", "passthrough_codecs"]

CODEC_NAME = "hpcpath.jpeg"
JPEG2K_NAME = "hpcpath.jpeg2k"
CODECS = ("blosc-lz4", "blosc-zstd", "jpeg", "none")


class _ImageCodec(ArrayBytesCodec):
    """What hpcpath's image codecs share: uint8 only, a data-dependent size, and zarr's async
    calls served by the subclass's synchronous ``_encode_sync`` / ``_decode_sync``."""

    is_fixed_size = False

    def validate(self, *, shape, dtype, chunk_grid) -> None:  # noqa: D401
        if dtype.to_native_dtype() != np.uint8:
            raise ValueError(f"{type(self).__name__} needs a uint8 array")

    async def _encode_single(self, chunk_array, chunk_spec):
        return self._encode_sync(chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes, chunk_spec):
        return self._decode_sync(chunk_bytes, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec) -> int:
        raise NotImplementedError(f"{type(self).__name__}: output size is data dependent")


@dataclass(frozen=True)
class JpegCodec(_ImageCodec):
    """Lossy JPEG for uint8 RGB (or grey) image chunks; last axis is colour."""

    quality: int = 90

    def __init__(self, *, quality: int = 90) -> None:
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        object.__setattr__(self, "quality", int(quality))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JpegCodec:
        return cls(**(data.get("configuration") or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"name": CODEC_NAME, "configuration": {"quality": self.quality}}

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        import imagecodecs

        arr = np.ascontiguousarray(chunk_array.as_numpy_array())
        image = arr.reshape(-1, *arr.shape[-2:]) if arr.ndim > 3 else arr
        data = imagecodecs.jpeg8_encode(image, level=self.quality, subsampling="444")
        return chunk_spec.prototype.buffer.from_bytes(data)

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        import imagecodecs

        image = imagecodecs.jpeg8_decode(chunk_bytes.to_bytes())
        arr = image.reshape(chunk_spec.shape)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(arr)


register_codec(CODEC_NAME, JpegCodec)


@dataclass(frozen=True)
class Jpeg2kCodec(_ImageCodec):
    """JPEG 2000 codestreams of uint8 RGB tiles (passthrough of Aperio RGB J2K, TIFF
    compression 33005); one tile per chunk.  Encodes losslessly when zarr writes through it."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Jpeg2kCodec:
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {"name": JPEG2K_NAME}

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        import imagecodecs

        arr = np.ascontiguousarray(chunk_array.as_numpy_array())
        data = imagecodecs.jpeg2k_encode(arr.reshape(-1, *arr.shape[-2:]), level=0, codecformat="J2K")
        return chunk_spec.prototype.buffer.from_bytes(data)

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        import imagecodecs

        arr = imagecodecs.jpeg2k_decode(chunk_bytes.to_bytes()).reshape(chunk_spec.shape)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(arr)


register_codec(JPEG2K_NAME, Jpeg2kCodec)


def passthrough_codecs(fmt: str, shard_tiles: int, tile: int) -> dict[str, Any]:
    """``zarr.create_array`` keyword arguments of a passthrough tile array: chunks of one
    tile, ``shard_tiles`` of them per shard file (the file count of an ordinary store)."""
    serializer = {"jpeg": JpegCodec, "jpeg2k": Jpeg2kCodec}[fmt]()
    return {"chunks": (1, tile, tile, 3), "shards": (shard_tiles, tile, tile, 3),
            "serializer": serializer, "compressors": None}


def array_codecs(codec: str, *, jpeg_quality: int = 90, clevel: int = 5) -> dict[str, Any]:
    """``zarr.create_array`` keyword arguments (serializer / compressors) for a codec name."""
    from zarr.codecs import BloscCodec

    if codec == "jpeg":
        return {"serializer": JpegCodec(quality=jpeg_quality), "compressors": None}
    if codec in ("blosc-lz4", "blosc-zstd"):
        cname: Literal["lz4", "zstd"] = "lz4" if codec == "blosc-lz4" else "zstd"
        return {"compressors": BloscCodec(cname=cname, clevel=clevel, shuffle="noshuffle")}
    if codec == "none":
        return {"compressors": None}
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
