"""Export one site of an activation store to plain arrays, joined by key with the rollout records.

Why: every analysis script also takes plain ``.npy`` inputs (so it serves any model); this is the bridge from a
recorded LIBERO run. Rows are streamed into a memory-mapped ``X.npy``, so memory stays bounded. Everything a row is
labelled with is looked up by key (episode -> its record, ``env_step`` and the row's action index -> the chunk
and the executed steps), never by row position.

Order of work: every input is checked first (store, site, filter, rollout folder, a record per episode, the attempt
that wrote it, a chunk for every query, frames for the bridges); then the whole output folder is written to a
temporary folder next to OUT and renamed into place (``openpi.shared.rundir.atomic_dir``). A failed export leaves
the previous OUT untouched, never a mix of new and old files.

Outputs in OUT:

Rows are written in key order (:data:`ROW_ORDER`), not in the order the store received them: two evaluation
workers interleave their requests differently from run to run, and every analysis that shuffles, splits or
bootstraps rows would otherwise give different numbers for the same episodes.

* ``X.npy`` (rows, d) float32; ``keys.npz``: the store's key columns plus ``action_index`` (which chunk action
  the row's token predicts: token_index - start of its span table's ``actions`` span; -1 for rows that are not
  one action token: token-reduced rows, attention rows, the state token).
* with ``rollouts`` (labels, rule in ``openpi.interp.join``): ``actions.npy`` (rows, 7) the predicted action of the
  row (chunk action j for action token j, chunk action 0 for other rows), ``executed_actions.npy`` (rows, 7) the
  action executed at env step t + j (NaN where not executed) and ``executed_valid.npy`` (rows,) bool,
  ``states.npy`` (rows, 8) the state at the query, ``gripper_closed.npy`` (predicted gripper > 0), ``task_id.npy``,
  ``success.npy`` (rows,) int, ``groups.npy`` (rows,) int episode index (for grouped cross-validation),
  ``prompts.json`` {group: prompt}.
* ``export.json``: site, request, row axes, filter, row counts, the attempt rule and the stale rows dropped, the
  label rule and how many rows got which label, targets, episodes (stems in group order), bridges.
* with ``rollouts``, the inputs of the array scripts (``openpi.interp.bridges``), listed with ready-to-run
  commands in ``bridge.json``.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from tqdm import tqdm

from openpi.interp.join import (AttemptSelection, JoinError, RowLabels, action_index, open_rollouts, record_of,
                                row_labels, select_attempts)
from openpi.interp.store import ActivationStore, StoreError
from openpi.shared.io import write_json_atomic
from openpi.shared.records import STATE_DIM, RolloutDir, episode_keys_of_rows
from openpi.shared.rundir import atomic_dir

SCHEMA = "vla-interp/export/1"
# The key columns that order exported rows (most significant first); together they identify a row.
ROW_ORDER = ("run_id", "suite", "task_id", "episode", "attempt", "env_step", "denoise_step", "token_index")
TARGETS = ("actions", "executed_actions", "executed_valid", "states", "gripper_closed", "task_id", "success", "groups")


@dataclasses.dataclass
class ExportPlan:
    """Everything an export writes, resolved and checked before anything is written."""

    store: ActivationStore
    site: str
    info: dict
    where: dict[str, Any] | None
    keys: dict[str, np.ndarray]  # every row matching ``where``, in stream order
    keep: np.ndarray  # (len(keys),) bool: rows written
    order: np.ndarray  # kept rows (in stream order) -> output order: output row i is kept row order[i]
    action_index: np.ndarray  # per output row
    attempts: AttemptSelection
    rollouts: RolloutDir | None
    labels: RowLabels | None  # per kept row
    dropped_unanswered: int

    @property
    def kept_keys(self) -> dict[str, np.ndarray]:
        """Key columns of the output rows, in output (key) order."""
        return {k: v[self.keep][self.order] for k, v in self.keys.items()}

    @property
    def width(self) -> int:
        return int(np.prod(self.info["row_shape"]))


def plan_export(store_dir: str | pathlib.Path, site: str, *, where: Mapping[str, Any] | None = None,
                rollouts: str | pathlib.Path | None = None) -> ExportPlan:
    """Resolve and check every input of an export (errors name the file, key and valid choices)."""
    store = ActivationStore(store_dir)
    if site not in store.sites:
        raise StoreError(f"site {site!r} is not in store {store.root}; stored sites: {sorted(store.sites)}")
    where = dict(where) if where else None
    keys = store.require_keys(site, where)
    keys.pop("shard", None)
    rollout_dir = open_rollouts(rollouts)
    source = f"site {site}"
    attempts = select_attempts(keys, rollout_dir, source)
    keep = attempts.keep.copy()
    tables = store.span_tables(site, where)
    aidx = action_index(keys["token_index"], tables, source)[keep]
    labels, unanswered = None, 0
    if rollout_dir is not None:
        labels = row_labels({k: v[keep] for k, v in keys.items()}, aidx, rollout_dir, source)
        if not labels.answered.all():
            unanswered = int((~labels.answered).sum())
            kept_rows = np.flatnonzero(keep)
            keep[kept_rows[~labels.answered]] = False
            aidx, labels = aidx[labels.answered], labels.subset(labels.answered)
    if not keep.any():
        raise JoinError(f"{source}: no row is left to export after keeping the attempts that wrote the records "
                        f"({attempts.dropped} stale rows, {unanswered} rows of unanswered queries)")
    order = key_order({k: v[keep] for k, v in keys.items()})
    return ExportPlan(store, site, store.sites[site], where, keys, keep, order, aidx[order], attempts, rollout_dir,
                      None if labels is None else labels.subset(order), unanswered)


def key_order(keys: Mapping[str, np.ndarray]) -> np.ndarray:
    """Permutation sorting rows by :data:`ROW_ORDER` (columns a store lacks are skipped; ties keep their order)."""
    cols = [np.asarray(keys[c]) for c in reversed(ROW_ORDER) if c in keys]
    n = len(next(iter(keys.values()))) if keys else 0
    return np.lexsort(cols) if cols else np.arange(n)


def export_site(store_dir: str | pathlib.Path, site: str, out: str | pathlib.Path, *,
                where: Mapping[str, Any] | None = None, rollouts: str | pathlib.Path | None = None,
                batch_size: int = 4096, bridges: bool = True) -> dict:
    """Write the export of ``site`` to ``out`` (atomically: the whole folder or nothing); returns export.json."""
    from openpi.interp import bridges as bridge_mod

    plan = plan_export(store_dir, site, where=where, rollouts=rollouts)
    out = pathlib.Path(out)
    bridge_plan = bridge_mod.plan_bridges(plan, out) if (bridges and plan.rollouts is not None) else None
    with atomic_dir(out) as tmp:
        _write_x(plan, tmp, batch_size)
        keys = plan.kept_keys
        np.savez(tmp / "keys.npz", **keys, action_index=plan.action_index)
        summary: dict[str, Any] = {
            "schema": SCHEMA, "site": site, "store": str(store_dir), "where": plan.where,
            "request": plan.info.get("request"), "row_axes": plan.info.get("row_axes"),
            "rows": int(plan.keep.sum()), "width": plan.width, "row_shape": plan.info["row_shape"],
            "attempts": plan.attempts.to_json(), "dropped_unanswered_rows": plan.dropped_unanswered,
            "action_index": "token_index - start of the row's actions span; -1: not one action token",
        }
        if plan.rollouts is not None:
            summary["rollouts"] = str(rollouts)
            summary.update(_write_targets(plan, tmp))
        if bridge_plan is not None:
            summary["bridges"] = bridge_plan.write(tmp)
        write_json_atomic(tmp / "export.json", summary, indent=1)
    return summary


def _write_x(plan: ExportPlan, tmp: pathlib.Path, batch_size: int) -> None:
    """Stream the kept rows into X.npy, checking that the stream is the manifest the plan was made from."""
    n = int(plan.keep.sum())
    x = np.lib.format.open_memmap(tmp / "X.npy", mode="w+", dtype=np.float32, shape=(n, plan.width))
    dest = np.empty_like(plan.order)
    dest[plan.order] = np.arange(n)  # kept row (stream order) -> its output row
    pos = start = 0
    for batch, keys in tqdm(plan.store.iter_batches(plan.site, batch_size, where=plan.where),
                            desc=f"export {plan.site}", unit="batch"):
        b = len(batch)
        for col in ("run_id", "episode", "attempt", "env_step", "denoise_step", "token_index"):
            if not np.array_equal(keys[col], plan.keys[col][pos:pos + b]):
                raise StoreError(f"{plan.store.root}: rows of {plan.site} changed while exporting (column {col!r} "
                                 f"differs at rows {pos}..{pos + b}); is a writer still appending?")
        keep = plan.keep[pos:pos + b]
        m = int(keep.sum())
        x[dest[start:start + m]] = batch[keep].reshape(m, -1)
        start += m
        pos += b
    if pos != len(plan.keep):
        raise StoreError(f"{plan.store.root}: streamed {pos} rows of {plan.site}, the manifest has {len(plan.keep)}")
    x.flush()
    del x


def _write_targets(plan: ExportPlan, tmp: pathlib.Path) -> dict:
    keys, labels = plan.kept_keys, plan.labels
    ep_ids, ep_keys = episode_keys_of_rows(keys)
    env_step = keys["env_step"].astype(np.int64)
    n = len(ep_ids)
    states = np.zeros((n, STATE_DIM), np.float32)
    task = np.zeros(n, np.int64)
    success = np.zeros(n, np.int64)
    prompts = {}
    for e, key in enumerate(ep_keys):
        rec = record_of(plan.rollouts, key, f"site {plan.site}")
        rows = ep_ids == e
        steps = env_step[rows]
        if steps.max() >= len(rec.states):
            raise JoinError(f"site {plan.site}: episode {key.stem} has rows at env_step {int(steps.max())}, but its "
                            f"record {rec.path} holds {len(rec.states)} states")
        states[rows] = rec.states[steps]
        task[rows] = key.task_id
        success[rows] = int(rec.success)
        prompts[str(e)] = rec.prompt
    np.save(tmp / "actions.npy", labels.predicted.astype(np.float32))
    np.save(tmp / "executed_actions.npy", labels.executed.astype(np.float32))
    np.save(tmp / "executed_valid.npy", labels.executed_valid)
    np.save(tmp / "states.npy", states)
    np.save(tmp / "gripper_closed.npy", (labels.predicted[:, 6] > 0).astype(np.int64))
    np.save(tmp / "task_id.npy", task)
    np.save(tmp / "success.npy", success)
    np.save(tmp / "groups.npy", ep_ids.astype(np.int64))
    write_json_atomic(tmp / "prompts.json", prompts, indent=1)
    return {"episodes": len(ep_keys), "episode_stems": [k.stem for k in ep_keys], "targets": list(TARGETS),
            "label_rule": labels.rule()}


def trajectories_from_export(export_dir: pathlib.Path, out_dir: pathlib.Path, *, verbose: bool = True) -> dict:
    """Geometry input from a last-denoising-step export: one point per policy query (mean over its action tokens).

    Writes ``T.npy`` (episodes, max queries, d; NaN rows pad shorter episodes), ``success.npy`` (episodes,) and
    ``trajectories.json`` ({episodes: [[run_id, suite, task_id, episode], ...], n_queries: [...], d}).
    Episodes are sorted by key; points by replan_index (a key join, never row order).
    """
    export_dir, out_dir = pathlib.Path(export_dir), pathlib.Path(out_dir)
    x = np.load(export_dir / "X.npy", mmap_mode="r")
    keys = np.load(export_dir / "keys.npz")
    success_path = export_dir / "success.npy"
    if not success_path.is_file():
        raise FileNotFoundError(f"{success_path} missing: export with --rollouts to get success flags")
    success = np.load(success_path)
    need = ("run_id", "suite", "task_id", "episode", "replan_index")
    missing = [k for k in need if k not in keys.files]
    if missing:
        raise KeyError(f"{export_dir / 'keys.npz'} lacks key columns {missing} (has {keys.files})")
    n = x.shape[0]
    if len(keys["run_id"]) != n or len(success) != n:
        raise ValueError(f"{export_dir}: X.npy has {n} rows, keys.npz {len(keys['run_id'])}, success.npy {len(success)}")
    if "denoise_step" in keys.files and np.unique(keys["denoise_step"]).size > 1:
        raise ValueError(f"{export_dir}: rows span denoising steps {np.unique(keys['denoise_step']).tolist()}; a "
                         "trajectory point must be one step (export with --denoise-step)")
    ep, episodes = episode_keys_of_rows({k: keys[k] for k in need[:4]})
    rep = keys["replan_index"].astype(np.int64)
    queries = [np.unique(rep[ep == j]) for j in range(len(episodes))]
    T = np.full((len(episodes), max(len(q) for q in queries), x.shape[1]), np.nan, dtype=np.float32)
    S = np.zeros(len(episodes), dtype=bool)
    for j, q in enumerate(queries):
        for t, r in enumerate(q):
            rows = np.flatnonzero((ep == j) & (rep == r))
            T[j, t] = np.asarray(x[rows], dtype=np.float64).mean(axis=0)
        S[j] = bool(success[ep == j][0])
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "T.npy", T)
    np.save(out_dir / "success.npy", S)
    info = {"episodes": [[k.run_id, k.suite, k.task_id, k.episode] for k in episodes],
            "n_queries": [int(len(q)) for q in queries], "d": int(x.shape[1])}
    write_json_atomic(out_dir / "trajectories.json", info, indent=1)
    if verbose:
        print(json.dumps({"T": list(T.shape), "successes": int(S.sum())}))
    return info
