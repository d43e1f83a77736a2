"""On-disk demonstration format: one directory of ``.npy`` arrays per successful episode.

Why ``.npy`` files rather than one compressed archive: training samples random frames from many episodes, and
``np.load(mmap_mode='r')`` reads just those frames, so a data set larger than memory streams from disk.

Layout (``<root>`` is what ``scripts/generate_demos.py --out-dir`` names)::

    <root>/demos/<stem>/agentview.npy   (F, S, S, 3) uint8  agent view exactly as the policy sees it
                                         (rotated 180 degrees, resized with padding to S = 224)
    <root>/demos/<stem>/wrist.npy       (F, S, S, 3) uint8  wrist camera, same transform
    <root>/demos/<stem>/states.npy      (T, 8) float32      policy state before the step: eef pos (3),
                                                             eef axis-angle (3), gripper joint positions (2)
    <root>/demos/<stem>/actions.npy     (T, 7) float32      action executed at the step (OSC delta pos 3,
                                                             delta axis-angle 3, gripper -1 open / +1 close)
    <root>/demos/<stem>/meta.json       written last: its presence means the episode is complete
    <root>/attempts/<stem>.json         one record per attempted episode, kept or not (resume + success rates)
    <root>/summary.json                 success rate per task over all attempt records on disk

``<stem>`` = ``<suite>__task<task_id>__ep<episode>``. Row ``t`` of states and actions belongs to env step ``t``:
the state observed before action ``t`` was executed. Frames are rendered every ``frame_stride`` steps (meta, default
1; rendering is ~90% of a CPU step): frame row ``i`` is env step ``i * frame_stride``, so F = ceil(T / stride). A demo directory is built under a temporary name and
renamed into place, so a killed writer never leaves a directory that looks complete.

``meta.json`` (``schema: vla-interp/demo/1``): ``suite, task_id, episode, init_state_index, prompt, steps`` (T),
``success`` (always true for kept demos), ``seed, settle_steps, resize_size, frame_stride, goal`` ({obj, target}),
``controller`` (name + parameters), ``created_at`` (ISO 8601 UTC).

Attempt record (``schema: vla-interp/demo-attempt/1``): ``suite, task_id, episode, prompt, success, steps,
failure_reason`` (null, ``max_steps``, ``controller_timeout``, ``controller_lost_object`` or ``error: ...``), ``kept`` (a demo directory was
written), ``timing`` ({reset_s, steps_s, total_s}), ``finished_at``.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

from openpi.shared import io as shared_io
from openpi.shared.io import read_json

DEMO_SCHEMA = "vla-interp/demo/1"
ATTEMPT_SCHEMA = "vla-interp/demo-attempt/1"
SUMMARY_SCHEMA = "vla-interp/demo-summary/1"
STATE_DIM = 8
ACTION_DIM = 7
ARRAYS = ("agentview", "wrist", "states", "actions")
META_KEYS = ("suite", "task_id", "episode", "prompt", "steps")


class DemoFormatError(ValueError):
    """A demo directory that is incomplete or does not follow the format."""


@dataclasses.dataclass
class DemoEpisode:
    agentview: np.ndarray  # (F, S, S, 3) uint8, F = ceil(T / frame_stride)
    wrist: np.ndarray  # (F, S, S, 3) uint8
    states: np.ndarray  # (T, 8) float32
    actions: np.ndarray  # (T, 7) float32
    meta: dict[str, Any]

    @property
    def steps(self) -> int:
        return int(self.actions.shape[0])

    @property
    def prompt(self) -> str:
        return str(self.meta["prompt"])

    @property
    def frame_stride(self) -> int:
        return int(self.meta.get("frame_stride", 1))

    def frame_steps(self) -> np.ndarray:
        """The env steps that have frames (0, stride, 2 * stride, ...)."""
        return np.arange(0, self.steps, self.frame_stride)


def demo_stem(suite: str, task_id: int, episode: int) -> str:
    return f"{suite}__task{int(task_id)}__ep{int(episode)}"


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_arrays(agentview, wrist, states, actions, source: str, frame_stride: int = 1,
                 check_values: bool = True) -> None:
    """Raise DemoFormatError naming the first array whose shape, dtype or values break the format."""
    a, w, s, u = (np.asarray(x) if check_values else x for x in (agentview, wrist, states, actions))
    if a.ndim != 4 or a.shape[-1] != 3 or a.shape[1] != a.shape[2] or a.dtype != np.uint8:
        raise DemoFormatError(f"{source}: agentview must be (F, S, S, 3) uint8, found {a.shape} {a.dtype}")
    if not isinstance(frame_stride, int) or frame_stride < 1:
        raise DemoFormatError(f"{source}: frame_stride must be an integer >= 1, found {frame_stride!r}")
    t = u.shape[0]
    if t < 1:
        raise DemoFormatError(f"{source}: episode has no steps")
    for name, arr, dim in (("states", s, STATE_DIM), ("actions", u, ACTION_DIM)):
        if arr.shape != (t, dim):
            raise DemoFormatError(f"{source}: {name} must be ({t}, {dim}) like the {t} actions, found {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating) or (check_values and not np.isfinite(arr).all()):
            raise DemoFormatError(f"{source}: {name} must be finite floats (dtype {arr.dtype})")
    frames = -(-t // frame_stride)
    if a.shape[0] != frames:
        raise DemoFormatError(f"{source}: agentview has {a.shape[0]} frames, expected ceil({t} steps / frame_stride "
                              f"{frame_stride}) = {frames}")
    if w.shape != a.shape or w.dtype != np.uint8:
        raise DemoFormatError(f"{source}: wrist must be {a.shape} uint8 like agentview, found {w.shape} {w.dtype}")


def write_demo(root: str | pathlib.Path, episode: DemoEpisode) -> pathlib.Path:
    """Write ``<root>/demos/<stem>/`` atomically (temporary directory + rename). Refuses to replace a demo."""
    missing = [k for k in META_KEYS if k not in episode.meta]
    if missing:
        raise DemoFormatError(f"demo meta lacks {missing} (has {sorted(episode.meta)})")
    m = episode.meta
    stem = demo_stem(m["suite"], m["task_id"], m["episode"])
    check_arrays(episode.agentview, episode.wrist, episode.states, episode.actions, stem, episode.frame_stride)
    if int(m["steps"]) != episode.steps:
        raise DemoFormatError(f"{stem}: meta steps={m['steps']} but arrays have {episode.steps} rows")
    demos = pathlib.Path(root) / "demos"
    demos.mkdir(parents=True, exist_ok=True)
    final = demos / stem
    if final.exists():
        raise FileExistsError(f"demo {final} already exists; refusing to overwrite it")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=demos))
    try:
        np.save(tmp / "agentview.npy", np.ascontiguousarray(episode.agentview, np.uint8))
        np.save(tmp / "wrist.npy", np.ascontiguousarray(episode.wrist, np.uint8))
        np.save(tmp / "states.npy", np.asarray(episode.states, np.float32))
        np.save(tmp / "actions.npy", np.asarray(episode.actions, np.float32))
        meta = {"schema": DEMO_SCHEMA, **m, "steps": episode.steps}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.chmod(tmp, 0o755)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_meta(path: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DemoFormatError(f"{path}: no meta.json (not a demo directory, or an unfinished one)")
    meta = read_json(meta_path, "demo meta", error=DemoFormatError)
    if meta.get("schema") != DEMO_SCHEMA:
        raise DemoFormatError(f"{meta_path}: schema {meta.get('schema')!r}, expected {DEMO_SCHEMA!r}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise DemoFormatError(f"{meta_path}: lacks key(s) {missing}")
    return meta


def read_demo(path: str | pathlib.Path, *, mmap: bool = True) -> DemoEpisode:
    """Load one demo directory (arrays memory-mapped unless ``mmap=False``) and check its shapes."""
    path = pathlib.Path(path)
    meta = read_meta(path)
    arrays = {}
    for name in ARRAYS:
        f = path / f"{name}.npy"
        if not f.is_file():
            raise DemoFormatError(f"{path}: missing {f.name}")
        arrays[name] = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
    # Shapes and dtypes only: the value check would read every frame of a memory-mapped episode.
    check_arrays(arrays["agentview"], arrays["wrist"], arrays["states"], arrays["actions"], str(path),
                 meta.get("frame_stride", 1), check_values=False)
    if int(meta["steps"]) != arrays["actions"].shape[0]:
        raise DemoFormatError(f"{path}: meta steps={meta['steps']} but arrays have {arrays['actions'].shape[0]} rows")
    return DemoEpisode(meta=meta, **arrays)


def validate_demo(path: str | pathlib.Path) -> DemoEpisode:
    """Full check of one demo (reads every array; finite states and actions, consistent lengths)."""
    ep = read_demo(path, mmap=False)
    check_arrays(ep.agentview, ep.wrist, ep.states, ep.actions, str(path), ep.frame_stride)
    return ep


def list_demos(root: str | pathlib.Path) -> list[pathlib.Path]:
    """Complete demo directories under ``<root>/demos`` (unfinished temporaries skipped), sorted by name."""
    demos = pathlib.Path(root) / "demos"
    if not demos.is_dir():
        raise FileNotFoundError(f"no demos directory at {demos} (run scripts/generate_demos.py --out-dir {root})")
    return sorted(p for p in demos.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / "meta.json").is_file())


# ------------------------------------------------------------------------------------------------ attempts


def attempt_path(root: str | pathlib.Path, suite: str, task_id: int, episode: int) -> pathlib.Path:
    return pathlib.Path(root) / "attempts" / f"{demo_stem(suite, task_id, episode)}.json"


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    """JSON (indent 1) written atomically, mode 0o644 whatever the umask (records are shared read-only)."""
    shared_io.write_json_atomic(path, obj, indent=1, mode=0o644)


def write_attempt(root: str | pathlib.Path, record: dict[str, Any]) -> pathlib.Path:
    path = attempt_path(root, record["suite"], record["task_id"], record["episode"])
    write_json_atomic(path, {"schema": ATTEMPT_SCHEMA, **record})
    return path


def read_attempts(root: str | pathlib.Path) -> list[dict[str, Any]]:
    directory = pathlib.Path(root) / "attempts"
    if not directory.is_dir():
        return []
    out = []
    for p in sorted(directory.glob("*.json")):
        out.append(read_json(p, "attempt record", error=DemoFormatError))
    return out


def summarize_attempts(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """``{schema, suites: {suite: {attempts, successes, success_rate, mean_steps_success, tasks: {"<id>":
    {prompt, attempts, successes, success_rate, mean_steps_success, failures: {reason: count}}}}}, total}``."""

    def stats(rows: list[dict]) -> dict[str, Any]:
        ok = [r for r in rows if r["success"]]
        failures: dict[str, int] = {}
        for r in rows:
            if not r["success"]:
                reason = str(r.get("failure_reason")).split(":")[0]
                failures[reason] = failures.get(reason, 0) + 1
        return {"attempts": len(rows), "successes": len(ok),
                "success_rate": len(ok) / len(rows) if rows else 0.0,
                "mean_steps_success": float(np.mean([r["steps"] for r in ok])) if ok else None,
                "failures": failures}

    suites: dict[str, Any] = {}
    for suite in sorted({a["suite"] for a in attempts}):
        rows = [a for a in attempts if a["suite"] == suite]
        tasks = {}
        for task in sorted({a["task_id"] for a in rows}):
            trows = [a for a in rows if a["task_id"] == task]
            tasks[str(task)] = {"prompt": trows[0].get("prompt"), **stats(trows)}
        suites[suite] = {**stats(rows), "tasks": tasks}
    return {"schema": SUMMARY_SCHEMA, "suites": suites, "total": stats(attempts)}


# ------------------------------------------------------------------------------------------------ synthetic

SYNTHETIC_PROMPTS = ("pick up the black bowl next to the ramekin and place it on the plate",
                     "pick up the black bowl on the stove and place it on the plate")


def synthetic_episode(episode: int, steps: int = 12, size: int = 224, task_id: int = 0) -> DemoEpisode:
    """A small deterministic demo for tests and smoke runs of the training pipeline (no simulator needed).

    Images: a flat colour per episode plus a bright square that moves with the step; actions: a fixed function of
    the state (so a model can learn them), gripper open for the first half and closed after.
    """
    rng = np.random.default_rng(episode)
    states = np.cumsum(rng.normal(0, 0.05, (steps, STATE_DIM)), axis=0).astype(np.float32)
    actions = np.tanh(states[:, :ACTION_DIM] * 3.0 + np.arange(ACTION_DIM) * 0.1).astype(np.float32)
    actions[:, 6] = np.where(np.arange(steps) < steps // 2, -1.0, 1.0)
    agent = np.full((steps, size, size, 3), (40 * episode) % 255, np.uint8)
    wrist = np.full((steps, size, size, 3), 100, np.uint8)
    for t in range(steps):
        agent[t, 10 + 10 * t: 40 + 10 * t, 20:50] = 255
        wrist[t, :, : 10 + 15 * t] = 200
    meta = {"suite": "libero_spatial", "task_id": task_id, "episode": episode, "init_state_index": episode,
            "prompt": SYNTHETIC_PROMPTS[task_id % len(SYNTHETIC_PROMPTS)], "steps": steps, "success": True}
    return DemoEpisode(agent, wrist, states, actions, meta)


def write_synthetic_demos(root: str | pathlib.Path, episodes: int = 3, steps: int = 12) -> pathlib.Path:
    """``episodes`` synthetic demos (alternating task ids 0/1) under ``<root>/demos``; returns ``root``."""
    for e in range(episodes):
        write_demo(root, synthetic_episode(e, steps, task_id=e % 2))
    return pathlib.Path(root)
