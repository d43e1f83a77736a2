"""PCA of executed (or any per-row) actions, coloured by suite / task / success; library side of action_pca.py.

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
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from openpi.shared.io import write_json_atomic
from openpi.shared.records import ACTION_DIM, ACTION_NAMES, EpisodeRecord, RecordError, RolloutDir

REQUIRED_FIELDS = ("success",)  # besides what the record schema requires: PCA plots are coloured by it


class ActionInputError(ValueError):
    """Bad rollout record or action array; the message names the file / field / shape."""


def load_records(rollouts: str | os.PathLike) -> tuple[list[EpisodeRecord], list[str]]:
    """Episode records of a rollout folder (the LIBERO client's ``--out-dir``), read with the record schema.

    Returns (records with at least one executed step, stems of the records skipped because the episode executed no
    step, e.g. a policy error at the first query). Records without ``success`` or with non-finite actions are
    errors naming the file.
    """
    try:
        folder = RolloutDir(rollouts)
        records = list(folder.records())
    except RecordError as exc:
        raise ActionInputError(str(exc)) from None
    if not records:
        raise ActionInputError(f"no episode records in {folder.episodes_dir}")
    kept, empty = [], []
    for rec in records:
        missing = [k for k in REQUIRED_FIELDS if k not in rec.raw]
        if missing:
            raise ActionInputError(f"{rec.path}: missing fields {missing}")
        if not np.isfinite(rec.actions).all():
            raise ActionInputError(f"{rec.path}: 'actions' contains NaN/inf at row "
                                   f"{int(np.argwhere(~np.isfinite(rec.actions))[0, 0])}")
        (kept if len(rec.actions) else empty).append(rec if len(rec.actions) else rec.key.stem)
    if not kept:
        raise ActionInputError(f"no episode in {folder.episodes_dir} executed a step ({len(empty)} empty records)")
    return kept, empty


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


def table_from_records(records: Sequence[EpisodeRecord]) -> ActionTable:
    """Executed actions of every step of every episode, labelled by suite, task and success."""
    acts, ep, step, suite, task, succ, ids = [], [], [], [], [], [], []
    for i, r in enumerate(records):
        T = len(r.actions)
        acts.append(r.actions)
        ep.append(np.full(T, i))
        step.append(np.arange(T))
        suite += [r.key.suite] * T
        task += [f"{r.key.suite}/{r.key.task_id}"] * T
        succ.append(np.full(T, r.success))
        ids.append(r.key.stem)
    return ActionTable(np.concatenate(acts), np.concatenate(ep), np.concatenate(step), np.asarray(suite),
                       np.asarray(task), np.concatenate(succ), ids)


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


# ------------------------------------------------------------------------------------------------- run


@dataclasses.dataclass
class PcaArgs:
    """Command line of action_pca.py (exactly one of --rollouts / --actions)."""

    out: str = "out/action_pca"
    """output folder."""
    rollouts: str | None = None
    """the LIBERO client's output folder (its --out-dir, holding episodes/): executed actions of every step."""
    actions: str | None = None
    """(n, D) .npy actions (instead of --rollouts), e.g. an export's actions.npy."""
    episode_ids: str | None = None
    """(n,) .npy episode id per row (for trajectories in PC space), e.g. an export's groups.npy."""
    suite_labels: str | None = None
    task_labels: str | None = None
    success_labels: str | None = None
    dim_names: tuple[str, ...] = ()
    """names of the action dimensions (default: LIBERO's dx dy dz droll dpitch dyaw gripper for 7-D)."""
    no_standardize: bool = False
    """PCA on raw (centred) actions instead of per-dimension z-scores."""
    max_points: int = 20000
    """scatter plots subsample to this many rows (the PCA uses all rows)."""
    max_episodes: int = 12
    """episodes drawn in trajectories_pc.png."""
    seed: int = 0


def _optional_array(path: str | None, what: str) -> np.ndarray | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path} not found")
    return np.load(path, allow_pickle=False)


def run(args: PcaArgs) -> dict[str, Any]:
    """Validate the inputs, then write action_pca.json, the scores and the plots into ``args.out``."""
    if (args.rollouts is None) == (args.actions is None):
        raise ValueError("give exactly one of --rollouts or --actions")
    skipped: list[str] = []
    if args.rollouts is not None:
        records, skipped = load_records(args.rollouts)
        table = table_from_records(records)
    else:
        table = table_from_arrays(_optional_array(args.actions, "actions"),
                                  _optional_array(args.episode_ids, "episode ids"),
                                  _optional_array(args.suite_labels, "suite labels"),
                                  _optional_array(args.task_labels, "task labels"),
                                  _optional_array(args.success_labels, "success labels"))
    D = table.actions.shape[1]
    names = list(args.dim_names) or (list(ACTION_NAMES) if D == ACTION_DIM else [f"dim{j}" for j in range(D)])
    if len(names) != D:
        raise ValueError(f"--dim-names gives {len(names)} names for {D} action dimensions")
    res = pca(table.actions, standardize=not args.no_standardize)
    os.makedirs(args.out, exist_ok=True)
    plots = ["explained_variance.png", "trajectories_pc.png"]
    plot_explained(res, os.path.join(args.out, "explained_variance.png"))
    plot_trajectories(res, table, os.path.join(args.out, "trajectories_pc.png"), args.max_episodes, args.seed)
    for label, values in (("suite", table.suite), ("task", table.task), ("success", table.success)):
        for dims in (2, 3):
            name = f"pca{dims}d_by_{label}.png"
            plot_scatter(res.scores, values.astype(str), f"actions in PC space, coloured by {label}",
                         os.path.join(args.out, name), dims, args.max_points, args.seed)
            plots.append(name)
    np.save(os.path.join(args.out, "action_pca_scores.npy"), res.scores.astype(np.float32))
    out = {**to_json(res, table, names, standardized=not args.no_standardize), "plots": plots,
           "source": args.rollouts or args.actions, "skipped_empty_episodes": skipped}
    write_json_atomic(os.path.join(args.out, "action_pca.json"), out)
    print(json.dumps({"out": os.path.join(args.out, "action_pca.json"), "n_rows": out["n_rows"],
                      "cumulative_explained_variance_ratio": [round(v, 4) for v in
                                                              out["cumulative_explained_variance_ratio"]]}))
    return out
