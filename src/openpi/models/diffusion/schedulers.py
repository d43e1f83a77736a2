"""DDPM and DDIM noise schedulers as LeRobot configures diffusers' ``DDPMScheduler`` / ``DDIMScheduler``.

LeRobot passes num_train_timesteps, beta_start, beta_end, beta_schedule, clip_sample, clip_sample_range and
prediction_type; everything else keeps diffusers' defaults, which fixes: variance_type "fixed_small", no
thresholding, "leading" timestep spacing with steps_offset 0, DDIM eta 0 with set_alpha_to_one and the
unclipped model output in the DDIM direction term. Tables are computed in numpy exactly as diffusers does
(betas in float64 Python for the cosine schedule, then float32; the cumulative product of the float32 alphas
accumulated in float64, as torch's CPU kernel does, then float32).

Randomness is explicit: the DDPM variance noise of step i is ``step_noise[i]`` (steps whose timestep is 0 add no
noise, as in diffusers), so a sampling run is reproducible from arrays.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from openpi.models.diffusion.config import DiffusionConfig


def betas(config: DiffusionConfig) -> np.ndarray:
    """(num_train_timesteps,) float32 betas for ``config.beta_schedule``."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return np.linspace(config.beta_start, config.beta_end, n, dtype=np.float32)
    if config.beta_schedule == "scaled_linear":
        return np.square(np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, n, dtype=np.float32))
    if config.beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.asarray([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                          dtype=np.float32)
    if config.beta_schedule == "sigmoid":
        x = np.linspace(-6, 6, n, dtype=np.float32)
        sig = (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
        return (sig * np.float32(config.beta_end - config.beta_start) + np.float32(config.beta_start)).astype(
            np.float32)
    raise ValueError(f"beta_schedule {config.beta_schedule!r} is not implemented")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Static tables of one config: betas, alphas_cumprod (float32) and the inference timesteps (descending)."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    timesteps: np.ndarray
    prev_timesteps: np.ndarray  # the timestep each step moves to; -1 = past the end (alpha_cumprod 1)


def make_schedule(config: DiffusionConfig) -> Schedule:
    b = betas(config)
    # torch's CPU cumprod accumulates float32 in double (diffusers builds the table on CPU at construction)
    alphas_cumprod = np.cumprod((np.float32(1.0) - b).astype(np.float64)).astype(np.float32)
    n, steps = config.num_train_timesteps, config.inference_steps
    ratio = n // steps
    timesteps = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64)  # "leading" spacing, offset 0
    if config.noise_scheduler_type == "DDPM":
        prev = np.append(timesteps[1:], -1)  # next entry of the list (diffusers' previous_timestep)
    else:
        prev = timesteps - ratio  # DDIM: t - n // steps
    return Schedule(b, alphas_cumprod, timesteps, prev.astype(np.int64))


def _alpha(alphas_cumprod: jax.Array, t: jax.Array) -> jax.Array:
    """alphas_cumprod[t], or 1 for t < 0 (diffusers' ``one`` / ``final_alpha_cumprod`` with set_alpha_to_one)."""
    return jnp.where(t >= 0, alphas_cumprod[jnp.maximum(t, 0)], jnp.float32(1.0))


def _per_sample(v: jax.Array, like: jax.Array) -> jax.Array:
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """Forward diffusion: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t per batch row."""
    a = jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(timesteps)]
    return _per_sample(jnp.sqrt(a), x0) * x0 + _per_sample(jnp.sqrt(1 - a), x0) * noise


def predict_x0(config: DiffusionConfig, schedule: Schedule, model_output: jax.Array, t: jax.Array,
               sample: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(clipped predicted clean sample, the epsilon DDIM's direction term uses) at timestep ``t`` (scalar)."""
    a_t = jnp.asarray(schedule.alphas_cumprod)[t]
    if config.prediction_type == "epsilon":
        x0 = (sample - jnp.sqrt(1 - a_t) * model_output) / jnp.sqrt(a_t)
        eps = model_output
    else:  # "sample"
        x0 = model_output
        eps = (sample - jnp.sqrt(a_t) * x0) / jnp.sqrt(1 - a_t)
    if config.clip_sample:
        x0 = jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    return x0, eps


def step_from_x0(config: DiffusionConfig, schedule: Schedule, x0: jax.Array, eps: jax.Array, t: jax.Array,
                 t_prev: jax.Array, sample: jax.Array, noise: jax.Array | None) -> jax.Array:
    """x_{t_prev} from the (clipped) predicted clean sample.

    DDPM: posterior mean sqrt(a_p) beta'/(1 - a_t) x0 + sqrt(a_t / a_p) (1 - a_p)/(1 - a_t) x_t with
    beta' = 1 - a_t / a_p, plus sqrt(max((1 - a_p)/(1 - a_t) beta', 1e-20)) * noise when t > 0.
    DDIM (eta 0): sqrt(a_p) x0 + sqrt(1 - a_p) eps.
    """
    acp = jnp.asarray(schedule.alphas_cumprod)
    a_t, a_p = acp[t], _alpha(acp, t_prev)
    if config.noise_scheduler_type == "DDIM":
        return jnp.sqrt(a_p) * x0 + jnp.sqrt(1 - a_p) * eps
    beta_t = 1 - a_t / a_p
    mean = (jnp.sqrt(a_p) * beta_t / (1 - a_t)) * x0 + (jnp.sqrt(a_t / a_p) * (1 - a_p) / (1 - a_t)) * sample
    if noise is None:
        return mean
    variance = jnp.maximum((1 - a_p) / (1 - a_t) * beta_t, 1e-20)
    return jnp.where(t > 0, mean + jnp.sqrt(variance) * noise, mean)


def uses_step_noise(config: DiffusionConfig) -> bool:
    """Whether sampling draws noise at each step (DDPM) or is deterministic given the initial noise (DDIM)."""
    return config.noise_scheduler_type == "DDPM"
