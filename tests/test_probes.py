"""Linear probes on synthetic data with a planted answer (openpi.interp.probes, linear_probe.py)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from openpi.interp import probes as P
from openpi.shared.rundir import RunSettingsError



def planted_regression(n=6000, d=20, n_groups=100, seed=0, offset=0.0):
    """y_j = X w_j + noise_j with var(X w_j) = signal_j and var(noise_j) = noise_j (X ~ N(0, I))."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    signal = np.array([3.0, 1.0, 0.25])
    noise = np.array([1.0, 1.0, 1.0])
    W = rng.standard_normal((d, 3))
    W *= np.sqrt(signal) / np.linalg.norm(W, axis=0)  # var(X w) = ||w||^2 for X ~ N(0, I)
    y = X @ W + rng.standard_normal((n, 3)) * np.sqrt(noise)
    groups = np.repeat(np.arange(n_groups), n // n_groups)
    theory = signal / (signal + noise)
    return (X + offset).astype(np.float32), y, groups, theory


def stream_probe(X, y, groups, split, n_shuffles=0, batch=997, random_features=False, dtype=np.float64):
    stacked = P.stack_shuffles(y, groups, n_shuffles, seed=0)
    return P.regression_probe(P.array_batches(X, batch), P.array_join(stacked, groups), split, n_targets=np.shape(y)[1],
                              n_shuffles=n_shuffles, random_features=random_features, compute_dtype=dtype)


def test_planted_linear_map_reaches_theoretical_r2_and_baselines_are_zero():
    X, y, groups, theory = planted_regression()
    split = P.make_group_split(groups, 5, 0.2, seed=1)
    rec = stream_probe(X, y, groups, split, n_shuffles=3, random_features=True)
    r2 = np.array(rec["test"]["r2_per_dim"])
    # theory = signal / (signal + noise) = [0.75, 0.5, 0.2]; test part has 1200 rows (sd of R^2 ~ 0.02)
    np.testing.assert_allclose(r2, theory, atol=0.04)
    assert abs(rec["test"]["r2_mean"] - theory.mean()) < 0.03
    assert abs(rec["baselines"]["shuffled"]["r2_mean"]) < 0.02
    assert all(abs(v) < 0.05 for v in rec["baselines"]["shuffled"]["r2_per_dim"])
    assert abs(rec["baselines"]["random_features"]["r2_mean"]) < 0.02
    assert rec["cv"]["best_alpha"] in rec["cv"]["alphas"]
    assert len(rec["cv"]["r2_per_fold"]) == len(rec["cv"]["alphas"]) and len(rec["cv"]["r2_per_fold"][0]) == 5


def test_streaming_equals_in_memory_svd_and_sklearn():
    # Large common offset: the shifted sufficient statistics must not lose precision to cancellation.
    X, y, groups, _ = planted_regression(n=2400, d=15, n_groups=48, seed=3, offset=300.0)
    X[:, 4] *= 50.0  # unequal feature scales: standardisation matters
    split = P.make_group_split(groups, 4, 0.25, seed=0)
    parts = split.assign(groups)
    stats, _ = P.accumulate_stats(P.array_batches(X, 313), P.array_join(y, groups), split, n_targets=3)
    s = P.ridge_cv_from_stats(stats)["y"]
    d = P.ridge_cv_dense(X, y, parts)
    assert s.best_alpha == d.best_alpha
    np.testing.assert_allclose(s.cv_r2, d.cv_r2, atol=1e-8)
    np.testing.assert_allclose(s.test_r2, d.test_r2, atol=1e-8)
    np.testing.assert_allclose(s.coef, d.coef, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(s.intercept, d.intercept, rtol=1e-6, atol=1e-6)
    # Independent check of the fitted coefficients with scikit-learn on the standardised training rows.
    from sklearn.linear_model import Ridge

    tr = parts != P.TEST_PART
    Xt = X[tr].astype(np.float64)
    mu, sd = Xt.mean(0), Xt.std(0)
    m = Ridge(alpha=s.best_alpha * tr.sum(), solver="svd").fit((Xt - mu) / sd, y[tr])
    np.testing.assert_allclose(m.coef_.T / sd[:, None], s.coef, rtol=1e-5, atol=1e-9)
    # Predictions of the stored original-unit model reproduce the test R^2.
    te = ~tr
    pred = X[te].astype(np.float64) @ s.coef + s.intercept
    r2 = 1 - ((y[te] - pred) ** 2).sum(0) / ((y[te] - y[te].mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(r2, s.test_r2, atol=1e-8)


def test_stream_is_invariant_to_row_order_and_batch_size():
    X, y, groups, _ = planted_regression(n=1800, d=12, n_groups=36, seed=5)
    split = P.make_group_split(groups, 3, 0.2, seed=2)
    a = P.ridge_cv_from_stats(P.accumulate_stats(P.array_batches(X, 1800), P.array_join(y, groups), split, n_targets=3)[0])["y"]
    perm = np.random.default_rng(0).permutation(len(X))
    b = P.ridge_cv_from_stats(P.accumulate_stats(P.array_batches(X[perm], 64), P.array_join(y[perm], groups[perm]), split, n_targets=3)[0])["y"]
    np.testing.assert_allclose(a.cv_r2, b.cv_r2, atol=1e-9)
    np.testing.assert_allclose(a.test_r2, b.test_r2, atol=1e-9)
    c = P.ridge_cv_from_stats(P.accumulate_stats(P.array_batches(X, 500), P.array_join(y, groups), split, n_targets=3, compute_dtype=np.float32)[0])["y"]
    np.testing.assert_allclose(c.test_r2, a.test_r2, atol=1e-4)


def test_target_sets_share_one_decomposition_but_choose_their_own_penalty():
    X, y, groups, _ = planted_regression(n=3000, d=20, n_groups=60, seed=7)
    split = P.make_group_split(groups, 5, 0.2, seed=0)
    stacked = P.stack_shuffles(y, groups, 2, seed=0)
    stats, _ = P.accumulate_stats(P.array_batches(X, 1000), P.array_join(stacked, groups), split, n_targets=9)
    sets = P.shuffle_target_sets(3, 2)
    assert sets == {"y": [0, 1, 2], "shuffled_0": [3, 4, 5], "shuffled_1": [6, 7, 8]}
    res = P.ridge_cv_from_stats(stats, target_sets=sets)
    alone = P.ridge_cv_from_stats(stats.select_targets([0, 1, 2]))["y"]
    np.testing.assert_allclose(res["y"].test_r2, alone.test_r2, atol=1e-10)
    assert res["y"].best_alpha < res["shuffled_0"].best_alpha  # no signal -> heavier penalty


def test_shuffle_between_groups_is_a_derangement_of_whole_episodes():
    groups = np.repeat(np.array(["a", "b", "c", "d", "e"]), [4, 6, 5, 4, 8])
    y = np.concatenate([np.full(c, i, float) for i, c in enumerate([4, 6, 5, 4, 8])])  # label = own group index
    t = np.concatenate([np.arange(c) for c in [4, 6, 5, 4, 8]])
    for seed in range(5):
        ys = P.shuffle_between_groups(y, groups, seed=seed, order=t)
        for gi, g in enumerate("abcde"):
            vals = np.unique(ys[groups == g])
            assert len(vals) == 1 and vals[0] != gi  # a whole other episode, never its own
    # Equal lengths: the time series is transplanted unchanged; resampling keeps order for unequal lengths.
    g2 = np.repeat([0, 1], 5)
    y2 = np.r_[np.arange(5), 10 + np.arange(5)].astype(float)
    np.testing.assert_array_equal(P.shuffle_between_groups(y2, g2, seed=0), np.r_[10 + np.arange(5), np.arange(5)])
    with pytest.raises(P.ProbeInputError, match="at least 2 groups"):
        P.shuffle_between_groups(y2, np.zeros(10), seed=0)


def test_group_split_keeps_groups_whole_and_spreads_strata():
    groups = np.repeat(np.arange(40), 7)
    strata = (np.arange(40) % 4)[groups]
    split = P.make_group_split(groups, 5, 0.2, seed=3, strata=strata)
    parts = split.assign(groups)
    for g in range(40):
        assert len(np.unique(parts[groups == g])) == 1
    assert split.to_json()["n_test_groups"] == 8
    for s in range(4):  # every stratum reaches the test part and at least 4 of 5 folds
        ps = set(parts[strata == s].tolist())
        assert P.TEST_PART in ps and len(ps - {P.TEST_PART}) >= 4
    with pytest.raises(P.ProbeInputError, match=r"found 5 distinct groups .* n_folds=5 needs at least 6"):
        P.make_group_split(np.repeat(np.arange(5), 3), 5, 0.2)
    with pytest.raises(P.ProbeInputError, match="not in the group split"):
        split.assign(np.array([99]))


def test_logistic_probe_on_planted_binary_target():
    rng = np.random.default_rng(0)
    n, d = 2400, 10
    X = rng.standard_normal((n, d))
    w = np.zeros(d)
    w[:2] = [2.0, -1.0]
    s = np.linalg.norm(w)
    y = (X @ w + rng.standard_normal(n) > 0).astype(int)
    groups = np.repeat(np.arange(48), n // 48)
    split = P.make_group_split(groups, 4, 0.25, seed=0)
    rec = P.classification_probe(X, y, groups, split, Cs=(0.01, 1.0, 100.0), n_shuffles=2, random_features=True)
    bayes = 1 - math.acos(s / math.sqrt(s**2 + 1)) / math.pi  # P(sign(xw + e) == sign(xw)), e ~ N(0, 1)
    assert abs(rec["test"]["accuracy"] - bayes) < 0.04
    assert rec["test"]["auc"] > 0.9
    assert abs(rec["baselines"]["shuffled"]["accuracy"] - 0.5) < 0.07
    assert abs(rec["baselines"]["random_features"]["accuracy"] - 0.5) < 0.07
    assert rec["classes"] == [0, 1]


def test_task_id_classification_with_group_constant_labels():
    rng = np.random.default_rng(1)
    n_groups, per = 40, 20
    task = np.arange(n_groups) % 4
    groups = np.repeat(np.arange(n_groups), per)
    y = task[groups]
    X = rng.standard_normal((len(y), 8))
    X[:, :4] += 2.5 * np.eye(4)[y]
    split = P.make_group_split(groups, 4, 0.25, seed=0, strata=y)
    res = P.logistic_probe(X, y, split.assign(groups), Cs=(0.1, 1.0))
    assert res.kind == "multiclass" and res.test["accuracy"] > 0.85
    assert res.test["majority_accuracy"] < 0.4


def test_key_table_joins_store_batches_by_keys_not_order(tmp_path):
    records = []
    for ep in range(6):
        T = 5 + ep
        acts = np.arange(T * 7, dtype=float).reshape(T, 7) + 100 * ep
        acts[:, 6] = np.where(np.arange(T) % 2, 1.0, -1.0)
        records.append({"run_id": "r", "suite": "libero_goal" if ep % 2 else "libero_10", "task_id": ep % 3, "episode": ep,
                        "success": ep % 2 == 0, "actions": acts, "states": np.ones((T, 8)) * ep})
    table = P.episode_target_table(records, "action")
    grip = P.episode_target_table(records, "gripper")
    # a store batch: rows in scrambled order, one row per (episode, env_step)
    keys = {c: [] for c in ("run_id", "suite", "task_id", "episode", "env_step", "denoise_step")}
    expect, expect_g = [], []
    for r in records:
        for t in range(len(r["actions"])):
            for c in ("run_id", "suite", "task_id", "episode"):
                keys[c].append(r[c])
            keys["env_step"].append(t)
            keys["denoise_step"].append(-1)
            expect.append(r["actions"][t])
            expect_g.append(float(r["actions"][t, 6] > 0))
    perm = np.random.default_rng(0).permutation(len(expect))
    batch = {c: np.asarray(v)[perm] for c, v in keys.items()}
    y, g = table(batch)
    np.testing.assert_array_equal(y, np.asarray(expect)[perm])
    np.testing.assert_array_equal(grip(batch)[0][:, 0], np.asarray(expect_g)[perm])
    assert g[0].count("|") == 3 and len(np.unique(g)) == 6
    # shuffled widening keeps the real targets in the first columns and moves whole episodes
    wide = table.with_shuffles(2, seed=0)
    yw, _ = wide(batch)
    np.testing.assert_array_equal(yw[:, :7], y)
    assert yw.shape[1] == 21 and not np.allclose(yw[:, 7:14], y)
    bad = dict(batch, env_step=np.where(np.arange(len(perm)) == 3, 999, batch["env_step"]))
    with pytest.raises(P.ProbeInputError, match="row 3 of the batch has no matching target.*'env_step': 999"):
        table(bad)


def test_bad_inputs_give_named_errors():
    X, y, groups, _ = planted_regression(n=600, d=5, n_groups=30, seed=0)
    split = P.make_group_split(groups, 3, 0.2)
    with pytest.raises(P.ProbeInputError, match="feature row 599 has no matching target row"):
        P.accumulate_stats(P.array_batches(X, 100), P.array_join(y[:550], groups), split, n_targets=3)
    Xn = X.copy()
    Xn[123, 2] = np.nan
    with pytest.raises(P.ProbeInputError, match=r"features contains 1 non-finite.*batch starting at stream row 100.*\(23, 2\)"):
        P.accumulate_stats(P.array_batches(Xn, 100), P.array_join(y, groups), split, n_targets=3)
    yn = y.copy()
    yn[5, 0] = np.nan
    with pytest.raises(P.ProbeInputError, match="non-finite"):
        P.accumulate_stats(P.array_batches(X, 100), P.array_join(yn, groups), split, n_targets=3)
    yc = y.copy()
    yc[:, 1] = 4.0
    stats, _ = P.accumulate_stats(P.array_batches(X, 100), P.array_join(yc, groups), split, n_targets=3)
    with pytest.raises(P.ProbeInputError, match="target dz is constant"):
        P.ridge_cv_from_stats(stats, target_names=["dx", "dz", "dy"])
    with pytest.raises(P.ProbeInputError, match="constant"):
        P.logistic_probe(X, np.ones(len(X)), split.assign(groups))
    with pytest.raises(P.ProbeInputError, match="row counts differ: features has 600 rows, targets 599"):
        P.check_rows_match(600, 599, 600)


def _run_cli(tmp_path, **kw):
    from openpi.interp import probe_cli as linear_probe

    args = linear_probe.Args(progress=False, **kw)
    return linear_probe, linear_probe.main(args)


def test_cli_layer_sweep_schema_plots_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 1500, 12
    groups = np.repeat(np.arange(30), 50)
    Z = rng.standard_normal((n, 3))
    for i, snr in enumerate([0.0, 2.0]):
        np.save(tmp_path / f"layer_{i}.npy", (snr * Z @ rng.standard_normal((3, d)) + rng.standard_normal((n, d))).astype(np.float32))
    np.save(tmp_path / "Y.npy", Z)
    np.save(tmp_path / "G.npy", groups)
    out = tmp_path / "out"
    mod, rc = _run_cli(tmp_path, features=(str(tmp_path / "layer_*.npy"),), targets=str(tmp_path / "Y.npy"), groups=str(tmp_path / "G.npy"),
                       out=str(out), n_shuffles=2, inlp=True, inlp_max_iter=6)
    assert rc == 0
    res = json.loads((out / "probe_results.json").read_text())
    assert res["schema"] == "vla-interp/probe_results/v1" and res["best_layer"] == "layer_1"
    assert [l["layer"] for l in res["layers"]] == ["layer_0", "layer_1"]
    assert res["test"]["r2_mean"] > 0.6 and len(res["test"]["r2_per_dim"]) == 3
    assert abs(res["layers"][0]["test"]["r2_mean"]) < 0.05
    assert abs(res["baselines"]["shuffled"]["r2_mean"]) < 0.05 and abs(res["baselines"]["random_features"]["r2_mean"]) < 0.05
    for f in ("r2_vs_layer.png", "cv_curves.png", "r2_per_dim.png", "inlp.png", "inlp_results.json", "inlp_basis.npy"):
        assert (out / f).stat().st_size > 0
    inl = json.loads((out / "inlp_results.json").read_text())
    assert inl["stop_reason"] == "baseline_reached" and inl["total_rank_removed"] >= 3
    metrics = [it["metric"] for it in inl["iterations"]]
    assert metrics[0] > 0.6 and metrics[-1] <= inl["band"]["upper"] and all(a > b for a, b in zip(metrics, metrics[1:]))
    # The test R^2 has a 95% interval over the held-out episodes; its full-weight value is the probe's own R^2.
    test = res["test"]
    assert test["r2_mean_check"] == pytest.approx(test["r2_mean"], abs=1e-6)
    assert test["r2_mean_ci_low"] < test["r2_mean"] < test["r2_mean_ci_high"] and "6 held-out episodes" in test["interval"]
    assert test["r2_mean_ci_low"] > res["baselines"]["shuffled"]["r2_mean"]
    # resume: the same command reuses the per-layer results (files untouched) ...
    same = dict(features=(str(tmp_path / "layer_*.npy"),), targets=str(tmp_path / "Y.npy"), groups=str(tmp_path / "G.npy"),
                out=str(out), n_shuffles=2, inlp=True, inlp_max_iter=6, progress=False)
    before = {p: os.stat(out / "layers" / p).st_mtime_ns for p in os.listdir(out / "layers")}
    mod.main(mod.Args(**same, shard_index=0, num_shards=1))
    assert before == {p: os.stat(out / "layers" / p).st_mtime_ns for p in os.listdir(out / "layers")}
    run = json.loads((out / "run.json").read_text())
    assert run["job"] == "probes" and "shard_index" not in run["settings"]["probe"] and "out" not in run["settings"]["probe"]
    # ... other settings are refused naming the difference, and a regenerated input is other data
    with pytest.raises(RunSettingsError, match="probe.n_shuffles: stored 2 vs now 3"):
        mod.main(mod.Args(**{**same, "n_shuffles": 3}))
    np.save(tmp_path / "Y.npy", Z * 2)
    with pytest.raises(RunSettingsError, match="inputs.targets"):
        mod.main(mod.Args(**same))


def test_cli_shards_split_layers_and_the_last_one_summarises(tmp_path):
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(12), 20)
    y = rng.standard_normal((240, 2))
    for i in range(3):
        np.save(tmp_path / f"layer_{i}.npy", (y @ rng.standard_normal((2, 6)) * i + rng.standard_normal((240, 6))).astype(np.float32))
    np.save(tmp_path / "Y.npy", y)
    np.save(tmp_path / "G.npy", groups)
    out = tmp_path / "out"
    kw = dict(features=(str(tmp_path / "layer_*.npy"),), targets=str(tmp_path / "Y.npy"), groups=str(tmp_path / "G.npy"),
              out=str(out), n_shuffles=1, n_folds=3, random_features=False, num_shards=2)
    _run_cli(tmp_path, shard_index=0, **kw)
    assert sorted(os.listdir(out / "layers")) == ["layer_0.json", "layer_2.json"] and not (out / "probe_results.json").exists()
    _run_cli(tmp_path, shard_index=1, **kw)
    res = json.loads((out / "probe_results.json").read_text())
    assert [l["layer"] for l in res["layers"]] == ["layer_0", "layer_1", "layer_2"] and res["best_layer"] == "layer_2"


def test_cli_rejects_bad_input_before_writing(tmp_path):
    np.save(tmp_path / "X.npy", np.zeros((100, 4), np.float32))
    np.save(tmp_path / "Y.npy", np.arange(180.0).reshape(90, 2))
    np.save(tmp_path / "G.npy", np.repeat(np.arange(10), 10))
    with pytest.raises(P.ProbeInputError, match=r"features .*X.npy has 100 rows, targets .*Y.npy 90"):
        _run_cli(tmp_path, features=(str(tmp_path / "X.npy"),), targets=str(tmp_path / "Y.npy"), groups=str(tmp_path / "G.npy"), out=str(tmp_path / "o"))
    np.save(tmp_path / "Y.npy", np.zeros((100, 2)))
    with pytest.raises(P.ProbeInputError, match="target dim0 is constant"):
        _run_cli(tmp_path, features=(str(tmp_path / "X.npy"),), targets=str(tmp_path / "Y.npy"), groups=str(tmp_path / "G.npy"), out=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_store_like_stream_with_key_join_matches_positional_arrays():
    """A store iterator (rows in any order, keyed) + KeyTargetTable gives the same probe as aligned arrays."""
    rng = np.random.default_rng(4)
    records, feats = [], {}
    M = rng.standard_normal((7, 24))
    for ep in range(30):
        T = 30 + ep % 7
        acts = rng.standard_normal((T, 7))
        records.append({"run_id": "r1", "suite": ["libero_10", "libero_goal"][ep % 2], "task_id": ep % 5, "episode": ep // 2,
                        "success": True, "actions": acts, "states": np.zeros((T, 8))})
        for t in range(T):
            feats[("r1", records[-1]["suite"], ep % 5, ep // 2, t)] = acts[t] @ M + rng.standard_normal(24)
    table = P.episode_target_table(records, "action").with_shuffles(2, seed=0)
    split = P.make_group_split(table.group_ids(), 4, 0.25, seed=0)
    keys = list(feats)
    order = rng.permutation(len(keys))

    def store_batches():
        for lo in range(0, len(order), 256):
            sel = [keys[i] for i in order[lo : lo + 256]]
            cols = list(zip(*sel))
            yield np.stack([feats[k] for k in sel]).astype(np.float32), {
                "run_id": np.array(cols[0]), "suite": np.array(cols[1]), "task_id": np.array(cols[2]),
                "episode": np.array(cols[3]), "env_step": np.array(cols[4]), "denoise_step": np.full(len(sel), -1)}

    rec, stats = P.regression_probe(store_batches(), table, split, n_targets=7, n_shuffles=2, random_features=False, return_stats=True)
    assert stats.n.sum() == len(keys) and stats.n_targets == 21
    # positional version of the same data
    X = np.stack([feats[k] for k in keys]).astype(np.float32)
    y, groups = table({c: np.array(v) for c, v in zip(("run_id", "suite", "task_id", "episode", "env_step"), zip(*keys))})
    ref = P.ridge_cv_dense(X, y[:, :7], split.assign(groups))
    np.testing.assert_allclose(rec["test"]["r2_per_dim"], ref.test_r2, atol=1e-8)
    assert rec["test"]["r2_mean"] > 0.8 and abs(rec["baselines"]["shuffled"]["r2_mean"]) < 0.05
