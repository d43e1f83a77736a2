"""Geometry of representation trajectories: step distances and curvature angles along a sequence.

Why: how far and how sharply a representation turns between consecutive env steps, layers or denoising
steps tells whether the policy's internal state moves smoothly, and whether successful and failed
episodes differ. A sequence z_0..z_{N-1} (vectors in R^d) gives

* step distance      ``dist_i = ||z_{i+1} - z_i||``                          (i = 0..N-2)
* relative distance  ``rel_i = dist_i / ((||z_i|| + ||z_{i+1}||) / 2)``    (comparable across layers)
* curvature angle    ``angle_i = angle(v_i, v_{i+1})`` in degrees, v_i = z_{i+1} - z_i (i = 0..N-3),
  computed as ``2 * atan2(||a - b||, ||a + b||)`` with a, b the unit steps (stable at 0 and 180 degrees;
  ``arccos`` of a dot product loses ~1e-3 degree near 0).

Undefined angles: when either step has norm <= ``min_step`` the direction does not exist; the angle is NaN
(JSON null), excluded from means and counted in ``n_undefined`` (it is NOT reported as 90 degrees, which is
what a normalised zero vector would give). ``min_step = max(min_step_abs, min_step_rel * median ||z||)``
with the median over all valid points of the call.

Padding: trajectories of different lengths may be padded with whole-vector NaN points (every component NaN);
steps touching a padded point are missing (not undefined, not counted). A vector with only some NaN
components is an input error.

Summaries (per group: all / success / failure): pooled mean of the defined values and a 95% cluster
bootstrap interval (trajectories resampled with replacement, ``n_boot`` draws, percentile interval), both
overall and per position along the sequence; ``difference`` = success minus failure with a bootstrap interval
(groups resampled independently).

JSON (``geometry.json``) -- see docs/probes.md for the full schema::

    {"schema": "vla-interp/geometry/v1", "input": {...}, "rule": {...},
     "analyses": [{"along": str, "per": str | null, "per_index": int | null, "min_step": float,
                   "groups": {"all" | "success" | "failure": {"n_trajectories": int,
                       "step_distance" | "relative_step_distance" | "curvature_deg":
                           {"mean", "ci95": [lo, hi], "n_values", "n_undefined", "n_missing",
                            "by_position": {"mean": [...], "ci95_low": [...], "ci95_high": [...], "n": [...]}}}},
                   "difference": {metric: {"mean", "ci95"}} | null}]}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from openpi.shared.io import finite_float

METRICS = ("step_distance", "relative_step_distance", "curvature_deg")


class GeometryInputError(ValueError):
    """Bad trajectory input; the message names the array, shape or position."""


@dataclasses.dataclass
class StepGeometry:
    """Per-trajectory metrics; NaN marks undefined (``undefined``) or missing (padding) entries."""

    step_distance: np.ndarray  # (..., N-1)
    relative_step_distance: np.ndarray  # (..., N-1)
    curvature_deg: np.ndarray  # (..., N-2)
    undefined: np.ndarray  # (..., N-2) bool: angle undefined because a step is near zero
    missing_angle: np.ndarray  # (..., N-2) bool: angle touches a padded point
    missing_step: np.ndarray  # (..., N-1) bool
    min_step: float


def check_points(Z: np.ndarray, name: str = "trajectories") -> np.ndarray:
    """Return a bool mask of padded (all-NaN) points; raise on partial NaN or inf."""
    Z = np.asarray(Z)
    if Z.ndim < 2:
        raise GeometryInputError(f"{name} must have shape (..., n_points, d); found {Z.shape}")
    if not np.issubdtype(Z.dtype, np.floating):
        raise GeometryInputError(f"{name} must be floating point; found dtype {Z.dtype}")
    nan = np.isnan(Z)
    pad = nan.all(-1)
    partial = nan.any(-1) & ~pad
    if partial.any():
        where = tuple(int(i) for i in np.argwhere(partial)[0])
        raise GeometryInputError(f"{name} has a vector with only some components NaN at index {where}; pad whole vectors or fix the data")
    if np.isinf(Z).any():
        where = tuple(int(i) for i in np.argwhere(np.isinf(Z).any(-1))[0])
        raise GeometryInputError(f"{name} contains inf at index {where}")
    return pad


def angle_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees between vectors along the last axis (no guard: callers mask near-zero vectors)."""
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        ua, ub = a / na, b / nb
    return np.degrees(2.0 * np.arctan2(np.linalg.norm(ua - ub, axis=-1), np.linalg.norm(ua + ub, axis=-1)))


def step_geometry(Z: np.ndarray, min_step_rel: float = 1e-5, min_step_abs: float = 0.0) -> StepGeometry:
    """Distances and curvature along axis -2 of ``Z`` (..., N, d)."""
    pad = check_points(Z)
    Z = np.asarray(Z, np.float64)
    if Z.shape[-2] < 2:
        raise GeometryInputError(f"need at least 2 points per sequence for a step; found {Z.shape[-2]}")
    norms = np.linalg.norm(np.where(pad[..., None], 0.0, Z), axis=-1)
    valid_norms = norms[~pad]
    if valid_norms.size == 0:
        raise GeometryInputError("every point is padding (NaN)")
    min_step = max(float(min_step_abs), float(min_step_rel) * float(np.median(valid_norms)))
    steps = np.diff(Z, axis=-2)
    missing_step = pad[..., 1:] | pad[..., :-1]
    dist = np.linalg.norm(np.where(missing_step[..., None], 0.0, steps), axis=-1)
    dist = np.where(missing_step, np.nan, dist)
    mean_norm = 0.5 * (norms[..., 1:] + norms[..., :-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(mean_norm > 0, dist / mean_norm, np.nan)
    if Z.shape[-2] >= 3:
        a, b = steps[..., :-1, :], steps[..., 1:, :]
        missing_angle = missing_step[..., :-1] | missing_step[..., 1:]
        small = (dist[..., :-1] <= min_step) | (dist[..., 1:] <= min_step)
        undefined = small & ~missing_angle
        with np.errstate(invalid="ignore"):
            ang = angle_between(np.where(missing_angle[..., None], 1.0, a), np.where(missing_angle[..., None], 1.0, b))
        ang = np.where(missing_angle | undefined, np.nan, ang)
    else:
        shape = Z.shape[:-2] + (0,)
        ang = np.zeros(shape)
        undefined = np.zeros(shape, bool)
        missing_angle = np.zeros(shape, bool)
    return StepGeometry(dist, rel, ang, undefined, missing_angle, missing_step, min_step)


# --------------------------------------------------------------------------------------------- summaries


def _boot_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Multinomial resampling counts (n_boot, n) for a cluster bootstrap over trajectories."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def _pooled(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum and count of defined values per trajectory (and per position if 2-D)."""
    ok = ~np.isnan(values)
    return np.where(ok, values, 0.0), ok.astype(np.float64)


def summarize(values: np.ndarray, n_boot: int = 1000, seed: int = 0, undefined: np.ndarray | None = None, missing: np.ndarray | None = None) -> dict[str, Any]:
    """Pooled mean, 95% cluster-bootstrap interval, counts; overall and per position. ``values``: (n_traj, P)."""
    values = np.asarray(values, np.float64)
    n_traj = values.shape[0]
    s, c = _pooled(values)
    out: dict[str, Any] = {
        "mean": None,
        "ci95": [None, None],
        "n_values": int(c.sum()),
        "n_undefined": int(undefined.sum()) if undefined is not None else 0,
        "n_missing": int(missing.sum()) if missing is not None else 0,
        "by_position": {"mean": [], "ci95_low": [], "ci95_high": [], "n": []},
    }
    if n_traj == 0:
        return out
    total_c = c.sum()
    if total_c > 0:
        out["mean"] = float(s.sum() / total_c)
    with np.errstate(invalid="ignore", divide="ignore"):
        pos_mean = s.sum(0) / c.sum(0)
    if n_traj >= 2 and total_c > 0:
        W = _boot_weights(n_traj, n_boot, seed)
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = (W @ s.sum(1)) / (W @ c.sum(1))
            boot_pos = (W @ s) / (W @ c)
        out["ci95"] = [finite_float(np.nanpercentile(boot, 2.5)), finite_float(np.nanpercentile(boot, 97.5))]
        lo = _nanpct(boot_pos, 2.5)
        hi = _nanpct(boot_pos, 97.5)
    else:
        lo = hi = np.full(values.shape[1], np.nan)
    out["by_position"] = {"mean": [finite_float(v) for v in pos_mean], "ci95_low": [finite_float(v) for v in lo], "ci95_high": [finite_float(v) for v in hi], "n": [int(v) for v in c.sum(0)]}
    return out


def difference(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """Pooled mean(a) - mean(b) with a 95% bootstrap interval (each group's trajectories resampled)."""
    if len(a) < 2 or len(b) < 2:
        return None
    sa, ca = _pooled(np.asarray(a, np.float64))
    sb, cb = _pooled(np.asarray(b, np.float64))
    if ca.sum() == 0 or cb.sum() == 0:
        return None
    Wa = _boot_weights(len(a), n_boot, seed)
    Wb = _boot_weights(len(b), n_boot, seed + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (Wa @ sa.sum(1)) / (Wa @ ca.sum(1)) - (Wb @ sb.sum(1)) / (Wb @ cb.sum(1))
    return {"mean": float(sa.sum() / ca.sum() - sb.sum() / cb.sum()), "ci95": [finite_float(np.nanpercentile(boot, 2.5)), finite_float(np.nanpercentile(boot, 97.5))]}


def analyse_sequences(
    Z: np.ndarray,
    success: np.ndarray | None = None,
    *,
    along: str,
    per: str | None = None,
    per_index: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    min_step_rel: float = 1e-5,
    min_step_abs: float = 0.0,
) -> dict[str, Any]:
    """Geometry of ``Z`` (n_traj, N, d) along its sequence axis, summarised for all / success / failure."""
    Z = np.asarray(Z)
    if Z.ndim != 3:
        raise GeometryInputError(f"expected (n_traj, n_points, d); found {Z.shape}")
    g = step_geometry(Z, min_step_rel, min_step_abs)
    groups: dict[str, np.ndarray] = {"all": np.ones(len(Z), bool)}
    if success is not None:
        success = np.asarray(success).astype(bool)
        if success.shape != (len(Z),):
            raise GeometryInputError(f"success must have one value per trajectory: shape {success.shape}, expected ({len(Z)},)")
        groups["success"], groups["failure"] = success, ~success
    per_metric = {
        "step_distance": (g.step_distance, None, g.missing_step),
        "relative_step_distance": (g.relative_step_distance, None, g.missing_step),
        "curvature_deg": (g.curvature_deg, g.undefined, g.missing_angle),
    }
    out_groups = {}
    for name, mask in groups.items():
        out_groups[name] = {"n_trajectories": int(mask.sum())}
        for metric, (vals, undef, miss) in per_metric.items():
            out_groups[name][metric] = summarize(vals[mask], n_boot, seed, None if undef is None else undef[mask], miss[mask])
    diff = None
    if success is not None:
        diff = {m: difference(per_metric[m][0][success], per_metric[m][0][~success], n_boot, seed) for m in METRICS}
    return {"along": along, "per": per, "per_index": per_index, "min_step": g.min_step, "groups": out_groups, "difference": diff}


def analyse_array(
    T: np.ndarray,
    success: np.ndarray | None = None,
    axes: Sequence[str] = ("time",),
    *,
    n_boot: int = 1000,
    seed: int = 0,
    min_step_rel: float = 1e-5,
    min_step_abs: float = 0.0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """All analyses of a (n_traj, N, d) or (n_traj, A, B, d) array; for 4-D, along B per A and along A per B.

    ``axes`` names the middle axes, e.g. ("time",), ("layer", "time"), ("time", "denoise").
    Works on memory-mapped arrays: each slice is read once per analysis.
    """
    if T.ndim not in (3, 4):
        raise GeometryInputError(f"trajectories must be (n_traj, n_points, d) or (n_traj, n_a, n_b, d); found shape {T.shape}")
    if len(axes) != T.ndim - 2:
        raise GeometryInputError(f"{T.ndim}-D trajectories need {T.ndim - 2} axis names; got {list(axes)}")
    kw = dict(n_boot=n_boot, seed=seed, min_step_rel=min_step_rel, min_step_abs=min_step_abs)
    if T.ndim == 3:
        return [analyse_sequences(np.asarray(T), success, along=axes[0], **kw)]
    a_name, b_name = axes
    jobs = [(b_name, a_name, i) for i in range(T.shape[1])] + [(a_name, b_name, j) for j in range(T.shape[2])]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="geometry")
    out = []
    for along, per, idx in jobs:
        Z = np.asarray(T[:, idx]) if along == b_name else np.asarray(T[:, :, idx])
        out.append(analyse_sequences(Z, success, along=along, per=per, per_index=idx, **kw))
    return out


# ------------------------------------------------------------------------------------------------- plots


def plot_profiles(analyses: list[dict[str, Any]], path: str, max_panels: int = 6) -> None:
    """Per-position distance and curvature (mean and 95% CI) for up to ``max_panels`` analyses; panels of one
    metric share their y scale so they can be compared by eye. Drawn on a bare ``Figure`` (no pyplot)."""
    from matplotlib.figure import Figure

    sel = analyses if len(analyses) <= max_panels else [analyses[i] for i in np.linspace(0, len(analyses) - 1, max_panels).round().astype(int)]
    fig = Figure(figsize=(3.2 * len(sel), 5.5))
    axes = fig.subplots(2, len(sel), squeeze=False, sharey="row")
    for col, a in enumerate(sel):
        for row, metric in enumerate(("relative_step_distance", "curvature_deg")):
            ax = axes[row, col]
            for gname, color in (("success", "tab:green"), ("failure", "tab:red"), ("all", "tab:blue")):
                if gname not in a["groups"] or (gname == "all" and "success" in a["groups"]):
                    continue
                bp = a["groups"][gname][metric]["by_position"]
                m = np.array([np.nan if v is None else v for v in bp["mean"]])
                lo = np.array([np.nan if v is None else v for v in bp["ci95_low"]])
                hi = np.array([np.nan if v is None else v for v in bp["ci95_high"]])
                x = np.arange(len(m))
                ax.plot(x, m, color=color, lw=1, label=f"{gname} (mean, 95% CI)")
                ax.fill_between(x, lo, hi, color=color, alpha=0.2)
            ax.set_xlabel(f"{a['along']} index")
            if col == 0:
                ax.set_ylabel("relative step distance" if row == 0 else "curvature (deg)")
            title = f"along {a['along']}" + (f", {a['per']} {a['per_index']}" if a["per"] else "")
            ax.set_title(title, fontsize=8)
            if row == 0 and col == 0 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    _save(fig, path)


def plot_summary_by_per(analyses: list[dict[str, Any]], path: str) -> None:
    """Overall mean (95% CI) of each metric against the ``per`` index (e.g. curvature over time, per layer).
    Drawn on a bare ``Figure`` (no pyplot)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    x = np.array([a["per_index"] for a in analyses])
    for ax, metric in zip(axes, METRICS):
        for gname, color in (("all", "tab:blue"), ("success", "tab:green"), ("failure", "tab:red")):
            if gname not in analyses[0]["groups"]:
                continue
            s = [a["groups"][gname][metric] for a in analyses]
            m = np.array([np.nan if v["mean"] is None else v["mean"] for v in s])
            lo = np.array([np.nan if v["ci95"][0] is None else v["ci95"][0] for v in s])
            hi = np.array([np.nan if v["ci95"][1] is None else v["ci95"][1] for v in s])
            ax.plot(x, m, "o-", ms=3, color=color, label=f"{gname} (mean, 95% CI)")
            ax.fill_between(x, lo, hi, color=color, alpha=0.2)
        ax.set_xlabel(f"{analyses[0]['per']} index")
        ax.set_title(f"{metric} along {analyses[0]['along']}", fontsize=9)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    _save(fig, path)


def _save(fig: Any, path: str) -> None:
    """tight_layout, then an atomic PNG write (a reader never sees half a figure)."""
    from openpi.shared.io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def _nanpct(a: np.ndarray, q: float) -> np.ndarray:
    """Percentile over axis 0 ignoring NaN; all-NaN columns give NaN without a warning."""
    out = np.full(a.shape[1], np.nan)
    ok = ~np.isnan(a).all(0)
    if ok.any():
        out[ok] = np.nanpercentile(a[:, ok], q, axis=0)
    return out
