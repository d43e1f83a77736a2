"""Action PCA with a planted low-rank structure and the rollout-record reader (openpi.interp.action_pca)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from openpi.interp import action_pca as A



def test_planted_rank_two_actions_are_recovered():
    rng = np.random.default_rng(0)
    n = 3000
    L = np.linalg.qr(rng.standard_normal((7, 2)))[0]  # planted loadings in the standardised space
    scales = np.array([0.01, 0.01, 0.02, 0.1, 0.1, 0.2, 1.0])  # LIBERO-like units differ per dimension
    Zs = rng.standard_normal((n, 2)) * [3.0, 1.5] @ L.T + 0.01 * rng.standard_normal((n, 7))
    std0 = Zs.std(0)
    Zs /= std0  # standardised actions: planted subspace = span(L / std0)
    actions = Zs * scales + 5 * scales
    res = A.pca(actions)
    assert res.cumulative[1] > 0.999
    np.testing.assert_allclose(res.cumulative[-1], 1.0, atol=1e-12)
    np.testing.assert_allclose(res.explained_variance.sum(), 7.0, rtol=1e-10)  # total variance of z-scores
    # the top-2 components span the planted loading subspace (after standardisation)
    cos = np.linalg.svd(res.components[:2] @ np.linalg.qr(L / std0[:, None])[0])[1]
    assert cos.min() > 0.99
    np.testing.assert_allclose(res.components @ res.components.T, np.eye(7), atol=1e-10)
    np.testing.assert_allclose(res.scores[:, 0].var(), res.explained_variance[0], rtol=1e-10)
    # without standardisation the large-unit gripper dominates PC1
    raw = A.pca(actions, standardize=False)
    assert abs(raw.components[0, 6]) > 0.9 and abs(res.components[0, 6]) < 0.9


def test_constant_dimension_is_reported_not_nan():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((200, 7))
    a[:, 6] = -1.0  # gripper never closes
    res = A.pca(a)
    assert res.constant_dims == [6] and np.isfinite(res.components).all()
    assert res.explained_variance_ratio[-1] < 1e-20


def _write_episode(root, i, T=20, **override):
    rng = np.random.default_rng(i)
    rec = {"run_id": "run0", "suite": ["libero_spatial", "libero_goal"][i % 2], "task_id": i % 3, "episode": i, "prompt": "pick",
           "success": bool(i % 2), "steps": T, "seed": 0, "init_state_index": i, "actions": rng.standard_normal((T, 7)).tolist(),
           "chunks": [], "states": rng.standard_normal((T, 8)).tolist(), "failure_reason": None}
    rec.update(override)
    os.makedirs(root / "episodes", exist_ok=True)
    path = root / "episodes" / f"{rec['run_id']}__{rec['suite']}__task{rec['task_id']}__ep{rec['episode']}.json"
    path.write_text(json.dumps(rec))
    return path


def test_reader_validates_records(tmp_path):
    for i in range(4):
        _write_episode(tmp_path, i, T=10 + i)
    recs, skipped = A.load_records(tmp_path)
    table = A.table_from_records(recs)
    assert table.actions.shape == (10 + 11 + 12 + 13, 7) and len(table.episode_ids) == 4 and skipped == []
    assert set(table.task.tolist()) == {"libero_spatial/0", "libero_goal/1", "libero_spatial/2", "libero_goal/0"}
    bad = _write_episode(tmp_path, 5, states=np.zeros((3, 8)).tolist())
    with pytest.raises(A.ActionInputError, match=r"ep5.json: 20 actions but 3 states"):
        A.load_records(tmp_path)
    bad.unlink()
    p = _write_episode(tmp_path, 6)
    rec = json.loads(p.read_text())
    del rec["success"]
    p.write_text(json.dumps(rec))
    with pytest.raises(A.ActionInputError, match=r"ep6.json: missing fields \['success'\]"):
        A.load_records(tmp_path)
    p.unlink()
    _write_episode(tmp_path, 7, T=0, status="policy_error")  # no step executed: skipped, and said so
    recs, skipped = A.load_records(tmp_path)
    assert len(recs) == 4 and skipped == ["run0__libero_goal__task1__ep7"]
    with pytest.raises(A.ActionInputError, match="pass its parent"):
        A.load_records(tmp_path / "episodes")
    (tmp_path / "empty" / "episodes").mkdir(parents=True)
    with pytest.raises(A.ActionInputError, match="no episode records"):
        A.load_records(tmp_path / "empty")


def test_cli_from_rollouts_and_from_arrays(tmp_path):
    for i in range(6):
        _write_episode(tmp_path, i)
    out = tmp_path / "pca"
    A.run(A.PcaArgs(rollouts=str(tmp_path), out=str(out)))
    res = json.loads((out / "action_pca.json").read_text())
    assert res["schema"] == "vla-interp/action_pca/v1" and res["n_rows"] == 120 and res["n_episodes"] == 6
    assert len(res["components"]) == 7 and len(res["components"][0]) == 7
    assert res["dim_names"][-1] == "gripper" and res["label_counts"]["success"] == {"False": 60, "True": 60}
    assert abs(res["cumulative_explained_variance_ratio"][-1] - 1) < 1e-9
    for f in res["plots"]:
        assert (out / f).stat().st_size > 0
    assert np.load(out / "action_pca_scores.npy").shape == (120, 7)
    # array input with labels; a label array of the wrong length is refused before anything is written
    rng = np.random.default_rng(0)
    np.save(tmp_path / "A.npy", rng.standard_normal((50, 4)))
    np.save(tmp_path / "E.npy", np.repeat(np.arange(5), 10))
    np.save(tmp_path / "S.npy", np.array(["a", "b"] * 25))
    A.run(A.PcaArgs(actions=str(tmp_path / "A.npy"), episode_ids=str(tmp_path / "E.npy"),
                    suite_labels=str(tmp_path / "S.npy"), out=str(tmp_path / "pca2")))
    res2 = json.loads((tmp_path / "pca2" / "action_pca.json").read_text())
    assert res2["dim_names"] == ["dim0", "dim1", "dim2", "dim3"] and res2["label_counts"]["suite"] == {"a": 25, "b": 25}
    np.save(tmp_path / "S3.npy", np.array(["a"] * 49))
    with pytest.raises(A.ActionInputError, match=r"suite labels must have shape \(50,\) to match actions; found \(49,\)"):
        A.run(A.PcaArgs(actions=str(tmp_path / "A.npy"), suite_labels=str(tmp_path / "S3.npy"), out=str(tmp_path / "pca3")))
    assert not (tmp_path / "pca3").exists()
    with pytest.raises(ValueError, match="exactly one of --rollouts or --actions"):
        A.run(A.PcaArgs(out=str(tmp_path / "pca4")))
