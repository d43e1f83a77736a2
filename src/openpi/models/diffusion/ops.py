"""Numeric blocks over PyTorch-layout weights (channel-first activations), as LeRobot's state_dict stores them.

Why channel-first: the parameters stay exactly as in ``model.safetensors`` (Conv (out, in, *k), ConvTranspose1d
(in, out, k), Linear (out, in)), so a checkpoint loads and saves without any re-layout, and activations match the
reference arrays axis for axis. XLA picks its own internal layouts anyway.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from openpi.models import layers


def linear(p: dict, x: jax.Array) -> jax.Array:
    """torch ``nn.Linear``: weight (out, in), bias (out,)."""
    kernel = {"kernel": p["weight"].T}
    if "bias" in p:
        kernel["bias"] = p["bias"]
    return layers.dense(kernel, x)


def conv2d(p: dict, x: jax.Array, stride: int = 1, padding: int = 0) -> jax.Array:
    """torch ``nn.Conv2d`` on (N, C, H, W); weight (out, in, kh, kw), optional bias."""
    y = jax.lax.conv_general_dilated(x, p["weight"].astype(x.dtype), (stride, stride),
                                     [(padding, padding), (padding, padding)],
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)[None, :, None, None]
    return y


def conv1d(p: dict, x: jax.Array, stride: int = 1, padding: int = 0) -> jax.Array:
    """torch ``nn.Conv1d`` on (N, C, T); weight (out, in, k), bias (out,)."""
    y = jax.lax.conv_general_dilated(x, p["weight"].astype(x.dtype), (stride,), [(padding, padding)],
                                     dimension_numbers=("NCH", "OIH", "NCH"))
    return y + p["bias"].astype(x.dtype)[None, :, None]


def conv_transpose1d(p: dict, x: jax.Array, stride: int, padding: int) -> jax.Array:
    """torch ``nn.ConvTranspose1d`` (output_padding 0, dilation 1); weight (in, out, k).

    A transposed convolution is the plain convolution of the stride-dilated input with the flipped kernel,
    padded by k - 1 - padding on both sides; output length (T - 1) * stride - 2 * padding + k.
    """
    k = p["weight"].shape[-1]
    w = jnp.flip(jnp.swapaxes(p["weight"], 0, 1), axis=-1).astype(x.dtype)
    pad = k - 1 - padding
    y = jax.lax.conv_general_dilated(x, w, (1,), [(pad, pad)], lhs_dilation=(stride,),
                                     dimension_numbers=("NCH", "OIH", "NCH"))
    return y + p["bias"].astype(x.dtype)[None, :, None]


def group_norm(p: dict, x: jax.Array, groups: int, eps: float = 1e-5) -> jax.Array:
    """torch ``nn.GroupNorm`` on (N, C, *spatial): biased variance per (sample, group), affine per channel."""
    n, c = x.shape[:2]
    if c % groups:
        raise ValueError(f"GroupNorm: {c} channels are not divisible into {groups} groups")
    g = x.reshape(n, groups, -1)
    mean = g.mean(-1, keepdims=True)
    var = jnp.square(g - mean).mean(-1, keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return y * p["weight"].reshape(shape) + p["bias"].reshape(shape)


def batch_norm(p: dict, x: jax.Array, train: bool, eps: float = 1e-5) -> jax.Array:
    """torch ``nn.BatchNorm2d``: running statistics in eval mode, batch statistics (biased) in train mode.

    Train mode does not return updated running statistics (training a BatchNorm backbone is not supported here).
    """
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    if train:
        axes = (0, *range(2, x.ndim))
        mean = x.mean(axes, keepdims=True)
        var = jnp.square(x - mean).mean(axes, keepdims=True)
    else:
        mean, var = p["running_mean"].reshape(shape), p["running_var"].reshape(shape)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    return y * p["weight"].reshape(shape) + p["bias"].reshape(shape)


def max_pool2d(x: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
    """torch ``nn.MaxPool2d`` on (N, C, H, W); padding counts as -inf."""
    pad = [(0, 0), (0, 0), (padding, padding), (padding, padding)]
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, kernel, kernel), (1, 1, stride, stride), pad)


def mish(x: jax.Array) -> jax.Array:
    """x * tanh(softplus(x)) (torch ``nn.Mish``)."""
    return x * jnp.tanh(jax.nn.softplus(x))
