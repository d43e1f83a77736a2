"""Gemma with one or two experts: expert 0 (PaliGemma, prefix tokens) and expert 1 (Pi0's action expert, suffix
tokens) with their own weights but one attention over the concatenated sequence; Pi0-FAST runs expert 0 alone.
Parameters are the stacked (scanned) openpi layout; layers are unrolled here so every layer has its own hook points.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from openpi.models.hooks import NO_HOOKS, Hooks
from openpi.models import layers
from openpi.models.config import GemmaConfig

KVCache = tuple[jax.Array, jax.Array]  # (depth, B, S, K, H) keys after RoPE, values
EXPERT_STREAMS = ("llm.expert0", "llm.expert1")  # hook-name prefix of each expert's residual stream


def _suffix(expert: int) -> str:
    return "" if expert == 0 else f"_{expert}"


def _expert_params(layer: dict, expert: int) -> dict:
    s = _suffix(expert)
    return {
        "q": layer["attn"][f"q_einsum{s}"]["w"],
        "kv": layer["attn"][f"kv_einsum{s}"]["w"],
        "out": layer["attn"][f"attn_vec_einsum{s}"]["w"],
        "gating": layer[f"mlp{s}"]["gating_einsum"],
        "linear": layer[f"mlp{s}"]["linear"],
        "pre_attn": layer[f"pre_attention_norm{s}"],
        "pre_ffw": layer[f"pre_ffw_norm{s}"],
    }


def _mlp(p: dict, x: jax.Array) -> jax.Array:
    gate = jnp.dot(x, p["gating"][0].astype(x.dtype))
    up = jnp.dot(x, p["gating"][1].astype(x.dtype))
    return jnp.dot(layers.gelu_tanh(gate) * up, p["linear"].astype(x.dtype))


def forward(
    params: dict,
    xs: list[jax.Array | None],
    positions: jax.Array,
    mask: jax.Array,
    cfgs: tuple[GemmaConfig, ...],
    *,
    conds: tuple[jax.Array | None, jax.Array | None] = (None, None),
    kv_cache: KVCache | None = None,
    cache_index: jax.Array | int | None = None,
    hooks: Hooks = NO_HOOKS,
    query_start: int = 0,
    prefix_pass: bool = False,
    streams: tuple[str, ...] = EXPERT_STREAMS,
) -> tuple[list[jax.Array | None], KVCache]:
    """Run every expert (one for Pi0-FAST, two for Pi0) through all layers.

    xs: per-expert token embeddings (None for an expert with no tokens in this call), concatenated in order.
    mask: (B, T, S) with S = cached length + T. Returns per-expert outputs after the final norms and the KV cache of
    this call's tokens (to reuse the prefix at every denoising step). With ``cache_index`` the cache is instead a
    fixed-size buffer (autoregressive decoding): this call's keys/values are written into it at that slot, attention
    runs over the whole buffer (``mask`` covers all of it) and the updated buffer is returned. ``query_start`` is the
    joint-sequence index of this call's first token (for attention knockouts); ``prefix_pass`` names attention sites
    ``prefix_probs``; ``streams`` names each expert's residual hook points (``<stream>.layer.<i>.resid_post``).
    Hook positions come from the model's hook table, never from here.
    """
    xs = list(xs)
    cfg = cfgs[0]
    num_heads, num_kv, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    lengths = [0 if x is None else x.shape[1] for x in xs]
    new_k, new_v = [], []
    for i in range(cfg.depth):
        layer = jax.tree.map(lambda a: a[i], params["layers"])
        ep = [_expert_params(layer, e) for e in range(len(xs))]
        qs, ks, vs, gates = [], [], [], []
        for e, x in enumerate(xs):
            if x is None:
                gates.append(None)
                continue
            x = hooks(f"{streams[e]}.layer.{i}.resid_pre", x)
            xs[e] = x
            y, gate = layers.rms_norm(ep[e]["pre_attn"], x, conds[e])
            gates.append(gate)
            qs.append(jnp.einsum("btd,ndh->btnh", y, ep[e]["q"].astype(y.dtype)))
            k, v = jnp.einsum("bsd,ckdh->cbskh", y, ep[e]["kv"].astype(y.dtype))
            ks.append(k)
            vs.append(v)
        q = layers.rope(jnp.concatenate(qs, axis=1), positions)
        k = layers.rope(jnp.concatenate(ks, axis=1), positions)
        v = jnp.concatenate(vs, axis=1)
        q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
        if cache_index is not None:
            k = jax.lax.dynamic_update_slice_in_dim(kv_cache[0][i], k.astype(kv_cache[0].dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv_cache[1][i], v.astype(kv_cache[1].dtype), cache_index, axis=1)
            new_k.append(k)
            new_v.append(v)
        else:
            new_k.append(k)
            new_v.append(v)
            if kv_cache is not None:
                k = jnp.concatenate([kv_cache[0][i].astype(k.dtype), k], axis=1)
                v = jnp.concatenate([kv_cache[1][i].astype(v.dtype), v], axis=1)
        b, t = q.shape[:2]
        q = q.reshape(b, t, num_kv, num_heads // num_kv, head_dim)
        logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
        layer_mask = hooks.knockout_mask(i, prefix_pass, mask, query_start) if hooks.knockouts else mask
        logits = jnp.where(layer_mask[:, None, None, :, :], logits, layers.MASKED_LOGIT)
        probs = jax.nn.softmax(logits, axis=-1)
        site = f"llm.layer.{i}.attn.{'prefix_probs' if prefix_pass else 'probs'}"
        if hooks.wants(site):
            hooks(site, probs.reshape(b, num_heads, t, -1))
        probs = probs.astype(k.dtype)
        encoded = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, num_heads, head_dim)
        start = 0
        for e, x in enumerate(xs):
            if x is None:
                continue
            part = encoded[:, start:start + lengths[e]]
            start += lengths[e]
            attn_out = jnp.einsum("btnh,nhd->btd", part, ep[e]["out"].astype(part.dtype))
            x = hooks(f"{streams[e]}.layer.{i}.resid_mid", layers.gated_residual(x, attn_out, gates[e]))
            y, gate = layers.rms_norm(ep[e]["pre_ffw"], x, conds[e])
            x = layers.gated_residual(x, _mlp(ep[e], y), gate)
            xs[e] = hooks(f"{streams[e]}.layer.{i}.resid_post", x)
    outs: list[jax.Array | None] = []
    for e, x in enumerate(xs):
        if x is None:
            outs.append(None)
            continue
        y, _ = layers.rms_norm(params[f"final_norm{_suffix(e)}"], x, conds[e])
        outs.append(hooks(f"{streams[e]}.final", y))
    return outs, (jnp.stack(new_k), jnp.stack(new_v))


def embed_tokens(params: dict, tokens: jax.Array, width: int, dtype) -> jax.Array:
    """Token embedding multiplied by sqrt(width) (Gemma convention)."""
    x = params["embedder"]["input_embedding"].astype(dtype)[tokens]
    return x * jnp.sqrt(width).astype(x.dtype)


def decode_logits(params: dict, x: jax.Array) -> jax.Array:
    """Vocabulary logits from final-norm outputs with the tied input embedding (Gemma), accumulated in float32."""
    table = params["embedder"]["input_embedding"].astype(x.dtype)
    return jnp.dot(x, table.T, preferred_element_type=jnp.float32)
