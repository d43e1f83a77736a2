"""Linear probes: episode-grouped, cross-validated ridge and logistic readouts from activations.

Why this module exists: "is y linearly decodable from X?" only has an answer when (1) whole episodes stay on
one side of every split (rows of one episode are strongly correlated), (2) the regularisation is chosen by
cross-validation on training episodes only, (3) features are standardised with training statistics only and
(4) baselines (shuffled labels, random features) sit next to every number.

Pieces
------
* :func:`make_group_split` assigns every group (episode) once to the held-out **test** part or to one of
  ``k`` **CV folds**. Test groups are never seen while choosing the penalty.
* Ridge works from per-part sufficient statistics (:class:`FoldStats`: row count, sums of x and y, X^T X,
  X^T y, sum of y^2), accumulated from a stream of batches (:func:`accumulate_stats`), so 1e6 x 2048 rows
  never sit in memory. Every quantity below is computed from these sums alone.
* :func:`ridge_cv_from_stats` does ONE symmetric eigendecomposition per CV fold (of the standardised
  training Gram matrix); every penalty on the path, and every target set (e.g. the real target and its
  shuffled copies), is served by that one decomposition. :func:`ridge_cv_dense` is an independent in-memory
  implementation (one SVD per fold, explicit predictions) used to check the streaming path.
* :func:`logistic_probe` (scikit-learn) for binary / multiclass targets (gripper open/close, task id) on
  in-memory arrays: penalty ``C`` chosen by grouped CV log-loss; accuracy, balanced accuracy, AUC.
* Baselines: :func:`shuffle_between_groups` (labels of whole episodes permuted among episodes) and random
  Gaussian features of the same dimension (``accumulate_stats(random_features_seed=...)``, same pass).
* :class:`KeyTargetTable` joins store rows (key columns, see docs/conventions.md) to targets, so a store
  iterator plugs into :func:`accumulate_stats` unchanged.

Formulas
--------
Standardised features ``z = (x - mu_tr) / s_tr`` (mean and population std over the training rows of that fit;
a feature with zero training variance keeps scale 1). Per target column, with ``n`` training rows::

    min_{w, b}  sum_i (y_i - b - z_i . w)^2 + lambda * ||w||^2,   lambda = alpha * n

so ``alpha`` is a per-row penalty comparable across folds of different size. With the eigendecomposition
``Z_c^T Z_c = V diag(e) V^T`` of the centred standardised training Gram matrix and ``c = Z_c^T y_c``:
``w(lambda) = V diag(1 / (e + lambda)) V^T c`` and ``b = mean(y)``. R^2 on a part P (per target dimension)
is ``1 - sum_P (y - yhat)^2 / sum_P (y - mean_P y)^2``; ``r2_mean`` is the unweighted mean over dimensions.
The CV score of a penalty is the mean over folds of ``r2_mean`` on the held-out fold; the chosen penalty
maximises it; the final model is refit on all CV folds and scored once on the test part.

Shuffled-label baseline (what and why)
--------------------------------------
Permuting single rows would keep episode-level targets (task id, success) aligned with their episode's
activations, and shuffling time inside an episode would do the same; both leave part of the X-y relation
in place. Instead the target *sequence of a whole episode* is handed to another episode (a random cyclic
derangement of groups, so no episode keeps its own labels); when lengths differ it is resampled by relative
position (row i of n_a receives source row floor(i * n_b / n_a)). This keeps each episode's target marginal
and temporal autocorrelation, keeps the group structure the CV relies on, and removes any X-y relation.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from openpi.shared import io as shared_io
from openpi.shared.io import finite_float, finite_floats
from openpi.shared.rundir import RunDir

TEST_PART = -1  # part label of held-out test groups in GroupSplit.assign
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-6, 4, 21))
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 7))
DEFAULT_N_BOOT = 1000
RUN_JOB = "probes"

Batch = tuple[np.ndarray, Mapping[str, np.ndarray]]
Join = Callable[[Mapping[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]


class ProbeInputError(ValueError):
    """Bad probe input (shape, NaN, unmatched row, constant target, too few groups); the message names it."""


# ----------------------------------------------------------------------------------------------- validation


def check_finite(arr: np.ndarray, name: str, where: str = "") -> None:
    """Raise naming the first NaN/inf position: NaNs silently poison sums of squares."""
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        raise ProbeInputError(
            f"{name} contains {len(bad)} non-finite values (NaN or inf){where}; first at index {first}. "
            "Drop or impute those rows before probing."
        )


def as_target_matrix(y: np.ndarray, name: str = "targets") -> np.ndarray:
    """Return targets as float64 (n, t); 1-D input becomes one column."""
    y = np.asarray(y)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise ProbeInputError(f"{name} must have shape (n,) or (n, t); found {y.shape}")
    if not np.issubdtype(y.dtype, np.number) and y.dtype != bool:
        raise ProbeInputError(f"{name} must be numeric; found dtype {y.dtype}")
    y = y.astype(np.float64)
    check_finite(y, name)
    return y


def check_rows_match(n_features: int, n_targets: int, n_groups: int, names: Sequence[str] = ("features", "targets", "groups")) -> None:
    """Every feature row needs exactly one target row and one group id (rows are joined by position here)."""
    if not (n_features == n_targets == n_groups):
        raise ProbeInputError(
            f"row counts differ: {names[0]} has {n_features} rows, {names[1]} {n_targets}, {names[2]} {n_groups}; "
            "every feature row needs a matching target row and group id"
        )


def check_not_constant(y: np.ndarray, names: Sequence[str] | None = None) -> None:
    """A constant target makes R^2 undefined (0/0) and a classifier trivial: refuse it by name."""
    y = as_target_matrix(y)
    for j in range(y.shape[1]):
        col = y[:, j]
        if col.size == 0 or np.all(col == col[0]):
            label = names[j] if names and j < len(names) else f"column {j}"
            value = col[0] if col.size else "n/a"
            raise ProbeInputError(f"target {label} is constant (every row = {value}): nothing to probe")


# ---------------------------------------------------------------------------------------------- group split


@dataclasses.dataclass(frozen=True)
class GroupSplit:
    """Assignment of every group (episode) to the test part (-1) or a CV fold (0..n_folds-1)."""

    groups: np.ndarray  # sorted unique group ids
    part: np.ndarray  # part of each unique group
    n_folds: int

    def assign(self, groups: np.ndarray) -> np.ndarray:
        """Part label per row; an unknown group is an error (it would silently leak or vanish)."""
        groups = np.asarray(groups)
        if len(self.groups) == 0:
            raise ProbeInputError("empty group split")
        try:
            idx = np.searchsorted(self.groups, groups)
        except TypeError as e:
            raise ProbeInputError(f"group ids of dtype {groups.dtype} cannot be compared with the split's {self.groups.dtype}") from e
        idx = np.clip(idx, 0, len(self.groups) - 1)
        ok = self.groups[idx] == groups
        if not np.all(ok):
            first = groups[~ok].ravel()[0]
            raise ProbeInputError(f"group {first!r} is not in the group split (built from {len(self.groups)} groups)")
        return self.part[idx]

    @property
    def test_groups(self) -> np.ndarray:
        return self.groups[self.part == TEST_PART]

    def fold_groups(self, fold: int) -> np.ndarray:
        return self.groups[self.part == fold]

    def to_json(self) -> dict[str, Any]:
        return {
            "n_groups": int(len(self.groups)),
            "n_folds": int(self.n_folds),
            "n_test_groups": int(np.sum(self.part == TEST_PART)),
            "groups_per_fold": [int(np.sum(self.part == f)) for f in range(self.n_folds)],
            "test_groups": [_scalar(g) for g in self.test_groups],
        }


def make_group_split(
    groups: np.ndarray,
    n_folds: int = 5,
    test_fraction: float = 0.2,
    seed: int = 0,
    strata: np.ndarray | None = None,
) -> GroupSplit:
    """Split groups into a test part and ``n_folds`` CV folds.

    With ``strata`` (one value per row, constant within a group, e.g. task id) groups are ordered by stratum
    before systematic test sampling and round-robin fold assignment, so every stratum is spread over the test
    part and the folds (a class absent from training cannot be classified).
    """
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ProbeInputError(f"groups must be 1-D (one id per row); found shape {groups.shape}")
    if n_folds < 2:
        raise ProbeInputError(f"n_folds must be >= 2; found {n_folds}")
    if not 0.0 < test_fraction < 1.0:
        raise ProbeInputError(f"test_fraction must be in (0, 1); found {test_fraction}")
    uniq, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    m = len(uniq)
    if m < n_folds + 1:
        raise ProbeInputError(
            f"found {m} distinct groups (episodes) but n_folds={n_folds} needs at least {n_folds + 1} "
            f"({n_folds} CV folds + 1 held-out test group); record more episodes or lower n_folds"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(m)
    if strata is not None:
        strata = np.asarray(strata)
        if strata.shape != groups.shape:
            raise ProbeInputError(f"strata must have one value per row: shape {strata.shape} vs groups {groups.shape}")
        _, s_inv = np.unique(strata, return_inverse=True)
        pairs = np.unique(np.stack([inverse.ravel(), s_inv.ravel()], 1), axis=0)
        if len(pairs) != m:
            raise ProbeInputError("strata must be constant within each group (e.g. one task id per episode)")
        group_stratum = s_inv.ravel()[first]
        order = order[np.argsort(group_stratum[order], kind="stable")]
    n_test = min(max(1, int(round(test_fraction * m))), m - n_folds)
    spacing = m / n_test
    test_pos = np.floor(rng.uniform(0, spacing) + np.arange(n_test) * spacing).astype(int)
    part = np.empty(m, dtype=np.int64)
    is_test = np.zeros(m, dtype=bool)
    is_test[order[test_pos]] = True
    part[is_test] = TEST_PART
    rest = order[~is_test[order]]
    part[rest] = (np.arange(len(rest)) + int(rng.integers(n_folds))) % n_folds
    return GroupSplit(groups=uniq, part=part, n_folds=n_folds)


def parts_to_index(parts: np.ndarray, n_folds: int) -> np.ndarray:
    """Map part labels (-1 test, 0..k-1 folds) to stats indices (test stored last, at index k)."""
    return np.where(parts == TEST_PART, n_folds, parts)


# ------------------------------------------------------------------------------------- sufficient statistics


@dataclasses.dataclass
class Moments:
    """Raw sums over one set of rows (in the shifted coordinates of the FoldStats they came from)."""

    n: float
    sx: np.ndarray  # (d,)
    sy: np.ndarray  # (t,)
    xx: np.ndarray  # (d, d)
    xy: np.ndarray  # (d, t)
    yy: np.ndarray  # (t,)

    def centred(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Means and centred cross-products (mu_x, mu_y, Cxx, Cxy)."""
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.xx - self.n * np.outer(mx, mx)
        cxy = self.xy - self.n * np.outer(mx, my)
        return mx, my, cxx, cxy


@dataclasses.dataclass
class FoldStats:
    """Sufficient statistics per part: index 0..n_folds-1 = CV folds, index n_folds = held-out test.

    Stored around a shift (``x_shift``, ``y_shift``, taken from the first batch) so that features with a large
    common mean do not lose precision to cancellation in X^T X.
    """

    n: np.ndarray  # (P,)
    sx: np.ndarray  # (P, d)
    sy: np.ndarray  # (P, t)
    xx: np.ndarray  # (P, d, d)
    xy: np.ndarray  # (P, d, t)
    yy: np.ndarray  # (P, t)
    x_shift: np.ndarray  # (d,)
    y_shift: np.ndarray  # (t,)

    @property
    def n_folds(self) -> int:
        return len(self.n) - 1

    @property
    def n_features(self) -> int:
        return self.sx.shape[1]

    @property
    def n_targets(self) -> int:
        return self.sy.shape[1]

    def moments(self, parts: Sequence[int]) -> Moments:
        parts = list(parts)
        return Moments(
            n=float(self.n[parts].sum()),
            sx=self.sx[parts].sum(0),
            sy=self.sy[parts].sum(0),
            xx=self.xx[parts].sum(0),
            xy=self.xy[parts].sum(0),
            yy=self.yy[parts].sum(0),
        )

    def select_targets(self, cols: Sequence[int]) -> FoldStats:
        cols = list(cols)
        return dataclasses.replace(self, sy=self.sy[:, cols], xy=self.xy[:, :, cols], yy=self.yy[:, cols], y_shift=self.y_shift[cols])

    def affine(self, mean: np.ndarray, M: np.ndarray) -> FoldStats:
        """Statistics of the transformed features x' = (x - mean) @ M (exact; used by INLP projections)."""
        m = np.asarray(mean, np.float64) - self.x_shift
        sx = self.sx - self.n[:, None] * m[None]
        xx = self.xx - np.einsum("pd,e->pde", self.sx, m) - np.einsum("d,pe->pde", m, self.sx) + self.n[:, None, None] * np.outer(m, m)[None]
        xy = self.xy - np.einsum("d,pt->pdt", m, self.sy)
        return dataclasses.replace(
            self,
            sx=sx @ M,
            xx=np.einsum("dk,pde,el->pkl", M, xx, M, optimize=True),
            xy=np.einsum("dk,pdt->pkt", M, xy, optimize=True),
            x_shift=np.zeros(M.shape[1]),
        )


class StatsAccumulator:
    """Accumulate FoldStats batch by batch (float64 sums; products in ``compute_dtype``)."""

    def __init__(self, split: GroupSplit, n_features: int, n_targets: int, compute_dtype: Any = np.float64):
        self.split = split
        self.d, self.t = int(n_features), int(n_targets)
        self.compute_dtype = np.dtype(compute_dtype)
        P = split.n_folds + 1
        self.n = np.zeros(P)
        self.sx = np.zeros((P, self.d))
        self.sy = np.zeros((P, self.t))
        self.xx = np.zeros((P, self.d, self.d))
        self.xy = np.zeros((P, self.d, self.t))
        self.yy = np.zeros((P, self.t))
        self.x_shift: np.ndarray | None = None
        self.y_shift: np.ndarray | None = None
        self.rows_seen = 0

    def update(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> None:
        X = np.asarray(X)
        y = as_target_matrix(y, f"targets of batch starting at row {self.rows_seen}")
        where = f" in the batch starting at stream row {self.rows_seen}"
        if X.ndim != 2 or X.shape[1] != self.d:
            raise ProbeInputError(f"feature batch{where} has shape {X.shape}; expected (b, {self.d})")
        if y.shape != (X.shape[0], self.t):
            raise ProbeInputError(f"target batch{where} has shape {y.shape}; expected ({X.shape[0]}, {self.t}): every row needs a target")
        if np.shape(groups) != (X.shape[0],):
            raise ProbeInputError(f"group batch{where} has shape {np.shape(groups)}; expected ({X.shape[0]},)")
        check_finite(X, "features", where)
        idx = parts_to_index(self.split.assign(groups), self.split.n_folds)
        if self.x_shift is None:
            self.x_shift = X.mean(0, dtype=np.float64)
            self.y_shift = y.mean(0)
        order = np.argsort(idx, kind="stable")
        idx = idx[order]
        Xs = X[order].astype(self.compute_dtype) - self.x_shift.astype(self.compute_dtype)
        ys = y[order] - self.y_shift
        bounds = np.flatnonzero(np.diff(idx)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(idx)]):
            p = idx[lo]
            Xp, yp = Xs[lo:hi], ys[lo:hi]
            self.n[p] += hi - lo
            self.sx[p] += Xp.sum(0, dtype=np.float64)
            self.sy[p] += yp.sum(0)
            self.xx[p] += Xp.T @ Xp
            self.xy[p] += np.asarray(Xp, np.float64).T @ yp
            self.yy[p] += np.sum(yp * yp, 0)
        self.rows_seen += X.shape[0]

    def finalize(self) -> FoldStats:
        if self.rows_seen == 0:
            raise ProbeInputError("the feature stream yielded no rows")
        empty = [("test" if p == self.split.n_folds else f"fold {p}") for p in range(len(self.n)) if self.n[p] == 0]
        if empty:
            raise ProbeInputError(f"no rows fell into {', '.join(empty)}: the stream does not cover every group of the split")
        return FoldStats(self.n.copy(), self.sx.copy(), self.sy.copy(), self.xx.copy(), self.xy.copy(), self.yy.copy(), self.x_shift.copy(), self.y_shift.copy())


def accumulate_stats(
    batches: Iterable[Batch],
    join: Join,
    split: GroupSplit,
    *,
    n_targets: int,
    compute_dtype: Any = np.float64,
    random_features_seed: int | None = None,
    progress: bool = False,
    total_rows: int | None = None,
    desc: str = "accumulate X^T X",
) -> tuple[FoldStats, FoldStats | None]:
    """One pass over a stream of ``(X, keys)`` batches -> (stats of X, stats of random Gaussian features or None).

    ``join(keys) -> (y (b, t), groups (b,))`` supplies the target and group of each row (e.g. a
    :class:`KeyTargetTable` for store batches, or :func:`array_join` for positional arrays).
    """
    acc: StatsAccumulator | None = None
    rand_acc: StatsAccumulator | None = None
    rng = np.random.default_rng(random_features_seed) if random_features_seed is not None else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_rows, unit="row", unit_scale=True, desc=desc)
    for X, keys in batches:
        y, groups = join(keys)
        if acc is None:
            acc = StatsAccumulator(split, np.shape(X)[1], n_targets, compute_dtype)
            if rng is not None:
                rand_acc = StatsAccumulator(split, np.shape(X)[1], n_targets, compute_dtype)
        acc.update(X, y, groups)
        if rand_acc is not None:
            rand_acc.update(rng.standard_normal((np.shape(X)[0], acc.d), dtype=np.float32), y, groups)
        if bar is not None:
            bar.update(np.shape(X)[0])
    if bar is not None:
        bar.close()
    if acc is None:
        raise ProbeInputError("the feature stream yielded no batches")
    return acc.finalize(), (rand_acc.finalize() if rand_acc is not None else None)


def array_batches(X: np.ndarray, batch_size: int = 4096) -> Iterator[Batch]:
    """Stream a (possibly memory-mapped) array in row batches; keys carry the row index for :func:`array_join`."""
    for lo in range(0, X.shape[0], batch_size):
        hi = min(lo + batch_size, X.shape[0])
        yield np.asarray(X[lo:hi]), {"row": np.arange(lo, hi)}


def array_join(y: np.ndarray, groups: np.ndarray) -> Join:
    """Join positional arrays to batches from :func:`array_batches` (row i of X <-> row i of y and groups)."""
    y = as_target_matrix(y)
    groups = np.asarray(groups)

    def join(keys: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        rows = keys["row"]
        if rows.size and rows.max() >= len(y):
            raise ProbeInputError(f"feature row {int(rows.max())} has no matching target row (targets have {len(y)} rows)")
        return y[rows], groups[rows]

    return join


# --------------------------------------------------------------------------------------------------- ridge


@dataclasses.dataclass
class RidgeResult:
    """Cross-validated ridge probe for one target set. Coefficients are in original feature/target units."""

    alphas: np.ndarray  # (L,)
    cv_r2: np.ndarray  # (L, k, t): R^2 per penalty, held-out fold, target dim
    cv_score: np.ndarray  # (L,): mean over folds of the mean over dims
    best_index: int
    train_r2: np.ndarray  # (t,) on all CV folds (the refit's own training rows)
    test_r2: np.ndarray  # (t,) on the held-out test part
    test_mse: np.ndarray  # (t,)
    coef: np.ndarray  # (d, t)
    intercept: np.ndarray  # (t,)
    n_train: int
    n_test: int

    @property
    def best_alpha(self) -> float:
        return float(self.alphas[self.best_index])

    @property
    def alpha_at_boundary(self) -> bool:
        return self.best_index in (0, len(self.alphas) - 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "cv": {
                "alphas": self.alphas.tolist(),
                "r2_mean": finite_floats(self.cv_score),
                "r2_per_fold": finite_floats(np.nanmean(self.cv_r2, axis=2)),
                "best_alpha": self.best_alpha,
                "best_index": int(self.best_index),
                "alpha_at_boundary": bool(self.alpha_at_boundary),
                "r2_mean_at_best": finite_float(self.cv_score[self.best_index]),
            },
            "train": {"r2_mean": finite_float(np.mean(self.train_r2)), "r2_per_dim": finite_floats(self.train_r2), "n_rows": int(self.n_train)},
            "test": {
                "r2_mean": finite_float(np.mean(self.test_r2)),
                "r2_per_dim": finite_floats(self.test_r2),
                "mse_per_dim": finite_floats(self.test_mse),
                "n_rows": int(self.n_test),
            },
        }


@dataclasses.dataclass
class _Decomp:
    """One eigendecomposition of a standardised training Gram matrix; serves every penalty."""

    n: float
    mx: np.ndarray
    my: np.ndarray
    scale: np.ndarray
    evals: np.ndarray
    evecs: np.ndarray
    proj: np.ndarray  # V^T c, (d, t)

    def coefs(self, lambdas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(beta (L, d, t), intercept (L, t)) in the shifted raw coordinates for penalties ``lambdas`` (L,) or (L, t)."""
        lam = np.asarray(lambdas, np.float64)
        lam = lam[:, None, None] if lam.ndim == 1 else lam[:, None, :]
        w = np.einsum("de,let->ldt", self.evecs, self.proj[None] / (self.evals[None, :, None] + lam), optimize=True)
        beta = w / self.scale[None, :, None]
        intercept = self.my[None] - np.einsum("d,ldt->lt", self.mx, beta)
        return beta, intercept


def standard_scale(var: np.ndarray) -> np.ndarray:
    """Population std with zero-variance features left at scale 1 (their centred column is zero anyway)."""
    ref = max(float(np.mean(np.abs(var))), 1e-300)
    s = np.sqrt(np.clip(var, 0.0, None))
    return np.where(var <= 1e-12 * ref, 1.0, s)


def _eigh(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric eigendecomposition; LAPACK's MRRR driver (syevr) is ~2x faster than numpy's syevd at d=2048."""
    import scipy.linalg

    try:
        return scipy.linalg.eigh(S, driver="evr", check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        return np.linalg.eigh(S)


def _decompose(train: Moments, standardize: bool) -> _Decomp:
    if train.n < 2:
        raise ProbeInputError(f"need at least 2 training rows; found {train.n:g}")
    mx, my, cxx, cxy = train.centred()
    scale = standard_scale(np.diag(cxx) / train.n) if standardize else np.ones(len(mx))
    S = cxx / np.outer(scale, scale)
    S = 0.5 * (S + S.T)
    evals, evecs = _eigh(S)
    evals = np.clip(evals, 0.0, None)
    proj = evecs.T @ (cxy / scale[:, None])
    return _Decomp(train.n, mx, my, scale, evals, evecs, proj)


def _sse(part: Moments, beta: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Sum of squared errors (L, t) of predictions x.beta + b on a part, from its sums alone."""
    L, d, t = beta.shape
    xxb = (part.xx @ beta.transpose(1, 0, 2).reshape(d, L * t)).reshape(d, L, t).transpose(1, 0, 2)
    quad = np.sum(beta * xxb, axis=1)
    cross_y = np.einsum("dt,ldt->lt", part.xy, beta)
    cross_x = np.einsum("d,ldt->lt", part.sx, beta)
    sse = part.yy[None] - 2 * cross_y - 2 * intercept * part.sy[None] + quad + 2 * intercept * cross_x + part.n * intercept**2
    return np.clip(sse, 0.0, None)


def _r2_from_sse(part: Moments, sse: np.ndarray) -> np.ndarray:
    sst = part.yy - part.sy**2 / max(part.n, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - sse / sst[None]
    return np.where(sst[None] > 1e-12 * np.maximum(part.yy[None], 1e-300), r2, np.nan)


def ridge_cv_from_stats(
    stats: FoldStats,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    target_sets: Mapping[str, Sequence[int]] | None = None,
    *,
    standardize: bool = True,
    target_names: Sequence[str] | None = None,
) -> dict[str, RidgeResult]:
    """Grouped k-fold ridge CV over a penalty path from sufficient statistics.

    One eigendecomposition per CV fold (plus one for the refit) serves every penalty and every target set;
    the penalty is chosen per target set (e.g. ``{"y": [0..6], "shuffled_0": [7..13]}``).
    """
    alphas_arr = np.asarray(sorted(float(a) for a in alphas))
    if len(alphas_arr) == 0 or np.any(alphas_arr < 0):
        raise ProbeInputError(f"alphas must be a non-empty list of non-negative penalties; found {list(alphas)}")
    t = stats.n_targets
    if target_sets is None:
        target_sets = {"y": list(range(t))}
    k = stats.n_folds
    total = stats.moments(range(k + 1))
    sst_total = total.yy - total.sy**2 / total.n
    for j in range(t):
        if sst_total[j] <= 1e-12 * max(total.yy[j], 1e-300):
            label = target_names[j] if target_names and j < len(target_names) else f"column {j}"
            raise ProbeInputError(f"target {label} is constant over all {int(total.n)} rows: R^2 is undefined")
    cv_r2 = np.empty((len(alphas_arr), k, t))
    for f in range(k):
        train = stats.moments([g for g in range(k) if g != f])
        dec = _decompose(train, standardize)
        beta, b = dec.coefs(alphas_arr * train.n)
        val = stats.moments([f])
        cv_r2[:, f, :] = _r2_from_sse(val, _sse(val, beta, b))
    train = stats.moments(range(k))
    test = stats.moments([k])
    dec = _decompose(train, standardize)
    out: dict[str, RidgeResult] = {}
    for name, cols in target_sets.items():
        cols = list(cols)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            score = np.nanmean(cv_r2[:, :, cols], axis=(1, 2))
        if np.all(np.isnan(score)):
            raise ProbeInputError(f"target set {name!r}: R^2 undefined on every CV fold (targets constant within folds)")
        best = int(np.nanargmax(score))
        lam = np.full((1, t), alphas_arr[best] * train.n)
        beta, b = dec.coefs(lam)
        beta, b = beta[:, :, cols], b[:, cols]
        tr_m = _select(train, cols)
        te_m = _select(test, cols)
        test_sse = _sse(te_m, beta, b)[0]
        coef = beta[0]
        intercept = b[0] - stats.x_shift @ coef + stats.y_shift[cols]
        out[name] = RidgeResult(
            alphas=alphas_arr,
            cv_r2=cv_r2[:, :, cols],
            cv_score=score,
            best_index=best,
            train_r2=_r2_from_sse(tr_m, _sse(tr_m, beta, b))[0],
            test_r2=_r2_from_sse(te_m, test_sse[None])[0],
            test_mse=test_sse / max(test.n, 1.0),
            coef=coef,
            intercept=intercept,
            n_train=int(train.n),
            n_test=int(test.n),
        )
    return out


def _select(m: Moments, cols: list[int]) -> Moments:
    return Moments(m.n, m.sx, m.sy[cols], m.xx, m.xy[:, cols], m.yy[cols])


def ridge_cv_dense(
    X: np.ndarray,
    y: np.ndarray,
    parts: np.ndarray,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    standardize: bool = True,
) -> RidgeResult:
    """In-memory reference: one SVD of the standardised training matrix per fold, explicit predictions.

    ``parts`` is :meth:`GroupSplit.assign` of the row groups (-1 test, 0..k-1 folds). Independent of the
    sufficient-statistics path so the two can check each other.
    """
    X = np.asarray(X, np.float64)
    y = as_target_matrix(y)
    check_finite(X, "features")
    alphas_arr = np.asarray(sorted(float(a) for a in alphas))
    k = int(parts.max()) + 1
    test_rows = parts == TEST_PART

    def fit(rows: np.ndarray) -> Callable[[float], tuple[np.ndarray, np.ndarray]]:
        Xtr, ytr = X[rows], y[rows]
        mu, ybar = Xtr.mean(0), ytr.mean(0)
        scale = standard_scale(Xtr.var(0)) if standardize else np.ones(X.shape[1])
        U, s, Vt = np.linalg.svd((Xtr - mu) / scale, full_matrices=False)
        uty = U.T @ (ytr - ybar)
        n = rows.sum()

        def at(alpha: float) -> tuple[np.ndarray, np.ndarray]:
            w = Vt.T @ ((s / (s**2 + alpha * n))[:, None] * uty)
            beta = w / scale[:, None]
            return beta, ybar - mu @ beta

        return at

    def r2(rows: np.ndarray, beta: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        resid = y[rows] - (X[rows] @ beta + b)
        sse = np.sum(resid**2, 0)
        sst = np.sum((y[rows] - y[rows].mean(0)) ** 2, 0)
        return 1 - sse / sst, sse

    cv_r2 = np.empty((len(alphas_arr), k, y.shape[1]))
    for f in range(k):
        at = fit((parts != f) & ~test_rows)
        for i, a in enumerate(alphas_arr):
            cv_r2[i, f] = r2(parts == f, *at(a))[0]
    score = cv_r2.mean(axis=(1, 2))
    best = int(np.argmax(score))
    train_rows = ~test_rows
    beta, b = fit(train_rows)(alphas_arr[best])
    test_r2, test_sse = r2(test_rows, beta, b)
    return RidgeResult(
        alphas=alphas_arr,
        cv_r2=cv_r2,
        cv_score=score,
        best_index=best,
        train_r2=r2(train_rows, beta, b)[0],
        test_r2=test_r2,
        test_mse=test_sse / test_rows.sum(),
        coef=beta,
        intercept=b,
        n_train=int(train_rows.sum()),
        n_test=int(test_rows.sum()),
    )


# ------------------------------------------------------------------------------------------------ baselines


def shuffle_between_groups(y: np.ndarray, groups: np.ndarray, seed: int = 0, order: np.ndarray | None = None) -> np.ndarray:
    """Give every group the target sequence of another group (cyclic derangement), resampled by relative position.

    ``order`` (e.g. env_step) sorts rows within a group; without it the array order is the time order.
    See the module docstring for why whole-episode permutation is the right null here.
    """
    y = np.asarray(y)
    groups = np.asarray(groups)
    if len(y) != len(groups):
        raise ProbeInputError(f"targets have {len(y)} rows but groups {len(groups)}")
    uniq, inverse = np.unique(groups, return_inverse=True)
    m = len(uniq)
    if m < 2:
        raise ProbeInputError("shuffling labels between groups needs at least 2 groups")
    key = np.arange(len(y)) if order is None else np.asarray(order)
    rows_sorted = np.lexsort((np.arange(len(y)), key, inverse))  # by group, then time, then position
    counts = np.bincount(inverse, minlength=m)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    cycle = np.random.default_rng(seed).permutation(m)
    source = np.empty(m, dtype=np.int64)
    source[cycle] = np.roll(cycle, -1)  # group cycle[i] takes the labels of group cycle[i+1]
    out = np.empty_like(y)
    for g in range(m):
        h = source[g]
        dst = rows_sorted[starts[g] : starts[g] + counts[g]]
        pos = (np.arange(counts[g]) * counts[h]) // counts[g]
        out[dst] = y[rows_sorted[starts[h] + pos]]
    return out


# ---------------------------------------------------------------------------------------------- classifiers


@dataclasses.dataclass
class ClassifierResult:
    """Cross-validated logistic probe. ``coef`` acts on standardised features (scale/mean from the training rows)."""

    kind: str
    classes: np.ndarray
    Cs: np.ndarray
    cv_log_loss: np.ndarray  # (n_C, k)
    cv_accuracy: np.ndarray  # (n_C, k)
    best_index: int
    train_accuracy: float
    test: dict[str, Any]
    coef: np.ndarray  # (n_classes or 1, d)
    mean: np.ndarray
    scale: np.ndarray
    n_convergence_warnings: int

    @property
    def best_C(self) -> float:
        return float(self.Cs[self.best_index])

    def to_json(self) -> dict[str, Any]:
        return {
            "cv": {
                "Cs": self.Cs.tolist(),
                "log_loss_mean": finite_floats(self.cv_log_loss.mean(1)),
                "accuracy_mean": finite_floats(self.cv_accuracy.mean(1)),
                "best_C": self.best_C,
                "best_index": int(self.best_index),
                "C_at_boundary": bool(self.best_index in (0, len(self.Cs) - 1)),
            },
            "train": {"accuracy": self.train_accuracy},
            "test": dict(self.test),
            "classes": [_scalar(c) for c in self.classes],
            "n_convergence_warnings": int(self.n_convergence_warnings),
        }


def _class_metrics(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray, majority: Any) -> dict[str, Any]:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    pred = classes[np.argmax(proba, 1)]
    col = np.searchsorted(classes, y_true)
    p_true = proba[np.arange(len(y_true)), col]
    aucs = []
    present = np.unique(y_true)
    if len(present) >= 2:
        targets = [classes[1]] if len(classes) == 2 else list(present)
        for c in targets:
            j = int(np.searchsorted(classes, c))
            aucs.append(float(roc_auc_score(y_true == c, proba[:, j])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true" is expected here
        bal = float(balanced_accuracy_score(y_true, pred))
    return {
        "accuracy": float(np.mean(pred == y_true)),
        "balanced_accuracy": bal,
        "auc": float(np.mean(aucs)) if aucs else None,
        "auc_note": None if aucs else "undefined: the test part holds a single class",
        "log_loss": float(-np.mean(np.log(np.clip(p_true, 1e-15, 1.0)))),
        "majority_accuracy": float(np.mean(y_true == majority)),
        "n_rows": int(len(y_true)),
    }


def _fit_logistic(X: np.ndarray, y: np.ndarray, Cs: np.ndarray, seed: int, standardize: bool = True) -> tuple[list[Any], np.ndarray, np.ndarray, int]:
    """Fit one model per C (warm-started along the path) on standardised X; return models, mean, scale, warnings."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mean = X.mean(0)
    scale = standard_scale(X.var(0)) if standardize else np.ones(X.shape[1])
    Z = (X - mean) / scale
    models = []
    n_warn = 0
    model = LogisticRegression(max_iter=500, warm_start=True, random_state=seed)
    for C in Cs:
        model.set_params(C=float(C))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(Z, y)
        n_warn += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        models.append((np.array(model.coef_), np.array(model.intercept_), np.array(model.classes_)))
    return models, mean, scale, n_warn


def _predict_proba(params: tuple[np.ndarray, np.ndarray, np.ndarray], Z: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Probabilities over ALL classes (a class absent from training gets probability 0)."""
    coef, intercept, fitted = params
    logits = Z @ coef.T + intercept
    if len(fitted) == 2:
        p1 = 1.0 / (1.0 + np.exp(-logits[:, 0]))
        sub = np.stack([1 - p1, p1], 1)
    elif len(fitted) == 1:
        sub = np.ones((len(Z), 1))
    else:
        logits = logits - logits.max(1, keepdims=True)
        e = np.exp(logits)
        sub = e / e.sum(1, keepdims=True)
    out = np.zeros((len(Z), len(classes)))
    out[:, np.searchsorted(classes, fitted)] = sub
    return out


def logistic_probe(
    X: np.ndarray,
    y: np.ndarray,
    parts: np.ndarray,
    Cs: Sequence[float] = DEFAULT_CS,
    *,
    seed: int = 0,
    standardize: bool = True,
) -> ClassifierResult:
    """Grouped-CV logistic probe (binary or multinomial) with standardisation from training rows only.

    ``C`` (inverse L2 strength, scikit-learn convention) is chosen by the mean held-out log-loss over the CV
    folds; the final model is refit on all CV folds and scored once on the test part.
    """
    X = np.asarray(X, np.float64)
    y = np.asarray(y)
    if y.ndim != 1:
        raise ProbeInputError(f"classification targets must be 1-D labels; found shape {y.shape}")
    if len(X) != len(y) or len(parts) != len(y):
        check_rows_match(len(X), len(y), len(parts), ("features", "targets", "parts"))
    check_finite(X, "features")
    if np.issubdtype(y.dtype, np.floating):
        check_finite(y, "targets")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ProbeInputError(f"classification target is constant (single class {classes.tolist()}): nothing to probe")
    Cs_arr = np.asarray(sorted(float(c) for c in Cs))
    k = int(parts.max()) + 1
    test_rows = parts == TEST_PART
    cv_ll = np.full((len(Cs_arr), k), np.nan)
    cv_acc = np.full((len(Cs_arr), k), np.nan)
    n_warn = 0
    for f in range(k):
        tr = (parts != f) & ~test_rows
        va = parts == f
        if len(np.unique(y[tr])) < 2:
            raise ProbeInputError(f"CV fold {f}: its training rows hold a single class; use stratified splits or more groups")
        models, mean, scale, w = _fit_logistic(X[tr], y[tr], Cs_arr, seed, standardize)
        n_warn += w
        Zva = (X[va] - mean) / scale
        for i, params in enumerate(models):
            m = _class_metrics(y[va], _predict_proba(params, Zva, classes), classes, None)
            cv_ll[i, f], cv_acc[i, f] = m["log_loss"], m["accuracy"]
    best = int(np.argmin(cv_ll.mean(1)))
    train_rows = ~test_rows
    models, mean, scale, w = _fit_logistic(X[train_rows], y[train_rows], Cs_arr[best : best + 1], seed, standardize)
    n_warn += w
    vals, counts = np.unique(y[train_rows], return_counts=True)
    majority = vals[np.argmax(counts)]
    Zte = (X[test_rows] - mean) / scale
    test = _class_metrics(y[test_rows], _predict_proba(models[0], Zte, classes), classes, majority)
    Ztr = (X[train_rows] - mean) / scale
    train_acc = float(np.mean(classes[np.argmax(_predict_proba(models[0], Ztr, classes), 1)] == y[train_rows]))
    return ClassifierResult(
        kind="binary" if len(classes) == 2 else "multiclass",
        classes=classes,
        Cs=Cs_arr,
        cv_log_loss=cv_ll,
        cv_accuracy=cv_acc,
        best_index=best,
        train_accuracy=train_acc,
        test=test,
        coef=models[0][0],
        mean=mean,
        scale=scale,
        n_convergence_warnings=n_warn,
    )


# ------------------------------------------------------------------------------------------------ drivers


def stack_shuffles(y: np.ndarray, groups: np.ndarray, n_shuffles: int, seed: int = 0, order: np.ndarray | None = None) -> np.ndarray:
    """Targets followed by ``n_shuffles`` between-group shuffled copies: (n, t * (1 + n_shuffles)).

    One stream pass then yields the statistics of the real probe and of every shuffled baseline.
    """
    y = as_target_matrix(y)
    copies = [y] + [shuffle_between_groups(y, groups, seed=seed + 1 + s, order=order) for s in range(n_shuffles)]
    return np.concatenate(copies, axis=1)


def shuffle_target_sets(n_targets: int, n_shuffles: int) -> dict[str, list[int]]:
    """Column sets of :func:`stack_shuffles` output: ``y`` then ``shuffled_0`` ..."""
    sets = {"y": list(range(n_targets))}
    for s in range(n_shuffles):
        sets[f"shuffled_{s}"] = list(range(n_targets * (s + 1), n_targets * (s + 2)))
    return sets


def _shuffled_summary(results: Sequence[RidgeResult]) -> dict[str, Any]:
    means = np.array([np.mean(r.test_r2) for r in results])
    return {
        "r2_mean": finite_float(means.mean()),
        "r2_mean_sd": finite_float(means.std(ddof=1)) if len(means) > 1 else None,
        "r2_per_dim": finite_floats(np.mean([r.test_r2 for r in results], axis=0)),
        "runs": [{"r2_mean": finite_float(m), "best_alpha": r.best_alpha} for m, r in zip(means, results)],
        "method": "whole-episode target sequences permuted among episodes (cyclic derangement, resampled by relative position)",
    }


def regression_probe(
    batches: Iterable[Batch],
    join: Join,
    split: GroupSplit,
    *,
    n_targets: int,
    n_shuffles: int = 0,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    random_features: bool = True,
    seed: int = 0,
    compute_dtype: Any = np.float64,
    target_names: Sequence[str] | None = None,
    progress: bool = False,
    total_rows: int | None = None,
    return_stats: bool = False,
    test_batches: Callable[[], Iterable[Batch]] | None = None,
    n_boot: int = DEFAULT_N_BOOT,
) -> dict[str, Any] | tuple[dict[str, Any], FoldStats]:
    """Ridge probe + baselines from ONE pass over a batch stream; returns the JSON-able per-layer record.

    With ``return_stats`` also the accumulated :class:`FoldStats` (e.g. to run INLP without another pass).
    With ``test_batches`` (a function returning a fresh stream of the same rows) a second pass scores the final
    model per held-out episode and adds the 95% interval of the test R^2 (:func:`test_r2_interval`).

    ``join(keys)`` must return targets with ``n_targets * (1 + n_shuffles)`` columns laid out as by
    :func:`stack_shuffles` (use ``array_join(stack_shuffles(...), groups)`` or ``KeyTargetTable.with_shuffles``).
    """
    stats, rand = accumulate_stats(
        batches,
        join,
        split,
        n_targets=n_targets * (1 + n_shuffles),
        compute_dtype=compute_dtype,
        random_features_seed=seed + 10_007 if random_features else None,
        progress=progress,
        total_rows=total_rows,
    )
    sets = shuffle_target_sets(n_targets, n_shuffles)
    res = ridge_cv_from_stats(stats, alphas, sets, target_names=target_names)
    out: dict[str, Any] = {"n_features": stats.n_features, **res["y"].to_json(), "baselines": {}}
    if test_batches is not None:
        out["test"] |= test_r2_interval(test_batches(), join, split, res["y"], n_targets, n_boot, seed)
    if n_shuffles:
        out["baselines"]["shuffled"] = _shuffled_summary([res[f"shuffled_{s}"] for s in range(n_shuffles)])
    if rand is not None:
        r = ridge_cv_from_stats(rand, alphas, {"y": sets["y"]})["y"]
        out["baselines"]["random_features"] = {
            "r2_mean": finite_float(np.mean(r.test_r2)),
            "r2_per_dim": finite_floats(r.test_r2),
            "best_alpha": r.best_alpha,
            "n_features": stats.n_features,
            "method": "i.i.d. N(0,1) features of the same dimension, same rows, targets and split",
        }
    return (out, stats) if return_stats else out


def test_r2_interval(batches: Iterable[Batch], join: Join, split: GroupSplit, fit: RidgeResult, n_targets: int,
                     n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> dict[str, Any]:
    """95% interval of the test R^2 (mean over dimensions), resampling held-out episodes.

    Why: rows of one episode are not independent, so the uncertainty of a held-out score comes from how few
    episodes are held out. One pass over the test rows accumulates, per test episode, the row count, the squared
    errors of the final model and the sums of y and y^2; a resample's R^2 per dimension is
    ``1 - sum w_g sse_g / sum w_g ss_g`` with ``ss_g`` taken around the mean of all test rows (a ratio bootstrap,
    so the full-weight value equals ``r2_mean``)."""
    index: dict[Any, int] = {}
    n, sse, sy, syy = [], [], [], []
    for X, keys in batches:
        y, groups = join(keys)
        y = as_target_matrix(y)[:, :n_targets]
        test = split.assign(groups) == TEST_PART
        if not test.any():
            continue
        pred = np.asarray(X, np.float64)[test] @ fit.coef + fit.intercept
        err, yt, gt = np.square(y[test] - pred), y[test], np.asarray(groups)[test]
        for g in np.unique(gt):
            rows = gt == g
            i = index.setdefault(_scalar(g), len(n))
            if i == len(n):
                n.append(0.0)
                sse.append(np.zeros(n_targets))
                sy.append(np.zeros(n_targets))
                syy.append(np.zeros(n_targets))
            n[i] += float(rows.sum())
            sse[i] += err[rows].sum(0)
            sy[i] += yt[rows].sum(0)
            syy[i] += np.square(yt[rows]).sum(0)
    if not n:
        raise ProbeInputError("no test rows in the second pass over the features")
    n_a, sse_a, sy_a, syy_a = np.asarray(n), np.stack(sse), np.stack(sy), np.stack(syy)
    mu = sy_a.sum(0) / n_a.sum()
    ss = syy_a - 2.0 * sy_a * mu + n_a[:, None] * mu**2
    g = len(n)
    w = np.ones((1, g))
    if g >= 2 and n_boot:
        draws = np.random.default_rng([seed, 5]).integers(0, g, size=(n_boot, g))
        w = np.vstack([w, np.stack([np.bincount(d, minlength=g) for d in draws])])
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.nanmean(1.0 - (w @ sse_a) / (w @ ss), axis=1)
    boot = r2[1:][np.isfinite(r2[1:])]
    lo, hi = (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))) if boot.size else (None, None)
    return {"r2_mean_ci_low": lo, "r2_mean_ci_high": hi, "r2_mean_check": finite_float(r2[0]),
            "interval": f"95% percentile bootstrap over the {g} held-out episodes ({n_boot if g >= 2 else 0} resamples)"}


def classification_probe(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    split: GroupSplit,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    n_shuffles: int = 1,
    random_features: bool = True,
    seed: int = 0,
    order: np.ndarray | None = None,
) -> dict[str, Any]:
    """Logistic probe + shuffled-label and random-feature baselines on in-memory arrays (JSON-able record)."""
    X = np.asarray(X)
    y = np.asarray(y).ravel() if np.ndim(y) == 2 and np.shape(y)[1] == 1 else np.asarray(y)
    check_rows_match(len(X), len(y), len(groups))
    parts = split.assign(groups)
    res = logistic_probe(X, y, parts, Cs, seed=seed)
    out: dict[str, Any] = {"n_features": int(X.shape[1]), **res.to_json(), "baselines": {}}
    out["baselines"]["majority_class"] = {"accuracy": res.test["majority_accuracy"]}
    if n_shuffles:
        runs = []
        for s in range(n_shuffles):
            ys = shuffle_between_groups(y, groups, seed=seed + 1 + s, order=order)
            runs.append(logistic_probe(X, ys, parts, Cs, seed=seed).test)
        acc = np.array([r["accuracy"] for r in runs])
        aucs = [r["auc"] for r in runs if r["auc"] is not None]
        out["baselines"]["shuffled"] = {
            "accuracy": float(acc.mean()),
            "accuracy_sd": float(acc.std(ddof=1)) if len(acc) > 1 else None,
            "auc": float(np.mean(aucs)) if aucs else None,
            "runs": runs,
            "method": "whole-episode label sequences permuted among episodes (cyclic derangement)",
        }
    if random_features:
        R = np.random.default_rng(seed + 10_007).standard_normal(X.shape, dtype=np.float32)
        r = logistic_probe(R, y, parts, Cs, seed=seed).test
        out["baselines"]["random_features"] = {"accuracy": r["accuracy"], "auc": r["auc"], "balanced_accuracy": r["balanced_accuracy"], "n_features": int(X.shape[1])}
    return out


# ----------------------------------------------------------------------------------------------- key joins

EPISODE_KEYS = ("run_id", "suite", "task_id", "episode")


def episode_group_ids(keys: Mapping[str, np.ndarray], columns: Sequence[str] = EPISODE_KEYS) -> np.ndarray:
    """One string id per row from the episode key columns (suite and run included: bare episode numbers collide)."""
    missing = [c for c in columns if c not in keys]
    if missing:
        raise ProbeInputError(f"key columns {missing} missing from batch keys (have {sorted(keys)})")
    cols = [np.asarray(keys[c]).astype(str) for c in columns]
    out = cols[0].astype(object)
    for c in cols[1:]:
        out = out + "|" + c.astype(object)
    return out.astype(str)


class KeyTargetTable:
    """Join store rows to targets by key columns (analyses join on keys, never on row order).

    ``key_columns`` hold one value per target row (e.g. run_id, suite, task_id, episode, env_step); calling the
    table on a batch's key dict returns ``(y (b, t), group ids (b,))`` and raises naming the first row whose key
    has no target.
    """

    def __init__(
        self,
        key_columns: Mapping[str, np.ndarray],
        targets: np.ndarray,
        match_on: Sequence[str] = (*EPISODE_KEYS, "env_step"),
        group_on: Sequence[str] = EPISODE_KEYS,
    ):
        self.targets = as_target_matrix(targets)
        self.match_on, self.group_on = tuple(match_on), tuple(group_on)
        cols = [np.asarray(key_columns[c]) for c in self.match_on]
        for c, v in zip(self.match_on, cols):
            if len(v) != len(self.targets):
                raise ProbeInputError(f"key column {c!r} has {len(v)} values but there are {len(self.targets)} target rows")
        self.index: dict[tuple, int] = {}
        for i, key in enumerate(zip(*(v.tolist() for v in cols))):
            if key in self.index:
                raise ProbeInputError(f"duplicate target key {dict(zip(self.match_on, key))}")
            self.index[key] = i

    def __call__(self, keys: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        missing = [c for c in self.match_on if c not in keys]
        if missing:
            raise ProbeInputError(f"batch keys lack columns {missing} needed to join targets (have {sorted(keys)})")
        cols = [np.asarray(keys[c]).tolist() for c in self.match_on]
        rows = np.empty(len(cols[0]), dtype=np.int64)
        for i, key in enumerate(zip(*cols)):
            j = self.index.get(key)
            if j is None:
                raise ProbeInputError(f"row {i} of the batch has no matching target: key {dict(zip(self.match_on, key))}")
            rows[i] = j
        return self.targets[rows], episode_group_ids(keys, self.group_on)

    def group_ids(self) -> np.ndarray:
        """Group (episode) id of every target row: build the GroupSplit from these before streaming."""
        keys = {c: np.array([k[i] for k in self.index]) for i, c in enumerate(self.match_on)}
        return episode_group_ids(keys, self.group_on)

    def with_shuffles(self, n_shuffles: int, seed: int = 0) -> KeyTargetTable:
        """Same keys; targets widened by :func:`stack_shuffles` (episodes = ``group_on``, time = ``env_step``)."""
        keys = {c: np.array([k[i] for k in self.index]) for i, c in enumerate(self.match_on)}
        rows = np.fromiter(self.index.values(), dtype=np.int64, count=len(self.index))
        groups = episode_group_ids(keys, self.group_on)
        order = keys["env_step"] if "env_step" in keys else None
        stacked = np.empty((len(self.targets), self.targets.shape[1] * (1 + n_shuffles)))
        stacked[rows] = stack_shuffles(self.targets[rows], groups, n_shuffles, seed, order)
        return KeyTargetTable(keys, stacked[rows], self.match_on, self.group_on)


TARGET_KINDS = ("action", "eef_pos", "gripper", "task_id", "success")


def episode_target_table(records: Sequence[Mapping[str, Any]], target: str) -> KeyTargetTable:
    """Targets per (run_id, suite, task_id, episode, env_step) from rollout records (docs/conventions.md).

    Assumes row i of ``actions``/``states`` is env step i. ``gripper`` is 1 when the executed gripper action
    (actions[:, 6]) is > 0 (LIBERO: +1 closes, -1 opens), else 0. ``eef_pos`` is states[:, :3].
    """
    if target not in TARGET_KINDS:
        raise ProbeInputError(f"unknown target {target!r}; expected one of {TARGET_KINDS}")
    keys: dict[str, list] = {c: [] for c in (*EPISODE_KEYS, "env_step")}
    ys = []
    for rec in records:
        actions = np.asarray(rec["actions"], np.float64)
        states = np.asarray(rec["states"], np.float64)
        T = len(actions)
        if target == "action":
            y = actions
        elif target == "eef_pos":
            y = states[:T, :3]
        elif target == "gripper":
            y = (actions[:, 6] > 0).astype(np.float64)[:, None]
        elif target == "task_id":
            y = np.full((T, 1), float(rec["task_id"]))
        else:
            y = np.full((T, 1), float(bool(rec["success"])))
        ys.append(y)
        for c in EPISODE_KEYS:
            keys[c].extend([rec[c]] * T)
        keys["env_step"].extend(range(T))
    if not ys:
        raise ProbeInputError("no episode records given")
    return KeyTargetTable({c: np.asarray(v) for c, v in keys.items()}, np.concatenate(ys))


# ------------------------------------------------------------------------------------------------ helpers


def _scalar(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


# ------------------------------------------------------------------------------------------------ run directory


def input_stamps(paths: Mapping[str, str | None]) -> dict[str, Any]:
    """(file name, size, modification time) of each input file: cheap stand-ins for their content in the run's
    fingerprint (a regenerated export is other data; a moved folder is not)."""
    out: dict[str, Any] = {}
    for name, path in paths.items():
        out[name] = None if path is None else [os.path.basename(path), os.path.getsize(path), os.stat(path).st_mtime_ns]
    return out


def run_layers(out_dir: str, settings: Any, layers: Sequence[tuple[str, str]],
               compute: Callable[[str, str], dict[str, Any]], shard_index: int = 0, num_shards: int = 1,
               overwrite: bool = False) -> list[dict[str, Any]] | None:
    """Probe this shard's layers into ``<out>/layers/<name>.json`` inside one run directory, then gather.

    ``out_dir/run.json`` fingerprints ``settings`` (every probe setting and the input stamps), so finished layer
    files are reused only by a rerun with the same settings; other settings are refused naming each difference
    (``overwrite`` starts over). Shards split the layers round-robin; whichever shard finds every layer done gets
    the full list (in ``layers`` order), the others None."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index {shard_index} must be in [0, --num-shards {num_shards})")
    RunDir(out_dir, RUN_JOB, settings, overwrite=overwrite)
    layer_dir = os.path.join(out_dir, "layers")
    if overwrite:
        shutil.rmtree(layer_dir, ignore_errors=True)
    os.makedirs(layer_dir, exist_ok=True)
    for name, path in layers[shard_index::num_shards]:
        part = os.path.join(layer_dir, f"{name}.json")
        if os.path.exists(part):
            print(f"[resume] layer {name} already done", file=sys.stderr)
            continue
        write_json_atomic(part, compute(name, path))
    done = []
    for name, _ in layers:
        part = os.path.join(layer_dir, f"{name}.json")
        if not os.path.exists(part):
            print(f"layer {name} not done yet (another shard?); summary not written", file=sys.stderr)
            return None
        done.append(shared_io.read_json(part, f"probe result of layer {name}", hint="delete it to recompute"))
    return done


def write_json_atomic(path: str, obj: Any) -> None:
    """Write strict JSON (indent 1, NaN refused) atomically, so a crash never leaves a half-written result."""
    shared_io.write_json_atomic(path, obj, indent=1)


# -------------------------------------------------------------------------------------------------- plots


def plot_layer_sweep(layers: Sequence[Mapping[str, Any]], kind: str, out_dir: str) -> list[str]:
    """Metric-vs-layer with baselines, CV curves and per-dimension bars; returns the written file names.

    Drawn on bare ``Figure`` objects (no pyplot), so the caller's matplotlib backend is never changed."""
    import matplotlib
    from matplotlib.figure import Figure

    def new(figsize: tuple[float, float]):
        fig = Figure(figsize=figsize)
        return fig, fig.add_subplot()

    def save(fig, name: str) -> None:
        fig.tight_layout()
        with shared_io.atomic_path(os.path.join(out_dir, name)) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        written.append(name)

    names = [str(l["layer"]) for l in layers]
    x = np.arange(len(layers))
    written = []

    def base(l: Mapping[str, Any], which: str, key: str) -> float:
        v = l.get("baselines", {}).get(which, {}).get(key)
        return np.nan if v is None else float(v)

    def val(v: Any) -> float:
        return np.nan if v is None else float(v)

    if kind == "regression":
        fig, ax = new((max(5, 0.4 * len(layers) + 3), 4))
        per_dim = np.array([[val(v) for v in l["test"]["r2_per_dim"]] for l in layers])
        dim_names = layers[0].get("target_names") or [f"dim{j}" for j in range(per_dim.shape[1])]
        for j in range(per_dim.shape[1]):
            # markers as well as lines: a one-layer sweep has no line to draw, and a legend entry must show something
            ax.plot(x, per_dim[:, j], ".-", lw=0.8, alpha=0.5, label=dim_names[j] if per_dim.shape[1] <= 10 else None)
        mean = np.array([val(l["test"]["r2_mean"]) for l in layers])
        lo = np.array([val(l["test"].get("r2_mean_ci_low")) for l in layers])
        hi = np.array([val(l["test"].get("r2_mean_ci_high")) for l in layers])
        if np.isfinite(lo).any():
            ax.errorbar(x, mean, yerr=np.clip(np.nan_to_num([mean - lo, hi - mean]), 0, None), fmt="o-", color="k",
                        lw=2, capsize=3, label="test R^2 (mean over dims), 95% interval over test episodes")
        else:
            ax.plot(x, mean, "o-", color="k", lw=2, label="test R^2 (mean over dims)")
        ax.plot(x, [base(l, "shuffled", "r2_mean") for l in layers], "x--", color="tab:red", label="shuffled labels")
        ax.plot(x, [base(l, "random_features", "r2_mean") for l in layers], "+:", color="tab:purple",
                label="random features")
        ax.set_ylabel("held-out R^2")
        fname = "r2_vs_layer.png"
    else:
        fig, ax = new((max(5, 0.4 * len(layers) + 3), 4))
        ax.plot(x, [val(l["test"]["accuracy"]) for l in layers], "o-", color="k", label="test accuracy")
        ax.plot(x, [val(l["test"]["auc"]) for l in layers], "s-", color="tab:blue", label="test AUC")
        ax.plot(x, [base(l, "shuffled", "accuracy") for l in layers], "x--", color="tab:red", label="shuffled labels (acc.)")
        ax.plot(x, [base(l, "random_features", "accuracy") for l in layers], "+:", color="tab:purple", label="random features (acc.)")
        ax.plot(x, [base(l, "majority_class", "accuracy") for l in layers], "d-.", color="grey", label="majority class")
        ax.set_ylabel("held-out score")
        fname = "accuracy_vs_layer.png"
    ax.set_xticks(x)
    tilt = len(layers) > 6 or max(len(n) for n in names) > 6
    ax.set_xticklabels(names, rotation=45 if tilt else 0, ha="right" if tilt else "center", fontsize=7)
    ax.set_xlim(-0.5, len(layers) - 0.5)
    ax.set_xlabel("layer")
    ax.legend(fontsize=7)
    save(fig, fname)

    fig, ax = new((5.5, 4))
    cmap = matplotlib.colormaps["viridis"]
    for i, l in enumerate(layers):
        cv = l["cv"]
        if kind == "regression":
            ax.semilogx(cv["alphas"], [val(v) for v in cv["r2_mean"]], color=cmap(i / max(len(layers) - 1, 1)), lw=1, label=names[i] if len(layers) <= 12 else None)
        else:
            ax.semilogx(cv["Cs"], [val(v) for v in cv["log_loss_mean"]], color=cmap(i / max(len(layers) - 1, 1)), lw=1, label=names[i] if len(layers) <= 12 else None)
    ax.set_xlabel("alpha (per-row ridge penalty)" if kind == "regression" else "C (inverse L2 strength)")
    ax.set_ylabel("CV R^2 (mean over folds, dims)" if kind == "regression" else "CV log-loss")
    if len(layers) <= 12:
        ax.legend(fontsize=6)
    save(fig, "cv_curves.png")

    if kind == "regression":
        best = max(layers, key=lambda l: val(l["cv"]["r2_mean_at_best"]))
        dims = best.get("target_names") or [f"dim{j}" for j in range(len(best["test"]["r2_per_dim"]))]
        fig, ax = new((max(4, 0.6 * len(dims) + 2), 3.5))
        xd = np.arange(len(dims))
        ax.bar(xd - 0.2, [val(v) for v in best["test"]["r2_per_dim"]], 0.4, label="probe")
        sh = best.get("baselines", {}).get("shuffled")
        if sh:
            ax.bar(xd + 0.2, [val(v) for v in sh["r2_per_dim"]], 0.4, color="tab:red", label="shuffled")
        ax.set_xticks(xd)
        ax.set_xticklabels(dims, rotation=30, fontsize=8)
        ax.set_ylabel("held-out R^2")
        ax.set_title(f"per-dimension R^2, layer {best['layer']}", fontsize=9)
        ax.legend(fontsize=7)
        save(fig, "r2_per_dim.png")
    return written
