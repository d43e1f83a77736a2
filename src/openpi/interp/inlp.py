"""Iterative nullspace projection (INLP; Ravfogel et al. 2020) on top of the grouped-CV probes.

Why: a probe's R^2 says information is linearly present; INLP says how many linear directions carry it.
Each iteration fits a probe, projects the probe's row space (its weight vectors) out of the features and
refits, until the held-out score is indistinguishable from the shuffled-label baseline.

Space and procedure
-------------------
Features are standardised ONCE with the mean/std of all training rows (the CV folds; never the test part),
z = (x - mu) / s. The projections act in this z-space; later fits centre but do not rescale (rescaling would
re-inflate the projected directions). With Q (d x r, orthonormal) the directions removed so far, iteration
i fits on z (I - Q Q^T): a ridge probe (regression; penalty re-chosen by grouped CV each iteration) or a
logistic probe (classification). Its weight vectors, orthogonalised against Q, are appended to Q
(``rank_added`` = their numerical rank, at most the number of target dims / classes).

Regression INLP runs entirely on sufficient statistics (x -> x P is linear, so X^T X -> P X^T X P): one pass
over the data serves every iteration, so it scales like the streaming probe.

Stopping rule
-------------
The band is computed once on the unprojected features from ``n_shuffles`` shuffled-label probes
(:func:`openpi.interp.probes.shuffle_between_groups`): ``upper = mean + z * sd + tol`` of their test metric
(sd with ddof=1; 0 for one shuffle). INLP stops at the first iteration whose test metric <= upper
(``stop_reason = "baseline_reached"``), or when no new direction can be added (``"no_rank_left"``), or after
``max_iter`` projections (``"max_iter"``).

JSON (``inlp_results.json``)
---------------------------
``{"schema": "vla-interp/inlp/v1", "metric": "r2_mean" | "balanced_accuracy", "band": {"shuffled_mean", "shuffled_sd",
"z", "tol", "upper", "n_shuffles"}, "iterations": [{"iteration", "rank_removed" (directions removed before
this fit), "rank_added", "metric", "per_dim" (R^2 per target dim, regression only), "penalty" (ridge alpha or
logistic C)}], "stopped_at", "stop_reason", "total_rank_removed", "space"}``
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from openpi.interp import probes as P
from openpi.shared.io import finite_floats


@dataclasses.dataclass
class InlpResult:
    """Per-iteration record plus the removed orthonormal basis (in the standardised z-space)."""

    metric: str
    iterations: list[dict[str, Any]]
    band: dict[str, Any]
    stopped_at: int
    stop_reason: str
    basis: np.ndarray  # (d, r)
    mean: np.ndarray  # (d,) standardisation mean
    scale: np.ndarray  # (d,) standardisation scale

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": "vla-interp/inlp/v1",
            "metric": self.metric,
            "band": self.band,
            "iterations": self.iterations,
            "stopped_at": int(self.stopped_at),
            "stop_reason": self.stop_reason,
            "total_rank_removed": int(self.basis.shape[1]),
            "space": "z = (x - mean_train) / std_train; projections z (I - Q Q^T)",
        }


def make_band(values: Sequence[float], z: float = 2.0, tol: float = 0.01) -> dict[str, Any]:
    """Upper edge of the shuffled-baseline band: mean + z * sd + tol."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if len(v) == 0:
        raise P.ProbeInputError("INLP needs at least one shuffled-label baseline (n_shuffles >= 1)")
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"shuffled_mean": float(v.mean()), "shuffled_sd": sd, "z": z, "tol": tol, "upper": float(v.mean() + z * sd + tol), "n_shuffles": len(v)}


def extend_basis(Q: np.ndarray, W: np.ndarray, rel_tol: float = 1e-6) -> tuple[np.ndarray, int]:
    """Append the part of span(W) orthogonal to Q; returns (new orthonormal basis, rank added)."""
    if W.size == 0:
        return Q, 0
    norm = np.linalg.norm(W, 2)
    if norm == 0:
        return Q, 0
    R = W - Q @ (Q.T @ W)
    R = R - Q @ (Q.T @ R)  # second Gram-Schmidt pass for stability
    U, s, _ = np.linalg.svd(R, full_matrices=False)
    keep = s > rel_tol * norm
    return np.concatenate([Q, U[:, keep]], axis=1), int(keep.sum())


def _loop(
    d: int,
    fit: Callable[[np.ndarray], tuple[float, np.ndarray, dict[str, Any]]],
    upper: float,
    max_iter: int,
    progress: bool,
) -> tuple[list[dict[str, Any]], int, str, np.ndarray]:
    """Shared INLP loop: ``fit(Q) -> (test metric, weights (d, m), extra record fields)``."""
    Q = np.zeros((d, 0))
    iterations: list[dict[str, Any]] = []
    rng = range(max_iter + 1)
    if progress:
        from tqdm import tqdm

        rng = tqdm(rng, desc="INLP")
    reason = "max_iter"
    for it in rng:
        metric, W, extra = fit(Q)
        rec = {"iteration": it, "rank_removed": int(Q.shape[1]), "metric": metric, **extra}
        iterations.append(rec)
        if metric is not None and metric <= upper:
            reason = "baseline_reached"
            rec["rank_added"] = 0
            break
        if it == max_iter:
            rec["rank_added"] = 0
            break
        Q, added = extend_basis(Q, W)
        rec["rank_added"] = added
        if added == 0:
            reason = "no_rank_left"
            break
    if progress:
        rng.close()
    stopped = iterations[-1]["iteration"]
    return iterations, stopped, reason, Q


def inlp_from_stats(
    stats: P.FoldStats,
    *,
    n_targets: int,
    n_shuffles: int,
    alphas: Sequence[float] = P.DEFAULT_ALPHAS,
    max_iter: int = 20,
    z: float = 2.0,
    tol: float = 0.01,
    progress: bool = False,
) -> InlpResult:
    """Regression INLP from sufficient statistics whose targets are laid out as by ``probes.stack_shuffles``."""
    if stats.n_targets != n_targets * (1 + n_shuffles):
        raise P.ProbeInputError(f"stats hold {stats.n_targets} target columns; expected {n_targets} x (1 + {n_shuffles} shuffles)")
    k = stats.n_folds
    train = stats.moments(range(k))
    mean = train.sx / train.n + stats.x_shift
    var = np.diag(train.centred()[2]) / train.n
    scale = P.standard_scale(var)
    base = stats.affine(mean, np.diag(1.0 / scale))
    sets = P.shuffle_target_sets(n_targets, n_shuffles)
    first = P.ridge_cv_from_stats(base, alphas, sets, standardize=False)
    band = make_band([float(np.mean(first[f"shuffled_{s}"].test_r2)) for s in range(n_shuffles)], z, tol)
    y_stats = base.select_targets(sets["y"])
    d = stats.n_features

    def fit(Q: np.ndarray) -> tuple[float, np.ndarray, dict[str, Any]]:
        if Q.shape[1] == 0:
            r = first["y"]
        else:
            r = P.ridge_cv_from_stats(y_stats.affine(np.zeros(d), np.eye(d) - Q @ Q.T), alphas, standardize=False)["y"]
        return float(np.mean(r.test_r2)), r.coef, {"per_dim": finite_floats(r.test_r2), "penalty": r.best_alpha}

    iterations, stopped, reason, Q = _loop(d, fit, band["upper"], max_iter, progress)
    return InlpResult("r2_mean", iterations, band, stopped, reason, Q, mean, scale)


def inlp_classification(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    split: P.GroupSplit,
    *,
    Cs: Sequence[float] = P.DEFAULT_CS,
    n_shuffles: int = 3,
    max_iter: int = 20,
    z: float = 2.0,
    tol: float = 0.01,
    seed: int = 0,
    order: np.ndarray | None = None,
    progress: bool = False,
) -> InlpResult:
    """Classification INLP (logistic probes) on in-memory features.

    The metric is held-out balanced accuracy: its chance level (1 / n_classes) does not move with the class
    balance of the test part, which the shuffled labels change; plain accuracy would put the band below the
    majority-class rate a fully projected probe falls back to.
    """
    X = np.asarray(X, np.float64)
    y = np.asarray(y).ravel()
    P.check_rows_match(len(X), len(y), len(groups))
    P.check_finite(X, "features")
    parts = split.assign(groups)
    train = parts != P.TEST_PART
    mean = X[train].mean(0)
    scale = P.standard_scale(X[train].var(0))
    Z = (X - mean) / scale
    shuffled = [
        P.logistic_probe(Z, P.shuffle_between_groups(y, groups, seed=seed + 1 + s, order=order), parts, Cs, seed=seed, standardize=False).test["balanced_accuracy"]
        for s in range(n_shuffles)
    ]
    band = make_band(shuffled, z, tol)

    def fit(Q: np.ndarray) -> tuple[float, np.ndarray, dict[str, Any]]:
        Zp = Z - (Z @ Q) @ Q.T
        r = P.logistic_probe(Zp, y, parts, Cs, seed=seed, standardize=False)
        return float(r.test["balanced_accuracy"]), r.coef.T, {"penalty": r.best_C, "accuracy": r.test["accuracy"], "auc": r.test["auc"]}

    iterations, stopped, reason, Q = _loop(X.shape[1], fit, band["upper"], max_iter, progress)
    return InlpResult("balanced_accuracy", iterations, band, stopped, reason, Q, mean, scale)


def plot_inlp(result: InlpResult, path: str, title: str = "") -> None:
    """Held-out metric vs iteration with the shuffled band; top axis shows the rank removed.

    Drawn on a bare ``Figure`` (no pyplot), so the caller's matplotlib backend is never changed."""
    from matplotlib.figure import Figure

    from openpi.shared.io import atomic_path

    its = [r for r in result.iterations if r["metric"] is not None]
    x = [r["iteration"] for r in its]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(x, [r["metric"] for r in its], "o-", label=f"test {result.metric}")
    b = result.band
    ax.axhspan(b["shuffled_mean"] - b["z"] * b["shuffled_sd"], b["upper"], color="grey", alpha=0.3, label="shuffled band (stop below top)")
    ax.axhline(b["shuffled_mean"], color="grey", ls="--", lw=1)
    ax.set_xticks(x)
    ax.set_xlabel("INLP iteration")
    ax.set_ylabel(result.metric)
    sec = ax.secondary_xaxis("top")
    sec.set_xticks(x)
    sec.set_xticklabels([str(r["rank_removed"]) for r in its], fontsize=7)
    sec.set_xlabel("rank removed before the fit")
    ax.set_title(title or f"INLP ({result.stop_reason} at iteration {result.stopped_at})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
