"""LeRobot's ``DiffusionConditionalUnet1d``: a 1-D conv UNet over the action chunk, FiLM-conditioned on
[timestep embedding, global conditioning].

Structure (``in_out = [(action_dim, d0), (d0, d1), ...]`` over ``down_dims``):
- down stage i: two residual blocks, keep the output as skip i, then a stride-2 conv (all but the last stage);
- mid: two residual blocks at the last width;
- up stage i (one fewer than down stages): concat the newest unused skip on channels, two residual blocks, then a
  stride-2 transposed conv (every up stage has one: LeRobot's ``is_last`` test never fires there);
- final: Conv1d block (GroupNorm with 8 groups whatever ``n_groups`` says) and a 1x1 conv to the action dim.
The first skip is computed but never consumed, exactly as in LeRobot.

Residual block: ``h = Mish(GN(conv(x)))``; FiLM ``Linear(Mish(cond))`` gives (scale, bias) (or bias only without
``use_film_scale_modulation``); ``h = scale * h + bias``; ``h = Mish(GN(conv(h)))``; plus ``x`` (through a 1x1
conv when the width changes).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from openpi.models.diffusion import ops
from openpi.models.diffusion.config import FINAL_GROUPS, DiffusionConfig

Hook = Callable[[str, jax.Array], jax.Array]


def stage_io(config: DiffusionConfig) -> list[tuple[int, int]]:
    dims = config.down_dims
    return [(config.action_dim, dims[0])] + list(zip(dims[:-1], dims[1:]))


def block_names(config: DiffusionConfig) -> list[tuple[str, int, int]]:
    """(hook name relative to ``unet.``, channels, horizon length) of every block output in call order."""
    out: list[tuple[str, int, int]] = []
    t = config.horizon
    io = stage_io(config)
    for i, (_, c) in enumerate(io):
        out += [(f"down.{i}.block.0", c, t), (f"down.{i}.block.1", c, t)]
        if i < len(io) - 1:
            t //= 2
            out.append((f"down.{i}.downsample", c, t))
    c = config.down_dims[-1]
    out += [("mid.block.0", c, t), ("mid.block.1", c, t)]
    for i, (c_out, _) in enumerate(reversed(io[1:])):
        out += [(f"up.{i}.block.0", c_out, t), (f"up.{i}.block.1", c_out, t)]
        t *= 2
        out.append((f"up.{i}.upsample", c_out, t))
    out.append(("final_block", config.down_dims[0], t))
    return out


def timestep_sinusoidal(timesteps: jax.Array, dim: int) -> jax.Array:
    """(B,) integer timesteps -> (B, dim): [sin(t f), cos(t f)] with f_i = exp(-i ln(10000) / (dim/2 - 1))."""
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * (-math.log(10000) / (half - 1)))
    angles = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def timestep_embedding(config: DiffusionConfig, p: dict, timesteps: jax.Array) -> jax.Array:
    """Sinusoidal embedding -> Linear(E, 4E) -> Mish -> Linear(4E, E)."""
    e = timestep_sinusoidal(timesteps, config.diffusion_step_embed_dim)
    return ops.linear(p["3"], ops.mish(ops.linear(p["1"], e)))


def conv_block(p: dict, x: jax.Array, groups: int) -> jax.Array:
    """Conv1d (same padding) -> GroupNorm -> Mish (``DiffusionConv1dBlock``; params ``block.0`` / ``block.1``)."""
    k = p["block"]["0"]["weight"].shape[-1]
    return ops.mish(ops.group_norm(p["block"]["1"], ops.conv1d(p["block"]["0"], x, padding=k // 2), groups))


def residual_block(config: DiffusionConfig, p: dict, x: jax.Array, cond: jax.Array) -> jax.Array:
    out = conv_block(p["conv1"], x, config.n_groups)
    film = ops.linear(p["cond_encoder"]["1"], ops.mish(cond))[:, :, None]
    c = out.shape[1]
    out = film[:, :c] * out + film[:, c:] if config.use_film_scale_modulation else out + film
    out = conv_block(p["conv2"], out, config.n_groups)
    skip = ops.conv1d(p["residual_conv"], x) if "residual_conv" in p else x
    return out + skip


def unet(config: DiffusionConfig, p: dict, x: jax.Array, timesteps: jax.Array, global_cond: jax.Array,
         hook: Hook | None = None) -> jax.Array:
    """(B, horizon, action_dim) noisy chunk, (B,) timesteps, (B, global_cond_dim) -> (B, horizon, action_dim).

    ``hook(name, x)`` is called with ``time_emb`` (B, E), ``cond`` (B, E + G), every name of :func:`block_names`
    (channel-first (B, C, T)) and ``out``.
    """
    hook = hook or (lambda _, v: v)
    temb = hook("time_emb", timestep_embedding(config, p["diffusion_step_encoder"], timesteps))
    cond = hook("cond", jnp.concatenate([temb, global_cond.astype(temb.dtype)], axis=-1))
    h = jnp.swapaxes(x, 1, 2)
    skips = []
    n_down = len(config.down_dims)
    for i in range(n_down):
        stage = p["down_modules"][str(i)]
        for j in range(2):
            h = hook(f"down.{i}.block.{j}", residual_block(config, stage[str(j)], h, cond))
        skips.append(h)
        if i < n_down - 1:
            h = hook(f"down.{i}.downsample", ops.conv1d(stage["2"], h, stride=2, padding=1))
    for j in range(2):
        h = hook(f"mid.block.{j}", residual_block(config, p["mid_modules"][str(j)], h, cond))
    for i in range(n_down - 1):
        stage = p["up_modules"][str(i)]
        h = jnp.concatenate([h, skips.pop()], axis=1)
        for j in range(2):
            h = hook(f"up.{i}.block.{j}", residual_block(config, stage[str(j)], h, cond))
        h = hook(f"up.{i}.upsample", ops.conv_transpose1d(stage["2"], h, stride=2, padding=1))
    h = hook("final_block", conv_block(p["final_conv"]["0"], h, FINAL_GROUPS))
    out = ops.conv1d(p["final_conv"]["1"], h)
    return hook("out", jnp.swapaxes(out, 1, 2))


def param_shapes(config: DiffusionConfig, prefix: str = "diffusion.unet") -> dict[str, tuple[int, ...]]:
    """Every state_dict entry of the UNet."""
    e, k, cond = config.diffusion_step_embed_dim, config.kernel_size, config.film_cond_dim
    out = {f"{prefix}.diffusion_step_encoder.1.weight": (4 * e, e), f"{prefix}.diffusion_step_encoder.1.bias": (4 * e,),
           f"{prefix}.diffusion_step_encoder.3.weight": (e, 4 * e), f"{prefix}.diffusion_step_encoder.3.bias": (e,)}

    def conv_block_shapes(name: str, c_in: int, c_out: int, kernel: int) -> None:
        out.update({f"{name}.block.0.weight": (c_out, c_in, kernel), f"{name}.block.0.bias": (c_out,),
                    f"{name}.block.1.weight": (c_out,), f"{name}.block.1.bias": (c_out,)})

    def res(name: str, c_in: int, c_out: int) -> None:
        conv_block_shapes(f"{name}.conv1", c_in, c_out, k)
        conv_block_shapes(f"{name}.conv2", c_out, c_out, k)
        film = 2 * c_out if config.use_film_scale_modulation else c_out
        out.update({f"{name}.cond_encoder.1.weight": (film, cond), f"{name}.cond_encoder.1.bias": (film,)})
        if c_in != c_out:
            out.update({f"{name}.residual_conv.weight": (c_out, c_in, 1), f"{name}.residual_conv.bias": (c_out,)})

    io = stage_io(config)
    for i, (c_in, c_out) in enumerate(io):
        res(f"{prefix}.down_modules.{i}.0", c_in, c_out)
        res(f"{prefix}.down_modules.{i}.1", c_out, c_out)
        if i < len(io) - 1:
            out.update({f"{prefix}.down_modules.{i}.2.weight": (c_out, c_out, 3),
                        f"{prefix}.down_modules.{i}.2.bias": (c_out,)})
    last = config.down_dims[-1]
    res(f"{prefix}.mid_modules.0", last, last)
    res(f"{prefix}.mid_modules.1", last, last)
    for i, (c_out, c_in) in enumerate(reversed(io[1:])):
        res(f"{prefix}.up_modules.{i}.0", 2 * c_in, c_out)
        res(f"{prefix}.up_modules.{i}.1", c_out, c_out)
        out.update({f"{prefix}.up_modules.{i}.2.weight": (c_out, c_out, 4),
                    f"{prefix}.up_modules.{i}.2.bias": (c_out,)})
    d0 = config.down_dims[0]
    conv_block_shapes(f"{prefix}.final_conv.0", d0, d0, k)
    out.update({f"{prefix}.final_conv.1.weight": (config.action_dim, d0, 1),
                f"{prefix}.final_conv.1.bias": (config.action_dim,)})
    return out
