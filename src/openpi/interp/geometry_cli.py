"""Representation-trajectory geometry: step distances and curvature angles, split by success vs failure.

    python geometry.py --trajectories T.npy --success S.npy --out out/geometry
    python geometry.py --trajectories T_layers.npy --axes layer time --success S.npy --out out/geometry
    python geometry.py --trajectories T_denoise.npy --axes time denoise --out out/geometry_denoise

T.npy: (n_traj, n_points, d) -> geometry along that axis (name it with ``--axes``, default ``time``), or
(n_traj, n_a, n_b, d) -> geometry along b for every a AND along a for every b (e.g. ``--axes layer time``:
over env time per layer, and over layers per time step; ``--axes time denoise``: over denoising steps per
env step). Trajectories of different lengths: pad with whole-vector NaN. S.npy: (n_traj,) bool/0-1.
The array is memory-mapped and read one slice at a time.

Writes DIR/geometry.json (schema: openpi.interp.geometry and docs/probes.md) and plots
``<along>_by_<per>.png`` (overall mean and 95% CI vs the other axis) and ``<along>_profiles.png``
(per-position curves). Definitions: step distance ||z_{i+1} - z_i||, curvature = angle between consecutive
steps in degrees; angles next to a near-zero step are undefined (null, counted, excluded from means).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from openpi.interp import geometry as G
from openpi.shared.io import write_json_atomic


@dataclasses.dataclass
class Args:
    trajectories: str
    """(n_traj, n_points, d) or (n_traj, n_a, n_b, d) .npy of representations."""
    out: str = "out/geometry"
    """output folder."""
    success: str | None = None
    """(n_traj,) .npy success flags; adds success / failure groups and their difference."""
    axes: tuple[str, ...] = ("time",)
    """names of the middle axes: one for 3-D input, two for 4-D (the default becomes ``layer time`` for 4-D)."""
    n_boot: int = 1000
    """bootstrap resamples (over trajectories) for the 95% intervals."""
    min_step_rel: float = 1e-5
    """a step shorter than min_step_rel x median ||z|| (or --min-step-abs) has no direction."""
    min_step_abs: float = 0.0
    seed: int = 0
    progress: bool = True


def main(args: Args) -> int:
    if not os.path.isfile(args.trajectories):
        raise FileNotFoundError(f"trajectories file {args.trajectories} not found")
    T = np.load(args.trajectories, mmap_mode="r", allow_pickle=False)
    if T.ndim not in (3, 4):
        raise G.GeometryInputError(f"trajectories {args.trajectories} must be (n_traj, n_points, d) or (n_traj, n_a, n_b, d); found {T.shape}")
    axes = args.axes if not (T.ndim == 4 and args.axes == ("time",)) else ("layer", "time")
    if len(axes) != T.ndim - 2:
        raise G.GeometryInputError(f"trajectories {args.trajectories} have shape {T.shape}: --axes needs {T.ndim - 2} names, got {list(axes)}")
    success = None
    if args.success:
        if not os.path.isfile(args.success):
            raise FileNotFoundError(f"success file {args.success} not found")
        success = np.load(args.success, allow_pickle=False)
        if success.shape != (T.shape[0],):
            raise G.GeometryInputError(f"success {args.success} has shape {success.shape}; expected ({T.shape[0]},), one flag per trajectory")
        if not np.isin(success.astype(np.float64), (0.0, 1.0)).all():
            raise G.GeometryInputError(f"success {args.success} must hold booleans or 0/1")
    analyses = G.analyse_array(T, success, axes, n_boot=args.n_boot, seed=args.seed, min_step_rel=args.min_step_rel, min_step_abs=args.min_step_abs, progress=args.progress)
    os.makedirs(args.out, exist_ok=True)
    plots = []
    if T.ndim == 3:
        name = f"{axes[0]}_profiles.png"
        G.plot_profiles(analyses, os.path.join(args.out, name))
        plots.append(name)
    else:
        for along, per in ((axes[1], axes[0]), (axes[0], axes[1])):
            sel = [a for a in analyses if a["along"] == along]
            G.plot_summary_by_per(sel, os.path.join(args.out, f"{along}_by_{per}.png"))
            G.plot_profiles(sel, os.path.join(args.out, f"{along}_profiles.png"))
            plots += [f"{along}_by_{per}.png", f"{along}_profiles.png"]
    result = {
        "schema": "vla-interp/geometry/v1",
        "input": {"file": args.trajectories, "shape": list(T.shape), "axes": list(axes), "success_file": args.success,
                  "n_success": None if success is None else int(np.sum(success.astype(bool)))},
        "rule": {"curvature": "2*atan2(|a-b|, |a+b|) of unit steps, degrees",
                 "undefined": "angle is null when an adjacent step <= min_step = max(min_step_abs, min_step_rel * median ||z||)",
                 "interval": f"95% percentile cluster bootstrap over trajectories, n_boot={args.n_boot}",
                 "min_step_rel": args.min_step_rel, "min_step_abs": args.min_step_abs},
        "analyses": analyses,
        "plots": plots,
    }
    write_json_atomic(os.path.join(args.out, "geometry.json"), result)
    first = analyses[0]["groups"]["all"]
    print(json.dumps({"out": os.path.join(args.out, "geometry.json"), "n_analyses": len(analyses),
                      "first": {"along": analyses[0]["along"], "curvature_deg_mean": first["curvature_deg"]["mean"],
                                "step_distance_mean": first["step_distance"]["mean"]}}))
    return 0
