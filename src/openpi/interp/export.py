"""Export one site of an activation store to plain arrays, joined by key with the rollout records.

Why: every analysis script also takes plain ``.npy`` inputs (so it serves any model); this is the bridge from a
recorded LIBERO run. Rows are streamed into a memory-mapped ``X.npy``, so memory stays bounded. Targets are looked
up by (run_id, suite, task_id, episode) -> episode JSON and ``env_step`` -> index into that episode's arrays:
never by row position.

Outputs in ``out``: ``X.npy`` (rows, d), ``keys.npz`` (the store's key columns), and with ``episodes_dir``:
``actions.npy`` (rows, 7) executed action at the row's env step, ``states.npy`` (rows, 8), ``gripper_closed.npy``
(rows,) int (executed gripper command > 0), ``task_id.npy``, ``success.npy`` (rows,) int, ``groups.npy`` (rows,)
int episode index (for grouped cross-validation), ``prompts.json`` (one per group).
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
from tqdm import tqdm

from openpi.interp.store import ActivationStore, Filter
from openpi.shared.io import read_json, write_json_atomic


def _episode_index(episodes_dir: pathlib.Path) -> dict[tuple, dict]:
    index = {}
    for path in sorted((episodes_dir / "episodes").glob("*.json")):
        rec = read_json(path, "episode record")
        index[(rec["run_id"], rec["suite"], int(rec["task_id"]), int(rec["episode"]))] = rec
    if not index:
        raise FileNotFoundError(f"no episode records in {episodes_dir / 'episodes'} (expected LIBERO client output)")
    return index


def export_site(store_dir: str | pathlib.Path, site: str, out: str | pathlib.Path, *, where: Filter = None,
                episodes_dir: str | pathlib.Path | None = None, batch_size: int = 4096) -> dict:
    store = ActivationStore(store_dir)
    keys = store.keys(site, where)
    n = len(keys["run_id"])
    if n == 0:
        raise ValueError(f"no rows of site {site!r} in {store_dir} match {where}")
    spec = store.sites[site]
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    width = int(np.prod(spec["row_shape"]))
    x = np.lib.format.open_memmap(out / "X.npy", mode="w+", dtype=np.float32, shape=(n, width))
    start = 0
    for batch, _ in tqdm(store.iter_batches(site, batch_size, where=where), desc=f"export {site}", unit="batch"):
        x[start:start + len(batch)] = batch.reshape(len(batch), -1)
        start += len(batch)
    x.flush()
    np.savez(out / "keys.npz", **{k: v for k, v in keys.items() if k != "shard"})
    summary = {"site": site, "rows": n, "width": width, "row_shape": spec["row_shape"]}
    if episodes_dir is not None:
        summary.update(_export_targets(pathlib.Path(episodes_dir), keys, out))
    write_json_atomic(out / "export.json", summary, indent=1)
    return summary


def _export_targets(episodes_dir: pathlib.Path, keys: dict[str, np.ndarray], out: pathlib.Path) -> dict:
    index = _episode_index(episodes_dir)
    n = len(keys["run_id"])
    actions = np.zeros((n, 7), np.float32)
    states = np.zeros((n, 8), np.float32)
    task = np.zeros(n, np.int64)
    success = np.zeros(n, np.int64)
    groups = np.zeros(n, np.int64)
    group_of: dict[tuple, int] = {}
    for i in range(n):
        key = (str(keys["run_id"][i]), str(keys["suite"][i]), int(keys["task_id"][i]), int(keys["episode"][i]))
        rec = index.get(key)
        if rec is None:
            raise KeyError(f"store row {i} is keyed {key} but no episode record with that (run_id, suite, task_id, "
                           f"episode) is in {episodes_dir / 'episodes'}")
        step = int(keys["env_step"][i])
        if not 0 <= step < len(rec["actions"]):
            raise KeyError(f"store row {i} ({key}) has env_step {step}, but the episode executed "
                           f"{len(rec['actions'])} steps")
        actions[i] = rec["actions"][step]
        states[i] = rec["states"][step]
        task[i] = rec["task_id"]
        success[i] = int(bool(rec["success"]))
        groups[i] = group_of.setdefault(key, len(group_of))
    np.save(out / "actions.npy", actions)
    np.save(out / "states.npy", states)
    np.save(out / "gripper_closed.npy", (actions[:, 6] > 0).astype(np.int64))
    np.save(out / "task_id.npy", task)
    np.save(out / "success.npy", success)
    np.save(out / "groups.npy", groups)
    prompts = {str(g): index[k]["prompt"] for k, g in group_of.items()}
    write_json_atomic(out / "prompts.json", prompts, indent=1)
    return {"episodes": len(group_of), "targets": ["actions", "states", "gripper_closed", "task_id", "success"]}


def trajectories_from_export(export_dir: pathlib.Path, out_dir: pathlib.Path) -> dict:
    """Geometry input from a last-denoising-step export: one point per policy query (mean over its action tokens).

    Writes ``T.npy`` (episodes, max queries, d; NaN rows pad shorter episodes), ``success.npy`` (episodes,) and
    ``trajectories.json`` ({episodes: [[run_id, suite, task_id, episode], ...], n_queries: [...], d}).
    Episodes are sorted by key; points by replan_index (a key join, never row order).
    """
    x = np.load(export_dir / "X.npy", mmap_mode="r")
    keys = np.load(export_dir / "keys.npz")
    success_path = export_dir / "success.npy"
    if not success_path.is_file():
        raise FileNotFoundError(f"{success_path} missing: export with --episodes-dir to get success flags")
    success = np.load(success_path)
    need = ("run_id", "suite", "task_id", "episode", "replan_index")
    missing = [k for k in need if k not in keys.files]
    if missing:
        raise KeyError(f"{export_dir / 'keys.npz'} lacks key columns {missing} (has {keys.files})")
    n = x.shape[0]
    if len(keys["run_id"]) != n or len(success) != n:
        raise ValueError(f"{export_dir}: X.npy has {n} rows, keys.npz {len(keys['run_id'])}, success.npy {len(success)}")
    ep_key = [tuple(str(keys[k][i]) if k in ("run_id", "suite") else int(keys[k][i]) for k in need[:4]) for i in range(n)]
    episodes = sorted(set(ep_key))
    index = {e: j for j, e in enumerate(episodes)}
    ep = np.array([index[e] for e in ep_key])
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
    info = {"episodes": [list(e) for e in episodes], "n_queries": [int(len(q)) for q in queries], "d": int(x.shape[1])}
    write_json_atomic(out_dir / "trajectories.json", info, indent=1)
    print(json.dumps({"T": list(T.shape), "successes": int(S.sum())}))
    return info
