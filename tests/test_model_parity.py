"""Our Pi0 against numbers produced by openpi's own code (shared/fixtures/openpi_ref/pi0_tiny.npz)."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_fixtures import FIXTURE, load_fixture
from openpi.models import pi0, siglip
from openpi.models.config import tiny_config
from openpi.models.param_shapes import init_params

TOK_ATOL, ATOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def fx():
    return load_fixture()


def test_image_tokens_each_camera(fx):
    cfg, params, obs, z = fx
    enc = jax.jit(lambda p, img: siglip.encode(p["PaliGemma"]["img"], img, cfg.siglip, jnp.float32))
    for cam in cfg.image_keys:
        np.testing.assert_allclose(enc(params, obs.images[cam]), z[f"output/image_tokens/{cam}"], atol=TOK_ATOL, rtol=0)


def test_prefix_and_suffix_embedding(fx):
    cfg, params, obs, z = fx
    tokens, mask, ar = jax.jit(lambda p, o: pi0.embed_prefix(cfg, p, o))(params, obs)
    np.testing.assert_allclose(tokens, z["output/prefix_tokens"], atol=TOK_ATOL, rtol=0)
    np.testing.assert_array_equal(mask, z["output/prefix_input_mask"])
    np.testing.assert_array_equal(ar, z["output/prefix_ar_mask"])
    s_tokens, s_mask, s_ar, cond = pi0.embed_suffix(cfg, params, obs, jnp.asarray(z["input/x_t"]), jnp.asarray(z["input/time"]))
    assert cond is None
    np.testing.assert_allclose(s_tokens, z["output/suffix_tokens"], atol=TOK_ATOL, rtol=0)
    np.testing.assert_array_equal(s_mask, z["output/suffix_input_mask"])
    np.testing.assert_array_equal(s_ar, z["output/suffix_ar_mask"])


def test_suffix_out_velocity_and_loss(fx):
    cfg, params, obs, z = fx
    x_t, t = jnp.asarray(z["input/x_t"]), jnp.asarray(z["input/time"])
    suffix_out, v_t = jax.jit(lambda p, o: pi0.joint_forward(cfg, p, o, x_t, t))(params, obs)
    np.testing.assert_allclose(suffix_out, z["output/suffix_out"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(v_t, z["output/v_t"], atol=ATOL, rtol=0)
    loss = jax.jit(lambda p, o: pi0.compute_loss(cfg, p, o, jnp.asarray(z["input/actions"]),
                                                 noise=jnp.asarray(z["input/noise"]), time=t))(params, obs)
    np.testing.assert_allclose(loss, z["output/loss"], atol=ATOL, rtol=0)


def test_sample_actions_kv_cache(fx):
    cfg, params, obs, z = fx
    actions, rec = jax.jit(lambda p, o: pi0.sample_actions(cfg, p, o, jnp.asarray(z["input/noise"]),
                                                           num_steps=int(z["input/num_steps"])))(params, obs)
    assert rec == {}
    np.testing.assert_allclose(actions, z["output/sample_actions"], atol=ATOL, rtol=0)


def test_masked_camera_is_ignored(fx):
    """Sample 1's right-wrist camera is masked: changing its pixels must not change anything."""
    cfg, params, obs, z = fx
    noise = jnp.asarray(z["input/noise"])
    run = jax.jit(lambda o: pi0.sample_actions(cfg, params, o, noise, num_steps=2)[0])
    base = run(obs)
    images = dict(obs.images)
    images["right_wrist_0_rgb"] = images["right_wrist_0_rgb"].at[1].set(-images["right_wrist_0_rgb"][1])
    changed = run(pi0.Observation(images, obs.image_masks, obs.state, obs.tokenized_prompt, obs.tokenized_prompt_mask))
    np.testing.assert_array_equal(base[1], changed[1])
    assert not np.allclose(base[0], run(pi0.Observation({**obs.images, "base_0_rgb": -obs.images["base_0_rgb"]},
                                                        obs.image_masks, obs.state, obs.tokenized_prompt,
                                                        obs.tokenized_prompt_mask))[0])


@pytest.mark.parametrize("pi05", [False, True])
def test_kv_cache_path_equals_joint_forward(pi05):
    """One Euler step through the KV cache equals noise - v_t from the joint forward at t = 1 (Pi0 and Pi0.5)."""
    cfg = tiny_config(pi05=pi05, max_token_len=16)
    params = init_params(cfg, seed=3)
    rng = np.random.default_rng(0)
    from openpi.models.model import make_observation
    obs = make_observation({k: rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8) for k in cfg.image_keys},
                           {k: np.array([True, k != "right_wrist_0_rgb"]) for k in cfg.image_keys},
                           rng.standard_normal((2, 32)).astype(np.float32), rng.integers(1, 1024, (2, 16)),
                           np.arange(16)[None] < np.array([[5], [9]]))
    noise = jnp.asarray(rng.standard_normal((2, 10, 32)).astype(np.float32))
    one_step = jax.jit(lambda: pi0.sample_actions(cfg, params, obs, noise, num_steps=1)[0])()
    _, v_t = jax.jit(lambda: pi0.joint_forward(cfg, params, obs, noise, jnp.ones(2)))()
    np.testing.assert_allclose(one_step, noise - v_t, atol=2e-5, rtol=0)


def test_bfloat16_compute_runs_close_to_float32(fx):
    cfg, params, obs, z = fx
    import dataclasses
    bf = dataclasses.replace(cfg, dtype="bfloat16")
    from openpi.models.model import Pi0Model
    actions, _ = Pi0Model(bf, params).sample_actions(obs, jnp.asarray(z["input/noise"]))
    assert actions.dtype == jnp.float32 and np.isfinite(np.asarray(actions)).all()
    err = np.abs(np.asarray(actions) - z["output/sample_actions"]).max()
    assert 0 < err < 0.5, err  # bf16 differs from f32, but stays in the same range


def test_parity_cli_reports_ok_and_fails_on_tampered_fixture(tmp_path):
    out = subprocess.run([sys.executable, "-m", "openpi.models.parity", str(FIXTURE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True and report["model"] == "pi0"
    assert report["v_t"] < ATOL and report["sample_actions"] < ATOL
    z = dict(np.load(FIXTURE))
    z["output/v_t"] = z["output/v_t"] + 1e-3
    bad = tmp_path / "bad.npz"
    np.savez(bad, **z)
    out = subprocess.run([sys.executable, "-m", "openpi.models.parity", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert report["ok"] is False and report["v_t"] > 9e-4


def test_parity_reports_pi05_adarms_cond(tmp_path):
    """A Pi0.5 fixture's ``adarms_cond`` (swish(time_mlp_out(swish(time_mlp_in(time_emb))))) is computed and
    compared, not reported as null. The reference is written here in numpy, with small t so float32 angles agree."""
    from openpi.models import parity
    from openpi.models.params_util import flatten
    cfg = tiny_config(pi05=True, max_token_len=16)
    flat = {k: np.asarray(v) for k, v in flatten(init_params(cfg, seed=2)).items()}
    rng = np.random.default_rng(0)
    time = np.array([0.004, 0.02], np.float32)
    inputs = {f"input/image_uint8/{k}": rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8) for k in cfg.image_keys}
    inputs.update({f"input/image_mask/{k}": np.ones(2, bool) for k in cfg.image_keys})
    inputs.update({"input/state": np.zeros((2, 32), np.float32), "input/time": time,
                   "input/tokenized_prompt": rng.integers(1, 1024, (2, 16)).astype(np.int32),
                   "input/tokenized_prompt_mask": np.ones((2, 16), bool),
                   "input/noise": rng.standard_normal((2, 10, 32)).astype(np.float32),
                   "input/x_t": rng.standard_normal((2, 10, 32)).astype(np.float32), "input/num_steps": np.int32(2)})
    fraction = np.linspace(0.0, 1.0, 32)
    period = 4e-3 * (4.0 / 4e-3) ** fraction
    angles = time[:, None].astype(np.float64) * (2 * np.pi / period)[None]
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)
    swish = lambda x: x / (1 + np.exp(-x))  # noqa: E731
    hidden = swish(emb @ flat["time_mlp_in/kernel"] + flat["time_mlp_in/bias"])
    cond = swish(hidden @ flat["time_mlp_out/kernel"] + flat["time_mlp_out/bias"]).astype(np.float32)
    np.savez(tmp_path / "pi05.npz", **flat, **inputs, **{"output/adarms_cond": cond})
    report = parity.run_parity(tmp_path / "pi05.npz")
    assert report["model"] == "pi05" and report["ok"] is True
    assert isinstance(report["adarms_cond"], float) and report["adarms_cond"] < 1e-5
    np.savez(tmp_path / "bad.npz", **flat, **inputs, **{"output/adarms_cond": cond + 1e-3})
    assert parity.run_parity(tmp_path / "bad.npz")["ok"] is False
