"""PCA of executed actions (standardised per dimension), coloured by suite / task / success.

    python action_pca.py --episodes-dir out/rollouts --out out/action_pca
    python action_pca.py --actions A.npy --episode-ids E.npy --suite-labels S.npy --task-labels T.npy \\
        --success-labels OK.npy --out out/action_pca

``--episodes-dir`` reads ``DIR/episodes/*.json`` (or ``DIR/*.json``) rollout records (docs/conventions.md:
``actions`` T x 7, ``states`` T x 8, ``success``, ``suite``, ``task_id``, ...). ``--actions`` takes an (n, D)
array with optional per-row label arrays.

Writes DIR/action_pca.json (schema: openpi.interp.action_pca and docs/probes.md), DIR/action_pca_scores.npy
((n, k) PC scores, rows in input order), plots ``explained_variance.png``, ``pca2d_by_<label>.png``,
``pca3d_by_<label>.png`` for label in suite / task / success, and ``trajectories_pc.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import tyro

from openpi.interp import action_pca as A
from openpi.interp.probes import write_json_atomic


@dataclasses.dataclass
class Args:
    out: str = "out/action_pca"
    """output folder."""
    episodes_dir: str | None = None
    """rollout output folder holding episodes/*.json."""
    actions: str | None = None
    """(n, D) .npy actions (instead of --episodes-dir)."""
    episode_ids: str | None = None
    """(n,) .npy episode id per row (for trajectories in PC space)."""
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


def _opt(path: str | None, what: str) -> np.ndarray | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path} not found")
    return np.load(path, allow_pickle=False)


def main(args: Args) -> int:
    if (args.episodes_dir is None) == (args.actions is None):
        raise ValueError("give exactly one of --episodes-dir or --actions")
    if args.episodes_dir is not None:
        table = A.table_from_records(A.load_episode_records(args.episodes_dir))
    else:
        table = A.table_from_arrays(_opt(args.actions, "actions"), _opt(args.episode_ids, "episode ids"), _opt(args.suite_labels, "suite labels"),
                                    _opt(args.task_labels, "task labels"), _opt(args.success_labels, "success labels"))
    D = table.actions.shape[1]
    names = list(args.dim_names) or (list(A.ACTION_DIM_NAMES) if D == 7 else [f"dim{j}" for j in range(D)])
    if len(names) != D:
        raise ValueError(f"--dim-names gives {len(names)} names for {D} action dimensions")
    res = A.pca(table.actions, standardize=not args.no_standardize)
    os.makedirs(args.out, exist_ok=True)
    plots = ["explained_variance.png", "trajectories_pc.png"]
    A.plot_explained(res, os.path.join(args.out, "explained_variance.png"))
    A.plot_trajectories(res, table, os.path.join(args.out, "trajectories_pc.png"), args.max_episodes, args.seed)
    for label, values in (("suite", table.suite), ("task", table.task), ("success", table.success)):
        for dims in (2, 3):
            name = f"pca{dims}d_by_{label}.png"
            A.plot_scatter(res.scores, values.astype(str), f"actions in PC space, coloured by {label}", os.path.join(args.out, name), dims, args.max_points, args.seed)
            plots.append(name)
    np.save(os.path.join(args.out, "action_pca_scores.npy"), res.scores.astype(np.float32))
    out = {**A.to_json(res, table, names, standardized=not args.no_standardize), "plots": plots, "source": args.episodes_dir or args.actions}
    write_json_atomic(os.path.join(args.out, "action_pca.json"), out)
    print(json.dumps({"out": os.path.join(args.out, "action_pca.json"), "n_rows": out["n_rows"],
                      "cumulative_explained_variance_ratio": [round(v, 4) for v in out["cumulative_explained_variance_ratio"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
