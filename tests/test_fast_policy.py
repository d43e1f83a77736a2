"""Pi0-FAST as a policy: openpi's LIBERO inputs, decoding failures flagged, recordings keyed by decoding step."""
from __future__ import annotations

import numpy as np
import pytest

from openpi.interp.recorded_run import RowLayout
from openpi.interp.store import ActivationStore
from openpi.interp.join import action_index
from openpi.models import pi0_fast
from openpi.models.fast_prompt import EOS_ID
from openpi.policies.fast_policy import FastPolicy, batch_fast_observation
from openpi.policies.libero_policy import STATE_KEY, example_observation
from openpi.policies.policy import PolicyOutputError
from openpi.policies.policy_config import create_policy, get_config

ATTN = "llm.layer.1.attn.probs?reduce=heads"
RESID = "llm.decode.layer.0.resid_post"


@pytest.fixture(scope="module")
def fast_policy():
    return create_policy("pi0_fast_tiny")


def test_inputs_follow_openpi_pi0_fast_libero(fast_policy):
    """Right wrist zeros but not masked, state only as bins in the prompt, spans that decode back to the words."""
    t = fast_policy.transforms
    x = t.inputs(example_observation())
    assert x["image_masks"] == {"base_0_rgb": True, "left_wrist_0_rgb": True, "right_wrist_0_rgb": True}
    assert not x["images"]["right_wrist_0_rgb"].any()
    a, b = x["instruction"]
    s0, s1 = x["state_in_prompt"]
    assert a < b <= s0 < s1 <= x["prompt_length"] and not x["token_ar_mask"].any() and not x["token_loss_mask"].any()
    other = dict(example_observation())
    other[STATE_KEY] = np.full(8, 0.9, np.float32)
    y = t.inputs(other)
    changed = np.flatnonzero(x["tokenized_prompt"] != y["tokenized_prompt"])
    assert changed.size and changed.min() >= s0  # the state changes the bins, nothing before them
    shorter = dict(example_observation(), prompt="pick up the black bowl")
    z = t.inputs(shorter)
    assert z["instruction"][0] == a and z["instruction"][1] - a < b - a  # the instruction span follows the words
    assert z["state_in_prompt"][1] - z["state_in_prompt"][0] == s1 - s0  # the same state: the same bins


def test_training_sequence_round_trips_the_target_chunk():
    t = create_policy("pi0_fast_tiny_spatial").transforms  # the trainable config: room for prompt + chunk
    rng = np.random.default_rng(0)
    target = np.clip(np.cumsum(rng.normal(0, 0.05, (10, 7)), axis=0), -1, 1).astype(np.float32)
    x = t.inputs(example_observation(), target)
    loss = x["token_loss_mask"]
    assert loss.any() and np.array_equal(loss, x["token_ar_mask"].astype(bool))
    assert np.flatnonzero(loss).min() == x["prompt_length"]  # the postfix starts where the prefix ends
    parsed = t.tokenizer.parse(x["tokenized_prompt"][loss], 10, 7)
    assert parsed.ok, parsed.reason
    assert np.abs(parsed.actions - target).max() <= t.tokenizer.fast.error_bound(10)
    obs = batch_fast_observation([x, x])
    assert obs.token_loss_mask.shape == (2, get_config("pi0_fast_tiny_spatial").model.max_token_len)


def test_untrained_output_is_flagged_not_silent(fast_policy):
    out = fast_policy.infer(example_observation())
    report = out["fast_decode"]
    assert out["actions"].shape == (10, 7) and np.isfinite(out["actions"]).all()
    assert report["ok"] is False and report["reason"] and report["action_tokens"] == 0 and not report["fitted"]
    fast_policy.on_decode_failure = "error"
    try:
        with pytest.raises(PolicyOutputError, match="did not decode"):
            fast_policy.infer(example_observation())
    finally:
        fast_policy.on_decode_failure = "openpi"
    with pytest.raises(ValueError, match="Pi0-FAST"):
        create_policy("pi0_tiny", temperature=0.5)
    with pytest.raises(ValueError, match="on_decode_failure"):
        FastPolicy(fast_policy.model, fast_policy.transforms, on_decode_failure="zeros")
    with pytest.raises(ValueError, match="coefficient_count"):
        FastPolicy(fast_policy.model, fast_policy.transforms, coefficient_count="pad")
    with pytest.raises(ValueError, match="Pi0-FAST options"):
        create_policy("pi0_tiny", coefficient_count="fit")


class _PlantedModel:
    """Stands in for Pi0FASTModel: returns a planted generated sequence and recordings whose step-s row is s."""

    def __init__(self, config, generated: list[int]) -> None:
        self.config = config
        self.generated = generated

    def sample_actions(self, obs, *, records=(), max_decoding_steps, **kwargs):
        m, b = max_decoding_steps, obs.tokenized_prompt.shape[0]
        tokens = np.zeros((b, m), np.int32)
        tokens[:, :len(self.generated)] = self.generated
        seq = self.config.prefix_len + m
        steps = np.arange(m, dtype=np.float32)
        attn = np.broadcast_to(steps[:, None, None, None], (m, b, 1, seq)).copy()
        resid = np.broadcast_to(steps[:, None, None, None], (m, b, 1, self.config.llm.width)).copy()
        recorded = {"llm.layer.1.attn.probs": attn, RESID: resid}
        return pi0_fast.DecodeOutput(tokens, np.int32(m), {k: v for k, v in recorded.items()
                                                           if any(k.startswith(r.site.split("?")[0]) for r in records)})


def test_rows_are_keyed_by_decoding_step_and_only_action_steps_are_action_rows(fast_policy, tmp_path):
    """Planted decode: 'Action: ' (3 steps), 5 action tokens, '|' (2 steps), EOS, then garbage after the stop.
    Rows exist for the 11 executed steps only, token_index = P + step, and only steps 3..7 are action queries."""
    fmt = fast_policy.transforms.tokenizer
    chunk = np.zeros((10, 7), np.float32)
    fast_ids = fmt.action_ids(fmt.fast.encode(chunk)).tolist()
    generated = fmt.action_marker + fast_ids + fmt.end_marker + [EOS_ID] + [5, 6, 7]
    n_act, n_valid = len(fast_ids), len(fmt.action_marker) + len(fast_ids) + len(fmt.end_marker) + 1
    policy = create_policy("pi0_fast_tiny", record_sites=[ATTN, RESID], record_dir=str(tmp_path / "store"))
    policy.model = _PlantedModel(policy.model.config, generated)
    out = policy.infer(example_observation())
    policy.close()
    assert out["fast_decode"]["ok"] and out["fast_decode"]["action_tokens"] == n_act
    assert out["fast_decode"]["decoding_steps"] == n_valid
    np.testing.assert_allclose(out["actions"], policy.transforms.outputs(chunk, policy.transforms.inputs(
        example_observation())), atol=1e-6)  # a zero chunk decodes to the zero chunk, then unnormalised
    store = ActivationStore(tmp_path / "store")
    p = policy.model.config.prefix_len
    for site in ("llm.layer.1.attn.probs", RESID):
        x, keys = store.read(site)
        steps = keys["denoise_step"]
        assert sorted(steps.tolist()) == list(range(n_valid))  # nothing stored after the end of sequence
        np.testing.assert_array_equal(keys["token_index"], p + steps)
        np.testing.assert_array_equal(x.reshape(len(x), -1)[:, 0], steps)  # row of step s holds step s's value
        a = len(fmt.action_marker)
        assert {int(s) for s, sp in zip(steps, keys["span"]) if sp == "actions"} == set(range(a, a + n_act))
        tables = store.span_tables(site, {})
        assert (action_index(keys["token_index"], tables, site) == -1).all()  # FAST tokens are not chunk rows
    layout = RowLayout.of(store, "llm.layer.1.attn.probs")
    x, keys = store.read("llm.layer.1.attn.probs")
    tables = store.span_tables("llm.layer.1.attn.probs", {})
    kept = [int(s) for row, s, tab in zip(x, keys["denoise_step"], tables)
            if layout.query_rows(row, tab, int(s)) is not None]
    assert sorted(kept) == list(range(len(fmt.action_marker), len(fmt.action_marker) + n_act))


def test_real_decoding_records_every_executed_step(tmp_path):
    policy = create_policy("pi0_fast_tiny", record_sites=[ATTN], record_dir=str(tmp_path / "store"),
                           num_steps=8)
    acts, cache = policy.run_with_cache(example_observation(), [ATTN, RESID])
    policy.infer(example_observation())
    policy.close()
    p = policy.model.config.prefix_len
    assert cache[RESID].value.shape == (8, 1, 1, 64)
    np.testing.assert_array_equal(cache[RESID].token_index[:, 0], p + np.arange(8))
    assert cache["llm.layer.1.attn.probs"].value.shape == (8, 1, 1, p + 8)
    np.testing.assert_allclose(cache["llm.layer.1.attn.probs"].value.sum(-1), 1.0, atol=1e-5)
    keys = ActivationStore(tmp_path / "store").keys("llm.layer.1.attn.probs")
    np.testing.assert_array_equal(keys["token_index"], p + keys["denoise_step"])
    with pytest.raises(ValueError, match="matches no hook point"):
        create_policy("pi0_fast_tiny", record_sites=["llm.expert1.layer.0.resid_post"])


def test_interventions_act_during_decoding():
    """An edit of one decoding step's residual changes what is generated from that step on, and only then."""
    from openpi.models.hooks import Intervention

    policy = create_policy("pi0_fast_tiny_spatial")
    obs = example_observation(image_size=96)
    plain = policy.infer(obs)
    _, cache = policy.run_with_cache(obs, ["llm.logits"])
    base_logits = cache["llm.logits"].value
    edit = Intervention("llm.decode.layer.1.resid_post", "scale", value=-3.0, steps="2")
    with policy.hooks([edit]):
        edited = policy.infer(obs)
        _, edited_cache = policy.run_with_cache(obs, ["llm.logits"])
    after = edited_cache["llm.logits"].value
    # llm.logits of step s come from the token of step s - 1: steps 0..2 are untouched, step 3 differs.
    np.testing.assert_allclose(after[:3], base_logits[:3], atol=1e-5)
    assert np.abs(after[3] - base_logits[3]).max() > 1e-3
    assert not np.allclose(plain["actions"], edited["actions"]) or plain["fast_decode"] != edited["fast_decode"]
    assert np.allclose(policy.infer(obs)["actions"], plain["actions"])  # the edit ends with the block
