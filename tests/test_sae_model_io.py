"""SAE model kernels (sparse gathers, custom gradients, BatchTopK) and the SAELens-layout round trip."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from openpi.interp.sae import io as sae_io
from openpi.interp.sae import model as sae_model
from openpi.interp.sae import synthetic


def _random_sae(arch="topk", d=12, n=40, k=5, scale=0.37, seed=0):
    rng = np.random.default_rng(seed)
    w_dec = rng.normal(size=(n, d)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    params = {"W_enc": rng.normal(size=(d, n)).astype(np.float32), "b_enc": rng.normal(size=n).astype(np.float32) * 0.1,
              "W_dec": w_dec, "b_dec": rng.normal(size=d).astype(np.float32)}
    spec = sae_model.SAESpec(d_in=d, d_sae=n, arch=arch, k=k, input_scale=scale)
    thr = None if arch == "topk" else np.full(n, 0.4, np.float32)
    return sae_model.SparseAutoencoder(spec, params, thr), rng


def _numpy_reference(sae, x):
    """Codes and reconstruction written out with numpy, in raw units."""
    p = {k: np.asarray(v, np.float64) for k, v in sae.params.items()}
    xs = x.astype(np.float64) * sae.spec.input_scale
    pre = (xs - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    codes = np.zeros_like(pre)
    if sae.spec.arch == "topk":
        top = np.argsort(-pre, axis=1)[:, : sae.spec.k]
        rows = np.arange(x.shape[0])[:, None]
        codes[rows, top] = np.maximum(pre[rows, top], 0)
    else:
        codes = np.where(pre > sae.threshold, np.maximum(pre, 0), 0)
    return codes, (codes @ p["W_dec"] + p["b_dec"]) / sae.spec.input_scale


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_encode_decode_match_numpy_reference(arch):
    sae, rng = _random_sae(arch)
    x = rng.normal(size=(30, 12)).astype(np.float32) * 3
    codes, recon = _numpy_reference(sae, x)
    np.testing.assert_allclose(sae.encode(x), codes, atol=1e-4)
    np.testing.assert_allclose(sae.reconstruct(x), recon, atol=1e-4)
    r, j, v = sae.triples(x)
    dense = np.zeros_like(codes)
    dense[r, j] = v
    np.testing.assert_allclose(dense, codes, atol=1e-4)
    if arch == "batchtopk":  # JumpReLU inference: active iff the pre-activation exceeds the threshold
        assert 0 < (codes > 0).sum() < codes.size


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_saelens_layout_round_trip(tmp_path, arch):
    sae, rng = _random_sae(arch)
    sae_io.save_sae(tmp_path / "s", sae, {"site": "llm.expert1.layer.3.resid_post"})
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == ("topk" if arch == "topk" else "jumprelu")
    assert (cfg["d_in"], cfg["d_sae"]) == (12, 40)
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "llm.expert1.layer.3.resid_post"
    ours = cfg["metadata"]["vla_interp"]
    assert ours["arch"] == arch and ours["k"] == 5 and ours["input_scale"] == pytest.approx(0.37)
    if arch == "topk":
        assert cfg["k"] == 5
    w = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (12, 40) and w["W_dec"].shape == (40, 12) and w["b_enc"].shape == (40,) and w["b_dec"].shape == (12,)
    # The saved (folded) weights, applied SAELens' way to *raw* activations, reconstruct in raw units.
    x = rng.normal(size=(25, 12)).astype(np.float32) * 3
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if arch == "topk":
        top = np.argsort(-pre, axis=1)[:, :5]
        codes = np.zeros_like(pre)
        rows = np.arange(25)[:, None]
        codes[rows, top] = np.maximum(pre[rows, top], 0)
    else:
        codes = np.maximum(pre, 0) * (pre > np.maximum(w["threshold"], 0))
    np.testing.assert_allclose(codes @ w["W_dec"] + w["b_dec"], sae.reconstruct(x), atol=1e-4)
    back = sae_io.load_sae(tmp_path / "s")
    assert back.spec == sae.spec
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(np.asarray(back.params[name]), np.asarray(sae.params[name]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(back.encode(x), sae.encode(x), atol=1e-5)


def _write(tmp_path, cfg, weights):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(tmp_path / "sae_weights.safetensors"))
    return tmp_path


def test_load_rejects_inconsistent_cfg_and_weights(tmp_path):
    sae, _ = _random_sae("topk")
    sae_io.save_sae(tmp_path / "ok", sae)
    cfg = json.loads((tmp_path / "ok" / "cfg.json").read_text())
    w = load_file(str(tmp_path / "ok" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"tensor W_enc has shape \(12, 40\) but cfg.json \(d_in=12, d_sae=41\) implies \(12, 41\)"):
        sae_io.load_sae(_write(tmp_path / "a", {**cfg, "d_sae": 41}, w))
    with pytest.raises(ValueError, match="k=50 must be between 1 and d_sae=40"):
        sae_io.load_sae(_write(tmp_path / "b", {**cfg, "k": 50, "metadata": {}}, w))
    with pytest.raises(KeyError, match="missing field 'k'"):
        sae_io.load_sae(_write(tmp_path / "c", {k: v for k, v in cfg.items() if k != "k"}, w))
    with pytest.raises(KeyError, match="missing tensor 'threshold'"):
        sae_io.load_sae(_write(tmp_path / "d", {**cfg, "architecture": "jumprelu"}, w))
    with pytest.raises(KeyError, match="missing tensor 'b_dec'"):
        sae_io.load_sae(_write(tmp_path / "e", cfg, {k: v for k, v in w.items() if k != "b_dec"}))
    bad = dict(w)
    bad["W_dec"] = w["W_dec"].copy()
    bad["W_dec"][0, 0] = np.nan
    with pytest.raises(ValueError, match="W_dec contains NaN"):
        sae_io.load_sae(_write(tmp_path / "f", cfg, bad))
    with pytest.raises(ValueError, match="architecture 'gated' is not supported"):
        sae_io.load_sae(_write(tmp_path / "g", {**cfg, "architecture": "gated"}, w))
    with pytest.raises(ValueError, match="metadata.vla_interp.k=5 disagrees"):
        sae_io.load_sae(_write(tmp_path / "h", {**cfg, "k": 6}, w))
    with pytest.raises(FileNotFoundError, match="missing cfg.json"):
        sae_io.load_sae(tmp_path / "nothing")
    # A SAELens-style config without b_dec applied to the input loads with an equivalent encoder bias.
    plain = _write(tmp_path / "i", {**cfg, "apply_b_dec_to_input": False, "metadata": {}}, w)
    s2 = sae_io.load_sae(plain)
    x = np.random.default_rng(0).normal(size=(4, 12)).astype(np.float32)
    pre = x @ w["W_enc"] + w["b_enc"]
    top = np.argsort(-pre, axis=1)[:, :5]
    codes = np.zeros_like(pre)
    codes[np.arange(4)[:, None], top] = np.maximum(pre[np.arange(4)[:, None], top], 0)
    np.testing.assert_allclose(s2.encode(x), codes, atol=1e-4)


def test_spec_rejects_k_larger_than_dictionary():
    with pytest.raises(ValueError, match="k must satisfy 1 <= k <= d_sae"):
        sae_model.SAESpec(d_in=4, d_sae=8, arch="topk", k=9)


@pytest.mark.parametrize("mode", ["slots", "dense", "scatter"])
def test_sparse_training_forward_and_gradients_match_dense_formulation(mode):
    rng = np.random.default_rng(1)
    d, n, k, b = 10, 30, 4, 16
    tp = sae_model.train_params_from(sae_model.init_params(jax.random.PRNGKey(0), d, n, rng.normal(size=d)))
    tp = {**tp, "b_enc": jnp.asarray(rng.normal(size=n), jnp.float32) * 0.1, "E": tp["E"] + 0.3 * jnp.asarray(rng.normal(size=(n, d)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)

    def sparse_loss(p):
        x_hat = sae_model.train_forward(p, x, "topk", k, mode)[0]
        return jnp.sum((x - x_hat) ** 2)

    def dense_loss(p):
        pre = (x - p["b_dec"]) @ p["E"].T + p["b_enc"]
        _, idx = jax.lax.top_k(jax.lax.stop_gradient(pre), k)
        mask = jnp.zeros_like(pre).at[jnp.arange(b)[:, None], idx].set(1.0)
        codes = jax.nn.relu(pre) * mask
        return jnp.sum((x - codes @ p["W_dec"] - p["b_dec"]) ** 2)

    assert float(sparse_loss(tp)) == pytest.approx(float(dense_loss(tp)), rel=1e-5)
    gs, gd = jax.grad(sparse_loss)(tp), jax.grad(dense_loss)(tp)
    for name in tp:
        np.testing.assert_allclose(np.asarray(gs[name]), np.asarray(gd[name]), rtol=1e-4, atol=1e-4, err_msg=name)


def test_batchtopk_training_selects_k_times_batch_and_falls_back_exactly():
    rng = np.random.default_rng(2)
    d, n, k, b = 8, 64, 3, 20
    tp = sae_model.train_params_from(sae_model.init_params(jax.random.PRNGKey(1), d, n))
    x = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    x = x.at[0].mul(25.0)  # one huge row: it holds far more than 4k of the batch's k*b largest codes
    pre = np.asarray((x - tp["b_dec"]) @ tp["E"].T + tp["b_enc"])
    flat = np.sort(np.maximum(pre, 0).ravel())[::-1]
    tau = flat[k * b - 1]
    expected = np.where(pre >= tau, np.maximum(pre, 0), 0) @ np.asarray(tp["W_dec"]) + np.asarray(tp["b_dec"])
    assert bool(sae_model.batchtopk_select(jnp.asarray(pre), k, 4 * k).overflow)
    x_hat, vals, _ = sae_model.train_forward(tp, x, "batchtopk", k, "dense")
    np.testing.assert_allclose(np.asarray(x_hat), expected, atol=1e-4)
    # Without the outlier every row fits in its 4k slots: the sparse path, same selection rule.
    x2 = x.at[0].set(x[1])
    pre2 = np.asarray((x2 - tp["b_dec"]) @ tp["E"].T + tp["b_enc"])
    assert not bool(sae_model.batchtopk_select(jnp.asarray(pre2), k, 4 * k).overflow)
    tau2 = np.sort(np.maximum(pre2, 0).ravel())[::-1][k * b - 1]
    x_hat2, vals2, _ = sae_model.train_forward(tp, x2, "batchtopk", k, "dense")
    assert int((np.asarray(vals2) > 0).sum()) == k * b
    np.testing.assert_allclose(np.asarray(x_hat2), np.where(pre2 >= tau2, np.maximum(pre2, 0), 0) @ np.asarray(tp["W_dec"]) + np.asarray(tp["b_dec"]), atol=1e-4)


@pytest.mark.parametrize("mode", ["slots", "dense", "scatter"])
@pytest.mark.parametrize("outlier", [False, True])
def test_batchtopk_packed_gradients_match_dense_formulation(mode, outlier):
    """The packed BatchTopK selection (rows of varying L0 in k * batch slots) gives the dense rule's loss and
    gradients, through the candidate path and (one huge row) the all-latent path."""
    rng = np.random.default_rng(4)
    d, n, k, b = 8, 48, 3, 12
    tp = sae_model.train_params_from(sae_model.init_params(jax.random.PRNGKey(2), d, n, rng.normal(size=d)))
    tp = {**tp, "b_enc": jnp.asarray(rng.normal(size=n), jnp.float32) * 0.1}
    x = jnp.asarray(rng.normal(size=(b, d)), jnp.float32) * jnp.asarray(rng.uniform(0.2, 3.0, size=(b, 1)), jnp.float32)
    if outlier:
        x = x.at[0].mul(25.0)
    pre = (x - tp["b_dec"]) @ tp["E"].T + tp["b_enc"]
    assert bool(sae_model.batchtopk_select(pre, k, 4 * k).overflow) == outlier
    l0 = np.asarray(((pre >= np.sort(np.maximum(np.asarray(pre), 0).ravel())[::-1][k * b - 1]) & (pre > 0)).sum(1))
    assert l0.min() != l0.max()  # rows really hold different numbers of latents

    def sparse_loss(p):
        return jnp.sum((x - sae_model.train_forward(p, x, "batchtopk", k, mode)[0]) ** 2)

    def dense_loss(p):
        q = (x - p["b_dec"]) @ p["E"].T + p["b_enc"]
        flat = jax.lax.stop_gradient(jax.nn.relu(q)).reshape(-1)
        tau = jnp.sort(flat)[::-1][k * b - 1]
        mask = jax.lax.stop_gradient((q >= tau) & (q > 0))
        return jnp.sum((x - jnp.where(mask, jax.nn.relu(q), 0.0) @ p["W_dec"] - p["b_dec"]) ** 2)

    assert float(sparse_loss(tp)) == pytest.approx(float(dense_loss(tp)), rel=1e-5)
    gs, gd = jax.grad(sparse_loss)(tp), jax.grad(dense_loss)(tp)
    for name in tp:
        np.testing.assert_allclose(np.asarray(gs[name]), np.asarray(gd[name]), rtol=1e-4, atol=1e-4, err_msg=name)


def test_kth_largest_by_bisection_is_exact():
    rng = np.random.default_rng(3)
    for _ in range(5):
        v = np.maximum(rng.normal(size=3000), 0).astype(np.float32)
        kth = int(rng.integers(1, 1500))
        assert float(sae_model.kth_largest_nonneg(jnp.asarray(v), kth)) == np.sort(v)[::-1][kth - 1]


def test_exact_sae_recovers_planted_codes():
    atoms = synthetic.orthonormal_atoms(6, 10)
    codes = np.zeros((5, 6), np.float32)
    codes[np.arange(5), np.arange(5)] = np.arange(1, 6)
    codes[:, 5] = 0.5
    sae = synthetic.exact_sae(atoms, k=2)
    np.testing.assert_allclose(sae.encode(codes @ atoms), codes, atol=1e-5)
