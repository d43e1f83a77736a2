"""PCA of executed actions, and the reader for rollout episode records.

Why: the 7-D LIBERO action (delta eef position 3, delta axis-angle rotation 3, gripper 1) mixes units;
PCA of the standardised actions shows how many independent motion modes a policy uses and whether suites,
tasks or successful vs failed episodes occupy different regions.

Method: each action dimension is standardised with its mean and population std over all rows (a dimension
with zero variance keeps scale 1 and is listed in ``constant_dims``); PCA is the SVD of the standardised
matrix, so ``explained_variance[k] = s_k^2 / n`` and ratios are over the total standardised variance.
Components are unit vectors in the standardised space, sign-fixed so the largest-|loading| entry is positive.

JSON (``action_pca.json``)::

    {"schema": "vla-interp/action_pca/v1", "n_rows": int, "n_episodes": int, "standardized": bool,
     "dim_names": [...], "mean": [7], "scale": [7], "constant_dims": [names],
     "components": [[7] per PC], "explained_variance": [...], "explained_variance_ratio": [...],
     "cumulative_explained_variance_ratio": [...], "n_components_90": int,
     "label_counts": {"suite": {...}, "task": {...}, "success": {...}}}
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from openpi.shared.io import read_json

ACTION_DIM_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
REQUIRED_FIELDS = ("run_id", "suite", "task_id", "episode", "success", "actions", "states")


class ActionInputError(ValueError):
    """Bad rollout record or action array; the message names the file / field / shape."""


def load_episode_records(directory: str) -> list[dict[str, Any]]:
    """Read ``<dir>/episodes/*.json`` (or ``<dir>/*.json``) rollout records and validate their fields.

    Checks: required fields present, ``actions`` is T x 7, ``states`` is T x 8 with the same T.
    """
    sub = os.path.join(directory, "episodes")
    root = sub if os.path.isdir(sub) else directory
    if not os.path.isdir(root):
        raise ActionInputError(f"episodes directory {directory!r} does not exist")
    paths = sorted(glob.glob(os.path.join(root, "*.json")))
    if not paths:
        raise ActionInputError(f"no episode JSON files in {root!r}")
    records = []
    for p in paths:
        rec = read_json(p, "episode record", error=ActionInputError)
        missing = [k for k in REQUIRED_FIELDS if k not in rec]
        if missing:
            raise ActionInputError(f"{p}: missing fields {missing}")
        actions = np.asarray(rec["actions"], np.float64)
        states = np.asarray(rec["states"], np.float64)
        if actions.ndim != 2 or actions.shape[1] != 7 or len(actions) == 0:
            raise ActionInputError(f"{p}: 'actions' must be T x 7 with T >= 1; found shape {actions.shape}")
        if states.ndim != 2 or states.shape[1] != 8 or len(states) != len(actions):
            raise ActionInputError(f"{p}: 'states' must be T x 8 with T = {len(actions)} (as actions); found shape {states.shape}")
        if not np.isfinite(actions).all():
            raise ActionInputError(f"{p}: 'actions' contains NaN/inf at row {int(np.argwhere(~np.isfinite(actions))[0, 0])}")
        rec = dict(rec, actions=actions, states=states, _path=p)
        records.append(rec)
    return records


@dataclasses.dataclass
class ActionTable:
    """Actions stacked over episodes with per-row labels."""

    actions: np.ndarray  # (n, 7)
    episode: np.ndarray  # (n,) episode index into ``episode_ids``
    step: np.ndarray  # (n,) env step within the episode
    suite: np.ndarray  # (n,) str
    task: np.ndarray  # (n,) str (suite/task_id: task ids repeat across suites)
    success: np.ndarray  # (n,) bool or None-filled object when unknown
    episode_ids: list[str]


def table_from_records(records: Sequence[dict[str, Any]]) -> ActionTable:
    acts, ep, step, suite, task, succ, ids = [], [], [], [], [], [], []
    for i, r in enumerate(records):
        T = len(r["actions"])
        acts.append(np.asarray(r["actions"], np.float64))
        ep.append(np.full(T, i))
        step.append(np.arange(T))
        suite += [str(r["suite"])] * T
        task += [f"{r['suite']}/{r['task_id']}"] * T
        succ.append(np.full(T, bool(r["success"])))
        ids.append(f"{r['run_id']}|{r['suite']}|{r['task_id']}|{r['episode']}")
    return ActionTable(np.concatenate(acts), np.concatenate(ep), np.concatenate(step), np.asarray(suite), np.asarray(task), np.concatenate(succ), ids)


def table_from_arrays(actions: np.ndarray, episode: np.ndarray | None = None, suite: np.ndarray | None = None, task: np.ndarray | None = None, success: np.ndarray | None = None) -> ActionTable:
    """Build a table from row-aligned arrays (labels optional, each one value per row)."""
    actions = np.asarray(actions, np.float64)
    if actions.ndim != 2:
        raise ActionInputError(f"actions must be (n, dims); found shape {actions.shape}")
    n = len(actions)
    if not np.isfinite(actions).all():
        raise ActionInputError(f"actions contain NaN/inf at row {int(np.argwhere(~np.isfinite(actions))[0, 0])}")

    def col(v: np.ndarray | None, name: str, default: Any) -> np.ndarray:
        if v is None:
            return np.full(n, default)
        v = np.asarray(v)
        if v.shape != (n,):
            raise ActionInputError(f"{name} labels must have shape ({n},) to match actions; found {v.shape}")
        return v

    ep = col(episode, "episode", 0)
    _, ep_idx = np.unique(ep, return_inverse=True)
    step = np.zeros(n, np.int64)
    for e in np.unique(ep_idx):
        rows = np.flatnonzero(ep_idx == e)
        step[rows] = np.arange(len(rows))
    ids = [str(v) for v in np.unique(ep)]
    return ActionTable(actions, ep_idx, step, col(suite, "suite", "?").astype(str), col(task, "task", "?").astype(str), col(success, "success", False).astype(bool) if success is not None else np.full(n, None, object), ids)


@dataclasses.dataclass
class PcaResult:
    mean: np.ndarray
    scale: np.ndarray
    constant_dims: list[int]
    components: np.ndarray  # (k, D)
    explained_variance: np.ndarray  # (k,)
    explained_variance_ratio: np.ndarray  # (k,)
    scores: np.ndarray  # (n, k)

    @property
    def cumulative(self) -> np.ndarray:
        return np.cumsum(self.explained_variance_ratio)


def pca(actions: np.ndarray, standardize: bool = True) -> PcaResult:
    """PCA of (n, D) rows via SVD of the (standardised) centred matrix."""
    A = np.asarray(actions, np.float64)
    if A.ndim != 2 or len(A) < 2:
        raise ActionInputError(f"PCA needs at least 2 rows of (n, D) actions; found shape {A.shape}")
    mean = A.mean(0)
    std = A.std(0)
    const = [int(j) for j in np.flatnonzero(std <= 1e-12 * max(float(np.abs(A).max()), 1e-300))]
    scale = np.where(std > 0, std, 1.0) if standardize else np.ones(A.shape[1])
    scale[const] = 1.0
    Z = (A - mean) / scale
    _, s, Vt = np.linalg.svd(Z, full_matrices=False)
    var = s**2 / len(A)
    total = np.sum(Z**2) / len(A)
    ratio = var / total if total > 0 else np.zeros_like(var)
    signs = np.sign(Vt[np.arange(len(Vt)), np.argmax(np.abs(Vt), 1)])
    Vt = Vt * signs[:, None]
    return PcaResult(mean, scale, const, Vt, var, ratio, Z @ Vt.T)


def to_json(res: PcaResult, table: ActionTable, dim_names: Sequence[str], standardized: bool = True) -> dict[str, Any]:
    cum = res.cumulative

    def counts(v: np.ndarray) -> dict[str, int]:
        u, c = np.unique(v.astype(str), return_counts=True)
        return {str(a): int(b) for a, b in zip(u, c)}

    return {
        "schema": "vla-interp/action_pca/v1",
        "n_rows": int(len(table.actions)),
        "n_episodes": len(table.episode_ids),
        "dim_names": list(dim_names),
        "standardized": bool(standardized),
        "mean": res.mean.tolist(),
        "scale": res.scale.tolist(),
        "constant_dims": [dim_names[j] for j in res.constant_dims],
        "components": res.components.tolist(),
        "explained_variance": res.explained_variance.tolist(),
        "explained_variance_ratio": res.explained_variance_ratio.tolist(),
        "cumulative_explained_variance_ratio": cum.tolist(),
        "n_components_90": int(np.searchsorted(cum, 0.9 - 1e-12) + 1),
        "label_counts": {"suite": counts(table.suite), "task": counts(table.task), "success": counts(table.success)},
    }


# ------------------------------------------------------------------------------------------------- plots


def _color_codes(labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    names, codes = np.unique(labels.astype(str), return_inverse=True)
    return codes, [str(n) for n in names]


def plot_scatter(scores: np.ndarray, labels: np.ndarray, title: str, path: str, dims: int = 2, max_points: int = 20000, seed: int = 0) -> None:
    """2-D or 3-D scatter of PC scores coloured by a label column (subsampled to ``max_points``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(scores)
    idx = np.random.default_rng(seed).choice(n, max_points, replace=False) if n > max_points else np.arange(n)
    codes, names = _color_codes(labels[idx])
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "viridis")
    k = scores.shape[1]
    fig = plt.figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot(111, projection="3d" if dims == 3 and k >= 3 else None)
    for c, name in enumerate(names):
        sel = idx[codes == c]
        color = cmap(c / max(len(names) - 1, 1)) if len(names) > 20 else cmap(c)
        pts = [scores[sel, 0], scores[sel, 1]] + ([scores[sel, 2]] if dims == 3 and k >= 3 else [])
        ax.scatter(*pts, s=3, alpha=0.5, color=color, label=name if len(names) <= 20 else None)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    if dims == 3 and k >= 3:
        ax.set_zlabel("PC3")
    if len(names) <= 20:
        ax.legend(markerscale=4, fontsize=7, loc="best")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_explained(res: PcaResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = np.arange(1, len(res.explained_variance_ratio) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(k, res.explained_variance_ratio, alpha=0.6, label="per component")
    ax.plot(k, res.cumulative, "o-", color="k", label="cumulative")
    ax.axhline(0.9, ls="--", color="grey", lw=1)
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trajectories(res: PcaResult, table: ActionTable, path: str, max_episodes: int = 12, seed: int = 0) -> None:
    """Episodes as lines in (PC1, PC2), green = success, red = failure, grey = unknown; dot marks the start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = np.unique(table.episode)
    if len(eps) > max_episodes:
        eps = np.random.default_rng(seed).choice(eps, max_episodes, replace=False)
    fig, ax = plt.subplots(figsize=(6, 5))
    for e in eps:
        rows = np.flatnonzero(table.episode == e)
        rows = rows[np.argsort(table.step[rows])]
        s = table.success[rows[0]]
        color = "grey" if s is None else ("tab:green" if s else "tab:red")
        ax.plot(res.scores[rows, 0], res.scores[rows, 1], lw=0.8, alpha=0.8, color=color)
        ax.plot(res.scores[rows[0], 0], res.scores[rows[0], 1], "o", ms=3, color=color)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.set_title(f"{len(eps)} episodes in PC space (green success, red failure)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
