"""A loaded Pi0 / Pi0.5 / Pi0-FAST model: config + parameters + cached jit-compiled entry points."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from openpi.models.hooks import AttentionKnockout, Intervention, Record
from openpi.models import pi0, pi0_fast
from openpi.models.config import AnyModelConfig, Pi0Config, Pi0FASTConfig


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


def make_fast_observation(images: dict, image_masks: dict, tokenized_prompt, tokenized_prompt_mask,
                          token_ar_mask=None, token_loss_mask=None) -> pi0_fast.Observation:
    """Pi0-FAST inputs; without ar/loss masks the prompt is an inference prefix (all 0 / all False)."""
    ids = jnp.asarray(tokenized_prompt, jnp.int32)
    return pi0_fast.Observation(
        images={k: images_to_float(v) for k, v in images.items()},
        image_masks={k: jnp.asarray(v, bool) for k, v in image_masks.items()},
        tokenized_prompt=ids,
        tokenized_prompt_mask=jnp.asarray(tokenized_prompt_mask, bool),
        token_ar_mask=jnp.zeros(ids.shape, jnp.int32) if token_ar_mask is None else jnp.asarray(token_ar_mask,
                                                                                               jnp.int32),
        token_loss_mask=jnp.zeros(ids.shape, bool) if token_loss_mask is None else jnp.asarray(token_loss_mask, bool),
    )


def cast_params(config: AnyModelConfig, params: dict) -> dict:
    """Parameters in the compute dtype; norm scales and 1-D leaves stay float32 (they are applied in float32)."""
    dtype = jnp.dtype(config.dtype)
    return jax.tree.map(lambda a: jnp.asarray(a, dtype if np.asarray(a).ndim >= 2 else jnp.float32), params)


class Pi0Model:
    """Holds parameters in the compute dtype (bfloat16 for released checkpoints) and compiled functions.

    ``compact_prefix``: drop the prefix tokens no sample of a call uses (masked cameras, prompt padding) before the
    transformer (:func:`pi0.compact_layout`), except those a recording or edit selects. Requests and recordings keep
    the full layout's token positions (attention over a dropped key is recorded as its exact 0). Outputs equal the
    full layout's within float rounding (reductions over fewer keys), not bit for bit, so it is off by default.
    """

    def __init__(self, config: Pi0Config, params: dict, *, compact_prefix: bool = False) -> None:
        self.config = config
        self.params = cast_params(config, params)
        self.compact_prefix = compact_prefix
        self._required: dict[tuple, np.ndarray] = {}

    def _layout(self, obs: pi0.Observation, records: tuple[Record, ...],
                interventions: tuple[Intervention, ...]) -> pi0.PrefixLayout | None:
        if not self.compact_prefix:
            return None
        key = tuple((r.site, r.tokens) for r in (*records, *interventions))
        if key not in self._required:  # pattern matching over every site name: once per distinct request
            self._required[key] = pi0.hook_table(self.config).required_tokens(records, interventions)
        return pi0.compact_layout(self.config, obs, required=self._required[key])

    @functools.cached_property
    def _sample(self):
        def run(params, obs, noise, interventions, *, num_steps, records, knockouts, layout):
            return pi0.sample_actions(self.config, params, obs, noise, num_steps=num_steps, records=records,
                                      interventions=interventions, knockouts=knockouts, layout=layout)
        return jax.jit(run, static_argnames=("num_steps", "records", "knockouts", "layout"))

    def sample_actions(self, obs: pi0.Observation, noise: jax.Array, *, num_steps: int = 10,
                       records: tuple[Record, ...] = (), interventions: tuple[Intervention, ...] = (),
                       knockouts: tuple[AttentionKnockout, ...] = ()) -> tuple[jax.Array, dict]:
        layout = self._layout(obs, tuple(records), tuple(interventions))
        return self._sample(self.params, obs, noise, tuple(interventions), num_steps=num_steps,
                            records=tuple(records), knockouts=tuple(knockouts), layout=layout)

    @functools.cached_property
    def _loss(self):
        return jax.jit(lambda params, obs, actions, noise, time: pi0.compute_loss(
            self.config, params, obs, actions, noise=noise, time=time))

    def compute_loss(self, obs: pi0.Observation, actions, noise, time) -> jax.Array:
        return self._loss(self.params, obs, actions, noise, time)


class Pi0FASTModel:
    """Pi0-FAST counterpart of :class:`Pi0Model`: parameters in the compute dtype and compiled decoding."""

    def __init__(self, config: Pi0FASTConfig, params: dict) -> None:
        self.config = config
        self.params = cast_params(config, params)

    @functools.cached_property
    def _sample(self):
        def run(params, obs, rng, temperature, interventions, *, max_decoding_steps, records, knockouts):
            return pi0_fast.sample_actions(self.config, params, obs, rng=rng, max_decoding_steps=max_decoding_steps,
                                           temperature=temperature, records=records, interventions=interventions,
                                           knockouts=knockouts)
        return jax.jit(run, static_argnames=("max_decoding_steps", "records", "knockouts"))

    def sample_actions(self, obs: pi0_fast.Observation, *, rng: jax.Array | None = None, temperature: float = 0.0,
                       max_decoding_steps: int | None = None, records: tuple[Record, ...] = (),
                       interventions: tuple[Intervention, ...] = (),
                       knockouts: tuple[AttentionKnockout, ...] = ()) -> pi0_fast.DecodeOutput:
        """Generated token ids (parse them with ``openpi.models.fast_prompt``), steps run and recordings."""
        rng = jax.random.key(0) if rng is None else rng
        steps = self.config.max_decoding_steps if max_decoding_steps is None else max_decoding_steps
        return self._sample(self.params, obs, rng, jnp.float32(temperature), tuple(interventions),
                            max_decoding_steps=steps, records=tuple(records), knockouts=tuple(knockouts))

    @functools.cached_property
    def _loss(self):
        return jax.jit(lambda params, obs: pi0_fast.compute_loss(self.config, params, obs))

    def compute_loss(self, obs: pi0_fast.Observation) -> jax.Array:
        return self._loss(self.params, obs)
