"""Held-out SAE metrics on hand-checked cases."""

import numpy as np
import pytest

from openpi.interp.sae import metrics


def test_fvu_uses_per_dimension_mean_of_eval_rows():
    x = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 13.0]])
    # per-dim mean (3, 11): total variance = (4 + 0 + 4) + (1 + 1 + 4) = 14
    x_hat = x + np.array([[1.0, 0.0], [0.0, -1.0], [0.0, 0.0]])  # SSE = 2
    assert metrics.fvu(x, x_hat) == pytest.approx(2 / 14)
    assert metrics.fvu(x, np.tile(x.mean(0), (3, 1))) == pytest.approx(1.0)
    assert metrics.fvu(x, x) == 0.0
    # A useless reconstruction (the mean of *another* set) is worse than 1, and scale does not matter.
    assert metrics.fvu(x, np.zeros_like(x)) > 1
    assert metrics.fvu(7 * x, 7 * x_hat) == pytest.approx(2 / 14)


def test_l0_dead_dense_and_streaming_equals_one_shot():
    codes = np.array([[0.0, 2.0, 0.0, 1.0], [0.0, 3.0, 0.0, 0.0], [0.0, 1.0, 0.5, 0.0], [0.0, 4.0, 0.0, 0.0]])
    x = np.arange(8.0).reshape(4, 2)
    acc = metrics.EvalAccumulator(d_in=2, d_sae=4, dense_threshold=0.5)
    acc.add(x[:2], x[:2] * 0.9, codes[:2])
    acc.add(x[2:], x[2:] * 0.9, codes[2:])
    r = acc.result()
    assert r["l0"] == pytest.approx(6 / 4)
    assert r["dead_fraction"] == pytest.approx(1 / 4)  # latent 0 never fires
    assert r["dense_fraction"] == pytest.approx(1 / 4)  # latent 1 fires on 4/4 > 0.5 of rows
    assert r["n_rows"] == 4
    assert r["fvu"] == pytest.approx(metrics.fvu(x, x * 0.9))
    assert "mean_eval" in r["fvu_formula"]
    sp = metrics.EvalAccumulator(d_in=2, d_sae=4, dense_threshold=0.5)
    vals = np.array([[2.0, 1.0], [3.0, 0.0], [1.0, 0.5], [4.0, 0.0]])
    idx = np.array([[1, 3], [1, 0], [1, 2], [1, 2]])  # value-0 slots do not count as firing
    sp.add_sparse(x, x * 0.9, vals, idx)
    assert sp.result() == r


def test_empty_eval_set_is_an_error():
    with pytest.raises(ValueError, match="no evaluation rows"):
        metrics.EvalAccumulator(3, 5).result()
    with pytest.raises(ValueError, match=r"must both be \(batch, 3\)"):
        metrics.EvalAccumulator(3, 5).add(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((2, 5)))


def test_grouped_fvu_matches_fvu_and_pairs_resamples():
    """The grouped FVU at full weight is exactly the streaming FVU; the interval covers it; a better model's paired
    difference excludes 0; PCA with 0 components is the mean predictor (FVU 1 on its own rows)."""
    from openpi.interp.sae.metrics import GroupedFVU, PCABaseline, fvu

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(12), 30)
    x = rng.normal(size=(360, 6)) + rng.normal(size=(12, 6))[groups] * 3
    good = x + rng.normal(size=x.shape) * 0.3
    bad = x + rng.normal(size=x.shape) * 1.0
    g = GroupedFVU(6, ("good", "bad"))
    for lo in range(0, 360, 50):  # batches that cut across groups
        g.add(groups[lo:lo + 50], x[lo:lo + 50], {"good": good[lo:lo + 50], "bad": bad[lo:lo + 50]})
    out = g.summary(500, 0, pairs=[("bad", "good")])
    assert out["good"]["fvu"] == pytest.approx(fvu(x, good), rel=1e-12)
    assert out["good"]["ci_low"] <= out["good"]["fvu"] <= out["good"]["ci_high"]
    assert out["bad-good"]["ci_low"] > 0 and out["n_groups"] == 12
    assert fvu(x, PCABaseline(x, 0)(x)) == pytest.approx(1.0)
    assert fvu(x, PCABaseline(x, 6)(x)) == pytest.approx(0.0, abs=1e-12)
