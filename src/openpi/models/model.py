"""A loaded Pi0 / Pi0.5 model: config + parameters + cached jit-compiled entry points."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from openpi.models.hooks import AttentionKnockout, Intervention, Record
from openpi.models import pi0
from openpi.models.config import Pi0Config


def images_to_float(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1], exactly as openpi's Observation.from_dict does."""
    if images.dtype == np.uint8:
        return jnp.asarray(np.asarray(images).astype(np.float32) / 255.0 * 2.0 - 1.0)
    return jnp.asarray(images, jnp.float32)


def make_observation(images: dict, image_masks: dict, state, tokenized_prompt, tokenized_prompt_mask) -> pi0.Observation:
    return pi0.Observation(
        images={k: images_to_float(v) for k, v in images.items()},
        image_masks={k: jnp.asarray(v, bool) for k, v in image_masks.items()},
        state=jnp.asarray(state, jnp.float32),
        tokenized_prompt=jnp.asarray(tokenized_prompt, jnp.int32),
        tokenized_prompt_mask=jnp.asarray(tokenized_prompt_mask, bool),
    )


class Pi0Model:
    """Holds parameters in the compute dtype (bfloat16 for released checkpoints) and compiled functions."""

    def __init__(self, config: Pi0Config, params: dict) -> None:
        self.config = config
        dtype = jnp.dtype(config.dtype)
        # Norm scales and the SigLIP stem/position embedding stay float32 (they are applied in float32).
        self.params = jax.tree.map(lambda a: jnp.asarray(a, dtype if np.asarray(a).ndim >= 2 else jnp.float32),
                                   params)

    @functools.cached_property
    def _sample(self):
        def run(params, obs, noise, interventions, *, num_steps, records, knockouts):
            return pi0.sample_actions(self.config, params, obs, noise, num_steps=num_steps, records=records,
                                      interventions=interventions, knockouts=knockouts)
        return jax.jit(run, static_argnames=("num_steps", "records", "knockouts"))

    def sample_actions(self, obs: pi0.Observation, noise: jax.Array, *, num_steps: int = 10,
                       records: tuple[Record, ...] = (), interventions: tuple[Intervention, ...] = (),
                       knockouts: tuple[AttentionKnockout, ...] = ()) -> tuple[jax.Array, dict]:
        return self._sample(self.params, obs, noise, tuple(interventions), num_steps=num_steps,
                            records=tuple(records), knockouts=tuple(knockouts))

    @functools.cached_property
    def _loss(self):
        return jax.jit(lambda params, obs, actions, noise, time: pi0.compute_loss(
            self.config, params, obs, actions, noise=noise, time=time))

    def compute_loss(self, obs: pi0.Observation, actions, noise, time) -> jax.Array:
        return self._loss(self.params, obs, actions, noise, time)
