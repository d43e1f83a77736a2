"""BatchTopK: trained with its threshold estimated during training, then used as a JumpReLU at inference."""

import json

import numpy as np
import pytest

from openpi.interp.sae import io as sae_io
from openpi.interp.sae import synthetic
from openpi.interp.sae import train as sae_train


def test_batchtopk_inference_uses_learned_threshold(tmp_path):
    x, atoms = synthetic.planted_dictionary(d=32, n_atoms=48, rows=8000, active=3, seed=4)
    np.save(tmp_path / "x.npy", x)
    cfg = sae_train.TrainConfig(arch="batchtopk", k=3, num_latents=64, steps=500, split="rows")
    res = sae_train.train(cfg, sae_train.npy_source(tmp_path / "x.npy", cfg), tmp_path / "sae", progress=False)
    m = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    thr = m["threshold"]
    assert thr > 0
    sae = sae_io.load_sae(tmp_path / "sae")
    assert sae.spec.arch == "batchtopk"
    np.testing.assert_allclose(sae.threshold, thr, rtol=1e-6)
    held = x[-2000:]
    # Inference codes are exactly relu(pre) where pre > threshold (computed from the saved SAELens weights).
    from safetensors.numpy import load_file

    w = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    pre = (held - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    expected = np.where(pre > w["threshold"], np.maximum(pre, 0), 0)
    np.testing.assert_allclose(sae.encode(held), expected, atol=1e-4)
    # The threshold reproduces the training sparsity: L0 close to k on held-out rows, good reconstruction.
    l0 = m["held_out"]["l0"]
    assert 0.6 * 3 <= l0 <= 1.4 * 3, l0
    assert m["held_out"]["fvu"] < 0.25
    # Reloading as TopK would be an error the predecessor made: the cfg says jumprelu with a threshold.
    cfg_json = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg_json["architecture"] == "jumprelu" and cfg_json["metadata"]["vla_interp"]["threshold"] == pytest.approx(thr)
    best = (atoms @ (np.asarray(res.sae.params["W_dec"]).T)).max(axis=1)
    assert (best > 0.9).mean() >= 0.8
