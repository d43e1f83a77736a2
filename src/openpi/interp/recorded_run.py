"""Join a recorded run: server-side attention rows (activation store) with the LIBERO client's rollout records.

Why a module of its own: the policy server writes attention rows keyed by ``(run_id, suite, task_id, episode,
env_step, replan_index, denoise_step)``; the client writes, per episode, a JSON record and a frames npz whose
``env_step`` column says which step each frame belongs to. Every attention analysis of a real run needs the
attention of one policy query next to the exact image and instance mask the policy saw at that step, so the join
lives here, done on keys (never on row order) and loud about anything that does not match.

A :class:`PolicyQuery` is one inference (one ``(episode, env_step)`` at which the policy was queried):

- ``attention``: ``(steps, layers, heads, queries, keys)`` float32 probabilities over the joint sequence, with
  ``steps`` the selected denoising steps, ``layers`` the selected ``llm.layer.<i>.attn.probs`` sites, ``heads``
  of length 1 when heads were averaged at recording time (``reduce=heads``), ``queries`` the **action** query
  tokens only (Pi0's state query is dropped using the span table's ``actions`` span; length 1 when queries were
  averaged at recording time over action tokens). For Pi0-FAST, ``steps`` are the decoding steps that generated
  an action token (one query each; the row of step ``s`` is the query at joint index ``P + s`` and the span
  table's ``actions`` span says which steps those are); an inference whose output did not decode has none and is
  skipped with a warning. Axes listed in ``reduce`` are averaged away at load time
  (``axes`` names what is left), which keeps memory small when an analysis only needs means.
- ``frames`` / ``masks``: ``{camera span name: (H, W, 3) uint8 / (H, W) int32}`` at that env step, taken from the
  frames npz row whose ``env_step`` equals the query's (``agentview`` -> ``base_0_rgb``, ``wrist`` ->
  ``left_wrist_0_rgb``).
- ``object_ids``: ``{BDDL object of interest: instance id}`` (matched objects only), ``success``, ``prompt``,
  ``original_prompt``, ``prompt_mode`` and ``episode_steps`` from the episode record.

How recorded queries are identified: the store keeps, per site, the axes of one row (``row_axes``, e.g.
``["query", "key"]`` with ``reduce=heads``) and the joint-sequence index of every kept query token
(``token_index``); the row's span table says which of them are action tokens. Nothing is guessed from shapes or
re-parsed from selectors; a store without that site info is refused with a clear error.

Attempts: a resumed LIBERO client reruns an episode under a new attempt id; only rows of the attempt that wrote
the episode record are read (``stale_rows`` counts the rows of earlier attempts that were dropped, per episode).

Diffusion Policy stores (``model_type`` "diffusion" in the store's model config, or its encoder / UNet sites):
the attention is each camera's ``enc.<cam>.attn`` (the spatial softmax, rows ``(obs_step, keypoint, location)``);
cameras map to the frames file like Pi0's (hook names in ``AGENT_VIEW_CAMERAS`` -> ``agentview`` ->
``base_0_rgb``, ``WRIST_CAMERAS`` -> ``wrist`` -> ``left_wrist_0_rgb``). A query's ``attention`` holds the last
obs step (the queried frame, checked against the span table's ``obs_positions``) as ``(steps=1, layers=1,
heads=keypoints, queries=1, keys)``, the keys being the cameras' locations side by side (each camera's part sums
to 1), described by a joint span table built here (``model`` "diffusion", one span per camera); ``layers`` is
``["encoder"]`` (:data:`DP_LAYER`), ``steps`` ``[-1]``, ``table_dict`` the stored request table, ``geometry`` each
camera's :class:`~openpi.interp.iou.GridGeometry` from the site info (``attention_grid``). ``layers`` / ``steps``
selections do not apply and are refused; a store without ``enc.<cam>.attn`` is refused naming the sites to record.

Errors (:class:`JoinError`, naming file, key and what was expected) are raised for: store episodes with no episode
record or no frames file (or ``on_missing="skip"`` to skip them with a warning), an env step missing from the
frames file or a frame not marked as ``queried``, a replan index that disagrees with the frames file, rows of no
attempt matching the record, layers or denoising steps missing for an inference, and sites without stored row axes.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from openpi.interp.attention import FRAME_KEY_TO_CAMERA, SpanTable
from openpi.interp.episode_frames import EpisodeFrames, frames_path
from openpi.interp.iou import GridGeometry
from openpi.interp.join import JoinError, open_rollouts, select_attempts
from openpi.interp.store import ActivationStore, StoreError
from openpi.shared.records import EpisodeKey, EpisodeRecord, episode_keys_of_rows

__all__ = ["ATTN_SITE_RE", "DP_ATTN_SITE_RE", "DP_LAYER", "EpisodeKey", "JoinError", "PolicyQuery", "QUERY_AXES",
           "RecordedRun", "RowLayout", "attention_layers", "diffusion_attention_sites"]

ATTN_SITE_RE = re.compile(r"^llm\.layer\.(\d+)\.attn\.probs$")
DP_ATTN_SITE_RE = re.compile(r"^enc\.([A-Za-z0-9_]+)\.attn$")
DP_LAYER = "encoder"  # the one pseudo-layer of a Diffusion Policy's attention (its cameras' spatial softmax)
DP_ROW_AXES = ("obs_step", "keypoint", "location")
DP_RECORD_HINT = "--record 'enc.*.attn'"
QUERY_AXES: tuple[str, ...] = ("steps", "layers", "heads", "queries", "keys")


# --------------------------------------------------------------------------------------------------------------
# Store side
# --------------------------------------------------------------------------------------------------------------
def attention_layers(store: ActivationStore) -> dict[int, str]:
    """{layer index: site name} of the attention sites in the store."""
    out = {}
    for site in store.sites:
        m = ATTN_SITE_RE.match(site)
        if m:
            out[int(m.group(1))] = site
    return dict(sorted(out.items()))


def is_diffusion_store(store: ActivationStore) -> bool:
    """A store written by a Diffusion Policy server (its model config, else its encoder / UNet sites)."""
    if store.model_config.get("model_type") == "diffusion":
        return True
    return any(s.startswith(("enc.", "unet.", "diffusion.")) or s == "cond.global" for s in store.sites)


def diffusion_attention_sites(store: ActivationStore) -> dict[str, tuple[str, str]]:
    """{camera span name (``base_0_rgb`` agent view, ``left_wrist_0_rgb`` wrist, as the frames file's cameras map):
    (Diffusion Policy camera hook name, ``enc.<cam>.attn`` site)} of the recorded spatial-softmax sites."""
    from openpi.policies.diffusion_policy import AGENT_VIEW_CAMERAS, WRIST_CAMERAS

    frame_key = {**{c: "agentview" for c in AGENT_VIEW_CAMERAS}, **{c: "wrist" for c in WRIST_CAMERAS}}
    out: dict[str, tuple[str, str]] = {}
    for site in sorted(store.sites):
        m = DP_ATTN_SITE_RE.match(site)
        if not m:
            continue
        cam = m.group(1)
        if cam not in frame_key:
            raise JoinError(f"{site}: camera {cam!r} is neither an agent view ({list(AGENT_VIEW_CAMERAS)}) nor a "
                            f"wrist camera ({list(WRIST_CAMERAS)}), so no saved frame matches it")
        span = FRAME_KEY_TO_CAMERA[frame_key[cam]]
        if span in out:
            raise JoinError(f"{site} and {out[span][1]} both map to the {frame_key[cam]} frames")
        out[span] = (cam, site)
    return dict(sorted(out.items(), key=lambda kv: list(FRAME_KEY_TO_CAMERA.values()).index(kv[0])))


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How a stored attention row is laid out, read from the store's site info (never from its shape)."""

    site: str
    axes: tuple[str, ...]  # axes of one stored row, "key" last
    token_index: np.ndarray  # joint-sequence index of each recorded query token (at step 0 when it moves)
    step_stride: int = 0  # Pi0-FAST decoding points: the query of step s is token_index + s

    @classmethod
    def of(cls, store: ActivationStore, site: str) -> RowLayout:
        try:
            info = store.site_info(site)
        except StoreError as exc:
            raise JoinError(str(exc)) from None
        axes = tuple(info["row_axes"])
        shape = tuple(int(v) for v in info["row_shape"])
        if not axes or axes[-1] != "key" or len(axes) != len(shape):
            raise JoinError(f"{site}: stored rows have axes {list(axes)} and shape {list(shape)}; expected attention "
                            "rows ([head,] [query,] key)")
        if "token_index" not in info:
            raise JoinError(f"{site}: the store does not say which query tokens were recorded (no token_index in "
                            f"{store.root / 'store.json'}); re-record the site")
        tokens = np.asarray(info["token_index"], np.int64)
        if "query" in axes and shape[axes.index("query")] != tokens.size:
            raise JoinError(f"{site}: rows hold {shape[axes.index('query')]} queries but the store lists "
                            f"{tokens.size} recorded query tokens")
        return cls(site, axes, tokens, int(info.get("token_step_stride", 0)))

    @property
    def has_heads(self) -> bool:
        return "head" in self.axes

    @property
    def has_queries(self) -> bool:
        return "query" in self.axes

    def action_rows(self, table: Mapping[str, Any], step: int = -1) -> np.ndarray | None:
        """Positions along the stored query axis of the action tokens (empty when queries were averaged). For a
        Pi0-FAST decoding step whose token is not an action token ("Action: ", "|", end of sequence): None."""
        a, b = (int(v) for v in table["spans"]["actions"])
        index = self.token_index + self.step_stride * max(int(step), 0)
        is_action = (index >= a) & (index < b)
        if self.step_stride and not is_action.any():
            return None
        if not is_action.any():
            raise JoinError(f"{self.site}: recorded query tokens {self.token_index.tolist()} include no action token "
                            f"(actions span [{a}, {b}))")
        if self.has_queries:
            return np.flatnonzero(is_action)
        if not is_action.all():
            raise JoinError(f"{self.site}: queries were averaged at recording time over tokens "
                            f"{self.token_index.tolist()}, which include non-action tokens (state); record with "
                            "tokens=actions to analyse action queries")
        return np.zeros(0, np.int64)

    def query_rows(self, row: np.ndarray, table: Mapping[str, Any], step: int = -1) -> np.ndarray | None:
        """One stored row -> (heads, action queries, keys) float32; None for a Pi0-FAST decoding step that did
        not generate an action token."""
        if row.shape[-1] != int(table["seq_len"]):
            raise JoinError(f"{self.site}: rows have {row.shape[-1]} keys but the span table's seq_len is "
                            f"{table['seq_len']}")
        rows = self.action_rows(table, step)
        if rows is None:
            return None
        row = np.asarray(row, np.float32)
        if not self.has_heads:
            row = row[None]
        return row[..., rows, :] if self.has_queries else row[..., None, :]


# --------------------------------------------------------------------------------------------------------------
# The join
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PolicyQuery:
    """One policy inference joined with its frame, masks and episode record (see module docstring)."""

    key: EpisodeKey
    env_step: int
    replan_index: int
    attention: np.ndarray
    axes: tuple[str, ...]
    layers: list[int]
    steps: list[int]
    table: SpanTable
    table_dict: dict
    frame_row: int
    frames: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    object_ids: dict[str, int]
    objects_of_interest: list[str]
    instance_names: dict[int, str]
    success: bool
    prompt: str
    original_prompt: str
    prompt_mode: str
    episode_steps: int
    per_head: bool
    geometry: dict[str, GridGeometry] = dataclasses.field(default_factory=dict)
    source: dict = dataclasses.field(default_factory=dict)

    def grid_geometry(self, camera: str) -> GridGeometry:
        """How ``camera``'s attention grid lies on its saved frame (default: the grid over the whole frame)."""
        return self.geometry.get(camera) or GridGeometry(self.table.grid)


@dataclasses.dataclass
class RecordedRun:
    """A store + rollout folder pair; iterate :meth:`queries` episode by episode (memory: one episode).

    ``where``: extra store filter (key column -> value(s)) applied to every read, e.g. ``{"run_id": "a"}``.
    """

    store_dir: str | pathlib.Path
    rollouts_dir: str | pathlib.Path
    layers: Sequence[int] | None = None
    steps: Sequence[int] | None = None
    reduce: Sequence[str] = ()
    on_missing: Literal["error", "skip"] = "error"
    where: Mapping[str, Any] | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    stale_rows: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.store = ActivationStore(self.store_dir)
        self.rollouts = open_rollouts(self.rollouts_dir)
        self.dp_sites: dict[str, tuple[str, str]] = {}
        available = attention_layers(self.store)
        if not available and is_diffusion_store(self.store):
            self._init_diffusion()
            return
        if not available:
            raise JoinError(f"store {self.store.root} has no llm.layer.<i>.attn.probs site (Pi0) nor enc.<cam>.attn "
                            f"site (Diffusion Policy) (sites: {sorted(self.store.sites)})")
        chosen = list(available) if self.layers is None else [int(v) for v in self.layers]
        absent = [v for v in chosen if v not in available]
        if absent:
            raise JoinError(f"layers {absent} are not recorded in {self.store.root}; recorded: {list(available)}")
        self.layer_sites = {v: available[v] for v in chosen}
        bad = [a for a in self.reduce if a not in ("steps", "layers", "heads", "queries")]
        if bad:
            raise ValueError(f"cannot reduce over {bad}; choose from steps, layers, heads, queries")
        self.layouts = {v: RowLayout.of(self.store, site) for v, site in self.layer_sites.items()}
        kinds = {(lay.has_heads, lay.has_queries, tuple(lay.token_index.tolist())) for lay in self.layouts.values()}
        if len(kinds) > 1:
            raise JoinError(f"the selected layers were recorded with different row layouts "
                            f"({ {v: list(lay.axes) for v, lay in self.layouts.items()} }); select layers recorded "
                            "alike")

    def _init_diffusion(self) -> None:
        """A Diffusion Policy store: each camera's ``enc.<cam>.attn`` site, keypoints as heads, one pseudo-layer."""
        self.dp_sites = diffusion_attention_sites(self.store)
        if not self.dp_sites:
            raise JoinError(f"store {self.store.root} is a Diffusion Policy recording without its spatial-softmax "
                            "attention: record enc.<cam>.attn of the cameras to score (e.g. "
                            f"{DP_RECORD_HINT}) (sites recorded: {sorted(self.store.sites)})")
        if self.layers is not None and [str(v) for v in self.layers] != [DP_LAYER]:
            raise JoinError(f"a Diffusion Policy recording has one attention pseudo-layer ({DP_LAYER!r}: each "
                            f"camera's spatial softmax); layers {list(self.layers)} do not exist, leave them unset")
        if self.steps is not None:
            raise JoinError("a Diffusion Policy's encoder attention is recorded once per request (denoise_step -1), "
                            f"not per denoising step; leave steps unset (got {list(self.steps)})")
        bad = [a for a in self.reduce if a not in ("steps", "layers", "heads", "queries")]
        if bad:
            raise ValueError(f"cannot reduce over {bad}; choose from steps, layers, heads, queries")
        self.geometries: dict[str, GridGeometry] = {}
        for span, (_, site) in self.dp_sites.items():
            try:
                info = self.store.site_info(site)
            except StoreError as exc:
                raise JoinError(str(exc)) from None
            if tuple(info["row_axes"]) != DP_ROW_AXES or "attention_grid" not in info:
                raise JoinError(f"{site}: stored rows have axes {info['row_axes']} and "
                                f"{'an' if 'attention_grid' in info else 'no'} attention_grid; expected "
                                f"{list(DP_ROW_AXES)} with the grid in the site info (re-record with {DP_RECORD_HINT})")
            g = info["attention_grid"]
            self.geometries[span] = GridGeometry(tuple(g["grid"]), tuple(g["image_hw"]), tuple(g["crop_box"]))
        grids = {geo.grid for geo in self.geometries.values()}
        if len(grids) > 1:
            raise JoinError(f"the cameras' attention grids differ ({ {c: g.grid for c, g in self.geometries.items()} })"
                            "; score one camera's store at a time")
        self.layer_sites = {DP_LAYER: next(iter(self.dp_sites.values()))[1]}
        self.layouts = {}

    @property
    def first_site(self) -> str:
        return next(iter(self.layer_sites.values()))

    def _where(self, *parts: Mapping[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.where or {})
        if self.steps is not None:
            out["denoise_step"] = [int(s) for s in self.steps]
        for p in parts:
            out.update(p or {})
        return out

    def episode_keys(self) -> list[EpisodeKey]:
        """Episodes that have attention rows, sorted; checked against the rollout folder per ``on_missing``, with
        the stale rows of earlier attempts counted in ``stale_rows`` (and noted in ``warnings``)."""
        try:
            keys = self.store.require_keys(self.first_site, self._where())
        except StoreError as exc:
            raise JoinError(str(exc)) from None
        ep_ids, found = episode_keys_of_rows(keys)
        out, usable = [], np.zeros(len(ep_ids), bool)
        for e, key in enumerate(found):
            problem = None
            if not self.rollouts.has(key):
                problem = (f"store rows of episode {key.stem} have no episode record in "
                           f"{self.rollouts.episodes_dir}")
            else:
                path = frames_path(self.rollouts, self.rollouts.record(key))
                if not path.is_file():
                    problem = (f"store rows of episode {key.stem} have no frames file ({path} missing; run the "
                               "client with --save-frames)")
            if problem is None:
                out.append(key)
                usable |= ep_ids == e
            elif self.on_missing == "error":
                raise JoinError(problem)
            else:
                self.warnings.append(problem + "; skipped")
        selection = select_attempts({k: v[usable] for k, v in keys.items()}, self.rollouts, self.first_site)
        self.stale_rows.update(selection.stale)
        note = selection.message(self.first_site)
        if note and note not in self.warnings:
            self.warnings.append(note)
        return out

    def episode_queries(self, key: EpisodeKey) -> list[PolicyQuery]:
        """Every recorded policy query of one episode (rows of the attempt that wrote its record), in env-step
        order."""
        if self.dp_sites:
            return self._diffusion_queries(key)
        rec = self.rollouts.record(key)
        frames = EpisodeFrames.of(self.rollouts, rec)
        where = self._where(key.where(), {"attempt": rec.attempt})
        per_layer: dict[int, dict[tuple[int, int], dict[int, np.ndarray]]] = {}
        tables: dict[tuple[int, int], dict] = {}
        for layer, site in self.layer_sites.items():
            try:
                x, keys = self.store.read(site, where)
            except StoreError as exc:  # the layer has no row for this episode (and attempt)
                raise JoinError(f"layer {layer} ({site}) has no rows for episode {key.stem} of attempt "
                                f"{rec.attempt!r}" + (f" at denoising steps {list(self.steps)}" if self.steps
                                                       is not None else "") + f": {exc}") from exc
            row_tables = self.store.span_tables(site, where)
            groups: dict[tuple[int, int], dict[int, np.ndarray]] = {}
            for i in range(len(x)):
                inf = (int(keys["env_step"][i]), int(keys["replan_index"][i]))
                step = int(keys["denoise_step"][i])
                if step in groups.setdefault(inf, {}):
                    raise JoinError(f"{site}: episode {key.stem} attempt {rec.attempt!r} has two rows for env_step "
                                    f"{inf[0]}, replan {inf[1]}, denoising step {step}")
                tables.setdefault(inf, row_tables[i])
                rows = self.layouts[layer].query_rows(x[i], row_tables[i], step)
                if rows is not None:  # Pi0-FAST: only the decoding steps that generated action tokens
                    groups[inf][step] = rows
            for inf in [inf for inf, rows in groups.items() if not rows]:
                del groups[inf]
                note = (f"episode {key.stem}: the inference at env_step {inf[0]} generated no action token (its "
                        "Pi0-FAST output did not decode); not scored")
                if layer == next(iter(self.layer_sites)) and note not in self.warnings:
                    self.warnings.append(note)
            per_layer[layer] = groups
        first = next(iter(per_layer.values()))
        env_steps = self._answered_inferences(key, rec, first)
        out = []
        for inf in env_steps:
            steps = sorted(first[inf])
            if self.steps is not None and len(steps) != len(set(self.steps)):
                raise JoinError(f"{self.first_site}: episode {key.stem} env_step {inf[0]} has denoising steps "
                                f"{steps}, requested {sorted(set(self.steps))}")
            stack = []
            for layer, groups in per_layer.items():
                if inf not in groups or sorted(groups[inf]) != steps:
                    have = sorted(groups.get(inf, {}))
                    raise JoinError(f"layer {layer}: episode {key.stem} env_step {inf[0]} has denoising steps "
                                    f"{have}, layer {next(iter(per_layer))} has {steps}")
                stack.append(np.stack([groups[inf][s] for s in steps]))
            att = np.stack(stack, axis=1)  # (steps, layers, heads, queries, keys)
            out.append(self._make_query(key, rec, frames, inf, att, steps, tables[inf]))
        extra = [inf for groups in per_layer.values() for inf in groups if inf not in first]
        if extra:
            raise JoinError(f"episode {key.stem}: inferences {sorted(set(extra))[:5]} are recorded for some layers "
                            "only")
        return out

    def _answered_inferences(self, key: EpisodeKey, rec: EpisodeRecord, found) -> list[tuple[int, int]]:
        """The (env_step, replan_index) inferences among ``found`` whose chunk the record holds, in order; one
        replan index per env step."""
        env_steps = [inf for inf in sorted(found) if self._answered(key, rec, inf[0])]
        dup = [s for s in {e for e, _ in env_steps} if sum(e == s for e, _ in env_steps) > 1]
        if dup:
            raise JoinError(f"episode {key.stem}: env steps {sorted(dup)} were queried with several replan indices "
                            "(recorded twice?)")
        return env_steps

    def _diffusion_queries(self, key: EpisodeKey) -> list[PolicyQuery]:
        """A Diffusion Policy episode: each camera's spatial softmax at the last obs step (the current frame), the
        cameras' location axes side by side as the key axis (each camera's part sums to 1), keypoints as heads."""
        rec = self.rollouts.record(key)
        frames = EpisodeFrames.of(self.rollouts, rec)
        where = self._where(key.where(), {"attempt": rec.attempt})
        per_cam: dict[str, dict[tuple[int, int], np.ndarray]] = {}
        tables: dict[tuple[int, int], dict] = {}
        for span, (_, site) in self.dp_sites.items():
            try:
                x, keys = self.store.read(site, where)
            except StoreError as exc:
                raise JoinError(f"{site} has no rows for episode {key.stem} of attempt {rec.attempt!r}: {exc}") from exc
            row_tables = self.store.span_tables(site, where)
            rows: dict[tuple[int, int], np.ndarray] = {}
            for i in range(len(x)):
                inf = (int(keys["env_step"][i]), int(keys["replan_index"][i]))
                if inf in rows:
                    raise JoinError(f"{site}: episode {key.stem} attempt {rec.attempt!r} has two rows for env_step "
                                    f"{inf[0]}, replan {inf[1]}")
                rows[inf] = np.asarray(x[i][-1], np.float32)  # (keypoints, locations) of the current frame
                tables.setdefault(inf, row_tables[i])
            per_cam[span] = rows
        first = next(iter(per_cam.values()))
        for span, rows in per_cam.items():
            if set(rows) != set(first):
                diff = sorted(set(rows) ^ set(first))[:5]
                raise JoinError(f"episode {key.stem}: inferences {diff} are recorded for some cameras only "
                                f"({span} vs {next(iter(per_cam))})")
        spans, start = {}, 0
        for span, rows in per_cam.items():
            n = self.geometries[span].grid[0] * self.geometries[span].grid[1]
            spans[span] = [start, start + n]
            start += n
        grid = next(iter(self.geometries.values())).grid
        table = SpanTable.from_dict({"model": "diffusion", "seq_len": start, "prefix_len": start, "grid": list(grid),
                                     "spans": spans, "camera_valid": dict.fromkeys(spans, True)},
                                    f"joint camera table of {key.stem}")
        source = {"model": "diffusion", "layer": DP_LAYER, "head_kind": "keypoint", "obs_step": "last",
                  "sites": {span: site for span, (_, site) in self.dp_sites.items()},
                  "geometry": {span: g.to_dict() for span, g in self.geometries.items()}}
        out = []
        for inf in self._answered_inferences(key, rec, first):
            positions = tables[inf].get("obs_positions") or [None]
            if positions[-1] is not None and int(positions[-1]) != inf[0]:
                raise JoinError(f"episode {key.stem} env_step {inf[0]}: the last obs step of its rows is env step "
                                f"{positions[-1]} (obs_positions {positions}), not the queried frame")
            parts = [per_cam[span][inf] for span in per_cam]
            if len({p.shape for p in parts}) > 1:
                raise JoinError(f"episode {key.stem} env_step {inf[0]}: the cameras' rows have shapes "
                                f"{[p.shape for p in parts]}; keypoint heads need the same number per camera")
            att = np.concatenate(parts, axis=-1)[None, None, :, None, :]  # (steps, layers, keypoints, queries, keys)
            out.append(self._make_query(key, rec, frames, inf, att, [-1], tables[inf], table=table,
                                        geometry=self.geometries, per_head=att.shape[2] > 1, source=source))
        return out

    def _answered(self, key: EpisodeKey, rec: EpisodeRecord, env_step: int) -> bool:
        """Whether the record holds the chunk of a recorded query. The one query a ``policy_error`` episode ended
        on (the server answered, the client never got the reply) is skipped with a warning, as in the export;
        any other query without a chunk means rows and record disagree."""
        if env_step in rec.chunk_at:
            return True
        if rec.status == "policy_error" and env_step > max(rec.chunk_at, default=-1):
            note = f"episode {key.stem}: skipped the query at env_step {env_step} that ended it on a policy error"
            if note not in self.warnings:
                self.warnings.append(note)
            return False
        raise JoinError(f"episode {key.stem}: the store has rows at env_step {env_step} but its record {rec.path} "
                        f"returned no chunk there (queried steps: {sorted(rec.chunk_at)[:8]})")

    def _make_query(self, key: EpisodeKey, rec: EpisodeRecord, frames: EpisodeFrames, inf: tuple[int, int],
                    att: np.ndarray, steps: list[int], table_dict: dict, *, table: SpanTable | None = None,
                    geometry: dict[str, GridGeometry] | None = None, per_head: bool | None = None,
                    source: dict | None = None) -> PolicyQuery:
        env_step, replan = inf
        row = frames.check_query(env_step, replan)
        axes = list(QUERY_AXES)
        for ax in self.reduce:
            att = att.mean(axis=axes.index(ax))
            axes.remove(ax)
        prompt_mode = ((rec.raw.get("perturbations") or {}).get("config") or {}).get("prompt_mode", "original")
        return PolicyQuery(
            key=key, env_step=env_step, replan_index=replan, attention=att, axes=tuple(axes),
            layers=list(self.layer_sites), steps=steps,
            table=table or SpanTable.from_dict(table_dict, f"span table of {key.stem}"), table_dict=table_dict,
            frame_row=row, frames={c: v[row] for c, v in frames.images.items()},
            masks={c: v[row] for c, v in frames.masks.items()}, object_ids=dict(frames.object_ids),
            objects_of_interest=list(frames.objects_of_interest), instance_names=dict(frames.instance_names),
            success=rec.success, prompt=rec.prompt, original_prompt=rec.original_prompt,
            prompt_mode=str(prompt_mode), episode_steps=rec.steps,
            per_head=next(iter(self.layouts.values())).has_heads if per_head is None else per_head,
            geometry=dict(geometry or {}),
            source=source or {"model": table_dict.get("model", ""), "head_kind": "head",
                              "sites": "llm.layer.<i>.attn.probs"})

    def queries(self, episodes: Sequence[EpisodeKey] | None = None) -> Iterator[PolicyQuery]:
        """All joined policy queries, episode by episode (one episode's rows in memory at a time)."""
        for key in (self.episode_keys() if episodes is None else episodes):
            yield from self.episode_queries(key)
