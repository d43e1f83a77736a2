"""SAE feature steering: the edit does exactly what it says on planted SAEs, changes the policy's actions through
the intervention mechanism, and sae/steer.py runs baseline vs steered LIBERO episodes on the same initial states."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from openpi.interp.sae.io import save_sae
from openpi.interp.sae.model import SAESpec, SparseAutoencoder
from openpi.interp.steering import SteerArgs, SteeringSpec, feature_edit_fn, run_steering


def _planted_sae(tmp_path, arch="topk", d_in=64, d_sae=32, k=4, scale=2.0):
    rng = np.random.default_rng(0)
    # orthonormal atoms, so editing one feature cannot move another one's code
    w_dec = np.linalg.qr(rng.standard_normal((d_in, d_sae)))[0].T.astype(np.float32)
    params = {"W_enc": w_dec.T.copy(), "b_enc": np.zeros(d_sae, np.float32), "W_dec": w_dec,
              "b_dec": np.zeros(d_in, np.float32)}
    threshold = np.full(d_sae, 0.1, np.float32) if arch == "batchtopk" else None
    sae = SparseAutoencoder(SAESpec(d_in, d_sae, arch, k, input_scale=scale), params, threshold)
    save_sae(tmp_path / arch, sae)
    return tmp_path / arch, SparseAutoencoder(SAESpec(d_in, d_sae, arch, k, input_scale=scale), params, threshold)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_edit_sets_the_feature_code_and_nothing_else(tmp_path, arch):
    sae_dir, _ = _planted_sae(tmp_path, arch)
    from openpi.interp.sae.io import load_sae
    sae = load_sae(sae_dir)
    rng = np.random.default_rng(1)
    w_dec = np.asarray(sae.params["W_dec"])
    # rows made of a few strong atoms (in raw units: codes are in scaled units, hence the division)
    x = (3.0 * w_dec[[5, 9]].sum(0) + 0.01 * rng.standard_normal((6, 64))).astype(np.float32) / sae.spec.input_scale
    codes = sae.encode(x)
    assert np.all(codes[:, 5] > 1.0)
    ablated = np.asarray(feature_edit_fn(sae_dir, 5, "ablate")(jnp.asarray(x)))
    new = sae.encode(ablated)
    np.testing.assert_allclose(new[:, 5], 0.0, atol=1e-4)
    np.testing.assert_allclose(new[:, 9], codes[:, 9], atol=1e-4)  # other features keep their codes
    clamped = sae.encode(np.asarray(feature_edit_fn(sae_dir, 5, "clamp", 7.0)(jnp.asarray(x))))
    np.testing.assert_allclose(clamped[:, 5], 7.0, atol=1e-3)
    same = np.asarray(feature_edit_fn(sae_dir, 5, "scale", 1.0)(jnp.asarray(x)))
    np.testing.assert_allclose(same, x, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        feature_edit_fn(sae_dir, 99, "ablate")
    with pytest.raises(ValueError, match="unknown steering mode"):
        feature_edit_fn(sae_dir, 1, "boost")


def test_steering_changes_the_policy_actions(tmp_path):
    from openpi.models.config import tiny_config
    from openpi.models.model import Pi0Model, make_observation
    from openpi.models.param_shapes import init_params
    sae_dir, _ = _planted_sae(tmp_path)
    cfg = tiny_config(max_token_len=16)
    model = Pi0Model(cfg, init_params(cfg, seed=2))
    rng = np.random.default_rng(0)
    obs = make_observation({k: rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8) for k in cfg.image_keys},
                           {k: np.array([True]) for k in cfg.image_keys}, np.zeros((1, 32), np.float32),
                           rng.integers(1, 100, (1, 16)), np.arange(16)[None] < 6)
    noise = jnp.asarray(rng.standard_normal((1, 10, 32)).astype(np.float32))
    base, _ = model.sample_actions(obs, noise)
    site = "llm.expert1.layer.1.resid_post"
    clamp = SteeringSpec(str(sae_dir), site, feature=3, mode="clamp", value=20.0).intervention()
    steered, _ = model.sample_actions(obs, noise, interventions=(clamp,))
    assert np.abs(np.asarray(steered) - np.asarray(base)).max() > 1e-3
    identity = SteeringSpec(str(sae_dir), site, feature=3, mode="scale", value=1.0).intervention()
    same, _ = model.sample_actions(obs, noise, interventions=(identity,))
    np.testing.assert_allclose(np.asarray(same), np.asarray(base), atol=1e-5)


@pytest.mark.libero
def test_steer_script_compares_on_the_same_initial_states(tmp_path):
    sae_dir, _ = _planted_sae(tmp_path)
    out = tmp_path / "steer"
    report = run_steering(SteerArgs(sae=str(sae_dir), site="llm.expert1.layer.1.resid_post", feature=3,
                                    mode="clamp", value=20.0, out=out, trials=1, max_steps=6))
    saved = json.loads((out / "steer.json").read_text())
    assert saved["spec"]["feature"] == 3 and len(saved["per_episode"]) == 1
    ep = saved["per_episode"][0]
    assert ep["common_steps"] == 6 and len(ep["first_chunk_mean_abs_delta"]) == 7
    assert max(ep["first_chunk_mean_abs_delta"]) > 1e-4  # same first observation and noise: only the edit differs
    assert report["delta_success_rate"] == saved["steered"]["success_rate"] - saved["baseline"]["success_rate"]


def test_a_site_that_matches_nothing_is_refused_before_any_rollout(tmp_path):
    """Review item 10: --site llm.layer.99.resid_post ran every episode and reported deltas of 0.0."""
    sae_dir, _ = _planted_sae(tmp_path)
    with pytest.raises(ValueError, match=r"matches no hook point.*nearest valid names"):
        run_steering(SteerArgs(sae=str(sae_dir), site="llm.layer.99.resid_post", feature=3, mode="ablate",
                               out=tmp_path / "steer", trials=1, max_steps=6))
    assert not (tmp_path / "steer").exists()  # nothing ran, nothing written
