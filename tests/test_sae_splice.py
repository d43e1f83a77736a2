"""Action error recovered: a perfect SAE recovers 1, an SAE that reconstructs nothing recovers 0."""
import numpy as np
import pytest

from openpi.interp.sae.io import save_sae
from openpi.interp.sae.model import SAESpec, SparseAutoencoder
from openpi.interp.sae.splice import action_error_recovered, observations_from_rollouts
from openpi.policies.policy_config import create_policy

SITE = "llm.expert1.layer.1.resid_post"


def _save(tmp_path, name, w_dec, k):
    d_sae, d_in = w_dec.shape
    params = {"W_enc": w_dec.T.copy(), "b_enc": np.zeros(d_sae, np.float32), "W_dec": w_dec,
              "b_dec": np.zeros(d_in, np.float32)}
    save_sae(tmp_path / name, SparseAutoencoder(SAESpec(d_in, d_sae, "topk", k), params))
    return tmp_path / name


def _obs(seed):
    rng = np.random.default_rng(seed)
    return {"observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/state": rng.standard_normal(8).astype(np.float32), "prompt": "put the bowl on the plate"}


def test_perfect_and_useless_saes(tmp_path):
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((64, 64)))[0].T.astype(np.float32)
    # +q and -q atoms: for every direction exactly one of the pair has a non-negative code, so TopK with k = 64
    # keeps the whole projection and reconstructs any vector exactly
    perfect = _save(tmp_path, "perfect", np.concatenate([q, -q]), k=64)
    useless = _save(tmp_path, "useless", np.zeros((16, 64), np.float32), k=4)
    policy = create_policy("pi0_tiny")
    obs = [_obs(1), _obs(2)]
    good = action_error_recovered(policy, perfect, SITE, obs)
    assert good["n_observations"] == 2 and good["mse_zero_ablated"] > 1e-3
    assert good["action_error_recovered"] > 0.999
    bad = action_error_recovered(policy, useless, SITE, obs)
    assert abs(bad["action_error_recovered"]) < 1e-6  # reconstructing zeros is exactly the zero ablation
    assert policy.interventions == ()  # the policy is left as it was


def test_no_recorded_observations_is_a_clear_error(tmp_path):
    (tmp_path / "episodes").mkdir()
    with pytest.raises(FileNotFoundError, match="--save-frames"):
        list(observations_from_rollouts(tmp_path))
