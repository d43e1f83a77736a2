"""Trajectory geometry with planted answers (openpi.interp.geometry, geometry.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from openpi.interp import geometry as G



def line(n=12, d=16, seed=0, step=0.7):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    return rng.standard_normal(d) * 5 + np.arange(n)[:, None] * step * u


def zigzag(n=12, d=16, seed=0, step=1.3):
    """Alternating steps along two orthogonal unit vectors: every turn is exactly 90 degrees."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.standard_normal((d, 2)))[0]
    steps = np.where((np.arange(n - 1) % 2 == 0)[:, None], q[:, 0], q[:, 1]) * step
    return np.vstack([np.zeros(d), np.cumsum(steps, 0)]) + rng.standard_normal(d) * 3


def test_straight_line_has_zero_curvature_and_constant_steps():
    g = G.step_geometry(line()[None])
    np.testing.assert_allclose(g.curvature_deg, 0.0, atol=1e-8)
    np.testing.assert_allclose(g.step_distance, 0.7, rtol=1e-10)
    assert not g.undefined.any()


def test_right_angle_zigzag_is_90_degrees():
    g = G.step_geometry(zigzag()[None])
    np.testing.assert_allclose(g.curvature_deg, 90.0, atol=1e-8)
    np.testing.assert_allclose(g.step_distance, 1.3, rtol=1e-10)


def test_known_turn_angles_in_the_plane():
    pts = [[0, 0], [1, 0], [2, 1], [2, 2], [1, 2], [2, 2]]  # turns: 45, 45, 90, 180
    g = G.step_geometry(np.array(pts, float)[None])
    np.testing.assert_allclose(g.curvature_deg[0], [45, 45, 90, 180], atol=1e-9)
    np.testing.assert_allclose(g.step_distance[0], [1, np.sqrt(2), 1, 1, 1])


def test_near_zero_steps_are_undefined_not_90_degrees():
    z = line(n=8)
    z = np.insert(z, 4, z[3] + 1e-9, axis=0)  # a repeated point (step ~ 1e-9 of ||z|| ~ 20)
    g = G.step_geometry(z[None])
    assert g.undefined[0].sum() == 2 and np.isnan(g.curvature_deg[0, 2:4]).all()
    summ = G.summarize(g.curvature_deg, undefined=g.undefined)
    assert summ["n_undefined"] == 2 and summ["n_values"] == len(z) - 2 - 2
    assert abs(summ["mean"]) < 1e-4  # defined angles are 0; undefined ones did not drag it towards 90
    # raising the threshold above the real step length marks every angle undefined
    g2 = G.step_geometry(line(n=6)[None], min_step_abs=10.0)
    assert g2.undefined.all() and np.isnan(g2.curvature_deg).all()


def test_padding_and_bad_nans():
    z = np.stack([line(n=10), line(n=10, seed=1)])
    z[1, 7:] = np.nan  # second trajectory is 7 points long
    g = G.step_geometry(z)
    assert g.missing_step[1].sum() == 3 and not g.missing_step[0].any()
    assert np.isnan(g.step_distance[1, 6:]).all() and np.isfinite(g.step_distance[1, :6]).all()
    np.testing.assert_allclose(g.curvature_deg[np.isfinite(g.curvature_deg)], 0.0, atol=1e-5)
    summ = G.summarize(g.curvature_deg, undefined=g.undefined, missing=g.missing_angle)
    assert summ["n_missing"] == 3 and summ["n_undefined"] == 0 and summ["n_values"] == 8 + 5
    z[0, 2, 3] = np.nan
    with pytest.raises(G.GeometryInputError, match=r"only some components NaN at index \(0, 2\)"):
        G.step_geometry(z)


def test_success_vs_failure_split_and_intervals():
    succ = [line(n=10, seed=s) for s in range(6)]
    fail = [zigzag(n=10, seed=s) for s in range(5)]
    Z = np.stack(succ + fail)
    success = np.array([1] * 6 + [0] * 5, bool)
    a = G.analyse_sequences(Z, success, along="time", n_boot=300)
    cs, cf = a["groups"]["success"]["curvature_deg"], a["groups"]["failure"]["curvature_deg"]
    assert abs(cs["mean"]) < 1e-4 and abs(cf["mean"] - 90) < 1e-6
    assert a["groups"]["success"]["n_trajectories"] == 6 and a["groups"]["failure"]["n_trajectories"] == 5
    diff = a["difference"]["curvature_deg"]
    assert abs(diff["mean"] + 90) < 1e-4 and diff["ci95"][1] < -89
    allc = a["groups"]["all"]["curvature_deg"]
    assert allc["ci95"][0] <= allc["mean"] <= allc["ci95"][1]
    assert len(allc["by_position"]["mean"]) == 8 and allc["by_position"]["n"] == [11] * 8
    # mixed lengths of steps: the pooled mean is weighted by values, the CI brackets it
    d = a["groups"]["all"]["step_distance"]
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    json.dumps(a, allow_nan=False)


def test_four_d_input_runs_along_both_axes():
    n_traj, L, N, d = 4, 3, 5, 6
    T = np.zeros((n_traj, L, N, d))
    for i in range(n_traj):
        for l in range(L):
            T[i, l] = line(n=N, d=d, seed=10 * i + l)  # straight over time in every layer
    res = G.analyse_array(T, None, ("layer", "time"), n_boot=50)
    assert len(res) == L + N
    over_time = [a for a in res if a["along"] == "time"]
    assert [a["per_index"] for a in over_time] == list(range(L)) and all(a["per"] == "layer" for a in over_time)
    assert all(abs(a["groups"]["all"]["curvature_deg"]["mean"]) < 1e-4 for a in over_time)
    over_layers = [a for a in res if a["along"] == "layer"]
    assert len(over_layers) == N and len(over_layers[0]["groups"]["all"]["step_distance"]["by_position"]["mean"]) == L - 1


def test_cli_writes_json_and_plots_and_rejects_bad_success(tmp_path):
    from openpi.interp import geometry_cli as script

    T = np.stack([np.stack([line(n=6, d=5, seed=s), zigzag(n=6, d=5, seed=s)]) for s in range(6)]).astype(np.float32)  # (6, 2, 6, 5)
    np.save(tmp_path / "T.npy", T)
    np.save(tmp_path / "S.npy", np.array([1, 0, 1, 0, 1, 0]))
    out = tmp_path / "geo"
    assert script.main(script.Args(trajectories=str(tmp_path / "T.npy"), success=str(tmp_path / "S.npy"), axes=("layer", "time"), out=str(out), n_boot=50, progress=False)) == 0
    res = json.loads((out / "geometry.json").read_text())
    assert res["schema"] == "vla-interp/geometry/v1" and res["input"]["shape"] == [6, 2, 6, 5]
    time_l0 = next(a for a in res["analyses"] if a["along"] == "time" and a["per_index"] == 0)
    time_l1 = next(a for a in res["analyses"] if a["along"] == "time" and a["per_index"] == 1)
    assert abs(time_l0["groups"]["all"]["curvature_deg"]["mean"]) < 1e-3 and abs(time_l1["groups"]["all"]["curvature_deg"]["mean"] - 90) < 1e-3
    for f in res["plots"]:
        assert (out / f).stat().st_size > 0
    np.save(tmp_path / "S2.npy", np.array([1, 0, 1]))
    with pytest.raises(G.GeometryInputError, match=r"success .*S2.npy has shape \(3,\); expected \(6,\)"):
        script.main(script.Args(trajectories=str(tmp_path / "T.npy"), success=str(tmp_path / "S2.npy"), out=str(tmp_path / "geo2"), progress=False))
    assert not (tmp_path / "geo2").exists()
