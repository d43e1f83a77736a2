"""Policy: one observation dict in, an action chunk out, with recording and interventions by hook-point name.

The Python API mirrors TransformerLens / nnsight habits::

    policy = create_policy()                                       # the embedded default
    actions, cache = policy.run_with_cache(obs, names=["llm.expert1.layer.3.resid_post"])
    cache["llm.expert1.layer.3.resid_post"].value                  # (step, batch, token, d_model) numpy array
    with policy.hooks([Intervention("llm.expert1.layer.3.resid_post", "zero", tokens="actions")]):
        edited = policy.infer(obs)["actions"]

Interventions are checked against the model's hook table when the block is entered (a site that matches nothing is
an error naming the nearest valid names), and each distinct intervention set is jit-compiled once and cached.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from openpi.interp.spans import span_table
from openpi.models.hooks import (AttentionKnockout, HookRequest, HookTable, Intervention, Record, parse_records,
                                resolve_steps, split_requests)
from openpi.models.model import Pi0Model
from openpi.models.pi0 import hook_table
from openpi.policies.libero_policy import LiberoTransforms, batch_observation

logger = logging.getLogger(__name__)
META_PREFIX = "meta/"
# The observation keys that identify one policy query of one episode; when all are present the flow-matching noise
# is a function of them (see Policy.noise_for). run_id is deliberately not among them: two runs over the same
# episodes (a baseline and an edited policy, or a rerun) must see the same noise to be comparable.
NOISE_KEY_FIELDS = ("suite", "task_id", "episode", "env_step")

# recorder(recordings, span_table, meta, actions) is called after every inference that recorded something.
Recorder = Callable[[dict[str, np.ndarray], dict, dict[str, Any], np.ndarray], None]


class PolicyOutputError(RuntimeError):
    """The model produced an unusable answer (non-finite actions); never sent as if it were one."""


@dataclasses.dataclass(frozen=True)
class Activation:
    """One recorded hook point: the array, the names of its axes and, along its token/query axis, the
    joint-sequence index of every kept token (None when the point has no token axis or tokens were averaged;
    (steps, tokens) for Pi0-FAST's decoding points, whose token moves one slot per step)."""

    name: str
    value: np.ndarray
    axes: tuple[str, ...]
    token_index: np.ndarray | None
    request: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape


class ActivationCache(Mapping[str, Activation]):
    """What ``run_with_cache`` returns: recorded hook points by name, plus the span table of the observation
    (which joint-sequence positions hold which camera, instruction, template, state and action tokens)."""

    def __init__(self, items: dict[str, Activation], span_table: dict) -> None:
        self._items = items
        self.span_table = span_table

    def __getitem__(self, name: str) -> Activation:
        if name not in self._items:
            raise KeyError(f"{name!r} was not recorded; recorded: {sorted(self._items)}")
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        rows = ", ".join(f"{k}: {v.axes}={v.shape}" for k, v in self._items.items())
        return f"ActivationCache({rows})"


def stable_seed(parts: Iterable[Any]) -> int:
    """A 31-bit integer from values, identical across processes and platforms (Python's hash() is salted)."""
    text = "|".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


class Policy:
    def __init__(self, model: Pi0Model, transforms: LiberoTransforms, *, metadata: dict | None = None,
                 records: tuple[Record, ...] = (), interventions: tuple[Intervention, ...] = (),
                 knockouts: tuple[AttentionKnockout, ...] = (), recorder: Recorder | None = None,
                 num_steps: int = 10, seed: int = 0) -> None:
        self.model = model
        self.transforms = transforms
        self.metadata = dict(metadata or {})
        self.table = self.hook_table_for(model.config, num_steps)
        self.records = parse_records(records)
        self.interventions = tuple(interventions)
        self.knockouts = tuple(knockouts)
        self.table.validate(self.records, self.interventions, self.knockouts, num_steps)
        self.recorder = recorder
        self.num_steps = num_steps
        self.seed = seed
        self._rng = jax.random.key(seed)

    @staticmethod
    def hook_table_for(config, num_steps: int) -> HookTable:
        """The hook table requests are checked against (``create_policy`` checks them before loading weights)."""
        return hook_table(config)

    # ------------------------------------------------------------------------------------------ noise

    def noise_shape(self) -> tuple[int, ...]:
        """One request's noise, without the batch axis: the flow-matching x_1 (horizon, action_dim)."""
        cfg = self.model.config
        return cfg.action_horizon, cfg.action_dim

    def _noise_layout(self) -> str:
        """Appended to the wrong-shape error when the axes need explaining (families with more than x_1)."""
        return ""

    def noise_for(self, meta: Mapping[str, Any]) -> np.ndarray | None:
        """Noise keyed by the query's identity (suite, task, episode, env step) and the policy seed, so the same
        query gets the same noise in any run, order or shard; None when a key is missing."""
        if not all(f in meta for f in NOISE_KEY_FIELDS):
            return None
        seed = stable_seed([self.seed, *(meta[f] for f in NOISE_KEY_FIELDS)])
        rng = np.random.default_rng(seed)
        return rng.standard_normal((1, *self.noise_shape())).astype(np.float32)

    def _noise(self, meta: Mapping[str, Any], noise: np.ndarray | None) -> np.ndarray:
        shape = self.noise_shape()
        if noise is not None:
            noise = np.asarray(noise, np.float32)
            if noise.size != np.prod(shape):
                raise ValueError(f"noise has shape {noise.shape}, expected {shape}{self._noise_layout()}")
            return noise.reshape(1, *shape)
        keyed = self.noise_for(meta)
        if keyed is not None:
            return keyed
        self._rng, key = jax.random.split(self._rng)  # keyless requests: one stream per policy
        return np.asarray(jax.random.normal(key, (1, *shape)), np.float32)

    # ------------------------------------------------------------------------------------------ inference

    def infer(self, obs: dict, *, noise: np.ndarray | None = None, return_recordings: bool = False) -> dict:
        """Observation keys: see LiberoTransforms. Keys starting with 'meta/' are ignored by the model and passed
        to the recorder (they key the stored rows) and to the noise. Returns {'actions': (H, 7), 'policy_timing'}."""
        out, _ = self._run(obs, noise, self.records, return_recordings)
        return out

    def run_with_cache(self, obs: dict, names: Iterable[str | Record] = ("*",), *,
                       noise: np.ndarray | None = None) -> tuple[np.ndarray, ActivationCache]:
        """Actions (H, 7) and an :class:`ActivationCache` of the hook points matching ``names`` (glob patterns or
        one-line records such as ``'llm.layer.*.attn.probs?tokens=actions&reduce=heads'``). The store recorder,
        if any, is not called."""
        records = parse_records([names] if isinstance(names, (str, Record)) else names)
        if not records:
            raise ValueError("run_with_cache needs at least one hook name or pattern")
        out, cache = self._run(obs, noise, records, True, use_recorder=False)
        return out["actions"], cache

    @contextlib.contextmanager
    def hooks(self, requests: HookRequest | Iterable[HookRequest]) -> Iterator[Policy]:
        """Apply interventions / attention knockouts to every inference inside the block (on top of those the
        policy was built with). Not for a policy that a server is answering requests with at the same time."""
        if isinstance(requests, (Record, Intervention, AttentionKnockout)):
            requests = [requests]
        records, interventions, knockouts = split_requests(requests)
        if records:
            raise TypeError("policy.hooks takes interventions and knockouts; record with policy.run_with_cache(obs, "
                            f"names=...) instead (got {[r.site for r in records]})")
        self.table.validate((), interventions, knockouts, self.num_steps)
        saved = self.interventions, self.knockouts
        self.interventions, self.knockouts = saved[0] + interventions, saved[1] + knockouts
        try:
            yield self
        finally:
            self.interventions, self.knockouts = saved

    def infer_batch(self, observations: list[dict]) -> list[dict | Exception]:
        """Answer several requests with one batched model call (the server gathers concurrent requests).

        Each request gets the noise it would get alone (keyed by its ``meta/*`` or drawn from the stream in list
        order) and its own recording rows. A request whose inputs are invalid, or whose actions come out
        non-finite, gets its exception in its slot; the others are answered. The batch is padded to a power of
        two so a server compiles a handful of shapes, not one per batch size."""
        results: list[dict | Exception] = [ValueError("not run")] * len(observations)
        prepared = []
        for i, obs in enumerate(observations):
            try:
                prepared.append((i, *self._prepare(obs)))
            except Exception as exc:  # noqa: BLE001 - reported to that request only
                results[i] = exc
        if prepared:
            noises = [self._noise(meta, None) for _, meta, _ in prepared]
            outs = self._forward([inp for _, _, inp in prepared], [m for _, m, _ in prepared], noises, self.records,
                                 want_cache=False, use_recorder=True, pad=True)
            for (i, _, _), out in zip(prepared, outs):
                results[i] = out[0] if not isinstance(out, Exception) else out
        return results

    def _prepare(self, obs: dict) -> tuple[dict, dict]:
        if not isinstance(obs, dict):
            raise TypeError(f"observation must be a dict, got {type(obs).__name__}")
        meta = {k[len(META_PREFIX):]: v for k, v in obs.items() if k.startswith(META_PREFIX)}
        return meta, self.transforms.inputs({k: v for k, v in obs.items() if not k.startswith(META_PREFIX)})

    def _run(self, obs: dict, noise: np.ndarray | None, records: tuple[Record, ...], want_cache: bool,
             use_recorder: bool = True) -> tuple[dict, ActivationCache | None]:
        meta, inputs = self._prepare(obs)
        (out,) = self._forward([inputs], [meta], [self._noise(meta, noise)], records, want_cache, use_recorder)
        if isinstance(out, Exception):
            raise out
        return out

    def _call_model(self, rows: list[dict], noises: list[np.ndarray], records: tuple[Record, ...]
                    ) -> tuple[np.ndarray, dict[str, np.ndarray], list[dict]]:
        """One batched model call: (B, H, action_dim) actions in model space, recordings and, per row, what the
        span table and the reply need beyond the inputs (nothing for Pi0)."""
        noise = np.concatenate(noises, axis=0)
        actions, recorded = self.model.sample_actions(batch_observation(rows), noise, num_steps=self.num_steps,
                                                      records=records, interventions=self.interventions,
                                                      knockouts=self.knockouts)
        return np.asarray(actions), {k: np.asarray(v) for k, v in recorded.items()}, [{} for _ in rows]

    def _span_table(self, inputs: dict, info: dict) -> dict:
        return span_table(self.model.config, inputs["image_masks"], inputs["prompt_length"], inputs["instruction"],
                          inputs.get("state_in_prompt"))

    def _forward(self, inputs: list[dict], metas: list[dict], noises: list[np.ndarray], records: tuple[Record, ...],
                 want_cache: bool, use_recorder: bool, pad: bool = False) -> list[tuple[dict, ActivationCache | None]
                                                                                 | Exception]:
        """One model call for prepared inputs; per-request outputs (or the exception for that request)."""
        start = time.monotonic()
        n = len(inputs)
        size = 1 << (n - 1).bit_length() if pad else n  # padded rows repeat the first request and are dropped
        actions, recorded, infos = self._call_model(inputs + [inputs[0]] * (size - n),
                                                    noises + [noises[0]] * (size - n), records)
        infer_ms = (time.monotonic() - start) * 1000
        outs: list = []
        for b in range(n):
            if isinstance(infos[b].get("error"), Exception):
                outs.append(infos[b]["error"])
                continue
            env_actions = self.transforms.outputs(actions[b], inputs[b])
            if not np.all(np.isfinite(env_actions)):
                bad = np.argwhere(~np.isfinite(env_actions))[0]
                raw = inputs[b]["raw_state"]
                outs.append(PolicyOutputError(
                    f"the model produced non-finite actions (first at chunk row {bad[0]}, dim {bad[1]}); inputs: "
                    f"state range [{float(np.min(raw)):.3g}, {float(np.max(raw)):.3g}]"
                    + (f", interventions {[iv.site for iv in self.interventions]}" if self.interventions else "")))
                continue
            out: dict[str, Any] = {"actions": env_actions, "policy_timing": {"infer_ms": infer_ms, "batch_size": n}}
            out.update(infos[b].get("reply", {}))
            cache = None
            if recorded:
                mine = {k: self._batch_row(k, v, b) for k, v in recorded.items()}
                table = self._span_table(inputs[b], infos[b])
                if use_recorder and self.recorder is not None:
                    self.recorder(mine, table, metas[b], env_actions)
                if want_cache:
                    cache = self._cache(mine, records, table)
                    out["recordings"] = mine
                    out["span_table"] = table
            outs.append((out, cache))
        return outs

    def _batch_row(self, name: str, value: np.ndarray, b: int) -> np.ndarray:
        """Request b's slice of a recording, keeping a batch axis of 1 (step-major points: axis 1)."""
        axis = 1 if self.table[name].per_step else 0
        return np.take(value, [b], axis=axis)

    def _cache(self, recorded: dict[str, np.ndarray], records: tuple[Record, ...], table: dict) -> ActivationCache:
        items = {}
        for name, value in recorded.items():
            rec = next(r for r in records if fnmatch.fnmatchcase(name, r.site))  # first match wins, as in Hooks
            point = self.table[name]
            averaged = "tokens" in rec.reduce
            kept = None if averaged else rec.kept_tokens(point, self.table)
            if kept is not None and point.token_step_stride:  # the token moves with the step: (steps, tokens)
                steps = resolve_steps(rec.steps, self.num_steps)
                kept = np.stack([point.joint_index_at(kept, s) for s in steps])
            items[name] = Activation(name, value, rec.result_axes(point), kept, rec.to_text())
        return ActivationCache(items, table)

    def close(self) -> None:
        """Flush recordings still buffered (call at shutdown)."""
        close = getattr(self.recorder, "close", None)
        if close is not None:
            close()

