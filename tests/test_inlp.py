"""INLP on features with planted rank-r information (openpi.interp.inlp)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from openpi.interp import inlp as I
from openpi.interp import probes as P


def planted_rank_r(n=12000, d=10, r=3, seed=0):
    """Scalar y = sum of r latents, seen through an ill-conditioned mixing B in the first r features.

    The information lives in an r-dimensional subspace (features 0..r-1) but no single direction carries all
    of it: removing the best direction leaves information in the rest of the subspace, so INLP needs r steps.
    The other features are noise of unequal scales (standardisation maps the planted subspace to itself).
    """
    rb = np.random.default_rng(3)
    U = np.linalg.qr(rb.standard_normal((r, r)))[0]
    V = np.linalg.qr(rb.standard_normal((r, r)))[0]
    B = U @ np.diag([1.0, 0.4, 0.15]) @ V.T
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, r))
    y = s.sum(1) + 0.3 * rng.standard_normal(n)
    X = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d)
    X[:, r:] = X[:, r:] @ np.linalg.qr(rng.standard_normal((d - r, d - r)))[0]
    X[:, :r] = s @ B.T + 0.05 * rng.standard_normal((n, r))
    groups = np.repeat(np.arange(n // 50), 50)
    return X + 3.0, y, groups


def test_inlp_removes_planted_rank_r_information_in_r_iterations():
    r, S = 3, 5
    X, y, groups = planted_rank_r(r=r)
    split = P.make_group_split(groups, 5, 0.2, seed=0)
    stats, _ = P.accumulate_stats(P.array_batches(X, 4000), P.array_join(P.stack_shuffles(y, groups, S), groups), split, n_targets=1 + S)
    res = I.inlp_from_stats(stats, n_targets=1, n_shuffles=S, max_iter=10)
    metrics = [it["metric"] for it in res.iterations]
    upper = res.band["upper"]
    assert res.stop_reason == "baseline_reached"
    assert res.stopped_at <= r  # within r iterations (r directions removed)
    assert metrics[0] > 0.8
    assert metrics[r - 1] > upper + 0.03  # r - 1 directions are not enough: the test is not trivial
    assert [it["rank_removed"] for it in res.iterations] == list(range(len(metrics)))  # scalar target: rank 1 per step
    # The removed directions span the planted subspace (features 0..r-1 of the standardised space).
    Q = res.basis[:, :r]
    np.testing.assert_allclose(Q.T @ Q, np.eye(r), atol=1e-8)
    cosines = np.linalg.svd(Q[:r])[1]
    assert cosines.min() > 0.8 and cosines.mean() > 0.95
    # Shuffled band is centred near 0 for a probe without signal.
    assert abs(res.band["shuffled_mean"]) < 0.01 and res.band["n_shuffles"] == S
    json.dumps(res.to_json(), allow_nan=False)


def test_affine_stats_equal_stats_of_transformed_data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 6)) * 3 + 7
    y = rng.standard_normal((500, 2))
    groups = np.repeat(np.arange(25), 20)
    split = P.make_group_split(groups, 3, 0.2)
    mean = rng.standard_normal(6)
    M = rng.standard_normal((6, 6))
    a = P.accumulate_stats(P.array_batches(X, 128), P.array_join(y, groups), split, n_targets=2)[0].affine(mean, M)
    b = P.accumulate_stats(P.array_batches((X - mean) @ M, 128), P.array_join(y, groups), split, n_targets=2)[0]
    for p in range(split.n_folds + 1):
        ma, mb = a.moments([p]), b.moments([p])
        # b holds sums around its own shift; compare shift-free quantities
        for m, s in ((ma, a.x_shift), (mb, b.x_shift)):
            m.xx = m.xx + np.outer(m.sx, s) + np.outer(s, m.sx) + m.n * np.outer(s, s)
            m.sx = m.sx + m.n * s
        np.testing.assert_allclose(ma.sx, mb.sx, rtol=1e-9, atol=1e-7)
        np.testing.assert_allclose(ma.xx, mb.xx, rtol=1e-9, atol=1e-6)


def test_extend_basis_adds_only_new_directions():
    rng = np.random.default_rng(1)
    Q = np.zeros((8, 0))
    W = rng.standard_normal((8, 2))
    Q, added = I.extend_basis(Q, W)
    assert added == 2 and Q.shape == (8, 2)
    Q2, added2 = I.extend_basis(Q, W @ rng.standard_normal((2, 3)))  # inside the span already
    assert added2 == 0 and Q2.shape == (8, 2)
    Q3, added3 = I.extend_basis(Q, np.c_[W[:, :1], rng.standard_normal(8)])
    assert added3 == 1
    np.testing.assert_allclose(Q3.T @ Q3, np.eye(3), atol=1e-10)


def test_classification_inlp_binary_rank_one():
    rng = np.random.default_rng(2)
    n, d = 1600, 8
    X = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d)
    y = (X[:, 0] / X[:, 0].std() + 0.3 * rng.standard_normal(n) > 0).astype(int)  # one informative feature
    groups = np.repeat(np.arange(40), 40)
    split = P.make_group_split(groups, 4, 0.25, seed=0)
    res = I.inlp_classification(X, y, groups, split, Cs=(0.1, 10.0), n_shuffles=3, max_iter=4)
    assert res.iterations[0]["metric"] > 0.85
    assert res.stop_reason == "baseline_reached" and res.stopped_at <= 1
    assert abs(res.basis[0, 0]) > 0.95  # the removed direction is the informative feature


def test_inlp_needs_shuffles():
    with pytest.raises(P.ProbeInputError, match="at least one shuffled"):
        I.make_band([])
