"""The hand-off to TensorFlow: a ``PatchDataset`` as a ``tf.data.Dataset`` (``train`` extra).

Batches come from the chunk-wise NumPy reader through ``from_generator`` and are augmented in
TensorFlow ops, after batching, so the per-item Python cost stays zero.  Images stay uint8
unless asked otherwise: models rescale on the device (a Rescaling layer), which keeps a
4x larger float copy out of the input pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from hpcpath._malloc import keep_large_buffers
from hpcpath.config import AugmentConfig

if TYPE_CHECKING:
    from hpcpath.dataset.reader import Batch, PatchDataset


def _hue_saturation_matrices(hue, sat):
    """Per-image 3x3 RGB matrices: rotate hue by ``hue`` turns in YIQ space and scale
    chroma by ``sat`` -- one matrix multiply instead of RGB->HSV->RGB per pixel."""
    import math

    import tensorflow as tf

    to_yiq = tf.constant([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    to_rgb = tf.linalg.inv(to_yiq)
    theta = hue * 2.0 * math.pi
    c, s_ = tf.cos(theta) * sat, tf.sin(theta) * sat
    one, zero = tf.ones_like(c), tf.zeros_like(c)
    rot = tf.stack([tf.stack([one, zero, zero], -1), tf.stack([zero, c, -s_], -1),
                    tf.stack([zero, s_, c], -1)], -2)  # (B, 3, 3)
    return tf.einsum("ij,bjk,kl->bil", to_rgb, rot, to_yiq)


def _dihedral(images, rnd, cfg: AugmentConfig):
    """Per image, one of the symmetries of the square (rotations and/or flips), on the input
    dtype (uint8 in the pipeline: a quarter of the bytes float would move)."""
    import tensorflow as tf

    k = tf.cast(rnd[:, 0] * 4, tf.int32) if cfg.rotate90 else tf.zeros_like(rnd[:, 0], tf.int32)
    flip = (rnd[:, 1] < 0.5) if cfg.flip else tf.zeros_like(rnd[:, 1], tf.bool)

    def one(args):
        img, kk, ff = args
        img = tf.image.rot90(img, kk)
        return tf.cond(ff, lambda: tf.reverse(img, [1]), lambda: img)

    return tf.map_fn(one, (images, k, flip), fn_output_signature=images.dtype)


def augment_batch(images, cfg: AugmentConfig, seed=None, rnd=None, dtype="float32"):
    """Augment a batch (uint8, or float32 in [0, 1]), each image with its own draw: a dihedral
    transform (quarter turns, flips), then hue and saturation as one colour matrix, contrast
    and brightness, clipped -- into float32 in [0, 1], or uint8 with ``dtype="uint8"``.
    ``rnd`` (B, 8) uniforms: pass the same draw to augment inputs that show the same place.

    The colour steps are linear in the pixel, so they are folded into one affine map per
    image (``A x + b``): one pass over the float pixels instead of one per step (2x faster on
    a CPU core).  The contrast mean is that of the hue/saturation output, from channel means."""
    import tensorflow as tf

    if rnd is None:
        rnd = tf.random.uniform((tf.shape(images)[0], 8), seed=seed)
    x = _dihedral(images, rnd, cfg) if (cfg.rotate90 or cfg.flip) else images
    top = 255.0 if x.dtype == tf.uint8 else 1.0  # work in the input's own range
    x = tf.cast(x, tf.float32)
    if cfg.hue > 0 or cfg.saturation != (1.0, 1.0) or cfg.contrast != (1.0, 1.0) or cfg.brightness > 0:
        lo_s, hi_s = cfg.saturation
        sat = lo_s + (hi_s - lo_s) * rnd[:, 3]
        hue = (2.0 * rnd[:, 4] - 1.0) * cfg.hue
        m = _hue_saturation_matrices(hue, sat)  # (B, 3, 3)
        lo_c, hi_c = cfg.contrast
        k = lo_c + (hi_c - lo_c) * rnd[:, 5]
        mean = tf.reduce_mean(tf.einsum("bdc,bc->bd", m, tf.reduce_mean(x, axis=(1, 2))), axis=1)
        shift = (1.0 - k) * mean + (2.0 * rnd[:, 6] - 1.0) * cfg.brightness * top
        x = tf.einsum("bhwc,bdc->bhwd", x, m * k[:, None, None]) + shift[:, None, None, None]
    x = tf.clip_by_value(x, 0.0, top)
    if dtype == "uint8":
        return tf.cast(tf.round(x * (255.0 / top)) if top != 255.0 else tf.round(x), tf.uint8)
    return x * (1.0 / top) if top != 1.0 else x


def batches_to_tf(batches: Callable[[], Iterable[Batch]], *, patch_size: int,
                  label_shape: tuple[int, ...], context_names: Sequence[str] = (),
                  augment: AugmentConfig | None = None, dtype: str = "uint8", prefetch: int = 2,
                  on_batch: Callable[[Batch], None] | None = None, encoded: bool = False):
    """The one hand-off from NumPy batches to ``tf.data``.  ``batches()`` is called each time
    the dataset is (re)started.  Elements are ``(x, labels float32 of label_shape)``; x is the
    image batch, or ``{"main": ..., "context_<name>": ...}`` with context patches.  Augmented
    inputs of one item share one draw (the same turn, flip and colours for main and context
    patches, which show the same place).  Batch memory is adopted by TensorFlow, not copied.
    ``encoded``: the batches' images are standalone JPEG files (passthrough stores, no context
    inputs), decoded here by ``tf.io.decode_jpeg`` in a parallel map -- exactly the stored
    pixels with the accurate integer IDCT (the fast one is off by up to 2 levels)."""
    import tensorflow as tf

    if dtype not in ("uint8", "float32"):
        raise ValueError(f"dtype must be uint8 or float32, got {dtype!r}")
    names = ["main", *[f"context_{c}" for c in context_names]]

    single = len(names) == 1

    def gen():
        keep_large_buffers(force=True)  # after TF's generator op set its own trim threshold
        for b in batches():
            if on_batch is not None:
                on_batch(b)
            y = b.labels.astype(np.float32).reshape(len(b.labels), *label_shape)
            yield (b.images if single else (b.images, *[b.context[c] for c in context_names])), y

    img = tf.TensorSpec((None, patch_size, patch_size, 3), tf.uint8)
    if encoded and not single:
        raise ValueError("encoded images are served without context inputs")
    main = tf.TensorSpec((None,), tf.string) if encoded else img
    out = tf.data.Dataset.from_generator(gen, output_signature=(
        main if single else tuple(img for _ in names), tf.TensorSpec((None, *label_shape), tf.float32)))
    if encoded:
        tile = tf.TensorSpec((patch_size, patch_size, 3), tf.uint8)

        def decode(x, y):
            return tf.map_fn(lambda s: tf.io.decode_jpeg(s, channels=3, dct_method="INTEGER_ACCURATE"),
                             x, fn_output_signature=tile), y

        out = out.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def convert(x, y):
        xs = [x] if single else list(x)
        if augment:
            rnd = tf.random.uniform((tf.shape(xs[0])[0], 8))  # one draw per item, for every input
            xs = [augment_batch(v, augment, rnd=rnd, dtype=dtype) for v in xs]
        elif dtype == "float32":
            xs = [tf.image.convert_image_dtype(v, tf.float32) for v in xs]
        return (xs[0] if single else dict(zip(names, xs))), y

    if augment or dtype != "uint8" or not single:
        # augmented: one call at a time, so a seeded run draws the same augmentations again
        # (each call's ops use the node's cores through TensorFlow's intra-op pool)
        out = out.map(convert, num_parallel_calls=1 if augment else tf.data.AUTOTUNE)
    return out.prefetch(prefetch)


def to_tf_dataset(ds: PatchDataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                  augment: AugmentConfig | bool | None = None, context: bool = False,
                  repeat: bool = False, prefetch: int = 2, dtype: str = "uint8", decode: str = "reader"):
    """``PatchDataset.to_tf``: each pass over the dataset a new (seeded) epoch."""
    if decode not in ("reader", "tf"):
        raise ValueError(f"decode must be 'reader' or 'tf', got {decode!r}")
    encoded = decode == "tf"
    if encoded and (context or ds.encoded_format() != "jpeg"):
        raise ValueError("decode='tf' needs passthrough JPEG stores and no context inputs")
    if augment is True:
        augment = AugmentConfig()
    first = next(ds.batches(1, context=context), None)
    if first is None:
        raise ValueError("the dataset is empty")
    epoch = iter(range(1 << 62))

    def epoch_batches():
        return ds.batches(batch_size, shuffle=shuffle, seed=seed, epoch=next(epoch), context=context,
                          encoded=encoded)

    out = batches_to_tf(epoch_batches, patch_size=first.images.shape[1], label_shape=first.labels.shape[1:],
                        context_names=sorted(first.context) if context else (),
                        augment=augment or None, dtype=dtype, prefetch=prefetch, encoded=encoded)
    return out.repeat() if repeat else out
