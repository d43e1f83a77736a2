"""Image augmentation for behaviour cloning on LIBERO: random crop-and-resize (shift + zoom) and colour jitter.

Why: a policy cloned from a few dozen demonstrations per task sees each scene from one fixed camera under one
lighting; without augmentation it memorises exact pixels and fails on the small shifts a held-out initial state
brings. Random crops and colour jitter are the standard remedy (openpi trains Pi0 with a 95 % random crop, small
rotations and colour jitter; robomimic with random crops).

Design
- Pure JAX on the model's float images ([-1, 1], (B, S, S, 3)), run inside the jitted training step, so one step's
  augmentation is a function of that step's rng alone: a resumed run replays it exactly. Inference never calls
  it (``create_policy`` / ``Policy`` do not import this module).
- Geometry (crop a random square of ``crop_scale`` of the side, anywhere in the image, resized back to S) only on
  ``geometric_keys``, by default the third-person view: the wrist camera is rigidly attached to the gripper, so
  its fingers always sit at the same pixels, and that is information, not a nuisance.
- Colour (brightness, contrast, saturation factors drawn in [1 - x, 1 + x]) on ``colour_keys`` with the *same*
  factors for both cameras of a sample: a lighting change affects every camera of the scene alike.
- Masked camera slots (the absent right wrist) are left untouched.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

BASE_KEY, WRIST_KEY = "base_0_rgb", "left_wrist_0_rgb"
_LUMA = jnp.array([0.299, 0.587, 0.114])  # ITU-R 601 luma weights


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.85, 1.0)  # side of the random square crop, as a fraction of the image
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    geometric_keys: tuple[str, ...] = (BASE_KEY,)
    colour_keys: tuple[str, ...] = (BASE_KEY, WRIST_KEY)

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


def random_crop_resize(images: jax.Array, rng: jax.Array, scale: tuple[float, float]) -> jax.Array:
    """(B, S, S, C) -> same shape: each image's random square crop (side in ``scale`` x S, position uniform over
    the image) resized back to S x S with bilinear interpolation."""
    b, s = images.shape[0], images.shape[1]
    k_side, k_pos = jax.random.split(rng)
    side = jax.random.uniform(k_side, (b,), minval=scale[0], maxval=scale[1]) * s
    offset = jax.random.uniform(k_pos, (b, 2)) * (s - side)[:, None]  # top-left corner (rows, cols), pixels

    def one(img, side_px, off):
        # Output coordinate = (input coordinate - offset) * S / side: the crop [off, off + side] fills [0, S].
        zoom = s / side_px
        return jax.image.scale_and_translate(img, img.shape, (0, 1), jnp.array([zoom, zoom]), -off * zoom,
                                             method="linear", antialias=False)

    return jax.vmap(one)(images, side, offset)


def colour_jitter(images01: jax.Array, brightness: jax.Array, contrast: jax.Array,
                  saturation: jax.Array) -> jax.Array:
    """Images in [0, 1] (B, S, S, 3) with per-sample factors (B,): scale brightness, stretch contrast about the
    image's mean luma, blend with the grey image for saturation; clipped back to [0, 1]."""
    f = lambda x: x[:, None, None, None]  # noqa: E731
    x = images01 * f(brightness)
    mean = jnp.mean(x @ _LUMA, axis=(1, 2))
    x = (x - f(mean)) * f(contrast) + f(mean)
    grey = (x @ _LUMA)[..., None]
    x = grey + (x - grey) * f(saturation)
    return jnp.clip(x, 0.0, 1.0)


def augment_images(images: dict[str, jax.Array], rng: jax.Array, cfg: AugmentConfig) -> dict[str, jax.Array]:
    """Augment a batch of model images ({camera: (B, S, S, 3) float in [-1, 1]}); same keys, shapes, dtypes."""
    missing = [k for k in (*cfg.geometric_keys, *cfg.colour_keys) if k not in images]
    if missing:
        raise KeyError(f"augmentation names camera(s) {missing} the batch lacks (has {sorted(images)})")
    k_geo, k_col = jax.random.split(rng)
    batch = next(iter(images.values())).shape[0]
    factors = [jax.random.uniform(k, (batch,), minval=1.0 - x, maxval=1.0 + x)
               for k, x in zip(jax.random.split(k_col, 3), (cfg.brightness, cfg.contrast, cfg.saturation))]
    out = dict(images)
    for i, key in enumerate(cfg.geometric_keys):
        out[key] = random_crop_resize(out[key], jax.random.fold_in(k_geo, i), cfg.crop_scale)
    for key in cfg.colour_keys:
        x01 = (out[key] + 1.0) * 0.5
        out[key] = colour_jitter(x01, *factors) * 2.0 - 1.0
    return {k: v.astype(images[k].dtype) for k, v in out.items()}


def augment_observation(obs, rng: jax.Array, cfg: AugmentConfig):
    """A ``pi0.Observation`` with augmented images (everything else unchanged)."""
    return dataclasses.replace(obs, images=augment_images(obs.images, rng, cfg))
