"""LeRobot's ``DiffusionRgbEncoder``: crop -> ResNet trunk -> spatial softmax -> Linear -> ReLU, one vector per image.

Crop: in LeRobot's eval mode a centre crop, in train mode (with ``crop_is_random``) torchvision's RandomCrop, which
draws one (top, left) per encoder call and applies it to every image of that call. Here the crop is an explicit
argument (None = centre crop), so a loss can be reproduced from the offsets LeRobot drew.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from openpi.models.diffusion import ops, resnet
from openpi.models.diffusion.config import DiffusionConfig
from openpi.models.diffusion.spatial_softmax import spatial_softmax

Hook = Callable[[str, jax.Array], jax.Array]
HOOK_STAGES = (*resnet.STAGES, "kp_logits", "attn", "keypoints", "features")


def center_crop_offsets(config: DiffusionConfig) -> tuple[int, int]:
    """torchvision ``CenterCrop`` offsets: int(round((size - crop) / 2)) with Python's round (half to even)."""
    if config.crop_shape is None:
        return 0, 0
    _, h, w = config.image_shape
    ch, cw = config.crop_shape
    return int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))


def crop(config: DiffusionConfig, x: jax.Array, top_left: jax.Array | None = None) -> jax.Array:
    """(N, 3, H, W) -> (N, 3, crop_h, crop_w); ``top_left`` (2,) int (may be traced) or None for the centre."""
    if config.crop_shape is None:
        return x
    ch, cw = config.crop_shape
    if top_left is None:
        top, left = center_crop_offsets(config)
        return x[:, :, top:top + ch, left:left + cw]
    top_left = jnp.asarray(top_left, jnp.int32)
    return jax.lax.dynamic_slice(x, (0, 0, top_left[0], top_left[1]), (x.shape[0], x.shape[1], ch, cw))


def random_crop_offsets(config: DiffusionConfig, rng: jax.Array, num: int = 1) -> jax.Array:
    """(num, 2) uniform (top, left) offsets, each in [0, size - crop], like torchvision's RandomCrop."""
    if config.crop_shape is None:
        return jnp.zeros((num, 2), jnp.int32)
    _, h, w = config.image_shape
    high = jnp.asarray([h - config.crop_shape[0] + 1, w - config.crop_shape[1] + 1])
    return jax.random.randint(rng, (num, 2), 0, high)


def rgb_encoder(config: DiffusionConfig, p: dict, images: jax.Array, top_left: jax.Array | None = None,
                train: bool = False, hook: Hook | None = None) -> jax.Array:
    """(N, 3, H, W) normalised images -> (N, 2 * num_keypoints) features.

    ``hook(stage, x)`` is called at every name of ``HOOK_STAGES`` with the batch of this call; ``train`` only
    switches BatchNorm to batch statistics (no effect with GroupNorm).
    """
    hook = hook or (lambda _, v: v)
    x = crop(config, images, top_left)
    fmap = resnet.backbone(config, p["backbone"], x, train, on_stage=hook)
    keypoints = spatial_softmax(p["pool"], fmap, hook)
    flat = keypoints.reshape(keypoints.shape[0], -1)  # [kp0.x, kp0.y, kp1.x, ...]
    return hook("features", jax.nn.relu(ops.linear(p["out"], flat)))


def param_shapes(config: DiffusionConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """state_dict entries of one encoder under ``prefix`` (``diffusion.rgb_encoder`` or ``...rgb_encoder.<i>``)."""
    k = config.spatial_softmax_num_keypoints
    h, w = config.feature_map_hw
    out = resnet.param_shapes(config, f"{prefix}.backbone")
    out.update({f"{prefix}.pool.nets.weight": (k, resnet.stage_widths(config)[-1], 1, 1),
                f"{prefix}.pool.nets.bias": (k,), f"{prefix}.pool.pos_grid": (h * w, 2),
                f"{prefix}.out.weight": (2 * k, 2 * k), f"{prefix}.out.bias": (2 * k,)})
    return out
