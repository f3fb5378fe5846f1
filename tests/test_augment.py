"""Augmentation: every configured transform moves pixels as configured, and nothing else.

Each test feeds ``augment_batch`` a known draw (``rnd``) and checks the exact effect -- which
symmetry of the square, which brightness shift, contrast factor, chroma scale and hue angle --
so an augmentation that silently does nothing (or does the wrong thing) fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from hpcpath.config import AugmentConfig  # noqa: E402

OFF = dict(rotate90=False, flip=False, brightness=0.0, saturation=(1.0, 1.0), hue=0.0,
           contrast=(1.0, 1.0))
# RGB -> YIQ, the colour space the hue/saturation matrix works in
YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _augment(x, rnd=None, **cfg):
    from hpcpath.dataset.tfdata import augment_batch

    dtype = "uint8" if x.dtype == np.uint8 else "float32"
    r = None if rnd is None else tf.constant(rnd, tf.float32)
    return augment_batch(tf.constant(x), AugmentConfig(**{**OFF, **cfg}), rnd=r, seed=7,
                         dtype=dtype).numpy()


def _draws(n, seed=0, **cols):
    """(n, 8) uniforms with chosen columns fixed."""
    rnd = np.random.default_rng(seed).random((n, 8))
    for k, v in cols.items():
        rnd[:, int(k[1:])] = v
    return rnd


def _symmetry(a, b):
    """The (quarter turns, flipped) pairs that map image a onto b."""
    return [(k, f) for k in range(4) for f in (False, True)
            if np.array_equal(b, np.rot90(a, k)[:, ::-1] if f else np.rot90(a, k))]


def _images(n, size=8, lo=0, hi=256, seed=0):
    return np.random.default_rng(seed).integers(lo, hi, (n, size, size, 3), dtype=np.uint8)


def test_disabled_augmentation_is_the_identity():
    x = _images(16)
    np.testing.assert_array_equal(_augment(x), x)
    xf = x.astype(np.float32) / 255
    np.testing.assert_allclose(_augment(xf), xf, atol=1e-6)


def test_quarter_turns_and_flips_follow_the_draw():
    x = _images(32)  # random pixels: each of the 8 symmetries gives a different image
    k = np.arange(32) % 4
    f = (np.arange(32) // 4) % 2 == 1
    rnd = _draws(32, r0=(k + 0.5) / 4, r1=np.where(f, 0.25, 0.75))
    both = _augment(x, rnd, rotate90=True, flip=True)
    for i in range(32):
        assert _symmetry(x[i], both[i]) == [(int(k[i]), bool(f[i]))], i
    turns = _augment(x, rnd, rotate90=True)  # no flips configured: the same draw only turns
    assert [_symmetry(a, b) for a, b in zip(x, turns)] == [[(int(kk), False)] for kk in k]
    flips = _augment(x, rnd, flip=True)      # no turns configured: only flips
    assert [_symmetry(a, b) for a, b in zip(x, flips)] == [[(0, bool(ff))] for ff in f]


def test_random_geometry_uses_every_symmetry_and_keeps_pixels():
    x = _images(128, seed=1)
    y = _augment(x, rotate90=True, flip=True)
    used = [_symmetry(a, b) for a, b in zip(x, y)]
    assert all(len(u) == 1 for u in used)  # exactly one symmetry each: pixels only move
    assert {u[0] for u in used} == {(k, f) for k in range(4) for f in (False, True)}


def test_brightness_shifts_each_image_by_its_drawn_amount():
    x = _images(16, lo=80, hi=176).astype(np.float32) / 255  # clear of clipping
    rnd = _draws(16)
    y = _augment(x, rnd, brightness=0.2)
    want = (2 * rnd[:, 6] - 1) * 0.2
    np.testing.assert_allclose(y - x, np.broadcast_to(want[:, None, None, None], x.shape), atol=1e-5)
    # random draws stay within the bound and differ between images
    shift = (_augment(x, brightness=0.2) - x).mean(axis=(1, 2, 3))
    assert np.abs(shift).max() <= 0.2 + 1e-5 and shift.std() > 0.05


def test_contrast_scales_deviations_from_the_mean():
    x = _images(16, lo=40, hi=216).astype(np.float32) / 255
    rnd = _draws(16)
    y = _augment(x, rnd, contrast=(0.5, 0.9))
    k = 0.5 + 0.4 * rnd[:, 5]
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(y, mean + k[:, None, None, None] * (x - mean), atol=1e-5)
    got = _augment(x, contrast=(0.5, 0.9)).std(axis=(1, 2, 3)) / x.std(axis=(1, 2, 3))
    assert got.min() >= 0.5 - 1e-4 and got.max() <= 0.9 + 1e-4 and got.std() > 0.02


def _yiq(img):
    return np.asarray(img, np.float64) @ YIQ.T


def test_saturation_scales_chroma_and_keeps_luma():
    x = _images(16, lo=60, hi=196).astype(np.float32) / 255
    rnd = _draws(16)
    y = _augment(x, rnd, saturation=(0.5, 0.8))
    a, b = _yiq(x), _yiq(y)
    np.testing.assert_allclose(b[..., 0], a[..., 0], atol=1e-4)  # luma kept
    sat = 0.5 + 0.3 * rnd[:, 3]
    np.testing.assert_allclose(b[..., 1:], a[..., 1:] * sat[:, None, None, None], atol=1e-4)


def test_hue_rotates_chroma_by_the_drawn_angle():
    x = _images(16, lo=60, hi=196).astype(np.float32) / 255
    rnd = _draws(16)
    y = _augment(x, rnd, hue=0.05)
    a, b = _yiq(x), _yiq(y)
    np.testing.assert_allclose(b[..., 0], a[..., 0], atol=1e-4)
    np.testing.assert_allclose(np.hypot(*b[..., 1:].transpose(3, 0, 1, 2)),
                               np.hypot(*a[..., 1:].transpose(3, 0, 1, 2)), atol=1e-4)
    ang = np.angle((b[..., 1] + 1j * b[..., 2]) / (a[..., 1] + 1j * a[..., 2]))
    want = (2 * rnd[:, 4] - 1) * 0.05 * 2 * np.pi
    np.testing.assert_allclose(np.median(ang, axis=(1, 2)), want, atol=1e-3)
    assert np.abs(want).max() > 0.1  # the draw did rotate


def test_default_recipe_changes_every_image_within_range():
    x = _images(32, seed=3)
    y = _augment(x, **AugmentConfig().model_dump())
    assert y.dtype == np.uint8 and y.shape == x.shape
    assert all(not np.array_equal(a, b) for a, b in zip(x, y))
    yf = _augment(x.astype(np.float32) / 255, **AugmentConfig().model_dump())
    assert yf.min() >= 0 and yf.max() <= 1
    # colour moved: mean channel values differ from the input's beyond quantisation
    assert np.abs(yf.mean(axis=(1, 2)) - x.mean(axis=(1, 2)) / 255).max() > 0.02


def test_pipeline_augments_and_shares_one_draw_between_main_and_context():
    """Context patches show the same place as their main patch: same turn, flip and colours;
    and the pipeline really augments (its output is not its input)."""
    from hpcpath.dataset.reader import Batch
    from hpcpath.dataset.tfdata import batches_to_tf

    rng = np.random.default_rng(1)
    batches = []
    for _ in range(3):
        im = rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
        batches.append(Batch(images=im, labels=np.arange(8) % 2, context={"l2": im.copy()},
                             slide=np.zeros(8, np.int32)))
    pipe = batches_to_tf(lambda: iter(batches), patch_size=16, label_shape=(1,),
                         context_names=("l2",), augment=AugmentConfig())
    n = changed = 0
    for (x, y), b in zip(pipe, batches):
        assert set(x) == {"main", "context_l2"} and y.shape[1:] == (1,)
        main = x["main"].numpy()
        np.testing.assert_array_equal(main, x["context_l2"].numpy())
        changed += sum(not np.array_equal(a, c) for a, c in zip(main, b.images))
        n += 1
    assert n == 3 and changed == 24
    plain = batches_to_tf(lambda: iter(batches), patch_size=16, label_shape=(1,),
                          context_names=("l2",))
    for (x, _), b in zip(plain, batches):  # without augment: the input, untouched
        np.testing.assert_array_equal(x["main"].numpy(), b.images)
