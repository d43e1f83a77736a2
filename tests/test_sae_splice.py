"""Action error recovered: a perfect SAE recovers 1, an SAE that reconstructs nothing recovers 0 (Pi0 on action
tokens, Diffusion Policy on a whole UNet block)."""
import math

import numpy as np
import pytest
from conftest import LEROBOT_POLICY, require_lerobot_policy

from openpi.interp.sae.io import save_sae
from openpi.interp.sae.model import SAESpec, SparseAutoencoder
from openpi.interp.sae.splice import action_error_recovered, observations_from_rollouts
from openpi.models.hooks import Record
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


def _perfect_and_useless(tmp_path, d: int):
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))[0].T.astype(np.float32)
    # +q and -q atoms: for every direction exactly one of the pair has a non-negative code, so TopK with k = d
    # keeps the whole projection and reconstructs any vector exactly
    return (_save(tmp_path, "perfect", np.concatenate([q, -q]), k=d),
            _save(tmp_path, "useless", np.zeros((16, d), np.float32), k=4))


def _check(policy, perfect, useless, site, obs, tokens):
    good = action_error_recovered(policy, perfect, site, obs)
    assert good["n_observations"] == len(obs) and good["mse_zero_ablated"] > 1e-3 and good["tokens"] == tokens
    assert good["action_error_recovered"] > 0.999
    bad = action_error_recovered(policy, useless, site, obs)
    assert abs(bad["action_error_recovered"]) < 1e-6  # reconstructing zeros is exactly the zero ablation
    assert policy.interventions == ()  # the policy is left as it was


def test_perfect_and_useless_saes(tmp_path):
    perfect, useless = _perfect_and_useless(tmp_path, 64)
    _check(create_policy("pi0_tiny"), perfect, useless, SITE, [_obs(1), _obs(2)], "actions")


def test_diffusion_policy_splices_a_whole_unet_block(tmp_path):
    """A DP UNet block has no token axis: its SAE row is the (channel, horizon) value flattened, as exported."""
    require_lerobot_policy()
    policy = create_policy("dp_lerobot", str(LEROBOT_POLICY))
    site = "unet.mid.block.1"
    _, cache = policy.run_with_cache(_obs(1), [Record(site, steps="0")])
    d = math.prod(cache[site].shape[-2:])  # (..., channel, horizon) -> one row of channel x horizon values
    perfect, useless = _perfect_and_useless(tmp_path, d)
    obs = [{**_obs(s), "meta/episode": 0, "meta/env_step": 8 * s} for s in (1, 2)]
    _check(policy, perfect, useless, site, obs, "all")
    with pytest.raises(ValueError, match="not a hook point"):
        action_error_recovered(policy, perfect, "unet.mid.block.9", obs)


def test_no_recorded_observations_is_a_clear_error(tmp_path):
    (tmp_path / "episodes").mkdir()
    with pytest.raises(FileNotFoundError, match="--save-frames"):
        list(observations_from_rollouts(tmp_path))
