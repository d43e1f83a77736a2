"""Prefix compaction: dropping masked cameras and prompt padding before the transformer changes no action.

Checked against openpi's own numbers (the fixture's second sample has a masked right-wrist camera and 5 padded prompt
slots) and on a LIBERO-shaped batch where the samples pad differently.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_fixtures import load_fixture
from openpi.models import pi0
from openpi.models.config import tiny_config
from openpi.models.hooks import Record
from openpi.models.model import Pi0Model, make_observation
from openpi.models.param_shapes import init_params
from openpi.policies import policy_config

ATOL = 1e-4


def test_compacted_sample_matches_openpi_fixture():
    cfg, params, obs, z = load_fixture()
    second = jax.tree.map(lambda a: a[1:2], obs)
    layout = pi0.compact_layout(cfg, second, prompt_bucket=1)
    assert layout == pi0.PrefixLayout(("base_0_rgb", "left_wrist_0_rgb"), 11)
    assert layout.num_tokens(cfg) == cfg.prefix_len - cfg.tokens_per_image - 5
    noise = jnp.asarray(z["input/noise"])[1:2]
    actions, _ = pi0.sample_actions(cfg, params, second, noise, num_steps=int(z["input/num_steps"]), layout=layout)
    np.testing.assert_allclose(actions, z["output/sample_actions"][1:2], atol=ATOL, rtol=0)


def _libero_batch(cfg, masks_valid: tuple[int, ...], right_wrist: tuple[bool, ...]):
    rng = np.random.default_rng(3)
    b = len(masks_valid)
    images = {k: rng.integers(0, 256, (b, 224, 224, 3), dtype=np.uint8) for k in cfg.image_keys}
    masks = {k: np.array(right_wrist if k == "right_wrist_0_rgb" else [True] * b) for k in cfg.image_keys}
    prompt_mask = np.arange(cfg.max_token_len)[None] < np.array(masks_valid)[:, None]
    obs = make_observation(images, masks, rng.standard_normal((b, cfg.action_dim)).astype(np.float32),
                           rng.integers(1, cfg.vocab_size, (b, cfg.max_token_len)), prompt_mask)
    noise = jnp.asarray(rng.standard_normal((b, cfg.action_horizon, cfg.action_dim)), jnp.float32)
    return obs, noise


def test_compact_pi05_equals_full_layout():
    """Pi0.5 (the fixture test covers Pi0): a batch whose samples pad the prompt differently."""
    cfg = tiny_config(pi05=True, max_token_len=48)
    params = init_params(cfg, seed=4)
    obs, noise = _libero_batch(cfg, (15, 9), (False, False))
    layout = pi0.compact_layout(cfg, obs)
    assert layout == pi0.PrefixLayout(("base_0_rgb", "left_wrist_0_rgb"), 16)  # 15 valid -> bucket of 8
    full, _ = Pi0Model(cfg, params).sample_actions(obs, noise)
    compact, _ = Pi0Model(cfg, params, compact_prefix=True).sample_actions(obs, noise)
    np.testing.assert_allclose(compact, full, atol=1e-5, rtol=0)


def test_layout_keeps_whatever_some_sample_uses():
    cfg = tiny_config(max_token_len=48)
    obs, _ = _libero_batch(cfg, (48, 3), (False, True))
    assert pi0.compact_layout(cfg, obs) is None  # a wrist valid for one sample, a full prompt for the other
    obs, _ = _libero_batch(cfg, (0, 0), (False, False))
    assert pi0.compact_layout(cfg, obs) == pi0.PrefixLayout(("base_0_rgb", "left_wrist_0_rgb"), 0)


def test_compaction_refuses_requests_and_stays_off_for_recorded_calls():
    cfg = tiny_config(max_token_len=48)
    params = init_params(cfg, seed=4)
    obs, noise = _libero_batch(cfg, (15, 9), (False, False))
    layout = pi0.compact_layout(cfg, obs)
    with pytest.raises(ValueError, match="full layout"):
        pi0.sample_actions(cfg, params, obs, noise, layout=layout, records=(Record("flow.v_t"),))
    # A recording call on a compacting model runs the full layout: its recordings keep the declared positions.
    model = Pi0Model(cfg, params, compact_prefix=True)
    site = "llm.layer.0.attn.probs"
    _, rec = model.sample_actions(obs, noise, records=(Record(site, steps="0"),))
    assert rec[site].shape[-1] == cfg.prefix_len + cfg.suffix_len
    with pytest.raises(ValueError, match="Pi0-FAST"):
        policy_config.create_policy("pi0_fast_tiny", compact_prefix=True)
    with pytest.raises(ValueError, match="never apply"):
        policy_config.create_policy("pi0_tiny", compact_prefix=True, record_sites=("flow.v_t",))
