"""Spatial soft-argmax keypoints (Finn et al. 2016, LeRobot's ``SpatialSoftmax``) as attention over image locations.

A 1x1 conv maps the (C, H, W) feature map to K keypoint logit maps; each map is softmaxed over its H*W locations
(flattened row-major: location ``l = h * W + w``), and the keypoint is the expected (x, y) under that distribution,
with x = linspace(-1, 1, W)[w] along the width and y = linspace(-1, 1, H)[h] along the height.

The softmax map is what the interpretability tools treat as attention: per keypoint, a probability distribution
over an H x W grid of feature-map cells, the same (N, P = grid_h * grid_w, row-major) layout the attention-object
IoU takes per camera. How cells map to image pixels: :func:`openpi.models.diffusion.model.attention_grid`.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from openpi.models.diffusion import ops

Hook = Callable[[str, jax.Array], jax.Array]


def pos_grid(height: int, width: int) -> np.ndarray:
    """(H * W, 2) float32 [x, y] per row-major location, the values LeRobot stores as the ``pos_grid`` buffer."""
    xs, ys = np.meshgrid(np.linspace(-1.0, 1.0, width), np.linspace(-1.0, 1.0, height))
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1).astype(np.float32)


def spatial_softmax(p: dict, features: jax.Array, hook: Hook | None = None) -> jax.Array:
    """(N, C, H, W) -> keypoints (N, K, 2), last axis [x, y].

    ``hook(name, x)`` sees ``kp_logits`` (N, K, H, W), ``attn`` (N, K, H*W) and ``keypoints`` (N, K, 2); an edit of
    ``attn`` (e.g. masking locations) changes the keypoints computed from it.
    """
    hook = hook or (lambda _, v: v)
    n, _, h, w = features.shape
    logits = hook("kp_logits", ops.conv2d(p["nets"], features))
    attn = hook("attn", jax.nn.softmax(logits.reshape(n, logits.shape[1], h * w), axis=-1))
    grid = jax.lax.stop_gradient(p["pos_grid"]).astype(attn.dtype)  # a buffer, not a parameter
    keypoints = jnp.einsum("nkl,lc->nkc", attn, grid, precision=jax.lax.Precision.HIGHEST)
    return hook("keypoints", keypoints)
