"""Named hook points: declarative recording and intervention inside the model, resolved at trace time.

Why this design: openpi runs its layers inside a scan and never returns attention probabilities; the usual fix
(global flags plus debug callbacks) is impure, cannot return values under jit and silently records the wrong pass.
Here the model calls ``hooks(name, x)`` at every hook point. A ``Hooks`` object built from an empty request returns
``x`` untouched, so the traced graph is exactly the plain one. Requests are frozen dataclasses (hashable, so they
can be static jit arguments); intervention vectors are pytree leaves.

Site names (see HOOKS.md for the full table):
  img.<camera>.layer.<i>.resid_pre / resid_post, img.<camera>.out          SigLIP, per camera
  llm.expert0.layer.<i>.resid_pre / resid_mid / resid_post, llm.expert0.final   prefix pass (PaliGemma expert)
  llm.expert1.layer.<i>.resid_pre / resid_mid / resid_post, llm.expert1.final   every denoising step (action expert)
  llm.layer.<i>.attn.prefix_probs   (batch, heads, prefix queries, prefix keys), prefix pass
  llm.layer.<i>.attn.probs          (batch, heads, suffix queries, all keys), every denoising step
  flow.x_t, flow.v_t                (batch, horizon, action_dim), every denoising step; flow.time (batch,)
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("heads", "tokens")


def _parse_steps(steps: str) -> tuple[int, ...] | None:
    """'all' -> None; '9' / '0,5,-1' -> a tuple (negative counts from the end)."""
    if steps in ("all", "*", ""):
        return None
    try:
        return tuple(int(s) for s in steps.split(","))
    except ValueError:
        raise ValueError(f"steps must be 'all' or comma-separated integers, got {steps!r}") from None


def resolve_steps(steps: str, num_steps: int) -> tuple[int, ...]:
    parsed = _parse_steps(steps)
    if parsed is None:
        return tuple(range(num_steps))
    out = []
    for s in parsed:
        idx = s + num_steps if s < 0 else s
        if not 0 <= idx < num_steps:
            raise ValueError(f"denoising step {s} out of range for {num_steps} steps")
        out.append(idx)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Record:
    """One recording request: a site pattern plus token/step selection, reductions and storage dtype.

    ``tokens``: 'all', a span name ('actions', 'state', 'prompt', 'prefix', 'suffix', 'images' or a camera key such
    as 'base_0_rgb'), a slice 'a:b' of joint-sequence indices, or comma-separated joint indices. On attention sites
    it selects queries (keys are always kept). ``reduce``: 'heads' (attention only) and/or 'tokens' (mean over the
    selected tokens/queries).
    """

    site: str
    tokens: str = "all"
    steps: str = "all"
    reduce: tuple[str, ...] = ()
    dtype: str = "float32"

    def __post_init__(self) -> None:
        bad = [r for r in self.reduce if r not in REDUCTIONS]
        if bad:
            raise ValueError(f"unknown reduction(s) {bad} in record {self.site!r}; expected any of {REDUCTIONS}")
        _parse_steps(self.steps)
        np.dtype(jnp.dtype(self.dtype))  # raises on an unknown dtype name

    @classmethod
    def parse(cls, text: str) -> "Record":
        """Parse the one-line form 'SITE?tokens=actions&steps=-1&reduce=heads,tokens&dtype=float16'."""
        site, _, query = text.partition("?")
        fields = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
        unknown = set(fields) - {"tokens", "steps", "reduce", "dtype"}
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} in record {text!r}; "
                             "expected tokens=, steps=, reduce=, dtype=")
        reduce = tuple(r for r in fields.pop("reduce", "").split(",") if r)
        return cls(site=site, reduce=reduce, **fields)


def parse_records(texts: tuple[str, ...] | list[str]) -> tuple[Record, ...]:
    return tuple(Record.parse(t) for t in texts)


@dataclasses.dataclass(frozen=True)
class Intervention:
    """Edit the activation at matching sites for chosen tokens and denoising steps.

    op: 'add' (x + value), 'scale' (x * value), 'zero', 'replace' (x <- fn(x) on the selected tokens; fn must be
    a hashable pure function, e.g. SAE encode -> edit -> decode).
    """

    site: str
    op: str
    value: Any = None
    tokens: str = "all"
    steps: str = "all"
    fn: Callable[[jax.Array], jax.Array] | None = None

    def __post_init__(self) -> None:
        if self.op not in ("add", "scale", "zero", "replace"):
            raise ValueError(f"unknown intervention op {self.op!r}; expected add, scale, zero or replace")
        if self.op in ("add", "scale") and self.value is None:
            raise ValueError(f"intervention op {self.op!r} at {self.site!r} needs a value")
        if self.op == "replace" and self.fn is None:
            raise ValueError(f"intervention op 'replace' at {self.site!r} needs fn")
        _parse_steps(self.steps)


jax.tree_util.register_dataclass(Intervention, data_fields=["value"], meta_fields=["site", "op", "tokens", "steps", "fn"])


@dataclasses.dataclass(frozen=True)
class AttentionKnockout:
    """Remove attention from chosen queries to a key span (logits masked before the softmax).

    ``prefix=False`` acts in the denoising steps (queries are suffix tokens); ``prefix=True`` in the prefix pass,
    which changes the KV cache every step reads. Spans follow ``Record.tokens``.
    """

    keys: str
    queries: str = "all"
    layers: str = "all"
    steps: str = "all"
    prefix: bool = False


class TokenLayout:
    """Static token positions of the joint sequence [prefix | suffix], derived from the model config."""

    def __init__(self, config) -> None:
        self.config = config
        n = config.tokens_per_image
        spans: dict[str, tuple[int, int]] = {}
        for i, key in enumerate(config.image_keys):
            spans[key] = (i * n, (i + 1) * n)
        spans["images"] = (0, len(config.image_keys) * n)
        p = config.prefix_len
        spans["prompt"] = (spans["images"][1], p)
        spans["prefix"] = (0, p)
        spans["state"] = (p, p) if config.pi05 else (p, p + 1)
        spans["actions"] = (spans["state"][1], spans["state"][1] + config.action_horizon)
        spans["suffix"] = (p, p + config.suffix_len)
        self.spans = spans
        self.seq_len = p + config.suffix_len

    def joint_indices(self, tokens: str) -> np.ndarray | None:
        """Joint-sequence indices for a token selector; None means 'all'."""
        if tokens in ("all", "*", ""):
            return None
        if tokens in self.spans:
            a, b = self.spans[tokens]
            return np.arange(a, b)
        if re.fullmatch(r"\d+:\d+", tokens):
            a, b = (int(v) for v in tokens.split(":"))
            return np.arange(a, b)
        if re.fullmatch(r"\d+(,\d+)*", tokens):
            return np.array([int(v) for v in tokens.split(",")])
        raise ValueError(f"unknown token selector {tokens!r}; expected 'all', a span name {sorted(self.spans)}, "
                         "'a:b' or comma-separated indices")

    def local_indices(self, tokens: str, offset: int, length: int, site: str) -> np.ndarray | None:
        idx = self.joint_indices(tokens)
        if idx is None:
            return None
        local = idx - offset
        if local.size == 0 or local.min() < 0 or local.max() >= length:
            raise ValueError(f"token selector {tokens!r} (joint indices {idx.min() if idx.size else '-'}.."
                             f"{idx.max() if idx.size else '-'}) is not within the tokens of site {site!r} "
                             f"(joint {offset}..{offset + length - 1})")
        return local


@dataclasses.dataclass
class Hooks:
    """Trace-time dispatcher. Build one per model call; the model passes it down to every hook point."""

    records: tuple[Record, ...] = ()
    interventions: tuple[Intervention, ...] = ()
    knockouts: tuple[AttentionKnockout, ...] = ()
    layout: TokenLayout | None = None
    step: Any = None  # traced denoising-step index inside the sampling loop, None outside it
    num_steps: int | None = None  # resolves negative step selectors (-1 = last step)
    collected: dict[str, jax.Array] = dataclasses.field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.records or self.interventions or self.knockouts)

    def for_step(self, step) -> "Hooks":
        return dataclasses.replace(self, step=step, collected={})

    def wants(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, r.site) for r in self.records)

    def _step_active(self, steps: str):
        if _parse_steps(steps) is None or self.step is None:
            return None
        if self.num_steps is None:
            raise ValueError("a step selector needs the number of denoising steps (set Hooks.num_steps)")
        selected = resolve_steps(steps, self.num_steps)
        return jnp.any(jnp.stack([self.step == s for s in selected]))

    def __call__(self, name: str, x: jax.Array, *, offset: int = 0, token_axis: int = -2) -> jax.Array:
        if self.empty:
            return x
        for iv in self.interventions:
            if fnmatch.fnmatchcase(name, iv.site):
                x = self._intervene(iv, name, x, offset, token_axis)
        rec = next((r for r in self.records if fnmatch.fnmatchcase(name, r.site)), None)  # first match wins
        if rec is not None:
            self.collected[name] = self._reduce(rec, name, x, offset, token_axis)
        return x

    def _intervene(self, iv: Intervention, name: str, x, offset: int, token_axis: int):
        if ".attn." in name:
            raise ValueError(f"intervention on attention site {name!r}: use AttentionKnockout instead")
        idx = self.layout.local_indices(iv.tokens, offset, x.shape[token_axis], name) if self.layout else None
        moved = jnp.moveaxis(x, token_axis, 0)
        sel = moved if idx is None else moved[idx]
        if iv.op == "add":
            new = sel + jnp.asarray(iv.value, dtype=x.dtype)
        elif iv.op == "scale":
            new = sel * jnp.asarray(iv.value, dtype=x.dtype)
        elif iv.op == "zero":
            new = jnp.zeros_like(sel)
        else:
            new = jnp.moveaxis(iv.fn(jnp.moveaxis(sel, 0, token_axis)), token_axis, 0).astype(x.dtype)
        new_full = new if idx is None else moved.at[idx].set(new)
        active = self._step_active(iv.steps)
        if active is not None:
            new_full = jnp.where(active, new_full, moved)
        return jnp.moveaxis(new_full, 0, token_axis)

    def _reduce(self, rec: Record, name: str, x, offset: int, token_axis: int):
        if self.layout is not None and x.ndim >= 2:
            idx = self.layout.local_indices(rec.tokens, offset, x.shape[token_axis], name)
            if idx is not None:
                x = jnp.take(x, jnp.asarray(idx), axis=token_axis)
        if "heads" in rec.reduce:
            if ".attn." not in name:
                raise ValueError(f"reduce=heads requested for {name!r}, which has no head axis")
            x = x.mean(axis=1)
            token_axis = token_axis if token_axis < 0 else token_axis - 1
        if "tokens" in rec.reduce:
            x = x.astype(jnp.float32).mean(axis=token_axis)
        return x.astype(rec.dtype)

    def knockout_mask(self, layer: int, prefix: bool, mask: jax.Array, q_offset: int) -> jax.Array:
        """Apply matching knockouts to a (batch, queries, keys) boolean attention mask."""
        for ko in self.knockouts:
            if ko.prefix != prefix:
                continue
            layers = _parse_steps(ko.layers)
            if layers is not None and layer not in layers:
                continue
            q = self.layout.local_indices(ko.queries, q_offset, mask.shape[1], f"llm.layer.{layer}.attn")
            k = self.layout.joint_indices(ko.keys)
            qsel = np.ones(mask.shape[1], bool) if q is None else np.isin(np.arange(mask.shape[1]), q)
            ksel = np.ones(mask.shape[2], bool) if k is None else np.isin(np.arange(mask.shape[2]), k)
            block = jnp.asarray(qsel[:, None] & ksel[None, :])
            active = self._step_active(ko.steps) if not prefix else None
            if active is not None:
                block = block & active
            mask = mask & ~block[None]
        return mask


NO_HOOKS = Hooks()
