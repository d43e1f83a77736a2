"""Action readout scoring: ridge vs scikit-learn, planted linear readout, controls, MCC, the sweep script."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import Ridge

from openpi.interp.sae import data, io as sae_io, scoring, sweep, synthetic
from openpi.interp.sae.cli import RowInputs


def _stream(z, chunk=37, sparse=True):
    def gen():
        for a in range(0, z.shape[0], chunk):
            pos = np.arange(a, min(a + chunk, z.shape[0]))
            yield pos, (sp.csr_matrix(z[pos]) if sparse else z[pos])

    return gen


def _planted(n_eps=30, per_ep=40, nf=12, seed=0, noise=0.1):
    rng = np.random.default_rng(seed)
    ep = np.repeat(np.arange(n_eps), per_ep)
    z = np.maximum(rng.normal(size=(ep.size, nf)), 0) * (rng.random((ep.size, nf)) < 0.5)
    w = rng.normal(size=(nf, 3))
    y = z @ w + 0.5 + noise * rng.normal(size=(ep.size, 3))
    return z, y, ep


def test_ridge_matches_sklearn_on_standardised_features():
    z, y, ep = _planted()
    cfg = scoring.ScoringConfig(lambdas=(0.01, 1.0))
    res = scoring.score_readout(_stream(z), z.shape[1], y, ep, cfg, progress=False)
    split = data.split_episodes(30, cfg.fractions, cfg.seed)[ep]
    tr = split == 0
    mu, sd = z[tr].mean(0), z[tr].std(0)
    for li, lam in enumerate(cfg.lambdas):
        model = Ridge(alpha=lam * tr.sum()).fit((z[tr] - mu) / sd, y[tr])
        pred = model.predict((z[split == 1] - mu) / sd)
        yv = y[split == 1]
        r2 = 1 - ((pred - yv) ** 2).sum(0) / ((yv - yv.mean(0)) ** 2).sum(0)
        np.testing.assert_allclose(res["val_r2_per_lambda"][li], r2, rtol=1e-6)
    assert res["n_episodes"] == {"train": 18, "val": 6, "test": 6}
    assert res["n_rows"]["train"] == 18 * 40


def test_planted_readout_is_recovered_and_shuffled_control_is_not():
    z, y, ep = _planted(noise=0.05)
    res = scoring.score_readout(_stream(z), z.shape[1], y, ep, scoring.ScoringConfig(), progress=False)
    assert res["test"]["r2_mean"] > 0.97 and min(res["test"]["mcc_sign"]) > 0.8 and min(res["test"]["mcc_median"]) > 0.8
    ctrl = scoring.score_readout(_stream(z), z.shape[1], y, ep, scoring.ScoringConfig(shuffle_labels=True), progress=False)
    assert ctrl["test"]["r2_mean"] < 0.05 and ctrl["shuffled_labels"] is True
    dense = scoring.score_readout(_stream(z, sparse=False), z.shape[1], y, ep, scoring.ScoringConfig(), progress=False)
    np.testing.assert_allclose(dense["test"]["r2"], res["test"]["r2"], rtol=1e-8)


def test_conjugate_gradient_path_equals_eigendecomposition():
    z, y, ep = _planted(nf=20)
    a = scoring.score_readout(_stream(z), 20, y, ep, scoring.ScoringConfig(lambdas=(0.1, 1.0)), progress=False)
    b = scoring.score_readout(_stream(z), 20, y, ep, scoring.ScoringConfig(lambdas=(0.1, 1.0), dense_limit=5), progress=False)
    np.testing.assert_allclose(a["val_r2_per_lambda"], b["val_r2_per_lambda"], rtol=1e-6)


def test_mcc_hand_checked():
    assert scoring.mcc(np.array(5), np.array(5), np.array(0), np.array(0)) == pytest.approx(1.0)
    assert scoring.mcc(np.array(0), np.array(0), np.array(5), np.array(5)) == pytest.approx(-1.0)
    # tp=3 tn=4 fp=1 fn=2: (12 - 2) / sqrt(4 * 5 * 5 * 6)
    assert scoring.mcc(np.array(3), np.array(4), np.array(1), np.array(2)) == pytest.approx(10 / np.sqrt(600))
    assert scoring.mcc(np.array(0), np.array(9), np.array(0), np.array(0)) == 0.0  # empty margin


def test_too_few_episodes_or_no_actions_is_an_error():
    z, y, ep = _planted(n_eps=2)
    with pytest.raises(ValueError, match="need at least 3 episodes"):
        scoring.score_readout(_stream(z), z.shape[1], y, ep, scoring.ScoringConfig(), progress=False)
    with pytest.raises(ValueError, match="no row has a predicted action label"):
        scoring.score_readout(_stream(z), z.shape[1], np.full_like(y, np.nan), ep, scoring.ScoringConfig(), progress=False)


def test_sweep_scores_every_sae_and_resumes(tmp_path):
    info = synthetic.planted_rollouts(tmp_path / "roll", n_episodes=15, steps=30)
    sae_io.save_sae(tmp_path / "saes" / "exact", synthetic.exact_sae(info["atoms"], 8))
    sae_io.save_sae(tmp_path / "saes" / "unrelated", synthetic.exact_sae(synthetic.orthonormal_atoms(16, 32, seed=9)[:3], 1))
    inputs = RowInputs(activations=info["activations"], keys=info["keys"], rollouts=info["rollouts"])
    args = sweep.SweepArgs(saes=str(tmp_path / "saes" / "*"), inputs=inputs, out=tmp_path / "out", num_shards=2,
                           shard_index=1)
    assert sweep.run(args) is None  # shard 1 of 2: scores "unrelated" only, cannot summarise yet
    assert sorted(p.name for p in (tmp_path / "out" / "per_sae").iterdir()) == [f"{sweep.safe_name(str(tmp_path / 'saes' / 'unrelated'))}.json"]
    summary = sweep.run(dataclasses.replace(args, shard_index=0))
    assert summary["best"]["name"] == "exact"
    assert summary["scoring"]["label"] == "predicted" and summary["label_rule"]["action_token_rows"] == 15 * 30 * 2
    names = [s["name"] for s in summary["saes"]]
    assert names == ["exact", "unrelated"]
    exact = summary["saes"][0]["result"]
    assert exact["test"]["r2"][0] > 0.6 and exact["test"]["mcc_sign"][0] > 0.7  # code 0 = relu(2 * x-action)
    assert exact["label"] == "predicted"
    assert summary["baselines"]["activations_shuffled_labels"]["test"]["r2_mean"] < summary["baselines"]["activations"]["test"]["r2_mean"]
    with open(tmp_path / "out" / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == ["exact", "unrelated", "baseline:activations", "baseline:activations_shuffled_labels"]
    assert float(rows[0]["test_r2_dx"]) == pytest.approx(exact["test"]["r2"][0])
    # Rerun: cached results are reused (files untouched), summary rewritten identically.
    per = tmp_path / "out" / "per_sae"
    mtimes = {p.name: p.stat().st_mtime_ns for p in per.iterdir()}
    again = sweep.run(dataclasses.replace(args, shard_index=0, num_shards=1))
    assert {p.name: p.stat().st_mtime_ns for p in per.iterdir()} == mtimes
    assert json.loads(json.dumps(again)) == json.loads((tmp_path / "out" / "scores.json").read_text())
    # The executed label: token 1's action is never executed (replanned every step), so only token-0 rows count.
    executed = sweep.run(dataclasses.replace(args, shard_index=0, num_shards=1, out=tmp_path / "exec",
                                             scoring=scoring.ScoringConfig(label="executed")))
    assert executed["saes"][0]["result"]["label"] == "executed"
    assert sum(executed["saes"][0]["result"]["n_rows"].values()) == 15 * 30
    with pytest.raises(FileNotFoundError, match="no SAE folder"):
        sweep.run(dataclasses.replace(args, saes=str(tmp_path / "none*")))
    with pytest.raises(ValueError, match="--rollouts is required"):
        sweep.run(dataclasses.replace(args, inputs=RowInputs(activations=info["activations"], keys=info["keys"])))
