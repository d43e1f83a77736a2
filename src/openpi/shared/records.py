"""One record schema: what identifies an episode and an activation row, and how rollout folders are laid out.

Every module that writes or reads rollouts, activation rows or their exports imports these names instead of
re-declaring them, so a key column, a file stem or an action name cannot mean two things in two places.

- :class:`EpisodeKey` ``(run_id, suite, task_id, episode)`` and its file stem ``<run_id>__<suite>__task<t>__ep<e>``.
- :data:`KEY_COLUMNS`: the key columns of every activation row (store, exports), with ``attempt`` naming which
  attempt at an episode produced the row (a resumed or retried episode writes under a new attempt).
- :data:`ACTION_NAMES` / :data:`STATE_NAMES`: LIBERO's 7-D action (OSC deltas + gripper) and 8-D policy state.
- :class:`EpisodeRecord`: the typed episode record (``vla-interp/libero-episode/1``), read and written here only.
- :class:`RolloutDir`: the folder the LIBERO client writes (``--out-dir``), which every analysis takes as
  ``--rollouts``.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from openpi.shared.io import read_json, write_json_atomic

EPISODE_SCHEMA = "vla-interp/libero-episode/1"
SUMMARY_SCHEMA = "vla-interp/libero-summary/1"

EPISODE_COLUMNS: tuple[str, ...] = ("run_id", "suite", "task_id", "episode")
KEY_COLUMNS: dict[str, type] = {
    "run_id": str, "suite": str, "task_id": int, "episode": int, "attempt": str, "env_step": int,
    "replan_index": int, "denoise_step": int, "token_index": int, "span": str, "span_table": int,
}
ACTION_NAMES: tuple[str, ...] = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
STATE_NAMES: tuple[str, ...] = ("eef_x", "eef_y", "eef_z", "eef_ax", "eef_ay", "eef_az", "finger_l", "finger_r")
ACTION_DIM, STATE_DIM = len(ACTION_NAMES), len(STATE_NAMES)

_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]*(_[A-Za-z0-9.\-]+)*$")
_STEM_RE = re.compile(r"^(?P<run_id>.+?)__(?P<suite>[^_].*?)__task(?P<task_id>\d+)__ep(?P<episode>\d+)$")


class RecordError(ValueError):
    """An episode record or rollout folder that does not follow the schema (the message names file and field)."""


def validate_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.match(run_id) or "__" in run_id:
        raise ValueError(f"run_id {run_id!r} must use letters, digits, '.', '-', single '_' (no '__', no '/', "
                         "no spaces)")
    return run_id


@dataclasses.dataclass(frozen=True, order=True)
class EpisodeKey:
    run_id: str
    suite: str
    task_id: int
    episode: int

    @property
    def stem(self) -> str:
        """File stem of the episode's record, frames and videos."""
        return f"{self.run_id}__{self.suite}__task{self.task_id}__ep{self.episode}"

    @classmethod
    def from_stem(cls, stem: str) -> EpisodeKey:
        m = _STEM_RE.match(stem)
        if m is None:
            raise RecordError(f"{stem!r} is not an episode stem (<run_id>__<suite>__task<t>__ep<e>)")
        return cls(m["run_id"], m["suite"], int(m["task_id"]), int(m["episode"]))

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> EpisodeKey:
        """The key of a record dict or of one row of key columns."""
        try:
            return cls(str(row["run_id"]), str(row["suite"]), int(row["task_id"]), int(row["episode"]))
        except KeyError as exc:
            raise RecordError(f"episode key field {exc} missing (need {list(EPISODE_COLUMNS)})") from None

    def where(self) -> dict[str, Any]:
        """Store filter selecting this episode's rows."""
        return dataclasses.asdict(self)


def episode_keys_of_rows(keys: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[EpisodeKey]]:
    """Integer episode id per row and the :class:`EpisodeKey` of each id (ids ordered by key)."""
    missing = [c for c in EPISODE_COLUMNS if c not in keys]
    if missing:
        raise RecordError(f"key columns lack {missing} (have {sorted(keys)})")
    cols = [np.asarray(keys[c]) for c in EPISODE_COLUMNS]
    if len(cols[0]) == 0:
        return np.zeros(0, np.int64), []
    codes, uniques = [], []
    for c in cols:
        u, inv = np.unique(c, return_inverse=True)
        uniques.append(u)
        codes.append(inv.reshape(-1))
    combos, inv = np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)
    found = [EpisodeKey(str(uniques[0][a]), str(uniques[1][b]), int(uniques[2][c]), int(uniques[3][d]))
             for a, b, c, d in combos]
    order = sorted(range(len(found)), key=lambda i: found[i])
    rank = np.empty(len(order), np.int64)
    rank[np.asarray(order)] = np.arange(len(order))
    return rank[inv.reshape(-1)], [found[i] for i in order]


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One policy answer: the (H, 7) chunk returned at ``env_step`` (query number ``replan_index``)."""

    env_step: int
    replan_index: int
    actions: np.ndarray
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # other fields, e.g. Pi0-FAST's fast_decode


@dataclasses.dataclass
class EpisodeRecord:
    """An episode record (field meanings: ``openpi.envs.rollout`` docstring and docs/conventions.md).

    Row t of ``actions`` / ``states`` is env step t (counted from 0 after the settle steps). ``attempt`` identifies
    the attempt that wrote the record; activation rows of other attempts at the same episode are stale.
    """

    key: EpisodeKey
    attempt: str
    success: bool
    status: str
    steps: int
    actions: np.ndarray  # (T, 7) executed
    states: np.ndarray  # (T, 8)
    chunks: list[Chunk]
    prompt: str
    original_prompt: str
    raw: dict[str, Any]  # every field as stored (perturbations, object matches, timing, ...)
    path: pathlib.Path | None = None

    @classmethod
    def from_json(cls, data: Any, source: str = "episode record") -> EpisodeRecord:
        if not isinstance(data, dict):
            raise RecordError(f"{source}: expected a JSON object, found {type(data).__name__}")
        schema = data.get("schema", EPISODE_SCHEMA)
        if schema != EPISODE_SCHEMA:
            raise RecordError(f"{source}: schema {schema!r}, expected {EPISODE_SCHEMA!r}")
        try:
            key = EpisodeKey.of(data)
        except (RecordError, ValueError, TypeError) as exc:
            raise RecordError(f"{source}: {exc}") from None
        actions = _matrix(data, "actions", ACTION_DIM, source)
        states = _matrix(data, "states", STATE_DIM, source)
        if len(states) != len(actions):
            raise RecordError(f"{source}: {len(actions)} actions but {len(states)} states")
        chunks = []
        for i, c in enumerate(data.get("chunks") or []):
            try:
                arr = np.asarray(c["actions"], np.float64)
                extra = {k: v for k, v in c.items() if k not in ("env_step", "replan_index", "actions")}
                chunks.append(Chunk(int(c["env_step"]), int(c["replan_index"]), arr, extra))
            except (KeyError, TypeError, ValueError) as exc:
                raise RecordError(f"{source}: chunks[{i}] is malformed ({exc})") from None
            if arr.ndim != 2 or arr.shape[1] != ACTION_DIM:
                raise RecordError(f"{source}: chunks[{i}].actions has shape {arr.shape}, expected (H, {ACTION_DIM})")
        return cls(key=key, attempt=str(data.get("attempt", "")), success=bool(data.get("success", False)),
                   status=str(data.get("status", "complete")), steps=int(data.get("steps", len(actions))),
                   actions=actions, states=states, chunks=chunks, prompt=str(data.get("prompt", "")),
                   original_prompt=str(data.get("original_prompt", data.get("prompt", ""))), raw=data)

    @classmethod
    def read(cls, path: str | pathlib.Path) -> EpisodeRecord:
        path = pathlib.Path(path)
        rec = cls.from_json(read_json(path, "episode record", hint="move it away to rerun the episode"), str(path))
        if path.stem != rec.key.stem:
            raise RecordError(f"{path}: file name says {path.stem!r} but the record is episode {rec.key.stem!r}")
        rec.path = path
        return rec

    def write(self, path: str | pathlib.Path) -> None:
        write_json_atomic(path, self.to_json(), indent=None)  # compact: records hold T x 7 and T x 8 arrays

    def to_json(self) -> dict[str, Any]:
        out = dict(self.raw)
        out.update(schema=EPISODE_SCHEMA, **dataclasses.asdict(self.key), attempt=self.attempt, success=self.success,
                   status=self.status, steps=self.steps, prompt=self.prompt, original_prompt=self.original_prompt,
                   actions=self.actions.tolist(), states=self.states.tolist(),
                   chunks=[{"env_step": c.env_step, "replan_index": c.replan_index, "actions": c.actions.tolist(),
                            **c.extra} for c in self.chunks])
        return out

    @functools.cached_property
    def chunk_at(self) -> dict[int, Chunk]:
        """The chunk returned at each queried env step."""
        return {c.env_step: c for c in self.chunks}

    def predicted_action(self, query_env_step: int, j: int) -> np.ndarray:
        """Action j of the chunk predicted at ``query_env_step``: the label of that query's action token j."""
        chunk = self.chunk_at.get(int(query_env_step))
        if chunk is None:
            raise RecordError(f"{self.path or self.key.stem}: no chunk was returned at env_step {query_env_step} "
                              f"(queried steps: {sorted(self.chunk_at)[:10]}...)")
        if not 0 <= j < len(chunk.actions):
            raise RecordError(f"{self.path or self.key.stem}: action token {j} outside the chunk of "
                              f"{len(chunk.actions)} actions at env_step {query_env_step}")
        return chunk.actions[j]

    def executed_action(self, env_step: int) -> np.ndarray | None:
        """The action executed at ``env_step`` (None past the end of the episode)."""
        return self.actions[env_step] if 0 <= env_step < len(self.actions) else None


def _matrix(data: dict, name: str, width: int, source: str) -> np.ndarray:
    try:
        arr = np.asarray(data.get(name, []), np.float64)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"{source}: {name!r} is not numeric ({exc})") from None
    if arr.size == 0:
        return np.zeros((0, width))
    if arr.ndim != 2 or arr.shape[1] != width:
        raise RecordError(f"{source}: {name!r} has shape {arr.shape}, expected (T, {width})")
    return arr


class RolloutDir:
    """The LIBERO client's output folder (``examples/libero/main.py --out-dir``; ``--rollouts`` everywhere else)::

        runs/<run_id>.json       run settings            episodes/<stem>.json       one record per episode
        results/<run_id>.json    success table           episodes/_errors/          records of retried episodes
        frames/<stem>.npz        frames + masks (--save-frames)
    """

    def __init__(self, root: str | pathlib.Path, *, must_exist: bool = True) -> None:
        self.root = pathlib.Path(root)
        if must_exist and not self.episodes_dir.is_dir():
            hint = (" (that looks like the episodes folder itself: pass its parent, the client's --out-dir)"
                    if self.root.name == "episodes" else "")
            raise RecordError(f"{self.root} is not a rollout folder: {self.episodes_dir} is missing{hint}")
        self._cache: dict[EpisodeKey, EpisodeRecord] = {}

    @property
    def episodes_dir(self) -> pathlib.Path:
        return self.root / "episodes"

    @property
    def errors_dir(self) -> pathlib.Path:
        return self.episodes_dir / "_errors"

    def episode_json(self, key: EpisodeKey) -> pathlib.Path:
        return self.episodes_dir / f"{key.stem}.json"

    def frames_npz(self, key: EpisodeKey) -> pathlib.Path:
        return self.root / "frames" / f"{key.stem}.npz"

    def run_json(self, run_id: str) -> pathlib.Path:
        return self.root / "runs" / f"{validate_run_id(run_id)}.json"

    def results_json(self, run_id: str) -> pathlib.Path:
        return self.root / "results" / f"{validate_run_id(run_id)}.json"

    def keys(self, run_id: str | None = None) -> list[EpisodeKey]:
        """Episodes with a record (from file names; sorted), optionally of one run."""
        out = []
        for path in self.episodes_dir.glob("*.json"):
            key = EpisodeKey.from_stem(path.stem)
            if run_id is None or key.run_id == run_id:
                out.append(key)
        return sorted(out)

    def has(self, key: EpisodeKey) -> bool:
        return self.episode_json(key).is_file()

    def record(self, key: EpisodeKey) -> EpisodeRecord:
        if key not in self._cache:
            path = self.episode_json(key)
            if not path.is_file():
                raise RecordError(f"episode {key.stem} has no record in {self.episodes_dir} "
                                  f"({len(self.keys())} records there)")
            self._cache[key] = EpisodeRecord.read(path)
        return self._cache[key]

    def records(self, run_id: str | None = None) -> Iterator[EpisodeRecord]:
        for key in self.keys(run_id):
            yield self.record(key)
