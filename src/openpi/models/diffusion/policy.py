"""A loaded Diffusion Policy: config + params + normaliser + cached jit entry points, and LeRobot's
``select_action`` queueing (observation history and action chunk per episode).

Raw observations use LeRobot's feature keys: images ``(B, S, 3, H, W)`` (uint8 [0, 255] or float [0, 1]),
``observation.state`` ``(B, S, D)``, optionally ``observation.environment_state``. ``prepare`` normalises them as
LeRobot's preprocessor does; actions come back normalised from the model and ``unnormalize_actions`` is the
postprocessor.
"""
from __future__ import annotations

import collections
import functools
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from openpi.models.diffusion import model as dp
from openpi.models.diffusion.checkpoint import load_policy
from openpi.models.diffusion.config import ACTION, OBS_ENV_STATE, OBS_STATE, DiffusionConfig
from openpi.models.diffusion.normalize import Normalizer
from openpi.models.hooks import Intervention, Record


def image_to_float(x) -> jax.Array:
    """uint8 [0, 255] -> float32 [0, 1] (what LeRobot datasets and env wrappers hand the preprocessor)."""
    arr = np.asarray(x)
    if arr.dtype == np.uint8:
        return jnp.asarray(arr.astype(np.float32) / np.float32(255.0))
    return jnp.asarray(arr, jnp.float32)


class DiffusionPolicyModel:
    """Holds float32 parameters and compiled functions; the config is static (closed over)."""

    def __init__(self, config: DiffusionConfig, params: dict, normalizer: Normalizer) -> None:
        self.config = config
        self.params = params
        self.normalizer = normalizer

    @classmethod
    def load(cls, folder: str | pathlib.Path) -> DiffusionPolicyModel:
        """From a LeRobot ``save_pretrained`` folder."""
        return cls(*load_policy(folder))

    def with_config(self, **changes) -> DiffusionPolicyModel:
        """Same weights, another config (e.g. noise_scheduler_type='DDIM', as LeRobot allows)."""
        return DiffusionPolicyModel(self.config.replace(**changes), self.params, self.normalizer)

    # -------------------------------------------------------------------------------------- processors

    def prepare(self, raw: Mapping[str, object]) -> dp.Observation:
        """Raw LeRobot-keyed observation (with history axis) -> normalised ``Observation``."""
        cfg, norm = self.config, self.normalizer
        missing = [k for k in (*cfg.image_keys, OBS_STATE) if k not in raw]
        if cfg.env_state_dim and OBS_ENV_STATE not in raw:
            missing.append(OBS_ENV_STATE)
        if missing:
            raise KeyError(f"observation lacks {missing}; has {sorted(raw)}")
        images = {k: norm.normalize(k, image_to_float(raw[k])) for k in cfg.image_keys}
        env = norm.normalize(OBS_ENV_STATE, raw[OBS_ENV_STATE]) if cfg.env_state_dim else None
        return dp.Observation(images=images, state=norm.normalize(OBS_STATE, raw[OBS_STATE]), env_state=env)

    def normalize_actions(self, actions) -> jax.Array:
        return self.normalizer.normalize(ACTION, actions)

    def unnormalize_actions(self, actions) -> jax.Array:
        return self.normalizer.unnormalize(ACTION, actions)

    # -------------------------------------------------------------------------------------- compiled entry points

    @functools.cached_property
    def _sample(self):
        def run(params, obs, noise, step_noise, rng, interventions, *, records):
            return dp.sample_chunk(self.config, params, obs, noise, step_noise=step_noise, rng=rng,
                                   records=records, interventions=interventions)
        return jax.jit(run, static_argnames=("records",))

    def sample_chunk(self, obs: dp.Observation, noise, *, step_noise=None, rng=None,
                     records: tuple[Record, ...] = (), interventions: tuple[Intervention, ...] = ()
                     ) -> tuple[jax.Array, dict]:
        """(full normalised chunk (B, horizon, A), recordings)."""
        return self._sample(self.params, obs, jnp.asarray(noise, jnp.float32), step_noise, rng,
                            tuple(interventions), records=tuple(records))

    def sample_actions(self, obs: dp.Observation, noise, *, step_noise=None, rng=None,
                       records: tuple[Record, ...] = (), interventions: tuple[Intervention, ...] = ()
                       ) -> tuple[jax.Array, dict]:
        """(normalised actions (B, n_action_steps, A), recordings), as LeRobot's ``generate_actions``."""
        chunk, rec = self.sample_chunk(obs, noise, step_noise=step_noise, rng=rng, records=records,
                                       interventions=interventions)
        return chunk[:, dp.action_slice(self.config)], rec

    @functools.cached_property
    def _loss_terms(self):
        def run(params, obs, actions, noise, timesteps, crop, action_is_pad, *, train):
            return dp.loss_terms(self.config, params, obs, actions, noise, timesteps, crop=crop,
                                 action_is_pad=action_is_pad, train=train)
        return jax.jit(run, static_argnames=("train",))

    def loss_terms(self, obs: dp.Observation, actions, noise, timesteps, *, crop=None, action_is_pad=None,
                   train: bool = True) -> dict:
        """Normalised actions; LeRobot's loss with its draws given (see ``model.loss_terms``)."""
        return self._loss_terms(self.params, obs, jnp.asarray(actions, jnp.float32),
                                jnp.asarray(noise, jnp.float32), jnp.asarray(timesteps, jnp.int32),
                                None if crop is None else jnp.asarray(crop, jnp.int32), action_is_pad, train=train)


class PolicyRunner:
    """LeRobot's ``select_action`` for one episode: keeps the last n_obs_steps normalised frames (the first frame
    repeated to fill the history), generates a chunk when no action is queued and hands out one action per call.

    Frames have no history axis: images (B, 3, H, W), state (B, D). Returns normalised actions (B, A).
    """

    def __init__(self, model: DiffusionPolicyModel) -> None:
        self.model = model
        self.reset()

    def reset(self) -> None:
        self._frames: collections.deque = collections.deque(maxlen=self.model.config.n_obs_steps)
        self._actions: collections.deque = collections.deque()

    def select_action(self, frame: dp.Observation, *, noise=None, step_noise=None, rng=None) -> jax.Array:
        if len(self._frames) < self._frames.maxlen:  # first frame of the episode fills the history
            while len(self._frames) < self._frames.maxlen:
                self._frames.append(frame)
        else:
            self._frames.append(frame)
        if not self._actions:
            obs = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *self._frames)
            if noise is None:
                if rng is None:
                    raise ValueError("select_action needs noise or rng when a new chunk is generated")
                rng, k = jax.random.split(rng)
                noise = jax.random.normal(k, (obs.state.shape[0], self.model.config.horizon,
                                              self.model.config.action_dim))
            actions, _ = self.model.sample_actions(obs, noise, step_noise=step_noise, rng=rng)
            self._actions.extend(jnp.swapaxes(actions, 0, 1))
        return self._actions.popleft()
