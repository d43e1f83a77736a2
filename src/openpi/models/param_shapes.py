"""Parameter paths and shapes of a Pi0 / Pi0.5 / Pi0-FAST config (openpi's tree layout), built without allocating
weights, plus a seeded initialiser for the embedded untrained default."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from openpi.models.config import AnyModelConfig, GemmaConfig, Pi0FASTConfig
from openpi.models.params_util import unflatten


def _norm(prefix: str, width: int, depth: int | None, adaptive_cond: int | None) -> dict[str, tuple]:
    lead = () if depth is None else (depth,)
    if adaptive_cond is None:
        return {f"{prefix}/scale": lead + (width,)}
    return {f"{prefix}/Dense_0/kernel": lead + (adaptive_cond, 3 * width), f"{prefix}/Dense_0/bias": lead + (3 * width,)}


def _siglip_shapes(config: AnyModelConfig) -> dict[str, tuple[int, ...]]:
    """SigLIP image encoder, including the `head` projection to the language model's width."""
    s, llm = config.siglip, config.llm
    shapes: dict[str, tuple[int, ...]] = {}
    img = "PaliGemma/img"
    blk = f"{img}/Transformer/encoderblock"
    d, w = s.depth, s.width
    shapes.update({
        f"{img}/embedding/kernel": (s.patch, s.patch, 3, w), f"{img}/embedding/bias": (w,),
        f"{img}/pos_embedding": (1, config.tokens_per_image, w),
        f"{img}/Transformer/encoder_norm/scale": (w,), f"{img}/Transformer/encoder_norm/bias": (w,),
        f"{img}/head/kernel": (w, llm.width), f"{img}/head/bias": (llm.width,),
        f"{blk}/LayerNorm_0/scale": (d, w), f"{blk}/LayerNorm_0/bias": (d, w),
        f"{blk}/LayerNorm_1/scale": (d, w), f"{blk}/LayerNorm_1/bias": (d, w),
        f"{blk}/MlpBlock_0/Dense_0/kernel": (d, w, s.mlp_dim), f"{blk}/MlpBlock_0/Dense_0/bias": (d, s.mlp_dim),
        f"{blk}/MlpBlock_0/Dense_1/kernel": (d, s.mlp_dim, w), f"{blk}/MlpBlock_0/Dense_1/bias": (d, w),
    })
    mha = f"{blk}/MultiHeadDotProductAttention_0"
    for name in ("query", "key", "value"):
        shapes[f"{mha}/{name}/kernel"] = (d, w, s.num_heads, s.head_dim)
        shapes[f"{mha}/{name}/bias"] = (d, s.num_heads, s.head_dim)
    shapes[f"{mha}/out/kernel"] = (d, s.num_heads, s.head_dim, w)
    shapes[f"{mha}/out/bias"] = (d, w)
    return shapes


def _gemma_expert_shapes(cfg: GemmaConfig, sfx: str, cond: int | None) -> dict[str, tuple[int, ...]]:
    """One Gemma expert's stacked layers and final norm (``sfx`` is '' for PaliGemma, '_1' for the action
    expert; ``cond`` the adaptive-norm conditioning width of Pi0.5's action expert)."""
    g, L = "PaliGemma/llm", cfg.depth
    shapes = {
        f"{g}/layers/attn/q_einsum{sfx}/w": (L, cfg.num_heads, cfg.width, cfg.head_dim),
        f"{g}/layers/attn/kv_einsum{sfx}/w": (L, 2, cfg.num_kv_heads, cfg.width, cfg.head_dim),
        f"{g}/layers/attn/attn_vec_einsum{sfx}/w": (L, cfg.num_heads, cfg.head_dim, cfg.width),
        f"{g}/layers/mlp{sfx}/gating_einsum": (L, 2, cfg.width, cfg.mlp_dim),
        f"{g}/layers/mlp{sfx}/linear": (L, cfg.mlp_dim, cfg.width),
    }
    shapes.update(_norm(f"{g}/layers/pre_attention_norm{sfx}", cfg.width, L, cond))
    shapes.update(_norm(f"{g}/layers/pre_ffw_norm{sfx}", cfg.width, L, cond))
    shapes.update(_norm(f"{g}/final_norm{sfx}", cfg.width, None, cond))
    return shapes


def param_shapes(config: AnyModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat '/'-path -> shape for every parameter, matching openpi's released layout (Pi0, Pi0.5 or Pi0-FAST)."""
    shapes = _siglip_shapes(config)
    shapes["PaliGemma/llm/embedder/input_embedding"] = (config.vocab_size, config.llm.width)
    if isinstance(config, Pi0FASTConfig):  # one Gemma, tied embedding, no action heads
        shapes.update(_gemma_expert_shapes(config.llm, "", None))
        return dict(sorted(shapes.items()))
    ex = config.expert
    for e, cfg in enumerate((config.llm, ex)):
        cond = cfg.width if (config.pi05 and e == 1) else None
        shapes.update(_gemma_expert_shapes(cfg, "" if e == 0 else f"_{e}", cond))

    ew, ad = ex.width, config.action_dim
    shapes.update({"action_in_proj/kernel": (ad, ew), "action_in_proj/bias": (ew,),
                   "action_out_proj/kernel": (ew, ad), "action_out_proj/bias": (ad,)})
    if config.pi05:
        shapes.update({"time_mlp_in/kernel": (ew, ew), "time_mlp_in/bias": (ew,),
                       "time_mlp_out/kernel": (ew, ew), "time_mlp_out/bias": (ew,)})
    else:
        shapes.update({"state_proj/kernel": (ad, ew), "state_proj/bias": (ew,),
                       "action_time_mlp_in/kernel": (2 * ew, ew), "action_time_mlp_in/bias": (ew,),
                       "action_time_mlp_out/kernel": (ew, ew), "action_time_mlp_out/bias": (ew,)})
    return dict(sorted(shapes.items()))


def abstract_params(config: AnyModelConfig, dtype=jnp.float32) -> dict:
    """Nested tree of jax.ShapeDtypeStruct: the full-size model described without memory."""
    return unflatten({k: jax.ShapeDtypeStruct(v, dtype) for k, v in param_shapes(config).items()})


def _fan_in(path: str, shape: tuple[int, ...]) -> int:
    if path.endswith("embedding/kernel"):
        return int(np.prod(shape[:-1]))
    if "einsum" in path or path.endswith("mlp/linear") or path.endswith("mlp_1/linear"):
        return shape[-2] if "attn_vec" not in path else shape[-2] * shape[-3]
    if "encoderblock" in path and len(shape) >= 3:
        return shape[1] if "out/kernel" not in path else shape[1] * shape[2]
    return shape[0] if len(shape) >= 2 else 1


def init_params(config: AnyModelConfig, seed: int = 0) -> dict:
    """Seeded deterministic random weights (scaled normal kernels, small random norms and biases).

    Used for the embedded *untrained* default: every path has a non-constant value so no sub-network is silently
    disconnected (a zero-init SigLIP head would make every image token 0).
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in param_shapes(config).items():
        if path.endswith(("/scale", "/bias")) or "LayerNorm" in path or "encoder_norm" in path:
            value = 0.02 * rng.standard_normal(shape)
            if "LayerNorm" in path and path.endswith("scale") or "encoder_norm/scale" in path:
                value = value + 1.0
        elif path.endswith("input_embedding"):
            value = rng.standard_normal(shape) / math.sqrt(shape[-1])
        elif path.endswith("pos_embedding"):
            value = 0.02 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / math.sqrt(max(_fan_in(path, shape), 1))
        flat[path] = value.astype(np.float32)
    return unflatten(flat)
