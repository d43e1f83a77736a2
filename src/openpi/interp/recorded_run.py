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
  averaged at recording time over action tokens). Axes listed in ``reduce`` are averaged away at load time
  (``axes`` names what is left), which keeps memory small when an analysis only needs means.
- ``frames`` / ``masks``: ``{camera span name: (H, W, 3) uint8 / (H, W) int32}`` at that env step, taken from the
  frames npz row whose ``env_step`` equals the query's (``agentview`` -> ``base_0_rgb``, ``wrist`` ->
  ``left_wrist_0_rgb``).
- ``object_ids``: ``{BDDL object of interest: instance id}`` (matched objects only), ``success``, ``prompt``,
  ``original_prompt``, ``prompt_mode`` and ``episode_steps`` from the episode record.

How recorded queries are identified: the store's ``span`` key of an attention row is the recording's ``tokens``
selector ('' = all suffix queries, or a span name such as ``actions`` / ``suffix``, ``a:b``, ``i,j,k``). Its joint
indices say which query tokens a row holds, and the span table's ``actions`` span picks the action ones.

Errors (:class:`JoinError`, naming file, key and what was expected) are raised for: store episodes with no episode
record or no frames file (or ``on_missing="skip"`` to skip them with a warning), an env step missing from the
frames file or a frame not marked as ``queried``, a replan index that disagrees with the frames file, duplicate
rows for one inference (an episode recorded twice), layers or denoising steps missing for an inference, and row
layouts that cannot be told apart.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from openpi.interp.attention import FRAME_KEY_TO_CAMERA, SpanTable
from openpi.interp.store import ActivationStore

ATTN_SITE_RE = re.compile(r"^llm\.layer\.(\d+)\.attn\.probs$")
CAMERA_TO_FRAME_KEY: dict[str, str] = {cam: key for key, cam in FRAME_KEY_TO_CAMERA.items()}
QUERY_AXES: tuple[str, ...] = ("steps", "layers", "heads", "queries", "keys")


class JoinError(ValueError):
    """Store rows and rollout records that do not match."""


@dataclasses.dataclass(frozen=True, order=True)
class EpisodeKey:
    run_id: str
    suite: str
    task_id: int
    episode: int

    @property
    def stem(self) -> str:
        """File stem used by the rollout writer (``openpi.envs.rollout.episode_stem``)."""
        return f"{self.run_id}__{self.suite}__task{self.task_id}__ep{self.episode}"

    def where(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "suite": self.suite, "task_id": self.task_id, "episode": self.episode}


# --------------------------------------------------------------------------------------------------------------
# Rollout side
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EpisodeFrames:
    """Frames npz of one episode: per-row ``env_step`` plus images and instance masks per camera span name."""

    path: pathlib.Path
    env_step: np.ndarray
    replan_index: np.ndarray | None
    queried: np.ndarray | None
    images: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    instance_names: dict[int, str]
    objects_of_interest: list[str]
    object_ids: dict[str, int]

    @classmethod
    def load(cls, path: pathlib.Path) -> EpisodeFrames:
        if not path.is_file():
            raise JoinError(f"frames file {path} not found")
        with np.load(path, allow_pickle=False) as z:
            if "env_step" not in z.files:
                raise JoinError(f"frames file {path} has no 'env_step' array (has {z.files}); it cannot be joined "
                                "to attention rows by key")
            env_step = np.asarray(z["env_step"]).astype(np.int64)
            if env_step.ndim != 1 or np.unique(env_step).size != env_step.size:
                raise JoinError(f"frames file {path}: 'env_step' must be 1-D without repeats, found shape "
                                f"{env_step.shape} with {env_step.size - np.unique(env_step).size} repeats")
            images, masks = {}, {}
            for key, cam in FRAME_KEY_TO_CAMERA.items():
                if key in z.files:
                    images[cam] = np.asarray(z[key])
                    if images[cam].shape[:1] != env_step.shape or images[cam].ndim != 4:
                        raise JoinError(f"frames file {path}: {key!r} has shape {images[cam].shape}, expected "
                                        f"({env_step.size}, H, W, 3)")
                if f"{key}_seg" in z.files:
                    masks[cam] = np.asarray(z[f"{key}_seg"])
                    if masks[cam].shape[:1] != env_step.shape or masks[cam].ndim != 3:
                        raise JoinError(f"frames file {path}: {key + '_seg'!r} has shape {masks[cam].shape}, "
                                        f"expected ({env_step.size}, H, W)")
            replan = np.asarray(z["replan_index"]).astype(np.int64) if "replan_index" in z.files else None
            queried = np.asarray(z["queried"]).astype(bool) if "queried" in z.files else None
            names = _json_field(z, "instance_names", path, {})
            ooi = _json_field(z, "objects_of_interest", path, [])
            ids = _json_field(z, "object_instance_ids", path, {})
        return cls(path, env_step, replan, queried, images, masks, {int(k): str(v) for k, v in names.items()},
                   [str(n) for n in ooi], {str(k): int(v) for k, v in ids.items() if v is not None})

    def row_of(self, env_step: int) -> int:
        """Row holding ``env_step`` (the join key); a clear error when there is none."""
        hit = np.flatnonzero(self.env_step == env_step)
        if hit.size == 0:
            raise JoinError(f"frames file {self.path} has no row for env_step {env_step} (its env steps: "
                            f"{_ranges(self.env_step)})")
        return int(hit[0])


def _json_field(z, name: str, path: pathlib.Path, default):
    if name not in z.files:
        return default
    try:
        return json.loads(str(z[name]))
    except json.JSONDecodeError as exc:
        raise JoinError(f"frames file {path}: {name!r} is not valid JSON ({exc})") from exc


def _ranges(values: np.ndarray) -> str:
    v = np.unique(values)
    if v.size == 0:
        return "none"
    return f"{v.size} values in {int(v.min())}..{int(v.max())}"


@dataclasses.dataclass
class EpisodeRecord:
    """An episode JSON of the rollout dir and where its frames are."""

    key: EpisodeKey
    path: pathlib.Path
    record: dict
    frames_path: pathlib.Path

    @property
    def success(self) -> bool:
        return bool(self.record.get("success", False))

    @property
    def prompt(self) -> str:
        return str(self.record.get("prompt", ""))

    @property
    def original_prompt(self) -> str:
        return str(self.record.get("original_prompt", self.prompt))

    @property
    def prompt_mode(self) -> str:
        cfg = (self.record.get("perturbations") or {}).get("config") or {}
        return str(cfg.get("prompt_mode", "original"))

    @property
    def steps(self) -> int:
        return int(self.record.get("steps", 0))


class RolloutDir:
    """Episode records of a rollout output folder (``<out>/episodes/*.json``, frames under ``<out>/frames``)."""

    def __init__(self, root: str | pathlib.Path) -> None:
        self.root = pathlib.Path(root)
        ep_dir = self.root / "episodes"
        if not ep_dir.is_dir():
            raise JoinError(f"{self.root} is not a rollout folder: {ep_dir} is missing")
        self.episodes: dict[EpisodeKey, EpisodeRecord] = {}
        for path in sorted(ep_dir.glob("*.json")):
            try:
                rec = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise JoinError(f"episode record {path} is not valid JSON: {exc}") from exc
            try:
                key = EpisodeKey(str(rec["run_id"]), str(rec["suite"]), int(rec["task_id"]), int(rec["episode"]))
            except KeyError as exc:
                raise JoinError(f"episode record {path} lacks the key field {exc}") from exc
            frames = self.root / rec["frames"] if rec.get("frames") else self.root / "frames" / f"{key.stem}.npz"
            self.episodes[key] = EpisodeRecord(key, path, rec, frames)

    def get(self, key: EpisodeKey) -> EpisodeRecord:
        if key not in self.episodes:
            raise JoinError(f"store rows of episode {key.stem} have no episode record in {self.root / 'episodes'} "
                            f"(records found: {len(self.episodes)})")
        return self.episodes[key]


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


def query_joint_indices(selector: str, table: dict) -> np.ndarray:
    """Joint-sequence indices of the query tokens a recording with ``tokens=selector`` keeps (attention sites)."""
    prefix, seq = int(table["prefix_len"]), int(table["seq_len"])
    if selector in ("", "all", "*", "suffix"):
        return np.arange(prefix, seq)
    if selector in table["spans"]:
        a, b = table["spans"][selector]
        return np.arange(int(a), int(b))
    if re.fullmatch(r"\d+:\d+", selector):
        a, b = (int(v) for v in selector.split(":"))
        return np.arange(a, b)
    if re.fullmatch(r"\d+(,\d+)*", selector):
        return np.array([int(v) for v in selector.split(",")])
    raise JoinError(f"cannot tell which query tokens the recording selector {selector!r} (store key 'span') holds")


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How a stored attention row is laid out and which of its queries are action tokens."""

    has_heads: bool
    has_queries: bool
    action_rows: np.ndarray  # indices into the stored queries axis (empty when queries were averaged)


def row_layout(row_shape: Sequence[int], selector: str, table: dict, num_heads: int | None, site: str) -> RowLayout:
    """Interpret a stored row shape: (heads, queries, keys), (queries, keys), (heads, keys) or (keys,)."""
    joint = query_joint_indices(selector, table)
    a, b = table["spans"]["actions"]
    is_action = (joint >= a) & (joint < b)
    if not is_action.any():
        raise JoinError(f"{site}: recorded query tokens {selector!r} (joint {joint.min()}..{joint.max()}) include "
                        f"no action token (actions span [{a}, {b}))")
    shape = tuple(int(s) for s in row_shape)
    if shape[-1] != int(table["seq_len"]):
        raise JoinError(f"{site}: rows have {shape[-1]} keys but the span table's seq_len is {table['seq_len']}")
    if len(shape) == 3:
        has_heads, has_queries = True, True
    elif len(shape) == 2:
        if shape[0] == joint.size:
            has_heads, has_queries = False, True
        elif num_heads is not None and shape[0] == num_heads:
            has_heads, has_queries = True, False
        else:
            raise JoinError(f"{site}: rows of shape {shape} match neither {joint.size} recorded queries "
                            f"({selector!r}) nor {num_heads} heads")
    elif len(shape) == 1:
        has_heads, has_queries = False, False
    else:
        raise JoinError(f"{site}: unexpected attention row shape {shape}")
    if has_queries:
        n_q = shape[-2]
        if n_q != joint.size:
            raise JoinError(f"{site}: rows hold {n_q} queries but selector {selector!r} means {joint.size}")
        return RowLayout(has_heads, True, np.flatnonzero(is_action))
    if not is_action.all():
        raise JoinError(f"{site}: queries were averaged at recording time over {selector!r}, which includes "
                        "non-action tokens (state); record with tokens=actions to analyse action queries")
    return RowLayout(has_heads, False, np.zeros(0, np.int64))


def _num_heads(model_config: dict) -> int | None:
    try:
        from openpi.models.config import Pi0Config
        cfg = {k: v for k, v in model_config.items() if k in {f.name for f in dataclasses.fields(Pi0Config)}}
        return Pi0Config.from_dict(cfg).llm.num_heads
    except Exception:  # noqa: BLE001 -- an unknown config only removes one way to read (heads, keys) rows
        return None


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


@dataclasses.dataclass
class RecordedRun:
    """A store + rollout folder pair; iterate :meth:`queries` episode by episode (memory: one episode)."""

    store_dir: str | pathlib.Path
    rollouts_dir: str | pathlib.Path
    layers: Sequence[int] | None = None
    steps: Sequence[int] | None = None
    reduce: Sequence[str] = ()
    on_missing: Literal["error", "skip"] = "error"
    warnings: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.store = ActivationStore(self.store_dir)
        self.rollouts = RolloutDir(self.rollouts_dir)
        available = attention_layers(self.store)
        if not available:
            raise JoinError(f"store {self.store.root} has no llm.layer.<i>.attn.probs site (sites: "
                            f"{sorted(self.store.sites)})")
        chosen = list(available) if self.layers is None else [int(v) for v in self.layers]
        absent = [v for v in chosen if v not in available]
        if absent:
            raise JoinError(f"layers {absent} are not recorded in {self.store.root}; recorded: {list(available)}")
        self.layer_sites = {v: available[v] for v in chosen}
        bad = [a for a in self.reduce if a not in ("steps", "layers", "heads", "queries")]
        if bad:
            raise ValueError(f"cannot reduce over {bad}; choose from steps, layers, heads, queries")
        self.num_heads = _num_heads(self.store.model_config)

    @property
    def first_site(self) -> str:
        return next(iter(self.layer_sites.values()))

    def episode_keys(self) -> list[EpisodeKey]:
        """Episodes that have attention rows, sorted; checked against the rollout folder per ``on_missing``."""
        k = self.store.keys(self.first_site)
        found = sorted({EpisodeKey(str(r), str(s), int(t), int(e))
                        for r, s, t, e in zip(k["run_id"], k["suite"], k["task_id"], k["episode"])})
        out = []
        for key in found:
            problem = None
            if key not in self.rollouts.episodes:
                problem = (f"store rows of episode {key.stem} have no episode record in "
                           f"{self.rollouts.root / 'episodes'}")
            elif not self.rollouts.episodes[key].frames_path.is_file():
                problem = (f"store rows of episode {key.stem} have no frames file "
                           f"({self.rollouts.episodes[key].frames_path} missing; run the client with --save-frames)")
            if problem is None:
                out.append(key)
            elif self.on_missing == "error":
                raise JoinError(problem)
            else:
                self.warnings.append(problem + "; skipped")
        return out

    def episode_queries(self, key: EpisodeKey) -> list[PolicyQuery]:
        """Every recorded policy query of one episode, in env-step order."""
        rec = self.rollouts.get(key)
        frames = EpisodeFrames.load(rec.frames_path)
        per_layer: dict[int, dict[tuple[int, int], dict[int, np.ndarray]]] = {}
        tables: dict[tuple[int, int], dict] = {}
        layouts: dict[int, RowLayout] = {}
        for layer, site in self.layer_sites.items():
            layout: RowLayout | None = None
            where = key.where() | ({"denoise_step": list(self.steps)} if self.steps is not None else {})
            try:
                x, keys = self.store.read(site, where)
            except Exception as exc:  # StoreError when the layer has no row for this episode
                raise JoinError(f"layer {layer} ({site}) has no rows for episode {key.stem}"
                                + (f" at denoising steps {list(self.steps)}" if self.steps is not None else "")
                                + f": {exc}") from exc
            row_tables = self.store.span_tables(site, where)
            spans = keys["span"]
            groups: dict[tuple[int, int], dict[int, np.ndarray]] = {}
            for i in range(len(x)):
                inf = (int(keys["env_step"][i]), int(keys["replan_index"][i]))
                step = int(keys["denoise_step"][i])
                if layout is None:
                    layout = row_layout(x.shape[1:], str(spans[i]), row_tables[i], self.num_heads, site)
                if step in groups.setdefault(inf, {}):
                    raise JoinError(f"{site}: episode {key.stem} has two rows for env_step {inf[0]}, replan "
                                    f"{inf[1]}, denoising step {step} (was the episode recorded twice, e.g. "
                                    "retried after a policy error?)")
                groups[inf][step] = self._query_rows(x[i], layout)
                tables.setdefault(inf, row_tables[i])
            per_layer[layer] = groups
            layouts[layer] = layout
        if len({(v.has_heads, v.has_queries, v.action_rows.size) for v in layouts.values()}) > 1:
            raise JoinError(f"episode {key.stem}: the selected layers were recorded with different row layouts "
                            f"({ {k: dataclasses.astuple(v)[:2] for k, v in layouts.items()} }); select layers "
                            "recorded alike")
        layout = next(iter(layouts.values()))
        first = next(iter(per_layer.values()))
        env_steps = sorted(first)
        dup = [s for s in {e for e, _ in env_steps} if sum(e == s for e, _ in env_steps) > 1]
        if dup:
            raise JoinError(f"episode {key.stem}: env steps {sorted(dup)} were queried with several replan indices "
                            "(recorded twice?)")
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
            out.append(self._make_query(key, rec, frames, inf, att, steps, tables[inf], layout))
        extra = [inf for groups in per_layer.values() for inf in groups if inf not in first]
        if extra:
            raise JoinError(f"episode {key.stem}: inferences {sorted(set(extra))[:5]} are recorded for some layers "
                            "only")
        return out

    def _query_rows(self, row: np.ndarray, layout: RowLayout) -> np.ndarray:
        row = np.asarray(row, np.float32)
        if not layout.has_heads:
            row = row[None]
        if layout.has_queries:
            row = row[..., layout.action_rows, :]
        else:
            row = row[..., None, :]
        return row  # (heads, queries, keys)

    def _make_query(self, key: EpisodeKey, rec: EpisodeRecord, frames: EpisodeFrames, inf: tuple[int, int],
                    att: np.ndarray, steps: list[int], table: dict, layout: RowLayout) -> PolicyQuery:
        env_step, replan = inf
        row = frames.row_of(env_step)
        if frames.queried is not None and not frames.queried[row]:
            raise JoinError(f"frames file {frames.path}: env_step {env_step} is not marked as a policy query, but "
                            f"the store has attention for it (frames and store of different runs?)")
        if frames.replan_index is not None and int(frames.replan_index[row]) != replan:
            raise JoinError(f"frames file {frames.path}: env_step {env_step} has replan_index "
                            f"{int(frames.replan_index[row])}, the store says {replan}")
        axes = list(QUERY_AXES)
        for ax in self.reduce:
            att = att.mean(axis=axes.index(ax))
            axes.remove(ax)
        return PolicyQuery(
            key=key, env_step=env_step, replan_index=replan, attention=att, axes=tuple(axes),
            layers=list(self.layer_sites), steps=steps, table=SpanTable.from_dict(table, f"span table of {key.stem}"),
            table_dict=table, frame_row=row, frames={c: v[row] for c, v in frames.images.items()},
            masks={c: v[row] for c, v in frames.masks.items()}, object_ids=dict(frames.object_ids),
            objects_of_interest=list(frames.objects_of_interest), instance_names=dict(frames.instance_names),
            success=rec.success, prompt=rec.prompt, original_prompt=rec.original_prompt,
            prompt_mode=rec.prompt_mode, episode_steps=rec.steps, per_head=layout.has_heads)

    def queries(self, episodes: Sequence[EpisodeKey] | None = None) -> Iterator[PolicyQuery]:
        """All joined policy queries, episode by episode (one episode's rows in memory at a time)."""
        for key in (self.episode_keys() if episodes is None else episodes):
            yield from self.episode_queries(key)
