"""Image augmentation for training: deterministic per rng, changes what it should and nothing else, keeps the
model's image format, and does the geometry it claims."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openpi.training import augment

BASE, WRIST, RIGHT = "base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"


def _images(batch: int = 3, size: int = 32, seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    # Smooth random images (block-upsampled noise), like camera frames rather than pixel noise.
    low = rng.uniform(-1, 1, (2, batch, size // 8, size // 8, 3))
    imgs = np.repeat(np.repeat(low, 8, axis=2), 8, axis=3).astype(np.float32)
    return {BASE: jnp.asarray(imgs[0]), WRIST: jnp.asarray(imgs[1]), RIGHT: jnp.zeros((batch, size, size, 3))}


def test_deterministic_for_an_rng_and_different_across_rngs():
    imgs, cfg = _images(), augment.AugmentConfig()
    a = augment.augment_images(imgs, jax.random.key(1), cfg)
    b = augment.augment_images(imgs, jax.random.key(1), cfg)
    c = augment.augment_images(imgs, jax.random.key(2), cfg)
    for k in (BASE, WRIST):
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
        assert float(jnp.abs(a[k] - c[k]).mean()) > 1e-3
    # Samples of one batch get different draws.
    same_input = {k: jnp.repeat(v[:1], 3, axis=0) for k, v in imgs.items()}
    out = augment.augment_images(same_input, jax.random.key(3), cfg)
    assert float(jnp.abs(out[BASE][0] - out[BASE][1]).mean()) > 1e-3


def test_changes_the_cameras_and_keeps_shape_dtype_range():
    imgs = _images()
    out = augment.augment_images(imgs, jax.random.key(0), augment.AugmentConfig())
    assert set(out) == set(imgs)
    for k in (BASE, WRIST):
        assert out[k].shape == imgs[k].shape and out[k].dtype == jnp.float32
        assert float(out[k].min()) >= -1.0 and float(out[k].max()) <= 1.0
        assert float(jnp.abs(out[k] - imgs[k]).mean()) > 0.01
    np.testing.assert_array_equal(np.asarray(out[RIGHT]), np.asarray(imgs[RIGHT]))  # masked slot untouched


def test_identity_settings_return_the_input():
    imgs = _images()
    cfg = augment.AugmentConfig(crop_scale=(1.0, 1.0), brightness=0.0, contrast=0.0, saturation=0.0)
    out = augment.augment_images(imgs, jax.random.key(0), cfg)
    for k in imgs:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(imgs[k]), atol=1e-6)


def test_crop_zooms_and_shifts_inside_the_image():
    """A ramp image (value = column index): a crop of half the side must double the ramp's slope, start at a
    column in [0, S/2], and never invent values outside the input's range."""
    s = 32
    ramp = jnp.broadcast_to(jnp.arange(s, dtype=jnp.float32)[None, None, :, None], (4, s, s, 3))
    out = np.asarray(augment.random_crop_resize(ramp, jax.random.key(0), (0.5, 0.5)))
    row = out[:, s // 2, :, 0]
    slope = np.diff(row[:, 4:-4], axis=1)
    np.testing.assert_allclose(slope, 0.5, atol=1e-4)  # S/2 input columns spread over S output columns
    starts = row[:, 8] - 0.5 * 8.5 + 0.5  # input column at output pixel centre 8.5 minus 8.5 x 0.5
    assert np.all(starts >= -1e-4) and np.all(starts <= s / 2 + 1e-4)
    assert len(np.unique(np.round(starts, 3))) > 1  # the crop position varies across the batch
    assert out.min() >= 0.0 and out.max() <= s - 1


def test_wrist_gets_colour_only_and_the_same_lighting_as_the_agent_view():
    """Geometry only on the agent view by default; one colour draw per sample for both cameras: the same image
    in both slots, with the crop off, comes out identical."""
    img = _images()[BASE]
    cfg = augment.AugmentConfig(crop_scale=(1.0, 1.0))
    out = augment.augment_images({BASE: img, WRIST: img, RIGHT: jnp.zeros_like(img)}, jax.random.key(4), cfg)
    np.testing.assert_allclose(np.asarray(out[BASE]), np.asarray(out[WRIST]), atol=1e-6)
    assert float(jnp.abs(out[BASE] - img).mean()) > 0.01
    geo = augment.AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0)
    out = augment.augment_images({BASE: img, WRIST: img, RIGHT: jnp.zeros_like(img)}, jax.random.key(4), geo)
    np.testing.assert_allclose(np.asarray(out[WRIST]), np.asarray(img), atol=1e-6)  # wrist: no crop
    assert float(jnp.abs(out[BASE] - img).mean()) > 0.01


def test_bad_settings_and_missing_cameras_are_named():
    with pytest.raises(ValueError, match="crop_scale"):
        augment.AugmentConfig(crop_scale=(0.9, 1.1))
    with pytest.raises(ValueError, match="brightness"):
        augment.AugmentConfig(brightness=1.5)
    with pytest.raises(KeyError, match="left_wrist_0_rgb"):
        augment.augment_images({BASE: _images()[BASE]}, jax.random.key(0), augment.AugmentConfig())
