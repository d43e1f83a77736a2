"""Pi0-FAST behind the same Policy interface as Pi0: LIBERO requests in, decoded action chunks out.

What differs from Pi0, and why:

- **Inputs** (openpi's ``pi0_fast_libero``): the state is quantile-normalised and enters only as 256-bin text in
  the prompt (``Task: ..., State: ...;\\n``); the right-wrist slot is zeros but *not* masked (openpi's LIBERO
  policy leaves padding cameras valid for Pi0-FAST).
- **Outputs**: the generated ids are parsed (``openpi.models.fast_prompt``) into a normalised chunk, then
  unnormalised and made absolute like Pi0's. A sequence that does not parse (no ``Action: ``, ids outside the
  action range, a coefficient count that does not fill the chunk) gives openpi's answer, a chunk of zeros in
  normalised space, and the reply says so: ``fast_decode = {ok, reason, action_tokens, decoding_steps,
  fitted}``. With ``on_decode_failure="error"`` such a request fails with :class:`PolicyOutputError` instead;
  with ``coefficient_count="fit"`` a wrong coefficient count is fitted (``FASTTokenizer.decode(fit_length=True)``)
  and flagged ``fitted`` instead of failing.
- **Randomness**: greedy decoding (temperature 0, openpi's default) needs none; with a temperature the sampling key
  is keyed by the request's ``meta/*`` like Pi0's noise (one key per batched call: the first request's).
- **Recordings**: decoding-step hook points are recorded per step; step ``s``'s token sits at joint index
  ``P + s`` and rows are keyed by it. The span table marks the steps that wrote action tokens as ``actions`` and
  says how many steps ran (``valid_steps``, through the end of sequence); rows of later steps are not stored.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from openpi.interp.spans import fast_span_table
from openpi.models import pi0_fast
from openpi.models.fast_prompt import FASTPromptFormat
from openpi.models.hooks import HookTable, Record
from openpi.models.model import Pi0FASTModel, make_fast_observation
from openpi.policies.libero_policy import LiberoTransforms
from openpi.policies.policy import NOISE_KEY_FIELDS, Policy, PolicyOutputError, stable_seed

DECODE_FAILURE_MODES = ("openpi", "error")
LENGTH_MODES = ("openpi", "fit")


@dataclasses.dataclass
class FastLiberoTransforms(LiberoTransforms):
    """LIBERO request -> Pi0-FAST inputs. ``tokenizer`` is a :class:`FASTPromptFormat` (text encoder + FAST
    tokenizer + the model's vocabulary layout)."""

    tokenizer: FASTPromptFormat = None  # type: ignore[assignment]
    quantile_norm: bool = True

    def inputs(self, obs: dict, targets: np.ndarray | None = None) -> dict:
        """Model inputs of a request; with ``targets`` (the (horizon, action_dim) chunk in model space, see
        ``openpi.training.train.action_targets``) the training sequence whose postfix holds their FAST tokens."""
        prompt, raw_state, state, base, wrist = self.parse(obs)
        tok = self.tokenizer.tokenize(prompt, state, targets, clamp=True)
        images, masks = self.camera_inputs(base, wrist, pad_slots_valid=True)
        return {"images": images, "image_masks": masks, "raw_state": raw_state, "tokenized_prompt": tok.tokens,
                "tokenized_prompt_mask": tok.mask, "token_ar_mask": tok.ar_mask, "token_loss_mask": tok.loss_mask,
                "prompt_length": tok.prefix_len, "instruction": tok.instruction, "state_in_prompt": tok.state,
                "prompt": prompt}


def batch_fast_observation(inputs: list[dict]) -> pi0_fast.Observation:
    """Outputs of ``FastLiberoTransforms.inputs`` for B requests -> one batched observation (serving and training
    share it, as Pi0's ``batch_observation``)."""
    keys = list(inputs[0]["images"])
    return make_fast_observation({k: np.stack([x["images"][k] for x in inputs]) for k in keys},
                                 {k: np.array([x["image_masks"][k] for x in inputs]) for k in keys},
                                 *(np.stack([x[f] for x in inputs]) for f in ("tokenized_prompt",
                                                                              "tokenized_prompt_mask",
                                                                              "token_ar_mask", "token_loss_mask")))


class FastPolicy(Policy):
    """A :class:`Policy` over a :class:`Pi0FASTModel`; ``num_steps`` is the number of decoding steps."""

    def __init__(self, model: Pi0FASTModel, transforms: FastLiberoTransforms, *, temperature: float = 0.0,
                 on_decode_failure: str = "openpi", coefficient_count: str = "openpi", num_steps: int | None = None,
                 **kwargs: Any) -> None:
        if on_decode_failure not in DECODE_FAILURE_MODES:
            raise ValueError(f"on_decode_failure must be one of {DECODE_FAILURE_MODES}, got {on_decode_failure!r}")
        if coefficient_count not in LENGTH_MODES:
            raise ValueError(f"coefficient_count must be one of {LENGTH_MODES}, got {coefficient_count!r}")
        self.coefficient_count = coefficient_count
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.temperature = float(temperature)
        self.on_decode_failure = on_decode_failure
        super().__init__(model, transforms, num_steps=num_steps or model.config.max_decoding_steps, **kwargs)

    @staticmethod
    def hook_table_for(config, num_steps: int) -> HookTable:
        return pi0_fast.hook_table(config, num_steps)

    def noise_for(self, meta: Mapping[str, Any]) -> np.ndarray | None:
        if not all(f in meta for f in NOISE_KEY_FIELDS):
            return None
        return np.array([stable_seed([self.seed, *(meta[f] for f in NOISE_KEY_FIELDS)])], np.int64)

    def _noise(self, meta: Mapping[str, Any], noise: np.ndarray | None) -> np.ndarray:
        if noise is not None:
            raise ValueError("Pi0-FAST has no flow-matching noise; its sampling key is keyed by the request's meta/*")
        keyed = self.noise_for(meta)
        if keyed is not None:
            return keyed
        self._rng, key = jax.random.split(self._rng)
        return np.asarray(jax.random.randint(key, (1,), 0, 2**31 - 1), np.int64)

    def _call_model(self, rows: list[dict], noises: list[np.ndarray], records: tuple[Record, ...]
                    ) -> tuple[np.ndarray, dict[str, np.ndarray], list[dict]]:
        out = self.model.sample_actions(batch_fast_observation(rows), rng=jax.random.key(int(noises[0][0])),
                                        temperature=self.temperature, max_decoding_steps=self.num_steps,
                                        records=records, interventions=self.interventions, knockouts=self.knockouts)
        tokens = np.asarray(out.tokens)
        executed = int(out.num_steps)
        cfg = self.model.config
        fmt: FASTPromptFormat = self.transforms.tokenizer
        actions = np.zeros((len(rows), cfg.action_horizon, cfg.action_dim), np.float32)
        infos = []
        for b in range(len(rows)):
            ids = tokens[b, :executed]
            eos = np.flatnonzero(ids == cfg.eos_token)
            valid = int(eos[0]) + 1 if eos.size else executed  # steps that produced this sample's tokens
            parsed = fmt.parse(ids[:valid], cfg.action_horizon, cfg.action_dim,
                               fit_length=self.coefficient_count == "fit")
            # The action-token steps are those that wrote well-formed action ids, whether or not their coefficient
            # count then filled the chunk (ok says that).
            start, end, _ = fmt.action_positions(ids[:valid])
            info: dict[str, Any] = {"valid_steps": valid, "action_steps": (start, end)}
            report = {"ok": parsed.ok, "reason": parsed.reason, "action_tokens": end - start,
                      "decoding_steps": valid, "fitted": parsed.fitted}
            if parsed.ok:
                actions[b] = parsed.actions
            elif self.on_decode_failure == "error":
                info["error"] = PolicyOutputError(f"Pi0-FAST output did not decode to actions: {parsed.reason}")
            info["reply"] = {"fast_decode": report}
            infos.append(info)
        return actions, {k: np.asarray(v) for k, v in out.recordings.items()}, infos

    def _span_table(self, inputs: dict, info: dict) -> dict:
        return fast_span_table(self.model.config, inputs["image_masks"], inputs["prompt_length"],
                               inputs["instruction"], inputs["state_in_prompt"], max_decoding_steps=self.num_steps,
                               valid_steps=info["valid_steps"], action_steps=info["action_steps"])


__all__ = ["FastLiberoTransforms", "FastPolicy", "batch_fast_observation"]
