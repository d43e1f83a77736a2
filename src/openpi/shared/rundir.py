"""One run directory for every long job: settings check-or-write, a fingerprint of all settings, resume, atomic
outputs and checkpoints.

Why one mechanism: LIBERO evaluation, demo generation, both trainers, probes, attention evaluation and exports are
all killed and rerun (SLURM preemption, a laptop lid). Each needs the same three guarantees: a rerun with the same
settings resumes, a rerun with other settings is refused naming every difference, and an output is either absent
or complete. Writing that once means it behaves the same everywhere.

Layout::

    <root>/run.json                  {schema, job, fingerprint, settings, created_at, **extra}
    <root>/checkpoints/<step:08d>/   one complete checkpoint each (``state.npz`` + ``meta.json`` + extras)

Fingerprint: a hash of *every* setting. Fields that change how a job runs but not what it computes (shard index,
progress bars, ``--overwrite``) are declared where they are defined, with :func:`run_option`, instead of in a
hand-kept exclusion list.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from openpi.shared.io import jsonable, read_json, save_npz_atomic, write_json_atomic

RUN_SCHEMA = "vla-interp/run/1"
_RUN_OPTION = "vla_interp_run_option"


class RunSettingsError(ValueError):
    """A run directory holds a run with other settings (the message lists each difference)."""


def run_option(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field that is not a setting of the result (left out of the fingerprint)."""
    metadata = {**kwargs.pop("metadata", {}), _RUN_OPTION: True}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def settings_of(obj: Any) -> Any:
    """JSON-able settings of a (nested) dataclass without its run options; mappings and values pass through."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: settings_of(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get(_RUN_OPTION)}
    if isinstance(obj, Mapping):
        return {str(k): settings_of(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [settings_of(v) for v in obj]
    return jsonable(obj, default=repr)


def fingerprint(settings: Any) -> str:
    """Stable short hash of settings (canonical JSON)."""
    text = json.dumps(settings_of(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(stored: Any, now: Any, prefix: str = "") -> list[str]:
    """'key: stored X vs now Y' for every leaf that differs (nested keys joined with dots)."""
    if isinstance(stored, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(stored) | set(now)):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in stored:
                out.append(f"{name}: absent then vs {now[k]!r} now")
            elif k not in now:
                out.append(f"{name}: {stored[k]!r} then vs absent now")
            else:
                out += differences(stored[k], now[k], name)
        return out
    return [] if stored == now else [f"{prefix or 'settings'}: stored {stored!r} vs now {now!r}"]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunDir:
    """A long job's output folder (see module docstring).

    ``RunDir(root, "sae-train", cfg)`` writes ``run.json`` or, when one exists, refuses a different job or
    different settings (``overwrite=True`` starts over: checkpoints are removed, outputs are replaced as they are
    rewritten). ``run_json`` names the settings file for jobs that keep several runs in one folder; ``remedy`` is
    what a refusal tells the user to do; ``extra`` (descriptive, not compared) is stored at the top level.
    """

    RESERVED = ("schema", "job", "fingerprint", "settings", "created_at")

    def __init__(self, root: str | os.PathLike, job: str, settings: Any, *, overwrite: bool = False,
                 extra: Mapping[str, Any] | None = None, run_json: str = "run.json",
                 remedy: str = "choose another output folder or pass --overwrite") -> None:
        self.root = pathlib.Path(root)
        self.job = job
        self.settings = settings_of(settings)
        self.fingerprint = fingerprint(self.settings)
        self.run_path = self.root / run_json
        self.resumed = False
        if self.run_path.exists() and not overwrite:
            stored = read_json(self.run_path, f"{job} run settings", hint="fix or remove it")
            if stored.get("job") != job:
                raise RunSettingsError(f"{self.run_path} belongs to a {stored.get('job')!r} run, not {job!r}; "
                                       "choose another output folder")
            if stored.get("fingerprint") != self.fingerprint:
                diffs = differences(stored.get("settings"), self.settings) or ["(settings equal, format changed)"]
                raise RunSettingsError(f"{self.run_path} holds a {job} run with different settings "
                                       f"({'; '.join(diffs)}); {remedy}")
            self.resumed = True
            self.record = stored
        else:
            if overwrite:
                shutil.rmtree(self.root / "checkpoints", ignore_errors=True)
            clash = sorted(set(extra or {}) & set(self.RESERVED))
            if clash:
                raise ValueError(f"run extras may not use the reserved keys {clash}")
            self.record = {"schema": RUN_SCHEMA, "job": job, "fingerprint": self.fingerprint,
                           "settings": self.settings, "created_at": _now(), **dict(extra or {})}
            write_json_atomic(self.run_path, self.record)

    def path(self, *parts: str) -> pathlib.Path:
        return self.root.joinpath(*parts)

    def write_json(self, name: str, obj: Any) -> pathlib.Path:
        path = self.path(name)
        write_json_atomic(path, obj)
        return path

    def save_npz(self, name: str, arrays: Mapping[str, np.ndarray], compress: bool = True) -> pathlib.Path:
        path = self.path(name)
        save_npz_atomic(path, arrays, compress=compress)
        return path

    @property
    def checkpoints(self) -> CheckpointDir:
        return CheckpointDir(self.root / "checkpoints")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary folder next to ``path``; on a clean exit it replaces ``path`` whole.

    An existing ``path`` is kept until the new folder is complete (renamed aside, then deleted), so a reader sees
    the old complete folder or the new complete one, never a mix; on an exception the old folder is untouched.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


class CheckpointDir:
    """Numbered checkpoints ``<root>/<step:08d>/``, each written to a temporary folder and renamed into place
    (a killed save leaves no checkpoint); complete = has ``meta.json`` (written last)."""

    def __init__(self, root: str | os.PathLike, keep_last: int | None = 2) -> None:
        self.root = pathlib.Path(root)
        self.keep_last = keep_last

    def step_dir(self, step: int) -> pathlib.Path:
        return self.root / f"{int(step):08d}"

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name) for p in self.root.iterdir()
                      if p.is_dir() and p.name.isdigit() and (p / "meta.json").is_file())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: Mapping[str, Any],
             write_extra: Callable[[pathlib.Path], None] | None = None) -> pathlib.Path:
        """Save a pytree of arrays (bit-exact, as npz) plus JSON ``meta``; ``write_extra(dir)`` adds files (e.g.
        servable Orbax params) inside the same atomic folder."""
        final = self.step_dir(step)
        if final.exists():
            raise FileExistsError(f"checkpoint {final} already exists; refusing to overwrite it")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{int(step):08d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            leaves = jax.tree_util.tree_leaves(state)
            save_npz_atomic(tmp / "state.npz", {f"leaf_{i:05d}": np.asarray(v) for i, v in enumerate(leaves)},
                            compress=False)
            if write_extra is not None:
                write_extra(tmp)
            write_json_atomic(tmp / "meta.json", {"step": int(step), "num_leaves": len(leaves), **dict(meta)})
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return final

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state shaped like ``template``, meta) of ``step`` (default: the latest); errors name the file."""
        step = self.latest() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.root}")
        d = self.step_dir(step)
        meta = read_json(d / "meta.json", "checkpoint metadata")
        tmpl_leaves, treedef = jax.tree_util.tree_flatten(template)
        with np.load(d / "state.npz") as z:
            leaves = [z[f"leaf_{i:05d}"] for i in range(len(z.files))]
        if len(leaves) != len(tmpl_leaves):
            raise ValueError(f"{d / 'state.npz'} holds {len(leaves)} arrays, the state being trained has "
                             f"{len(tmpl_leaves)} (a checkpoint of another model or optimizer?)")
        for i, (a, b) in enumerate(zip(leaves, tmpl_leaves)):
            if a.shape != np.shape(b) or a.dtype != np.asarray(b).dtype:
                raise ValueError(f"{d / 'state.npz'}: array {i} is {a.dtype}{a.shape}, the state being trained "
                                 f"has {np.asarray(b).dtype}{np.shape(b)}")
        return jax.tree_util.tree_unflatten(treedef, leaves), meta

    def prune(self) -> None:
        if self.keep_last is None:
            return
        for step in self.steps()[:-self.keep_last]:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)
