"""Named hook points: declarative recording and intervention inside a model, resolved at trace time.

Why this design: openpi runs its layers inside a scan and never returns attention probabilities; the usual fix
(global flags plus debug callbacks) is impure, cannot return values under jit and silently records the wrong pass.
Here a model calls ``hooks(name, x)`` at every hook point. A ``Hooks`` object built from an empty request returns
``x`` untouched, so the traced graph is exactly the plain one. Requests are frozen dataclasses (hashable, so they
can be static jit arguments); intervention vectors are pytree leaves.

Every model family lists its hook points once, as :class:`HookPoint` records (name, axes, which joint-sequence
token its token axis starts at): ``openpi.models.hook_names(config)``. That table is the single source of truth:
the dispatcher reads token offsets from it (a model never passes offsets by hand), requests are checked against it
before anything runs (a pattern that matches nothing is an error naming the nearest valid names), the recorder and
the store read axes from it, and HOOKS.md is generated from it.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("heads", "tokens")
TOKEN_AXES = ("token", "query")  # the axis a token selector acts on (query: attention rows)


# ------------------------------------------------------------------------------------------------ hook points


@dataclasses.dataclass(frozen=True)
class HookPoint:
    """One named place in a model's computation.

    ``axes``: names of the value's axes as the model hands it to the hook (e.g. ``("batch", "token", "d_model")``,
    ``("batch", "head", "query", "key")``). ``per_step``: called once per denoising (flow matching) or decoding
    (autoregressive) step; recordings then get a leading ``step`` axis. ``token_start`` / ``num_tokens``: joint-
    sequence index of element 0 of the ``token``/``query`` axis and its length (None when the value has no token
    axis). ``group``: a short phrase shared by the points of one family (HOOKS.md collapses each group into one
    pattern row). ``token_step_stride``: how far the joint index of the token axis moves per step (Pi0-FAST's
    decoding points: 1, step ``s``'s token sits at ``token_start + s``; 0 for points whose tokens stay put).
    """

    name: str
    axes: tuple[str, ...]
    per_step: bool = False
    token_start: int | None = None
    num_tokens: int | None = None
    description: str = ""
    group: str = ""
    token_step_stride: int = 0

    def joint_index_at(self, kept: np.ndarray, step: int) -> np.ndarray:
        """Joint-sequence indices of the kept tokens at one step (``step`` -1: a point called once)."""
        return np.asarray(kept, np.int64) + self.token_step_stride * max(int(step), 0)

    @property
    def token_axis(self) -> int | None:
        hits = [i for i, a in enumerate(self.axes) if a in TOKEN_AXES]
        return hits[0] if hits else None

    @property
    def recorded_axes(self) -> tuple[str, ...]:
        """Axes of a recording of this point as ``sample_actions`` returns it."""
        return ("step", *self.axes) if self.per_step else self.axes


class HookTable:
    """The hook points of one model config plus its static token spans (for ``tokens=`` selectors)."""

    def __init__(self, points: Iterable[HookPoint], spans: Mapping[str, tuple[int, int]], seq_len: int) -> None:
        self.points: dict[str, HookPoint] = {}
        for p in points:
            if p.name in self.points:
                raise ValueError(f"hook point {p.name!r} declared twice")
            self.points[p.name] = p
        self.spans = {k: (int(a), int(b)) for k, (a, b) in spans.items()}
        self.seq_len = int(seq_len)

    @property
    def names(self) -> list[str]:
        return list(self.points)

    def __contains__(self, name: str) -> bool:
        return name in self.points

    def __getitem__(self, name: str) -> HookPoint:
        if name not in self.points:
            raise KeyError(f"{name!r} is not a hook point of this model; {suggest(name, self.names)}")
        return self.points[name]

    def match(self, pattern: str, what: str = "pattern") -> list[str]:
        """Names matching a glob pattern; an error naming the nearest valid names when none does."""
        hits = [n for n in self.points if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"{what} {pattern!r} matches no hook point of this model; {suggest(pattern, self.names)}"
                             " (all names: HOOKS.md or openpi.models.hook_names(config))")
        return hits

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
                         "'a:b' or comma-separated joint-sequence indices")

    def local_indices(self, tokens: str, name: str, length: int) -> np.ndarray | None:
        """Indices along a point's token axis for a selector (None = all); an error when they fall outside."""
        idx = self.joint_indices(tokens)
        if idx is None:
            return None
        point = self[name]
        if point.token_start is None:
            raise ValueError(f"token selector {tokens!r} given for {name!r}, which has no token axis "
                             f"(axes {point.axes}); use tokens=all")
        local = idx - point.token_start
        if local.size == 0 or local.min() < 0 or local.max() >= length:
            where = f"{idx.min()}..{idx.max()}" if idx.size else "none"
            raise ValueError(f"token selector {tokens!r} (joint indices {where}) is not within the tokens of "
                             f"{name!r} (joint {point.token_start}..{point.token_start + length - 1})")
        return local

    def token_length(self, name: str) -> int | None:
        """Length of a point's token axis (None when it has none)."""
        return self[name].num_tokens

    def validate(self, records: Sequence[Record] = (), interventions: Sequence[Intervention] = (),
                 knockouts: Sequence[AttentionKnockout] = (), num_steps: int | None = None) -> None:
        """Check every request against the table before anything is traced; errors name the request."""
        for r in records:
            for name in self.match(r.site, "record site"):
                self._check_tokens(r.tokens, name, f"record {r.site!r}")
                if "heads" in r.reduce and "head" not in self.points[name].axes:
                    raise ValueError(f"record {r.site!r}: reduce=heads but {name!r} has no head axis "
                                     f"(axes {self.points[name].axes})")
                if "tokens" in r.reduce and self.points[name].token_axis is None:
                    raise ValueError(f"record {r.site!r}: reduce=tokens but {name!r} has no token axis")
            _check_steps(r.steps, num_steps, f"record {r.site!r}")
        for iv in interventions:
            for name in self.match(iv.site, "intervention site"):
                if "key" in self.points[name].axes:
                    raise ValueError(f"intervention on attention site {name!r}: use AttentionKnockout instead")
                self._check_tokens(iv.tokens, name, f"intervention {iv.site!r}")
            _check_steps(iv.steps, num_steps, f"intervention {iv.site!r}")
        attn = [p for p in self.points.values() if "key" in p.axes]
        for ko in knockouts:
            self.joint_indices(ko.keys)
            self.joint_indices(ko.queries)
            layers = _parse_steps(ko.layers)
            have = sorted({_layer_of(p.name) for p in attn} - {None})
            if layers is not None and not set(layers) <= set(have):
                raise ValueError(f"knockout layers {ko.layers!r}: this model has attention layers {have}")
            if not ko.prefix:
                _check_steps(ko.steps, num_steps, "knockout")

    def required_tokens(self, records: Sequence[Record] = (), interventions: Sequence[Intervention] = ()
                        ) -> np.ndarray:
        """(seq_len,) bool: the joint tokens whose values the requests read or edit (the token/query axis of every
        matched site), which a compacted call must keep. Attention keys are not among them (a dropped key's
        probability is exactly 0 in the full layout), nor are knockouts' tokens (a knockout touching a dropped
        token only changes that token, which nothing reads)."""
        need = np.zeros(self.seq_len, bool)
        for req in (*records, *interventions):
            for name in self.match(req.site, "request site"):
                point = self.points[name]
                if point.token_axis is None:
                    continue
                local = self.local_indices(req.tokens, name, point.num_tokens)
                local = np.arange(point.num_tokens) if local is None else local
                need[point.token_start + local] = True
        return need

    def _check_tokens(self, tokens: str, name: str, what: str) -> None:
        length = self.token_length(name)
        if self.joint_indices(tokens) is None:
            return
        if length is None:
            raise ValueError(f"{what}: token selector {tokens!r} given but {name!r} has no token axis; narrow the "
                             "pattern or use tokens=all")
        try:
            self.local_indices(tokens, name, length)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}; narrow the site pattern to sites that hold those tokens") from None


def _layer_of(name: str) -> int | None:
    m = re.search(r"\.layer\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def suggest(name: str, names: Sequence[str], n: int = 5) -> str:
    """'did you mean ...' text with the nearest valid names (globs compared with '*' stripped)."""
    probe = name.replace("*", "")
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5) or difflib.get_close_matches(
        probe, names, n=n, cutoff=0.3)
    if not close:
        close = sorted(names)[:n]
    return "nearest valid names: " + ", ".join(close)


# ------------------------------------------------------------------------------------------------ requests


def _parse_steps(steps: str) -> tuple[int, ...] | None:
    """'all' -> None; '9' / '0,5,-1' -> a tuple (negative counts from the end)."""
    if steps in ("all", "*", ""):
        return None
    try:
        return tuple(int(s) for s in steps.split(","))
    except ValueError:
        raise ValueError(f"steps must be 'all' or comma-separated integers, got {steps!r}") from None


def _check_steps(steps: str, num_steps: int | None, what: str) -> None:
    if num_steps is not None:
        resolve_steps(steps, num_steps, what)


def resolve_steps(steps: str, num_steps: int, what: str = "step selector") -> tuple[int, ...]:
    parsed = _parse_steps(steps)
    if parsed is None:
        return tuple(range(num_steps))
    out = []
    for s in parsed:
        idx = s + num_steps if s < 0 else s
        if not 0 <= idx < num_steps:
            raise ValueError(f"{what}: step {s} out of range for {num_steps} steps (valid: 0..{num_steps - 1} "
                             f"or -{num_steps}..-1)")
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
    def parse(cls, text: str) -> Record:
        """Parse the one-line form 'SITE?tokens=actions&steps=-1&reduce=heads,tokens&dtype=float16'."""
        site, _, query = text.partition("?")
        fields = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
        unknown = set(fields) - {"tokens", "steps", "reduce", "dtype"}
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} in record {text!r}; "
                             "expected tokens=, steps=, reduce=, dtype=")
        reduce = tuple(r for r in fields.pop("reduce", "").split(",") if r)
        return cls(site=site, reduce=reduce, **fields)

    def to_text(self) -> str:
        """The one-line form (inverse of ``parse``)."""
        opts = {"tokens": self.tokens, "steps": self.steps, "reduce": ",".join(self.reduce), "dtype": self.dtype}
        default = {"tokens": "all", "steps": "all", "reduce": "", "dtype": "float32"}
        query = "&".join(f"{k}={v}" for k, v in opts.items() if v != default[k])
        return self.site + (f"?{query}" if query else "")

    def result_axes(self, point: HookPoint) -> tuple[str, ...]:
        """Axes of this record's array at ``point`` as ``sample_actions`` returns it (after reductions)."""
        axes = list(point.recorded_axes)
        if "heads" in self.reduce:
            axes.remove("head")
        if "tokens" in self.reduce and point.token_axis is not None:
            axes.remove(point.axes[point.token_axis])
        return tuple(axes)

    def row_axes(self, point: HookPoint) -> tuple[str, ...]:
        """Axes of one stored row: the result axes without step and batch, and without the ``token`` axis (one
        row per token; attention keeps its ``query`` axis whole in one row)."""
        return tuple(a for a in self.result_axes(point) if a not in ("step", "batch", "token"))

    def kept_tokens(self, point: HookPoint, table: HookTable) -> np.ndarray | None:
        """Joint-sequence index of each token kept along the point's token/query axis (None: no token axis)."""
        if point.token_axis is None:
            return None
        local = table.local_indices(self.tokens, point.name, point.num_tokens)
        return point.token_start + (np.arange(point.num_tokens) if local is None else local)


def parse_records(texts: Iterable[str | Record]) -> tuple[Record, ...]:
    return tuple(t if isinstance(t, Record) else Record.parse(t) for t in texts)


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


HookRequest = Record | Intervention | AttentionKnockout


def split_requests(requests: Iterable[HookRequest]) -> tuple[tuple[Record, ...], tuple[Intervention, ...],
                                                               tuple[AttentionKnockout, ...]]:
    """Sort a mixed list of requests into (records, interventions, knockouts); anything else is refused."""
    out: tuple[list, list, list] = ([], [], [])
    for r in requests:
        kinds = (Record, Intervention, AttentionKnockout)
        if not isinstance(r, kinds):
            raise TypeError(f"expected Record, Intervention or AttentionKnockout, got {type(r).__name__}: {r!r}")
        out[[isinstance(r, k) for k in kinds].index(True)].append(r)
    return tuple(out[0]), tuple(out[1]), tuple(out[2])


# ------------------------------------------------------------------------------------------------ compaction


@dataclasses.dataclass(frozen=True)
class TokenMap:
    """Where the tokens of a compacted call sit: ``keep[j]`` says whether joint token j of the declared (full)
    layout is computed. Dropped tokens all lie in the prefix and are masked for every sample (no query attends to
    them as keys), so a compacted call computes every kept token exactly as the full layout does; the dispatcher
    uses this map to read and edit kept tokens at their compacted positions and to hand back recordings in the
    full layout (attention over a dropped key is exactly 0 there)."""

    keep: tuple[bool, ...]

    @property
    def num_dropped(self) -> int:
        return len(self.keep) - sum(self.keep)

    def compact_index(self, joint: np.ndarray) -> np.ndarray:
        """Compacted position of full-layout joint indices (all of them must be kept)."""
        keep = np.asarray(self.keep)
        joint = np.asarray(joint, np.int64)
        if not keep[joint].all():
            raise ValueError(f"tokens {joint[~keep[joint]].tolist()[:8]} were dropped by prefix compaction, but a "
                             "request touches them (the layout must keep every token a request selects)")
        return np.cumsum(keep)[joint] - 1

    def kept_before(self, joint: int) -> int:
        """How many kept tokens precede full-layout joint index ``joint`` (where its point starts when compacted)."""
        return int(sum(self.keep[:joint]))

    def full_index(self, compact: np.ndarray) -> np.ndarray:
        """Full-layout joint index of compacted positions."""
        return np.nonzero(np.asarray(self.keep))[0][np.asarray(compact, np.int64)]

    def expand_keys(self, x: jax.Array) -> jax.Array:
        """An attention array over compacted keys (last axis) as the full layout holds it: zeros at dropped keys.
        Keys always start at joint 0 and cover the whole prefix, so the full axis has ``num_dropped`` more."""
        n = x.shape[-1]
        full = jnp.zeros(x.shape[:-1] + (n + self.num_dropped,), x.dtype)
        return full.at[..., jnp.asarray(self.full_index(np.arange(n)))].set(x)


# ------------------------------------------------------------------------------------------------ dispatcher


@dataclasses.dataclass
class Hooks:
    """Trace-time dispatcher. Build one per model call; the model passes it down to every hook point."""

    records: tuple[Record, ...] = ()
    interventions: tuple[Intervention, ...] = ()
    knockouts: tuple[AttentionKnockout, ...] = ()
    table: HookTable | None = None
    step: Any = None  # traced denoising-step index inside the sampling loop, None outside it
    num_steps: int | None = None  # resolves negative step selectors (-1 = last step)
    token_map: TokenMap | None = None  # set for a compacted call: requests stay in the full layout's positions
    collected: dict[str, jax.Array] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.empty and self.table is None:
            raise ValueError("Hooks with requests needs the model's HookTable")

    @property
    def empty(self) -> bool:
        return not (self.records or self.interventions or self.knockouts)

    def for_step(self, step) -> Hooks:
        return dataclasses.replace(self, step=step, collected={})

    def wants(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, r.site) for r in self.records)

    def record_for(self, name: str) -> Record | None:
        return next((r for r in self.records if fnmatch.fnmatchcase(name, r.site)), None)  # first match wins

    def _step_active(self, steps: str):
        if _parse_steps(steps) is None or self.step is None:
            return None
        if self.num_steps is None:
            raise ValueError("a step selector needs the number of denoising steps (set Hooks.num_steps)")
        selected = resolve_steps(steps, self.num_steps)
        return jnp.any(jnp.stack([self.step == s for s in selected]))

    def __call__(self, name: str, x: jax.Array) -> jax.Array:
        if self.empty:
            return x
        point = self.table[name]  # a name the model does not declare is a model bug: fail loudly
        for iv in self.interventions:
            if fnmatch.fnmatchcase(name, iv.site):
                x = self._intervene(iv, point, x)
        rec = self.record_for(name)
        if rec is not None:
            self.collected[name] = self._reduce(rec, point, x)
        return x

    def _local(self, tokens: str, point: HookPoint, length: int) -> np.ndarray | None:
        """Indices along the value's token axis for a selector (None = all), in the call's own layout."""
        if self.token_map is None:
            return self.table.local_indices(tokens, point.name, length)
        local = self.table.local_indices(tokens, point.name, point.num_tokens)  # checked in the full layout
        joint = point.token_start + (np.arange(point.num_tokens) if local is None else local)
        compact = self.token_map.compact_index(joint) - self.token_map.kept_before(point.token_start)
        return None if local is None and compact.size == length else compact

    def _intervene(self, iv: Intervention, point: HookPoint, x):
        axis = point.token_axis
        idx = None if axis is None else self._local(iv.tokens, point, x.shape[axis])
        axis = 0 if axis is None else axis
        moved = jnp.moveaxis(x, axis, 0)
        sel = moved if idx is None else moved[idx]
        if iv.op == "add":
            new = sel + jnp.asarray(iv.value, dtype=x.dtype)
        elif iv.op == "scale":
            new = sel * jnp.asarray(iv.value, dtype=x.dtype)
        elif iv.op == "zero":
            new = jnp.zeros_like(sel)
        else:
            new = jnp.moveaxis(iv.fn(jnp.moveaxis(sel, 0, axis)), axis, 0).astype(x.dtype)
        new_full = new if idx is None else moved.at[idx].set(new)
        active = self._step_active(iv.steps)
        if active is not None:
            new_full = jnp.where(active, new_full, moved)
        return jnp.moveaxis(new_full, 0, axis)

    def _reduce(self, rec: Record, point: HookPoint, x):
        axis = point.token_axis
        if axis is not None:
            idx = self._local(rec.tokens, point, x.shape[axis])
            if idx is not None:
                x = jnp.take(x, jnp.asarray(idx), axis=axis)
        if self.token_map is not None and "key" in point.axes:
            x = self.token_map.expand_keys(x)
        if "heads" in rec.reduce:
            head = point.axes.index("head")
            x = x.astype(jnp.float32).mean(axis=head)
            if axis is not None and axis > head:
                axis -= 1
        if "tokens" in rec.reduce and axis is not None:
            x = x.astype(jnp.float32).mean(axis=axis)
        return x.astype(rec.dtype)

    def knockout_mask(self, layer: int, prefix: bool, mask: jax.Array, q_offset: int) -> jax.Array:
        """Apply matching knockouts to a (batch, queries, keys) boolean attention mask."""
        for ko in self.knockouts:
            if ko.prefix != prefix:
                continue
            layers = _parse_steps(ko.layers)
            if layers is not None and layer not in layers:
                continue
            q = self.table.joint_indices(ko.queries)
            k = self.table.joint_indices(ko.keys)
            q_joint, k_joint = q_offset + np.arange(mask.shape[1]), np.arange(mask.shape[2])
            q_start, q_end = q_offset, q_offset + mask.shape[1]  # the pass's queries in the full layout
            if self.token_map is not None:  # compacted call: compare in the full layout's positions
                q_joint, k_joint = self.token_map.full_index(q_joint), self.token_map.full_index(k_joint)
                # dropped tokens all lie in the prefix: the prefix pass has that many more queries, the suffix
                # starts that much later
                dropped = self.token_map.num_dropped
                q_start, q_end = (q_start, q_end + dropped) if prefix else (q_start + dropped, q_end + dropped)
            qsel = np.ones(mask.shape[1], bool) if q is None else np.isin(q_joint, q)
            if q is not None and not np.isin(np.arange(q_start, q_end), q).any():
                raise ValueError(f"knockout queries {ko.queries!r} select no query of layer {layer}'s "
                                 f"{'prefix' if prefix else 'denoising'} pass (joint {q_start}..{q_end - 1})")
            ksel = np.ones(mask.shape[2], bool) if k is None else np.isin(k_joint, k)
            block = jnp.asarray(qsel[:, None] & ksel[None, :])
            active = self._step_active(ko.steps) if not prefix else None
            if active is not None:
                block = block & active
            mask = mask & ~block[None]
        return mask


NO_HOOKS = Hooks()
