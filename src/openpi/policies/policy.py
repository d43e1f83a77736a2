"""Policy: one observation dict in, an action chunk out, with optional recording of model internals."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from openpi.models.hooks import AttentionKnockout, Intervention, Record
from openpi.interp.spans import span_table
from openpi.models.model import Pi0Model
from openpi.policies.libero_policy import LiberoTransforms, batch_observation

logger = logging.getLogger(__name__)
META_PREFIX = "meta/"

# recorder(recordings, span_table, meta, actions) is called after every inference that recorded something.
Recorder = Callable[[dict[str, np.ndarray], dict, dict[str, Any], np.ndarray], None]


class Policy:
    def __init__(self, model: Pi0Model, transforms: LiberoTransforms, *, metadata: dict | None = None,
                 records: tuple[Record, ...] = (), interventions: tuple[Intervention, ...] = (),
                 knockouts: tuple[AttentionKnockout, ...] = (), recorder: Recorder | None = None,
                 num_steps: int = 10, seed: int = 0) -> None:
        self.model = model
        self.transforms = transforms
        self.metadata = dict(metadata or {})
        self.records = tuple(records)
        self.interventions = tuple(interventions)
        self.knockouts = tuple(knockouts)
        self.recorder = recorder
        self.num_steps = num_steps
        self._rng = jax.random.key(seed)

    def infer(self, obs: dict, *, noise: np.ndarray | None = None, return_recordings: bool = False) -> dict:
        """Observation keys: see LiberoTransforms. Keys starting with 'meta/' are ignored by the model and passed
        to the recorder (they key the stored rows). Returns {'actions': (H, 7), 'policy_timing': {...}}."""
        start = time.monotonic()
        if not isinstance(obs, dict):
            raise TypeError(f"observation must be a dict, got {type(obs).__name__}")
        meta = {k[len(META_PREFIX):]: v for k, v in obs.items() if k.startswith(META_PREFIX)}
        inputs = self.transforms.inputs({k: v for k, v in obs.items() if not k.startswith(META_PREFIX)})
        model_obs = batch_observation([inputs])
        cfg = self.model.config
        if noise is None:
            self._rng, key = jax.random.split(self._rng)
            noise = jax.random.normal(key, (1, cfg.action_horizon, cfg.action_dim))
        else:
            noise = np.asarray(noise, np.float32).reshape(1, cfg.action_horizon, cfg.action_dim)
        actions, recorded = self.model.sample_actions(model_obs, noise, num_steps=self.num_steps,
                                                      records=self.records, interventions=self.interventions,
                                                      knockouts=self.knockouts)
        model_actions = np.asarray(actions[0])
        infer_ms = (time.monotonic() - start) * 1000
        out: dict[str, Any] = {"actions": self.transforms.outputs(model_actions, inputs),
                               "policy_timing": {"infer_ms": infer_ms}}
        if recorded:
            recorded = {k: np.asarray(v) for k, v in recorded.items()}
            table = span_table(cfg, inputs["image_masks"], inputs["prompt_length"], inputs["instruction"])
            if self.recorder is not None:
                self.recorder(recorded, table, meta, out["actions"])
            if return_recordings:
                out["recordings"] = recorded
                out["span_table"] = table
        return out

    def close(self) -> None:
        """Flush recordings still buffered (call at shutdown)."""
        close = getattr(self.recorder, "close", None)
        if close is not None:
            close()
