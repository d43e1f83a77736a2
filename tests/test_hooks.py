"""Recording and intervention through named hook points on the tiny Pi0 and Pi0.5."""
import jax.numpy as jnp
import numpy as np
import pytest

from model_fixtures import load_fixture
from openpi.models.hooks import AttentionKnockout, Intervention, Record, parse_records
from openpi.interp.spans import key_valid_mask, span_table
from openpi.models import layers, pi0
from openpi.models.config import tiny_config
from openpi.models.model import Pi0Model, make_observation
from openpi.models.param_shapes import init_params


@pytest.fixture(scope="module")
def pi0_setup():
    cfg, params, obs, z = load_fixture()
    return Pi0Model(cfg, params), obs, jnp.asarray(z["input/noise"])


@pytest.fixture(scope="module")
def pi05_setup():
    cfg = tiny_config(pi05=True, max_token_len=16)
    rng = np.random.default_rng(1)
    obs = make_observation({k: rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8) for k in cfg.image_keys},
                           {k: np.array([k != "right_wrist_0_rgb"]) for k in cfg.image_keys},
                           np.zeros((1, 32), np.float32), rng.integers(1, 1024, (1, 16)), np.arange(16)[None] < 9)
    noise = jnp.asarray(rng.standard_normal((1, 10, 32)).astype(np.float32))
    return Pi0Model(cfg, init_params(cfg, seed=5)), obs, noise


def test_record_parse_one_line():
    rec = Record.parse("llm.expert1.layer.*.resid_post?tokens=actions&steps=-1&reduce=tokens&dtype=float16")
    assert rec == Record("llm.expert1.layer.*.resid_post", tokens="actions", steps="-1", reduce=("tokens",),
                         dtype="float16")
    with pytest.raises(ValueError, match="unknown option"):
        Record.parse("llm.layer.0.attn.probs?token=actions")
    with pytest.raises(ValueError, match="unknown reduction"):
        Record.parse("llm.layer.0.attn.probs?reduce=layers")


@pytest.mark.parametrize("setup", ["pi0_setup", "pi05_setup"])
def test_recording_leaves_actions_bit_identical(setup, request):
    model, obs, noise = request.getfixturevalue(setup)
    plain, rec = model.sample_actions(obs, noise)
    assert rec == {}
    records = parse_records(["llm.expert1.layer.*.resid_post?tokens=actions&steps=-1",
                             "llm.layer.*.attn.probs?reduce=heads&tokens=actions", "flow.v_t", "flow.x_t",
                             "llm.expert0.layer.*.resid_pre", "llm.layer.*.attn.prefix_probs?reduce=heads"])
    recorded, rec = model.sample_actions(obs, noise, records=records)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(recorded))
    depth = model.config.llm.depth
    assert len([k for k in rec if k.startswith("llm.expert1.")]) == depth
    assert rec["llm.expert1.layer.0.resid_post"].shape == (1, obs.state.shape[0], 10, 64)  # 1 step kept
    assert rec["flow.v_t"].shape == (10, obs.state.shape[0], 10, 32)


@pytest.mark.parametrize("setup", ["pi0_setup", "pi05_setup"])
def test_attention_rows_sum_to_one_on_valid_keys(setup, request):
    model, obs, noise = request.getfixturevalue(setup)
    cfg = model.config
    _, rec = model.sample_actions(obs, noise, records=(Record("llm.layer.*.attn.probs"),
                                                      Record("llm.layer.*.attn.prefix_probs")))
    mask_prefix = np.concatenate([np.repeat(np.asarray(obs.image_masks[k])[:, None], cfg.tokens_per_image, 1)
                                  for k in cfg.image_keys] + [np.asarray(obs.tokenized_prompt_mask)], axis=1)
    for layer in range(cfg.llm.depth):
        probs = np.asarray(rec[f"llm.layer.{layer}.attn.probs"])  # (steps, B, heads, suffix, keys)
        assert probs.shape[-1] == cfg.prefix_len + cfg.suffix_len
        valid = np.concatenate([mask_prefix, np.ones((mask_prefix.shape[0], cfg.suffix_len), bool)], axis=1)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        for b in range(valid.shape[0]):
            assert np.all(probs[:, b][..., ~valid[b]] == 0.0)
        if not cfg.pi05:  # Pi0: the state token (first suffix query) does not see the action tokens
            assert np.all(probs[:, :, :, 0, cfg.prefix_len + 1:] == 0.0)
        pp = np.asarray(rec[f"llm.layer.{layer}.attn.prefix_probs"])
        for b in range(valid.shape[0]):
            rows = pp[b][:, mask_prefix[b]]  # valid queries
            np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-5)
            assert np.all(rows[..., ~mask_prefix[b]] == 0.0)


def test_resid_post_equals_next_resid_pre_and_final_norm_reproduces_v_t(pi05_setup, pi0_setup):
    for model, obs, noise in (pi0_setup, pi05_setup):
        cfg = model.config
        records = parse_records(["llm.expert1.layer.*", "flow.v_t", "llm.expert0.layer.*"])
        _, rec = model.sample_actions(obs, noise, records=records)
        for e in (0, 1):
            for layer in range(cfg.llm.depth - 1):
                np.testing.assert_array_equal(rec[f"llm.expert{e}.layer.{layer}.resid_post"],
                                              rec[f"llm.expert{e}.layer.{layer + 1}.resid_pre"])
        last = rec[f"llm.expert1.layer.{cfg.llm.depth - 1}.resid_post"]  # (steps, B, suffix, D)
        p = model.params
        if cfg.pi05:
            # Pi0.5's final norm is conditioned on time: recompute the conditioning of each step.
            times = 1.0 - 0.1 * np.arange(10, dtype=np.float32)
            outs = []
            for s, t in enumerate(times):
                cond = pi0.embed_suffix(cfg, p, obs, jnp.zeros((1, 10, 32)), jnp.full((1,), t))[3]
                normed, _ = layers.rms_norm(p["PaliGemma"]["llm"]["final_norm_1"], last[s], cond)
                outs.append(layers.dense(p["action_out_proj"], normed[:, -10:]))
            v = np.stack(outs)
            atol = 1e-4
        else:
            normed, _ = layers.rms_norm(p["PaliGemma"]["llm"]["final_norm_1"], last)
            v = layers.dense(p["action_out_proj"], normed[..., -10:, :])
            atol = 1e-5
        np.testing.assert_allclose(v, rec["flow.v_t"], atol=atol, rtol=0)


def test_zero_vector_leaves_actions_identical_and_image_knockout_changes_them(pi0_setup):
    model, obs, noise = pi0_setup
    plain, _ = model.sample_actions(obs, noise)
    zero = (Intervention("llm.expert1.layer.2.resid_post", "add", value=jnp.zeros(64), tokens="actions"),)
    same, _ = model.sample_actions(obs, noise, interventions=zero)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(same))
    knocked, rec = model.sample_actions(obs, noise, knockouts=(AttentionKnockout(keys="images", queries="actions"),),
                                        records=(Record("llm.layer.1.attn.probs", tokens="actions"),))
    assert np.abs(np.asarray(knocked) - np.asarray(plain)).max() > 1e-3
    probs = np.asarray(rec["llm.layer.1.attn.probs"])
    assert np.all(probs[..., :768] == 0.0)  # no action query attends to any image token any more


def test_add_scale_zero_replace_change_what_they_address(pi0_setup):
    model, obs, noise = pi0_setup
    site = "llm.expert1.layer.1.resid_mid"  # not the last layer: a zeroed state token must still matter
    base, rec0 = model.sample_actions(obs, noise, records=(Record(site),))
    direction = jnp.ones(64)
    for iv in (Intervention(site, "add", value=direction, tokens="actions", steps="0"),
               Intervention(site, "scale", value=2.0), Intervention(site, "zero", tokens="state"),
               Intervention(site, "replace", fn=lambda x: -x)):
        out, rec = model.sample_actions(obs, noise, interventions=(iv,), records=(Record(site),))
        assert np.abs(np.asarray(out) - np.asarray(base)).max() > 1e-4, iv.op
    # the add at step 0 on action tokens: recorded value at step 0 = original + 1 on action rows, state row intact
    out, rec = model.sample_actions(obs, noise, interventions=(Intervention(site, "add", value=direction,
                                                                            tokens="actions", steps="0"),),
                                    records=(Record(site),))
    np.testing.assert_allclose(np.asarray(rec[site])[0, :, 1:] - np.asarray(rec0[site])[0, :, 1:], 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(rec[site])[0, :, 0], np.asarray(rec0[site])[0, :, 0])


def test_reductions_and_token_selection(pi0_setup):
    model, obs, noise = pi0_setup
    _, full = model.sample_actions(obs, noise, records=(Record("llm.layer.0.attn.probs"),))
    _, red = model.sample_actions(obs, noise, records=(Record("llm.layer.0.attn.probs", tokens="actions",
                                                              reduce=("heads", "tokens"), steps="9"),))
    expect = np.asarray(full["llm.layer.0.attn.probs"])[9:10, :, :, 1:, :].mean(axis=(2, 3))
    np.testing.assert_allclose(red["llm.layer.0.attn.probs"], expect, atol=1e-6)
    with pytest.raises(ValueError, match="not within the tokens"):
        model.sample_actions(obs, noise, records=(Record("llm.expert1.layer.0.resid_post", tokens="base_0_rgb"),))


def test_span_tables_match_fixture_layouts():
    cfg = tiny_config()
    spans = pi0.token_spans(cfg)
    assert spans["base_0_rgb"] == (0, 256) and spans["right_wrist_0_rgb"] == (512, 768)
    assert spans["prompt"] == (768, 784) and spans["state"] == (784, 785)
    assert spans["actions"] == (785, 795) and pi0.hook_table(cfg).seq_len == 795
    table = span_table(cfg, {"base_0_rgb": True, "left_wrist_0_rgb": True, "right_wrist_0_rgb": False}, 7, (1, 6))
    assert table["spans"]["instruction"] == [769, 774] and table["spans"]["template"] == [[768, 769], [774, 775]]
    assert table["spans"]["pad"] == [775, 784]
    valid = key_valid_mask(table)
    assert valid.sum() == 512 + 7 + 1 + 10
    t05 = span_table(tiny_config(pi05=True, max_token_len=16), {k: True for k in cfg.image_keys}, 12, (3, 8))
    assert t05["spans"]["state"] == [784, 784] and t05["spans"]["actions"] == [784, 794]
    assert t05["spans"]["template"] == [[768, 771], [776, 780]] and t05["seq_len"] == 794
    from openpi.interp.attention import SpanTable
    parsed = SpanTable.from_dict(t05)  # the attention library reads what the recorder writes
    assert parsed.length("template") == 7 and parsed.length("instruction") == 5
