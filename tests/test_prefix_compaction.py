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
from openpi.models.hooks import AttentionKnockout, Intervention, Record
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


def _models(cfg, seed=4):
    params = init_params(cfg, seed=seed)
    return Pi0Model(cfg, params), Pi0Model(cfg, params, compact_prefix=True)


RECORDS = (Record("llm.layer.*.attn.probs", steps="0,-1"),  # suffix queries over every key
           Record("llm.layer.1.attn.prefix_probs", tokens="base_0_rgb"),  # prefix queries of a kept camera
           Record("llm.expert0.layer.1.resid_post", tokens="left_wrist_0_rgb"),
           Record("llm.expert1.layer.0.resid_post", steps="-1"),
           Record("img.base_0_rgb.out"),
           Record("flow.v_t"))


@pytest.mark.parametrize("pi05", [False, True])
def test_recordings_of_a_compacted_call_are_the_full_layouts(pi05):
    cfg = tiny_config(pi05=pi05, max_token_len=48)
    full, compact = _models(cfg)
    obs, noise = _libero_batch(cfg, (15, 9), (False, False))
    layout = compact._layout(obs, RECORDS, ())
    assert layout == pi0.PrefixLayout(("base_0_rgb", "left_wrist_0_rgb"), 16)  # these requests need no dropped token
    a_full, r_full = full.sample_actions(obs, noise, records=RECORDS)
    a_comp, r_comp = compact.sample_actions(obs, noise, records=RECORDS)
    np.testing.assert_allclose(a_comp, a_full, atol=1e-5, rtol=0)
    assert r_comp.keys() == r_full.keys() and len(r_full) == cfg.llm.depth + 5
    for name in r_full:
        assert r_comp[name].shape == r_full[name].shape, name
        np.testing.assert_allclose(r_comp[name], r_full[name], atol=2e-5, rtol=0, err_msg=name)
    keep = np.asarray(layout.token_map(cfg).keep)
    probs = np.asarray(r_comp["llm.layer.0.attn.probs"])
    assert (~keep).sum() == cfg.tokens_per_image + 48 - 16
    assert np.all(probs[..., ~keep] == 0) and np.all(np.asarray(r_full["llm.layer.0.attn.probs"])[..., ~keep] == 0)


def test_a_request_on_dropped_tokens_keeps_them():
    cfg = tiny_config(max_token_len=48)
    full, compact = _models(cfg)
    obs, noise = _libero_batch(cfg, (15, 9), (False, False))
    rw, prompt = pi0.prefix_spans(cfg)["right_wrist_0_rgb"], pi0.prefix_spans(cfg)["prompt"]
    assert rw[1] == prompt[0] == 768  # the selector below: the masked camera's last 8 tokens, 22 prompt slots
    records = (Record("img.right_wrist_0_rgb.out"), Record("llm.expert0.layer.0.resid_pre", tokens="760:790"))
    assert compact._layout(obs, records[1:], ()) == pi0.PrefixLayout(cfg.image_keys, 22)
    assert compact._layout(obs, records[:1], ()) == pi0.PrefixLayout(cfg.image_keys, 16)
    rng = np.random.default_rng(0)
    edit = Intervention("llm.expert0.layer.0.resid_post", op="add", tokens="prompt",
                        value=jnp.asarray(rng.standard_normal(cfg.llm.width), jnp.float32))
    assert compact._layout(obs, (), (edit,)) == pi0.PrefixLayout(("base_0_rgb", "left_wrist_0_rgb"), 48)
    for kwargs in (dict(records=records), dict(interventions=(edit,))):
        a_full, r_full = full.sample_actions(obs, noise, **kwargs)
        a_comp, r_comp = compact.sample_actions(obs, noise, **kwargs)
        np.testing.assert_allclose(a_comp, a_full, atol=1e-5, rtol=0)
        for name in r_full:
            np.testing.assert_allclose(r_comp[name], r_full[name], atol=2e-5, rtol=0, err_msg=name)
    # A layout that drops what a request reads is refused, naming the tokens.
    layout = pi0.compact_layout(cfg, obs)
    with pytest.raises(ValueError, match="dropped by prefix compaction"):
        pi0.sample_actions(cfg, full.params, obs, noise, layout=layout, records=records)


def test_edits_and_knockouts_act_on_the_same_tokens_when_compacted():
    cfg = tiny_config(pi05=True, max_token_len=48)
    full, compact = _models(cfg, seed=5)
    obs, noise = _libero_batch(cfg, (15, 9), (False, False))
    rng = np.random.default_rng(1)
    edit = Intervention("llm.expert0.layer.1.resid_mid", op="add", tokens="left_wrist_0_rgb",
                        value=jnp.asarray(3 * rng.standard_normal(cfg.llm.width), jnp.float32))
    knockouts = (AttentionKnockout(keys="base_0_rgb", queries="actions", layers="0"),
                 AttentionKnockout(keys="prompt", queries="left_wrist_0_rgb", prefix=True),
                 AttentionKnockout(keys="right_wrist_0_rgb", queries="right_wrist_0_rgb", prefix=True))  # dropped
    plain, _ = full.sample_actions(obs, noise)
    a_full, _ = full.sample_actions(obs, noise, interventions=(edit,), knockouts=knockouts)
    a_comp, _ = compact.sample_actions(obs, noise, interventions=(edit,), knockouts=knockouts)
    assert compact._layout(obs, (), (edit,)) is not None
    assert np.abs(np.asarray(a_full) - np.asarray(plain)).max() > 1e-2  # the edits change the actions
    np.testing.assert_allclose(a_comp, a_full, atol=1e-5, rtol=0)


def test_compaction_options_of_create_policy():
    with pytest.raises(ValueError, match="Pi0-FAST"):
        policy_config.create_policy("pi0_fast_tiny", compact_prefix=True)
    policy = policy_config.create_policy("pi0_tiny", compact_prefix=True, record_sites=("flow.v_t",))
    assert policy.model.compact_prefix
