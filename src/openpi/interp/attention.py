"""Attention rows -> camera heatmaps and modality masses, using the span table that travels with a recording.

Why a module of its own: every attention analysis starts by cutting an attention row (one query's probabilities
over all keys of the joint sequence) into named spans. Doing that from the recorded span table, never from
hard-coded indices, is what keeps a wrist-camera span from being read as "text" (docs/analyses.md, section 1, "a span read as text").

Span table: the JSON-able dict of docs/conventions.md. As a superset of that format, a span may be a single
half-open ``[start, end]`` or a list of them (``[[768, 769], [775, 776]]``): the BOS token and the trailing
newline both belong to ``template`` but sit on either side of the instruction, which one interval cannot hold.

Attention arrays have named axes. The canonical order, used by the plain-array scripts unless ``--axes`` says
otherwise, is ``(steps, layers, heads, queries, keys)``:

- ``steps``: denoising steps of one ``sample_actions`` call (index 0 = first step, t = 1);
- ``layers``: language-model layers;
- ``heads``: query heads (raw per-head data; average at analysis time if wanted);
- ``queries``: the recorded query tokens (the action tokens, possibly preceded by Pi0's state token; which ones
  were recorded is the recorder's business, select with indices into this axis);
- ``keys``: every key of the joint sequence, ``seq_len`` long, indexed by the span table.

An optional leading ``time`` axis (one entry per recorded policy call / env frame) is allowed by the scripts.
Missing axes are treated as length 1. Reductions are plain means, so a mean over heads, queries or steps of
probability rows is again a probability row.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from openpi.shared.io import jsonable, read_json, write_json_atomic

CANONICAL_AXES: tuple[str, ...] = ("steps", "layers", "heads", "queries", "keys")
KNOWN_AXES: tuple[str, ...] = ("time", *CANONICAL_AXES)
DEFAULT_CAMERAS: tuple[str, ...] = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
TEXT_SPANS: tuple[str, ...] = ("instruction", "template", "pad")
NON_CAMERA_SPANS: tuple[str, ...] = ("instruction", "template", "pad", "state", "actions")
# Frame-file keys (rollout record) -> camera span names (openpi LIBERO mapping).
FRAME_KEY_TO_CAMERA: dict[str, str] = {"agentview": "base_0_rgb", "wrist": "left_wrist_0_rgb"}


# --------------------------------------------------------------------------------------------------------------
# Span table
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SpanTable:
    """A validated span table. ``spans`` maps a name to a tuple of half-open (start, end) pieces."""

    seq_len: int
    prefix_len: int
    grid: tuple[int, int]
    spans: dict[str, tuple[tuple[int, int], ...]]
    camera_valid: dict[str, bool]
    model: str = ""

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], source: str = "span table") -> SpanTable:
        """Parse and validate the conventions.md dict; errors name ``source`` and the offending span."""
        for key in ("seq_len", "spans", "grid"):
            if key not in table:
                raise ValueError(f"{source}: missing key {key!r} (expected the format of docs/conventions.md)")
        seq_len = int(table["seq_len"])
        grid_raw = table["grid"]
        if len(grid_raw) != 2 or int(grid_raw[0]) <= 0 or int(grid_raw[1]) <= 0:
            raise ValueError(f"{source}: grid must be two positive ints, found {grid_raw!r}")
        grid = (int(grid_raw[0]), int(grid_raw[1]))
        spans: dict[str, tuple[tuple[int, int], ...]] = {}
        for name, raw in table["spans"].items():
            spans[name] = _parse_span(name, raw, seq_len, source)
        _check_no_overlap(spans, source)
        camera_valid_raw = table.get("camera_valid")
        if camera_valid_raw is None:
            camera_valid = {c: True for c in DEFAULT_CAMERAS if c in spans}
        else:
            camera_valid = {str(k): bool(v) for k, v in camera_valid_raw.items()}
        n_patches = grid[0] * grid[1]
        for cam in camera_valid:
            if cam not in spans:
                raise ValueError(f"{source}: camera {cam!r} is listed in camera_valid but has no span")
            length = sum(e - s for s, e in spans[cam])
            if length != n_patches:
                raise ValueError(f"{source}: camera span {cam!r} holds {length} tokens, expected grid "
                                 f"{grid[0]}x{grid[1]} = {n_patches}")
        prefix_len = int(table.get("prefix_len", seq_len))
        if not 0 <= prefix_len <= seq_len:
            raise ValueError(f"{source}: prefix_len {prefix_len} outside [0, seq_len={seq_len}]")
        return cls(seq_len, prefix_len, grid, spans, camera_valid, str(table.get("model", "")))

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def cameras(self) -> tuple[str, ...]:
        """Camera span names in sequence order (valid or not)."""
        return tuple(sorted(self.camera_valid, key=lambda c: self.spans[c][0][0]))

    @property
    def valid_cameras(self) -> tuple[str, ...]:
        return tuple(c for c in self.cameras if self.camera_valid[c])

    def length(self, name: str) -> int:
        """Number of tokens in a span (0 for an absent or empty span)."""
        return sum(e - s for s, e in self.spans.get(name, ()))

    def indices(self, name: str) -> np.ndarray:
        """Key indices of a span in sequence order (empty for an absent span)."""
        pieces = self.spans.get(name, ())
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in pieces])

    def prompt_indices(self) -> np.ndarray:
        """All prompt positions (instruction, template and pad) in sequence order."""
        return np.sort(np.concatenate([self.indices(n) for n in TEXT_SPANS]))

    def unassigned_indices(self) -> np.ndarray:
        """Keys that no span claims (should be none in a well-formed table)."""
        claimed = np.zeros(self.seq_len, dtype=bool)
        for name in self.spans:
            claimed[self.indices(name)] = True
        return np.flatnonzero(~claimed)


def _parse_span(name: str, raw: Any, seq_len: int, source: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"{source}: span {name!r} = {raw!r} is not [start, end] or a list of them")
    arr = raw
    if len(arr) == 2 and all(isinstance(v, (int, np.integer)) for v in arr):
        arr = [arr]
    pieces = []
    for piece in arr:
        if not isinstance(piece, (list, tuple)) or len(piece) != 2:
            raise ValueError(f"{source}: span {name!r} piece {piece!r} is not [start, end]")
        s, e = int(piece[0]), int(piece[1])
        if not 0 <= s <= e <= seq_len:
            raise ValueError(f"{source}: span {name!r} = [{s}, {e}) is not within [0, seq_len={seq_len}] "
                             "with start <= end")
        if e > s:
            pieces.append((s, e))
    return tuple(sorted(pieces))


def _check_no_overlap(spans: Mapping[str, tuple[tuple[int, int], ...]], source: str) -> None:
    flat = sorted((s, e, name) for name, pieces in spans.items() for s, e in pieces)
    for (s0, e0, n0), (s1, e1, n1) in zip(flat, flat[1:]):
        if s1 < e0:
            raise ValueError(f"{source}: spans {n0!r} [{s0}, {e0}) and {n1!r} [{s1}, {e1}) overlap")


def load_span_table(path: str | os.PathLike) -> SpanTable:
    """Read a span table JSON file (a bare table or a dict holding it under ``"spans_table"``)."""
    path = pathlib.Path(path)
    data = read_json(path, "span table")
    if isinstance(data, dict) and "spans" not in data and "spans_table" in data:
        data = data["spans_table"]
    if not isinstance(data, dict):
        raise ValueError(f"span table {path}: expected a JSON object, found {type(data).__name__}")
    return SpanTable.from_dict(data, source=str(path))


# --------------------------------------------------------------------------------------------------------------
# Rows -> heatmaps, masses, fractions
# --------------------------------------------------------------------------------------------------------------
def _check_keys(rows: np.ndarray, table: SpanTable) -> None:
    if rows.shape[-1] != table.seq_len:
        raise ValueError(f"attention rows have {rows.shape[-1]} keys on the last axis but the span table's "
                         f"seq_len is {table.seq_len}")


def camera_probs(rows: np.ndarray, table: SpanTable, camera: str) -> np.ndarray:
    """A camera's share of each row, shape (..., n_patches), in row-major patch order (not renormalised)."""
    _check_keys(rows, table)
    if camera not in table.camera_valid:
        raise KeyError(f"{camera!r} is not a camera of this span table; cameras: {list(table.cameras)}")
    return np.asarray(rows)[..., table.indices(camera)]


def camera_heatmap(rows: np.ndarray, table: SpanTable, camera: str) -> np.ndarray:
    """Heatmap (..., grid_h, grid_w): patch token p of the camera lands at [p // grid_w, p % grid_w]."""
    probs = camera_probs(rows, table, camera)
    return probs.reshape(*probs.shape[:-1], *table.grid)


def modality_masses(rows: np.ndarray, table: SpanTable) -> dict[str, np.ndarray]:
    """Attention mass per span, shape (...) each.

    Keys: every span of the table (each camera, instruction, template, pad, state, actions, ...), ``visual``
    (sum over the valid cameras), ``unassigned`` (keys no span claims) and ``total`` (the whole row).
    """
    _check_keys(rows, table)
    rows = np.asarray(rows)

    def span_sum(pieces: Sequence[tuple[int, int]]) -> np.ndarray:
        return sum((rows[..., s:e].sum(-1, dtype=np.float64) for s, e in pieces), np.zeros(rows.shape[:-1]))

    masses = {name: span_sum(pieces) for name, pieces in table.spans.items()}
    for name in NON_CAMERA_SPANS:
        masses.setdefault(name, np.zeros(rows.shape[:-1]))
    masses["visual"] = sum((masses[c] for c in table.valid_cameras), np.zeros(rows.shape[:-1]))
    masses["unassigned"] = rows[..., table.unassigned_indices()].sum(-1, dtype=np.float64)
    masses["total"] = rows.sum(-1, dtype=np.float64)
    return masses


def modality_fractions(masses: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Masses divided by the row total (NaN where the total is 0); the partition fractions sum to 1."""
    total = np.asarray(masses["total"], dtype=np.float64)
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for name, m in masses.items():
            if name != "total":
                out[name] = np.where(total > 0, np.asarray(m) / total, np.nan)
    return out


def partition_names(table: SpanTable) -> list[str]:
    """The span names whose masses partition a row (every span once, plus ``unassigned``)."""
    return [*table.spans, *(n for n in NON_CAMERA_SPANS if n not in table.spans), "unassigned"]


def visual_linguistic_ratio(masses: Mapping[str, np.ndarray]) -> np.ndarray:
    """Visual mass (valid cameras) over instruction mass; +inf where the instruction gets nothing."""
    vis = np.asarray(masses["visual"], dtype=np.float64)
    ins = np.asarray(masses["instruction"], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ins > 0, vis / np.where(ins > 0, ins, 1.0), np.inf)


def sanity_warnings(masses: Mapping[str, np.ndarray], table: SpanTable, atol: float = 1e-4) -> list[str]:
    """Symptoms of a wrong recording or span table: mass on pad / masked cameras / nowhere; rows not summing to 1."""
    warnings = []
    checks = [("pad", masses["pad"])] + [(c, masses[c]) for c in table.cameras if not table.camera_valid[c]]
    for name, m in checks:
        worst = float(np.max(m)) if np.size(m) else 0.0
        if worst > atol:
            warnings.append(f"span {name!r} is masked but receives up to {worst:.3g} attention mass")
    worst_un = float(np.max(masses["unassigned"])) if np.size(masses["unassigned"]) else 0.0
    if worst_un > atol:
        warnings.append(f"{worst_un:.3g} attention mass falls on keys no span claims")
    total = np.asarray(masses["total"])
    if np.size(total) and float(np.max(np.abs(total - 1.0))) > 1e-3:
        warnings.append(f"attention rows sum to {float(total.min()):.4g}..{float(total.max()):.4g}, not 1: "
                        "are these probabilities over all keys?")
    return warnings


def text_weights(rows: np.ndarray, table: SpanTable) -> tuple[np.ndarray, np.ndarray]:
    """Per-token weights over the prompt positions (instruction, template, pad): (weights (..., T), key indices)."""
    _check_keys(rows, table)
    idx = table.prompt_indices()
    return np.asarray(rows)[..., idx], idx


# --------------------------------------------------------------------------------------------------------------
# Named-axis arrays: selection and averaging
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttentionArray:
    """An attention array with named axes (``keys`` last). Selection keeps axes; ``mean`` drops them."""

    data: np.ndarray
    axes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.axes) != self.data.ndim:
            raise ValueError(f"attention array has {self.data.ndim} dims but {len(self.axes)} axis names "
                             f"{self.axes}")
        if len(set(self.axes)) != len(self.axes):
            raise ValueError(f"duplicate axis names in {self.axes}")
        unknown = [a for a in self.axes if a not in KNOWN_AXES]
        if unknown:
            raise ValueError(f"unknown axis names {unknown}; known: {list(KNOWN_AXES)}")
        if not self.axes or self.axes[-1] != "keys":
            raise ValueError(f"the last axis must be 'keys', found axes {self.axes}")

    @classmethod
    def with_all_axes(cls, data: np.ndarray, axes: Sequence[str]) -> AttentionArray:
        """Insert missing KNOWN_AXES as length 1 and reorder to ``(time, steps, layers, heads, queries, keys)``."""
        arr = cls(np.asarray(data), tuple(axes))
        full = arr.data
        names = list(arr.axes)
        for ax in KNOWN_AXES:
            if ax not in names:
                full = full[..., np.newaxis]
                names.append(ax)
        order = [names.index(ax) for ax in KNOWN_AXES]
        return cls(np.transpose(full, order), KNOWN_AXES)

    def size(self, axis: str) -> int:
        return self.data.shape[self.axes.index(axis)]

    def select(self, **indices: Sequence[int] | None) -> AttentionArray:
        """Keep the given indices along each named axis (None keeps all); negative indices count from the end."""
        data = self.data
        for axis, idx in indices.items():
            if idx is None:
                continue
            if axis not in self.axes:
                raise ValueError(f"cannot select on axis {axis!r}: array axes are {self.axes}")
            n = data.shape[self.axes.index(axis)]
            idx_arr = np.asarray(list(idx), dtype=np.int64)
            bad = idx_arr[(idx_arr < -n) | (idx_arr >= n)]
            if bad.size:
                raise IndexError(f"{axis} indices {bad.tolist()} out of range for length {n}")
            if idx_arr.size == 0:
                raise ValueError(f"empty selection on axis {axis!r}")
            data = np.take(data, idx_arr, axis=self.axes.index(axis))
        return AttentionArray(data, self.axes)

    def mean(self, *axes: str) -> AttentionArray:
        """Average over the named axes (dropping them); absent names are an error."""
        for ax in axes:
            if ax not in self.axes:
                raise ValueError(f"cannot average over {ax!r}: array axes are {self.axes}")
        if "keys" in axes:
            raise ValueError("averaging over 'keys' would destroy the attention row")
        pos = tuple(self.axes.index(a) for a in axes)
        kept = tuple(a for a in self.axes if a not in axes)
        return AttentionArray(self.data.mean(axis=pos, dtype=np.float64), kept)


def ranges_label(values: Sequence[int | str]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (compact labels for titles); named layers (a Diffusion Policy's 'encoder') as
    they are."""
    if any(isinstance(v, str) and not v.lstrip("-").isdigit() for v in values):
        return ", ".join(str(v) for v in values)
    out: list[str] = []
    vals = sorted(int(v) for v in values)
    start = prev = None
    for v in vals + [None]:
        if start is None:
            start = prev = v
        elif v is not None and v == prev + 1:
            prev = v
        else:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = v
    return ", ".join(out)


def step_file_stem(step: int | None) -> str:
    """File stem of one attention time entry: ``s<env_step>`` (as the recorded-run overlays), or
    ``unknown_step`` for a lone frame whose env step nobody recorded."""
    return "unknown_step" if step is None else f"s{step:04d}"


def step_title(step: int | None) -> str:
    """Title text of one time entry: its env step (never a frame index)."""
    return "env step unknown" if step is None else f"env step {step}"


def parse_axes(spec: str) -> tuple[str, ...]:
    """``"steps,layers,heads,queries,keys"`` -> tuple of names."""
    return tuple(a.strip() for a in spec.split(",") if a.strip())


def load_attention(path: str | os.PathLike, axes: Sequence[str]) -> AttentionArray:
    """Memory-map an ``.npy`` attention array and give it all KNOWN_AXES (missing ones length 1).

    Nothing is read until a selection or reduction touches the data; call :func:`check_probabilities` on
    the selected part.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attention file {path} not found")
    data = np.load(path, allow_pickle=False, mmap_mode="r")
    if len(axes) != data.ndim:
        raise ValueError(f"{path}: array has shape {data.shape} ({data.ndim} dims) but --axes names "
                         f"{len(axes)}: {tuple(axes)}")
    if not np.issubdtype(data.dtype, np.floating):
        raise ValueError(f"{path}: attention must be floating point, found dtype {data.dtype}")
    return AttentionArray.with_all_axes(data, axes)


def check_probabilities(att: AttentionArray, source: str = "attention") -> None:
    """Raise on NaN/inf or negative entries (attention rows are probabilities)."""
    if not np.all(np.isfinite(att.data)):
        raise ValueError(f"{source}: attention holds NaN or inf values")
    if np.any(att.data < 0):
        raise ValueError(f"{source}: attention holds negative values, so it is not probabilities "
                         "(logits recorded instead of softmax output?)")


# --------------------------------------------------------------------------------------------------------------
# Small I/O helpers shared by the attention scripts
# --------------------------------------------------------------------------------------------------------------
def load_tokens(path: str | os.PathLike) -> list[str]:
    """A JSON list of decoded token strings."""
    path = pathlib.Path(path)
    data = read_json(path, "tokens file")
    if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
        raise ValueError(f"{path}: expected a JSON list of token strings")
    return data


def align_tokens(tokens: Sequence[str], table: SpanTable, source: str = "tokens") -> list[str]:
    """Tokens for every prompt position: accept one per prompt position, or one per non-pad position (pad filled)."""
    n_prompt = table.prompt_indices().size
    n_text = n_prompt - table.length("pad")
    if len(tokens) == n_prompt:
        return list(tokens)
    if len(tokens) == n_text:
        pad = set(table.indices("pad").tolist())
        it = iter(tokens)
        return ["<pad>" if i in pad else next(it) for i in table.prompt_indices().tolist()]
    raise ValueError(f"{source}: {len(tokens)} tokens, but the span table has {n_prompt} prompt positions "
                     f"({n_text} without pad)")


def load_frames(path: str | os.PathLike, rotate_180: bool = False) -> dict[str, np.ndarray]:
    """Frames npz (keys ``agentview``/``wrist``) -> {camera span name: (T, H, W, 3) uint8}.

    Frames must be the images as the policy saw them; ``rotate_180`` applies LIBERO's ``img[::-1, ::-1]``
    to raw environment renders.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"frames file {path} not found")
    out = {}
    with np.load(path, allow_pickle=False) as npz:
        for key, cam in FRAME_KEY_TO_CAMERA.items():
            if key not in npz.files:
                continue
            arr = np.asarray(npz[key])
            if arr.ndim == 3:
                arr = arr[None]
            if arr.ndim != 4 or arr.shape[-1] != 3:
                raise ValueError(f"{path}: key {key!r} has shape {arr.shape}, expected (T, H, W, 3) or (H, W, 3)")
            if arr.dtype != np.uint8:
                raise ValueError(f"{path}: key {key!r} has dtype {arr.dtype}, expected uint8")
            out[cam] = arr[:, ::-1, ::-1] if rotate_180 else arr
        if not out:
            raise ValueError(f"{path}: none of the keys {list(FRAME_KEY_TO_CAMERA)} found (has {npz.files})")
    return out


def json_safe(obj: Any) -> Any:
    """Numpy scalars/arrays -> Python; non-finite floats -> None (strict JSON has no NaN/inf)."""
    return jsonable(obj)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write strict JSON (``json_safe``, indent 1) atomically so a crash never leaves half a file."""
    write_json_atomic(path, jsonable(obj), indent=1)


@dataclasses.dataclass(kw_only=True)
class AttentionInputs:
    """Shared CLI inputs of the plain-array attention scripts (subclassed by each script's Args)."""

    attention: pathlib.Path
    """.npy attention probabilities; axis names given by --axes (keys last, length seq_len)."""
    spans: pathlib.Path
    """span table JSON (docs/conventions.md)."""
    axes: str = "steps,layers,heads,queries,keys"
    """comma-separated axis names of --attention; any subset of time,steps,layers,heads,queries,keys."""
    steps: tuple[int, ...] | None = None
    """denoising-step indices to keep (default all)."""
    layers: tuple[int, ...] | None = None
    """layer indices to keep (default all)."""
    heads: tuple[int, ...] | None = None
    """head indices to keep (default all; pass one index for raw per-head attention)."""
    queries: tuple[int, ...] | None = None
    """query indices (into the recorded queries axis) to keep (default all)."""
    times: tuple[int, ...] | None = None
    """time indices to keep when the array has a time axis (default all)."""
    env_steps: pathlib.Path | None = None
    """env step of every entry of the time axis: a (T,) .npy or an .npz with an 'env_step' array (an export's
    keys.npz). Frames and titles are matched on these, never on positions."""
    env_step: int | None = None
    """env step of an attention array without a time axis."""

    def load(self) -> tuple[AttentionArray, SpanTable]:
        """Load, validate against the span table and apply the selection flags; axes become KNOWN_AXES."""
        table = load_span_table(self.spans)
        att = load_attention(self.attention, parse_axes(self.axes))
        if att.size("keys") != table.seq_len:
            raise ValueError(f"{self.attention}: keys axis has length {att.size('keys')} but span table "
                             f"{self.spans} has seq_len {table.seq_len}")
        att = att.select(time=self.times, steps=self.steps, layers=self.layers, heads=self.heads,
                         queries=self.queries)
        att = AttentionArray(np.asarray(att.data), att.axes)  # read the selected part from the memory map
        check_probabilities(att, str(self.attention))
        return att, table

    def labels(self, att: AttentionArray) -> dict[str, list[int]]:
        """Original indices of the kept time, step and layer entries (for titles, filenames and JSON)."""
        chosen = {"time": self.times, "steps": self.steps, "layers": self.layers}
        return {ax: list(sel) if sel is not None else list(range(att.size(ax))) for ax, sel in chosen.items()}

    def time_env_steps(self, att: AttentionArray) -> list[int] | None:
        """Env step of each kept time entry, or None when no env step was given."""
        axes = parse_axes(self.axes)
        n_time_axis = None
        if "time" in axes:
            n_time_axis = int(np.load(self.attention, allow_pickle=False, mmap_mode="r").shape[axes.index("time")])
        if self.env_steps is not None and self.env_step is not None:
            raise ValueError("pass --env-steps (arrays with a time axis) or --env-step (without one), not both")
        if self.env_step is not None:
            if n_time_axis is not None:
                raise ValueError(f"--env-step names one env step but the attention has a time axis of "
                                 f"{n_time_axis} entries: pass --env-steps")
            return [int(self.env_step)]
        if self.env_steps is None:
            return None
        steps = load_env_steps(self.env_steps)
        expected = 1 if n_time_axis is None else n_time_axis
        if steps.size != expected:
            raise ValueError(f"{self.env_steps} holds {steps.size} env steps, the attention's time axis has "
                             f"{expected} entries")
        kept = self.labels(att)["time"]
        return [int(steps[t]) for t in kept]

    def describe(self, att: AttentionArray) -> str:
        """Title text naming the layers and denoising steps averaged (their original indices)."""
        lab = self.labels(att)
        return f"layers {ranges_label(lab['layers'])}, denoising steps {ranges_label(lab['steps'])} (mean)"

    def selection(self) -> dict[str, Any]:
        """The selection flags as a JSON-able record."""
        return {"axes": self.axes, "times": self.times, "env_steps": self.env_steps, "env_step": self.env_step,
                "steps": self.steps, "layers": self.layers,
                "heads": self.heads, "queries": self.queries, "reduction": "mean over selected steps, heads, "
                "queries (and layers for the overall numbers)"}


# --------------------------------------------------------------------------------------------------------------
# Summaries shared by the visualisation scripts
# --------------------------------------------------------------------------------------------------------------
def modality_summary(rows: np.ndarray, table: SpanTable) -> dict[str, np.ndarray]:
    """Masses, fractions and the visual/linguistic ratio of rows (..., keys) as flat ``{name: (...)}`` arrays.

    Keys: ``mass/<span>`` and ``fraction/<span>`` for every partition span plus ``visual`` (and ``mass/total``),
    and ``visual_linguistic_ratio``.
    """
    masses = modality_masses(rows, table)
    fractions = modality_fractions(masses)
    names = [*partition_names(table), "visual"]
    out = {f"mass/{n}": masses[n] for n in [*names, "total"]}
    out.update({f"fraction/{n}": fractions[n] for n in names})
    out["visual_linguistic_ratio"] = visual_linguistic_ratio(masses)
    return out


def nest_summary(flat: Mapping[str, np.ndarray], index: tuple[int, ...] = ()) -> dict[str, Any]:
    """``{"mass/x": arr}`` -> ``{"mass": {"x": arr[index]}, ...}`` for JSON output."""
    nested: dict[str, Any] = {}
    for key, val in flat.items():
        head, _, tail = key.partition("/")
        v = np.asarray(val)[index]
        if tail:
            nested.setdefault(head, {})[tail] = v
        else:
            nested[head] = v
    return nested


def attention_summary(att: AttentionArray, table: SpanTable, labels: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """Per-time modality summary of an array with KNOWN_AXES, averaged over steps, heads and queries.

    ``labels`` gives the original indices of the kept ``time``, ``steps`` and ``layers`` entries. Each per-time
    entry holds the layer-mean summary plus ``per_layer`` and ``per_step`` lists (each with its index).
    """
    if att.axes != KNOWN_AXES:
        raise ValueError(f"expected axes {KNOWN_AXES}, found {att.axes}")
    by_layer = att.mean("steps", "heads", "queries").data  # (T, L, K)
    by_step = att.mean("layers", "heads", "queries").data  # (T, S, K)
    overall = modality_summary(by_layer.mean(axis=1), table)
    per_layer = modality_summary(by_layer, table)
    per_step = modality_summary(by_step, table)
    entries = []
    for t, t_label in enumerate(labels["time"]):
        entry = {"time": int(t_label), **nest_summary(overall, (t,))}
        entry["per_layer"] = [{"layer": int(lab), **nest_summary(per_layer, (t, i))}
                              for i, lab in enumerate(labels["layers"])]
        entry["per_step"] = [{"step": int(lab), **nest_summary(per_step, (t, i))}
                             for i, lab in enumerate(labels["steps"])]
        entries.append(entry)
    return {"per_time": entries, "mean": nest_summary({k: v.mean(axis=0) for k, v in overall.items()}),
            "warnings": sanity_warnings(modality_masses(att.data, table), table)}


def load_frame_env_steps(path: str | os.PathLike) -> np.ndarray | None:
    """The ``env_step`` array of a frames npz (one per frame row), or None when the file has none."""
    with np.load(path, allow_pickle=False) as npz:
        if "env_step" not in npz.files:
            return None
        steps = np.asarray(npz["env_step"]).astype(np.int64).reshape(-1)
    if np.unique(steps).size != steps.size:
        raise ValueError(f"{path}: 'env_step' repeats values, so frames cannot be joined by env step")
    return steps


def load_env_steps(path: str | os.PathLike) -> np.ndarray:
    """Env steps of an attention array's time entries: a (T,) .npy, or an .npz with an ``env_step`` column (e.g.
    the keys.npz an export writes next to its arrays)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"env steps file {path} not found")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            if "env_step" not in npz.files:
                raise ValueError(f"{path} has no 'env_step' array (has {npz.files})")
            steps = np.asarray(npz["env_step"])
    else:
        steps = np.load(path, allow_pickle=False)
    if steps.ndim != 1 or not np.issubdtype(steps.dtype, np.integer):
        raise ValueError(f"{path}: env steps must be a 1-D integer array, found {steps.dtype}{steps.shape}")
    return steps.astype(np.int64)


def select_frames(frames: Mapping[str, np.ndarray], frame_steps: np.ndarray | None,
                  query_steps: Sequence[int] | None, source: str = "frames") -> tuple[dict[str, np.ndarray],
                                                                                  list[int | None]]:
    """The frame of each attention time entry, joined on env step: (camera -> (n, H, W, 3), env steps).

    ``frame_steps``: the frames file's ``env_step`` column; ``query_steps``: the env step of each attention time
    entry. Rows are matched by value, never by position, and a query env step with no frame is an error naming
    it. Without env steps on either side only the unambiguous case is accepted: one frame for one time entry."""
    lengths = {cam: arr.shape[0] for cam, arr in frames.items()}
    n_frames = next(iter(lengths.values()), 0)
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{source}: cameras hold different numbers of frames {lengths}")
    if query_steps is None or frame_steps is None:
        n_query = 1 if query_steps is None else len(query_steps)
        if n_frames == 1 and n_query == 1:
            step = (None if query_steps is None else int(query_steps[0])) if frame_steps is None else int(frame_steps[0])
            if query_steps is not None and frame_steps is not None and step != int(query_steps[0]):
                raise ValueError(f"{source}: its frame is env step {step}, the attention is env step {query_steps[0]}")
            return {cam: arr[:1] for cam, arr in frames.items()}, [step]
        if query_steps is None:
            raise ValueError(f"{source} holds {n_frames} frames but the env step of the attention is unknown: pass "
                             "--env-steps (one env step per attention time entry, e.g. the export's keys.npz) or "
                             "--env-step (attention without a time axis)")
        raise ValueError(f"{source} has no 'env_step' array, so its {n_frames} frames cannot be joined with the "
                         f"attention's env steps {list(query_steps)[:5]}; use the rollout's frames file "
                         "(examples/libero/main.py --save-frames), which records them")
    steps = np.asarray(frame_steps, np.int64)
    if steps.shape != (n_frames,):
        raise ValueError(f"{source}: {steps.size} env steps for {n_frames} frames")
    row_of = {int(s): i for i, s in enumerate(steps)}
    missing = [int(q) for q in query_steps if int(q) not in row_of]
    if missing:
        raise KeyError(f"{source} has no frame for env step(s) {missing} (it holds env steps "
                       f"{int(steps.min())}..{int(steps.max())}, {steps.size} frames)")
    rows = [row_of[int(q)] for q in query_steps]
    return {cam: arr[rows] for cam, arr in frames.items()}, [int(q) for q in query_steps]


def camera_heatmaps(row: np.ndarray, table: SpanTable, cameras: Sequence[str]) -> dict[str, np.ndarray]:
    """{camera: (grid_h, grid_w)} for one attention row (keys,)."""
    return {cam: camera_heatmap(row, table, cam) for cam in cameras}


def token_kinds(table: SpanTable) -> list[str]:
    """The span name (instruction/template/pad) of each prompt position, in sequence order."""
    kind = {}
    for name in TEXT_SPANS:
        for i in table.indices(name).tolist():
            kind[i] = name
    return [kind[i] for i in table.prompt_indices().tolist()]
