"""The hand-off to TensorFlow: a ``PatchDataset`` as a ``tf.data.Dataset`` (``train`` extra).

Batches come from the chunk-wise NumPy reader through ``from_generator`` and are converted and
augmented in TensorFlow ops, after batching, so the per-item Python cost stays zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpcpath.config import AugmentConfig

if TYPE_CHECKING:
    from hpcpath.dataset.reader import PatchDataset


def augment_batch(images, cfg: AugmentConfig, seed=None):
    """Augment a float32 batch in [0, 1]: quarter turns, flips, brightness, saturation, hue,
    contrast (each as configured), clipped back to [0, 1]."""
    import tensorflow as tf

    if cfg.rotate90:
        k = tf.random.uniform([], 0, 4, dtype=tf.int32, seed=seed)
        images = tf.image.rot90(images, k)
    if cfg.flip:
        images = tf.image.random_flip_left_right(images, seed=seed)
        images = tf.image.random_flip_up_down(images, seed=seed)
    if cfg.brightness > 0:
        images = tf.image.random_brightness(images, cfg.brightness, seed=seed)
    if cfg.saturation != (1.0, 1.0):
        images = tf.image.random_saturation(images, *cfg.saturation, seed=seed)
    if cfg.hue > 0:
        images = tf.image.random_hue(images, cfg.hue, seed=seed)
    if cfg.contrast != (1.0, 1.0):
        images = tf.image.random_contrast(images, *cfg.contrast, seed=seed)
    return tf.clip_by_value(images, 0.0, 1.0)


def to_tf_dataset(ds: "PatchDataset", batch_size: int, *, shuffle: bool = True, seed: int = 0,
                  augment: AugmentConfig | bool | None = None, context: bool = False,
                  repeat: bool = False, prefetch: int = 2):
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
        xs = x if isinstance(x, tuple) else (x,)
        xs = [tf.image.convert_image_dtype(v, tf.float32) for v in xs]
        if augment:
            xs = [augment_batch(v, augment) for v in xs]
        if ctx_names:
            return {"main": xs[0], **{f"context_{n}": v for n, v in zip(ctx_names, xs[1:])}}, y
        return xs[0], y

    out = out.map(convert, num_parallel_calls=tf.data.AUTOTUNE)
    if repeat:
        out = out.repeat()
    return out.prefetch(prefetch)
