"""The hand-off to TensorFlow: a ``PatchDataset`` as a ``tf.data.Dataset`` (``train`` extra).

Batches come from the chunk-wise NumPy reader through ``from_generator`` and are augmented in
TensorFlow ops, after batching, so the per-item Python cost stays zero.  Images stay uint8
unless asked otherwise: models rescale on the device (a Rescaling layer), which keeps a
4x larger float copy out of the input pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpcpath._malloc import keep_large_buffers
from hpcpath.config import AugmentConfig

if TYPE_CHECKING:
    from hpcpath.dataset.reader import PatchDataset


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


def augment_batch(images, cfg: AugmentConfig, seed=None):
    """Augment a batch (uint8, or float32 in [0, 1]) into float32 in [0, 1], each image with
    its own draw: a dihedral transform (quarter turns, flips), then hue and saturation as one
    colour matrix, contrast and brightness, clipped to [0, 1].  Vectorised over the batch."""
    import tensorflow as tf

    b = tf.shape(images)[0]
    rnd = tf.random.uniform((b, 8), seed=seed)
    x = _dihedral(images, rnd, cfg) if (cfg.rotate90 or cfg.flip) else images
    x = tf.image.convert_image_dtype(x, tf.float32)
    lo_s, hi_s = cfg.saturation
    sat = lo_s + (hi_s - lo_s) * rnd[:, 3]
    hue = (2.0 * rnd[:, 4] - 1.0) * cfg.hue
    if cfg.hue > 0 or cfg.saturation != (1.0, 1.0):
        x = tf.einsum("bhwc,bdc->bhwd", x, _hue_saturation_matrices(hue, sat))
    if cfg.contrast != (1.0, 1.0):
        lo_c, hi_c = cfg.contrast
        k = tf.reshape(lo_c + (hi_c - lo_c) * rnd[:, 5], (-1, 1, 1, 1))
        mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * k + mean
    if cfg.brightness > 0:
        x = x + tf.reshape((2.0 * rnd[:, 6] - 1.0) * cfg.brightness, (-1, 1, 1, 1))
    return tf.clip_by_value(x, 0.0, 1.0)


def to_tf_dataset(ds: "PatchDataset", batch_size: int, *, shuffle: bool = True, seed: int = 0,
                  augment: AugmentConfig | bool | None = None, context: bool = False,
                  repeat: bool = False, prefetch: int = 2, dtype: str = "uint8"):
    import numpy as np
    import tensorflow as tf

    if augment is True:
        augment = AugmentConfig()
    first = next(ds.batches(1, context=context), None)
    if first is None:
        raise ValueError("the dataset is empty")
    t = first.images.shape[1]
    label_shape = first.labels.shape[1:]
    ctx_names = sorted(first.context) if context else []
    epoch = {"n": 0}

    def gen():
        keep_large_buffers(force=True)  # after TF's generator op set its own trim threshold
        e = epoch["n"]
        epoch["n"] += 1
        for b in ds.batches(batch_size, shuffle=shuffle, seed=seed, epoch=e, context=context):
            lab = b.labels.astype(np.float32)
            if ctx_names:
                yield (b.images, *[b.context[n] for n in ctx_names]), lab
            else:
                yield b.images, lab

    img_spec = tf.TensorSpec((None, t, t, 3), tf.uint8)
    x_spec = tuple([img_spec] * (1 + len(ctx_names))) if ctx_names else img_spec
    out = tf.data.Dataset.from_generator(
        gen, output_signature=(x_spec, tf.TensorSpec((None, *label_shape), tf.float32))
    )

    def convert(x, y):
        xs = list(x) if isinstance(x, tuple) else [x]
        if augment:
            xs = [augment_batch(v, augment) for v in xs]
            if dtype == "uint8":
                xs = [tf.image.convert_image_dtype(v, tf.uint8, saturate=True) for v in xs]
        elif dtype == "float32":
            xs = [tf.image.convert_image_dtype(v, tf.float32) for v in xs]
        if ctx_names:
            return {"main": xs[0], **{f"context_{n}": v for n, v in zip(ctx_names, xs[1:])}}, y
        return xs[0], y

    if dtype not in ("uint8", "float32"):
        raise ValueError(f"dtype must be uint8 or float32, got {dtype!r}")
    if augment or dtype != "uint8" or ctx_names:
        out = out.map(convert, num_parallel_calls=tf.data.AUTOTUNE)
    if repeat:
        out = out.repeat()
    return out.prefetch(prefetch)
