"""SigLIP ViT image encoder (big_vision layout, no pooling) with per-layer hook points."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from openpi.models.hooks import NO_HOOKS, Hooks
from openpi.models import layers
from openpi.models.config import SigLIPConfig


def _mha(p: dict, x: jax.Array, head_dim: int) -> jax.Array:
    q = jnp.einsum("btd,dnh->btnh", x, p["query"]["kernel"].astype(x.dtype)) + p["query"]["bias"].astype(x.dtype)
    k = jnp.einsum("btd,dnh->btnh", x, p["key"]["kernel"].astype(x.dtype)) + p["key"]["bias"].astype(x.dtype)
    v = jnp.einsum("btd,dnh->btnh", x, p["value"]["kernel"].astype(x.dtype)) + p["value"]["bias"].astype(x.dtype)
    q = q / jnp.sqrt(head_dim).astype(x.dtype)
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("bnqk,bknh->bqnh", probs, v)
    return jnp.einsum("bqnh,nhd->bqd", out, p["out"]["kernel"].astype(x.dtype)) + p["out"]["bias"].astype(x.dtype)


def encode(params: dict, images: jax.Array, cfg: SigLIPConfig, dtype, *, camera: str = "image",
           hooks: Hooks = NO_HOOKS) -> jax.Array:
    """images (B, H, W, 3) float in [-1, 1] -> image tokens (B, num_patches, llm width), after the `head` Dense."""
    # Patch stem (a stride-`patch` VALID conv, written as patchify + matmul: identical numbers, and its gradient is
    # several times faster than a conv's on XLA CPU) and learned position embedding run in float32 (as released).
    b, h, w, _ = images.shape
    gh, gw, ps = h // cfg.patch, w // cfg.patch, cfg.patch
    kernel = params["embedding"]["kernel"].astype(jnp.float32)  # (patch, patch, 3, width)
    grid = images.astype(jnp.float32).reshape(b, gh, ps, gw, ps, 3)
    x = jnp.einsum("bypxqc,pqcd->byxd", grid, kernel, precision=jax.lax.Precision.HIGHEST)
    x = x.reshape(b, gh * gw, -1) + params["embedding"]["bias"].astype(jnp.float32)
    x = x + params["pos_embedding"].astype(jnp.float32)
    x = x.astype(dtype)
    blocks = params["Transformer"]["encoderblock"]
    for i in range(cfg.depth):
        p = jax.tree.map(lambda a: a[i], blocks)
        x = hooks(f"img.{camera}.layer.{i}.resid_pre", x)
        y = layers.layer_norm(p["LayerNorm_0"], x)
        x = x + _mha(p["MultiHeadDotProductAttention_0"], y, cfg.head_dim)
        y = layers.layer_norm(p["LayerNorm_1"], x)
        y = layers.dense(p["MlpBlock_0"]["Dense_1"], layers.gelu_tanh(layers.dense(p["MlpBlock_0"]["Dense_0"], y)))
        x = hooks(f"img.{camera}.layer.{i}.resid_post", x + y)
    x = layers.layer_norm(params["Transformer"]["encoder_norm"], x)
    return hooks(f"img.{camera}.out", layers.dense(params["head"], x))
