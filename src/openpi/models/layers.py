"""Small numeric building blocks shared by SigLIP, Gemma and the Pi0 heads (pure functions over param dicts)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED_LOGIT = -2.3819763e38  # what openpi writes into masked attention logits


def dense(p: dict, x: jax.Array) -> jax.Array:
    """Flax-style Dense: kernel (in, out) plus optional bias, computed in x's dtype."""
    y = jnp.dot(x, p["kernel"].astype(x.dtype))
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


def layer_norm(p: dict, x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm with statistics in float32 (as flax does for low-precision inputs)."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def rms_norm(p: dict, x: jax.Array, cond: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Gemma RMSNorm in float32; with ``cond`` (Pi0.5 action expert) it is adaptive and also returns a gate.

    Plain: x * rsqrt(mean(x^2) + 1e-6) * (1 + scale). Adaptive: a Dense on cond gives (scale, shift, gate).
    """
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    normed = x * jnp.reciprocal(jnp.sqrt(var + 1e-6))
    if cond is None:
        return (normed * (1 + p["scale"].astype(jnp.float32))).astype(x.dtype), None
    modulation = dense(p["Dense_0"], cond)
    scale, shift, gate = jnp.split(modulation[:, None, :], 3, axis=-1)
    return (normed * (1 + scale) + shift).astype(x.dtype), gate


def gated_residual(x: jax.Array, y: jax.Array, gate: jax.Array | None) -> jax.Array:
    return x + y if gate is None else x + y * gate


def rope(x: jax.Array, positions: jax.Array, max_wavelength: float = 10_000.0) -> jax.Array:
    """Rotary position embedding, split-half layout, computed in float32. x: (B, T, N, H), positions: (B, T)."""
    head_dim = x.shape[-1]
    exponents = (2.0 / head_dim) * jnp.arange(head_dim // 2, dtype=jnp.float32)
    timescale = max_wavelength ** exponents
    radians = positions[..., None] / timescale[None, None, :]
    radians = radians[..., None, :]
    sin, cos = jnp.sin(radians), jnp.cos(radians)
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return out.astype(x.dtype)


def posemb_sincos(pos: jax.Array, dim: int, min_period: float, max_period: float) -> jax.Array:
    """Sin-cos embedding of a scalar per batch row (Pi0 time conditioning): sin half, then cos half."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    fraction = jnp.linspace(0.0, 1.0, dim // 2)
    period = min_period * (max_period / min_period) ** fraction
    angles = jnp.einsum("i,j->ij", pos, 1.0 / period * 2 * jnp.pi, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def make_attn_mask(input_mask: jax.Array, ar_mask: jax.Array) -> jax.Array:
    """(B, N) validity + autoregressive boundaries -> (B, N, N) mask: a token sees valid tokens whose
    boundary count is <= its own."""
    ar_mask = jnp.broadcast_to(ar_mask, input_mask.shape)
    cumsum = jnp.cumsum(ar_mask, axis=1)
    causal = cumsum[:, None, :] <= cumsum[:, :, None]
    valid = input_mask[:, None, :] & input_mask[:, :, None]
    return causal & valid
