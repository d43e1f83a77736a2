"""Our Pi0-FAST against numbers from openpi's own code (shared/fixtures/openpi_ref/pi0_fast_tiny.npz), its Orbax
checkpoint and full-size manifest, the corrected decoding options, and hook points during decoding."""
import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_fixtures import FAST_FIXTURE, load_fast_fixture
from openpi.models import checkpoint, parity, parity_fast, pi0_fast
from openpi.models.config import Pi0FASTConfig, tiny_config
from openpi.models.hooks import Intervention, Record
from openpi.models.model import Pi0FASTModel, make_fast_observation
from openpi.models.param_shapes import param_shapes
from openpi.models.params_util import flatten

CKPT = FAST_FIXTURE.with_name("pi0_fast_tiny_ckpt")
MANIFEST = FAST_FIXTURE.with_name("pi0_fast_param_manifest.json")
ATOL = 1e-4


@pytest.fixture(scope="module")
def fx():
    return load_fast_fixture()


@pytest.fixture(scope="module")
def model(fx):
    cfg, params, *_ = fx
    return Pi0FASTModel(cfg, params)


def _with_masks(obs, masks: dict):
    return dataclasses.replace(obs, image_masks={k: jnp.asarray(v) for k, v in masks.items()})


def _all_valid(obs):
    return _with_masks(obs, {k: np.ones(2, bool) for k in obs.image_masks})


def _step_logits(out) -> np.ndarray:
    return np.asarray(out.recordings["llm.logits"]).swapaxes(0, 1)  # (B, steps, vocab)


# ------------------------------------------------------------------------------------------------ parity


def test_parity_cli_passes_on_every_fixture_output():
    out = subprocess.run([sys.executable, "-m", "openpi.models.parity", str(FAST_FIXTURE)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True and report["model"] == "pi0_fast"
    z = np.load(FAST_FIXTURE)
    names = [k[len("output/"):] for k in z.files if k.startswith("output/")]
    assert set(report) == set(names) | {"fixture", "model", "tolerances", "ok"}
    for name in names:
        assert isinstance(report[name], float) and report[name] <= report["tolerances"][name], name
    assert report["tolerances"]["sample/step_logits"] == ATOL and report["tolerances"]["sample_tokens"] == 0.0


def test_parity_compare_flags_wrong_and_missing_outputs():
    z = np.load(FAST_FIXTURE)
    ref = {k[len("output/"):]: z[k] for k in z.files if k.startswith("output/")}
    tol = lambda name: parity_fast.tolerance(name, 1e-5, ATOL)  # noqa: E731
    assert parity.compare(ref, {k: v.copy() for k, v in ref.items()}, tol)[1] is True
    for name, change in (("sample/step_logits", 1e-3), ("temperature_sampling/sample_tokens", 1.0),
                         ("image_tokens/base_0_rgb", 5e-5)):
        ours = {k: v.copy() for k, v in ref.items()}
        ours[name] = ours[name] + change
        report, ok = parity.compare(ref, ours, tol)
        assert not ok and report[name] == pytest.approx(change, rel=1e-2), name
    ours = {k: v for k, v in ref.items() if k != "loss"}
    report, ok = parity.compare(ref, ours, tol)
    assert not ok and report["loss"] is None


def test_greedy_and_sampled_decoding_match_openpi(model, fx):
    """In-process check of the decoding outputs (the CLI test covers all of them, this one the model API)."""
    cfg, _, _, infer, z = fx
    rng = jax.random.wrap_key_data(jnp.asarray(z["input/sample_rng_key"]))
    greedy = model.sample_actions(infer, rng=rng, records=(Record("llm.logits"),))
    np.testing.assert_array_equal(np.asarray(greedy.tokens), z["output/sample_tokens"])
    assert int(greedy.num_steps) == int(z["output/sample_num_steps"])
    np.testing.assert_allclose(_step_logits(greedy), z["output/sample/step_logits"], atol=ATOL, rtol=0)
    sampled = model.sample_actions(infer, rng=rng, temperature=1.0, records=(Record("llm.logits"),))
    np.testing.assert_array_equal(np.asarray(sampled.tokens), z["output/temperature_sampling/sample_tokens"])
    np.testing.assert_allclose(_step_logits(sampled), z["output/temperature_sampling/step_logits"], atol=ATOL,
                               rtol=0)


def test_loss_uses_the_loss_mask(fx):
    cfg, params, train, _, z = fx
    loss = jax.jit(lambda o: pi0_fast.compute_loss(cfg, params, o))
    np.testing.assert_allclose(loss(train), z["output/loss"], atol=ATOL, rtol=0)
    # Only postfix positions count: changing a prefix-only loss mask entry does nothing, dropping one postfix
    # target changes the loss.
    mask = np.asarray(train.token_loss_mask).copy()
    first_postfix = int(z["input/prefix_len"][0])
    mask[0, first_postfix] = False
    changed = np.asarray(loss(dataclasses.replace(train, token_loss_mask=jnp.asarray(mask))))
    assert changed[1] == np.asarray(loss(train))[1] and abs(changed[0] - z["output/loss"][0]) > 1e-4


# ------------------------------------------------------------------------------------------------ params


def test_full_size_param_tree_equals_openpi_manifest():
    manifest = json.loads(MANIFEST.read_text())
    expected = {p["path"]: tuple(p["shape"]) for p in manifest["params"]}
    shapes = param_shapes(Pi0FASTConfig())
    assert shapes == expected
    assert sum(int(np.prod(s)) for s in shapes.values()) == manifest["total_params"]


def test_checkpoint_loads_through_the_shared_loader(fx):
    cfg, params, *_ = fx
    loaded, ref = flatten(checkpoint.load_params(CKPT, cfg)), flatten(params)
    assert loaded.keys() == ref.keys() and len(loaded) == 32
    for key, value in ref.items():
        np.testing.assert_array_equal(loaded[key], np.asarray(value), err_msg=key)
    with pytest.raises(checkpoint.CheckpointError, match="is missing"):
        checkpoint.load_params(CKPT, tiny_config())  # a Pi0 config wants the action expert


# ------------------------------------------------------------------------------------------------ decoding options


def test_openpi_decode_window_skips_valid_tokens_and_sees_the_masked_camera(fx):
    """Sample 1's right-wrist camera is masked. openpi's window attends to it and not to the base camera; the
    'valid' option attends to exactly the valid prefix."""
    cfg, params, _, infer, _ = fx
    rec = (Record("llm.layer.0.attn.probs", reduce=("heads",), steps="1"),)
    spans = pi0_fast.token_spans(cfg)
    p = cfg.prefix_len
    for mode in ("openpi", "valid"):
        out = Pi0FASTModel(dataclasses.replace(cfg, decode_attention=mode), params).sample_actions(infer, records=rec)
        probs = np.asarray(out.recordings["llm.layer.0.attn.probs"])[0, :, 0]  # (B, keys) at step 1
        mass = {k: probs[:, a:b].sum(-1) for k, (a, b) in spans.items()}
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        assert np.all(probs[:, p + 2:] == 0.0)  # generated slots after step 1 are not visible yet
        assert np.all(mass["base_0_rgb"][0] > 0) and mass["right_wrist_0_rgb"][0] > 0
        if mode == "openpi":
            assert mass["base_0_rgb"][1] == 0.0 and mass["right_wrist_0_rgb"][1] > 0.0
        else:
            assert mass["base_0_rgb"][1] > 0.0 and mass["right_wrist_0_rgb"][1] == 0.0
            assert np.all(probs[1, p - 31:p] == 0.0)  # padded prompt positions


def test_corrected_decoding_equals_teacher_forcing(fx):
    """With valid-prefix attention and contiguous positions, decoding reproduces the training forward fed the same
    tokens; openpi's positions (one further) do not."""
    cfg, params, _, infer, z = fx
    obs = _all_valid(infer)
    fixed = dataclasses.replace(cfg, decode_attention="valid", decode_positions="contiguous")
    out = Pi0FASTModel(fixed, params).sample_actions(obs, temperature=1.0, records=(Record("llm.logits"),))
    gen, steps = np.asarray(out.tokens), _step_logits(out)
    n = z["input/prefix_len"]
    ids = np.zeros((2, cfg.max_token_len), np.int32)
    ar = np.zeros_like(ids)
    for b in range(2):
        ids[b, :n[b]] = np.asarray(obs.tokenized_prompt)[b, :n[b]]
        ids[b, n[b]:n[b] + 15] = gen[b, :15]
        ar[b, n[b]:n[b] + 15] = 1
    teacher_obs = make_fast_observation({k: np.zeros((2, 224, 224, 3), np.uint8) for k in cfg.image_keys},
                                        {k: np.ones(2, bool) for k in cfg.image_keys}, ids, ids > 0, ar)
    teacher_obs = dataclasses.replace(teacher_obs, images=obs.images)
    _, logits = jax.jit(lambda o: pi0_fast.forward(cfg, params, o))(teacher_obs)
    teacher = np.stack([np.asarray(logits)[b, n[b] - 1:n[b] + 15] for b in range(2)])
    np.testing.assert_allclose(steps, teacher, atol=ATOL, rtol=0)
    openpi = Pi0FASTModel(dataclasses.replace(cfg, decode_attention="valid"), params).sample_actions(
        obs, temperature=1.0, records=(Record("llm.logits"),))
    shifted = _step_logits(openpi)
    np.testing.assert_allclose(shifted[:, 0], teacher[:, 0], atol=ATOL, rtol=0)  # step 0 is the prefill
    assert np.abs(shifted[:, 1] - teacher[:, 1]).max() > 1e-3


def _eos_push(cfg, sample: int, step: int) -> Intervention:
    value = np.zeros((2, cfg.vocab_size), np.float32)
    value[sample, cfg.eos_token] = 1e3
    return Intervention("llm.logits", "add", value=jnp.asarray(value), steps=str(step))


def test_eos_stop_openpi_and_per_sample(model, fx):
    cfg, params, _, infer, _ = fx
    eos = cfg.eos_token
    staggered = (_eos_push(cfg, 0, 2), _eos_push(cfg, 1, 5))
    openpi = model.sample_actions(infer, interventions=staggered)
    tokens = np.asarray(openpi.tokens)
    assert tokens[0, 2] == eos and tokens[1, 5] == eos
    assert int(openpi.num_steps) == cfg.max_decoding_steps and tokens[0, 3] != 0  # no common EOS step: no stop
    per = Pi0FASTModel(dataclasses.replace(cfg, eos_stop="per_sample"), params).sample_actions(
        infer, interventions=staggered)
    per_tokens = np.asarray(per.tokens)
    assert int(per.num_steps) == 6
    np.testing.assert_array_equal(per_tokens[0, :3], tokens[0, :3])
    np.testing.assert_array_equal(per_tokens[1, :6], tokens[1, :6])
    assert np.all(per_tokens[0, 3:] == 0) and np.all(per_tokens[1, 6:] == 0)
    together = model.sample_actions(infer, interventions=(_eos_push(cfg, 0, 4), _eos_push(cfg, 1, 4)))
    assert int(together.num_steps) == 5 and np.all(np.asarray(together.tokens)[:, 4] == eos)
    assert np.all(np.asarray(together.tokens)[:, 5:] == 0)


# ------------------------------------------------------------------------------------------------ hooks


def test_hook_table_describes_decoding_points(fx):
    cfg = fx[0]
    p, m = cfg.prefix_len, cfg.max_decoding_steps
    table = pi0_fast.hook_table(cfg)
    assert table.seq_len == p + m and table.spans["generated"] == (p, p + m)
    for i in range(cfg.llm.depth):
        for name in (f"llm.layer.{i}.attn.probs", f"llm.decode.layer.{i}.resid_post"):
            point = table[name]
            assert point.per_step and point.token_start == p and point.num_tokens == 1
        assert not table[f"llm.layer.{i}.attn.prefix_probs"].per_step
        assert table[f"llm.expert0.layer.{i}.resid_mid"].num_tokens == p
    assert table["llm.logits"].per_step and table["llm.logits"].token_axis is None
    table.validate([Record("llm.decode.layer.0.resid_post", tokens=str(p))], num_steps=m)
    with pytest.raises(ValueError, match="not within the tokens"):
        table.validate([Record("llm.decode.layer.0.resid_post", tokens="generated")], num_steps=m)


def test_recording_leaves_decoding_bit_identical(model, fx):
    cfg, _, _, infer, z = fx
    plain = model.sample_actions(infer, temperature=1.0)
    records = (Record("llm.logits"), Record("llm.layer.*.attn.probs", reduce=("heads",)),
               Record("llm.decode.layer.*.resid_post", steps="0,5,-1"), Record("llm.decode.final"),
               Record("llm.layer.*.attn.prefix_probs", reduce=("heads",)),
               Record("llm.expert0.layer.1.resid_post", tokens="base_0_rgb"), Record("img.left_wrist_0_rgb.out"))
    rec = model.sample_actions(infer, temperature=1.0, records=records)
    np.testing.assert_array_equal(np.asarray(plain.tokens), np.asarray(rec.tokens))
    assert int(plain.num_steps) == int(rec.num_steps) and plain.recordings == {}
    r = rec.recordings
    p, s, m = cfg.prefix_len, cfg.prefix_len + cfg.max_decoding_steps, cfg.max_decoding_steps
    assert r["llm.layer.3.attn.probs"].shape == (m, 2, 1, s)
    assert r["llm.decode.layer.2.resid_post"].shape == (3, 2, 1, 64)
    assert r["llm.layer.0.attn.prefix_probs"].shape == (2, p, s)
    assert r["llm.expert0.layer.1.resid_post"].shape == (2, 256, 64)
    assert r["img.left_wrist_0_rgb.out"].shape == (2, 256, 64)
    np.testing.assert_allclose(_step_logits(rec), z["output/temperature_sampling/step_logits"], atol=ATOL, rtol=0)
    probs = np.asarray(r["llm.layer.2.attn.probs"])[:, :, 0]  # (steps, B, keys)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    for step in range(m):  # the step's token sees the generated slots up to its own, none after
        assert np.all(probs[step, :, p + step + 1:] == 0.0) and np.all(probs[step, :, p + step] > 0.0)
    # decode.final of step s gives the logits of step s + 1 (tied embedding)
    final = np.asarray(r["llm.decode.final"])[:, :, 0]
    table = np.asarray(fx[1]["PaliGemma"]["llm"]["embedder"]["input_embedding"])
    np.testing.assert_allclose(final[:-1] @ table.T, np.asarray(r["llm.logits"])[1:], atol=1e-4, rtol=0)


def test_intervention_during_decoding(model, fx):
    *_, infer, _ = fx
    site, rec = "llm.decode.layer.2.resid_post", (Record("llm.logits"),)
    base = model.sample_actions(infer, temperature=1.0, records=rec)
    zero = model.sample_actions(infer, temperature=1.0, records=rec,
                                interventions=(Intervention(site, "add", value=jnp.zeros(64), steps="3"),))
    np.testing.assert_array_equal(np.asarray(zero.tokens), np.asarray(base.tokens))
    np.testing.assert_allclose(_step_logits(zero), _step_logits(base), atol=1e-6, rtol=0)
    big = model.sample_actions(infer, temperature=1.0, records=rec,
                               interventions=(Intervention(site, "add", value=jnp.full(64, 50.0), steps="3"),))
    before, after = _step_logits(big), _step_logits(base)
    np.testing.assert_allclose(before[:, :4], after[:, :4], atol=1e-6, rtol=0)  # steps up to the edited one
    assert np.abs(before[:, 4] - after[:, 4]).max() > 0.1  # the edited token's output feeds step 4's logits


def test_bfloat16_compute_decodes_close_to_float32(fx):
    """Released checkpoints run in bfloat16: the same decoding runs (cache, embedding, logits in bf16 compute)."""
    cfg, params, train, infer, z = fx
    bf16 = Pi0FASTModel(dataclasses.replace(cfg, dtype="bfloat16"), params)
    out = bf16.sample_actions(infer, records=(Record("llm.logits"),))
    err = np.abs(_step_logits(out) - z["output/sample/step_logits"]).max()
    assert out.tokens.dtype == jnp.int32 and 0 < err < 0.2, err  # bf16 differs from f32 but stays close
    np.testing.assert_allclose(bf16.compute_loss(train), z["output/loss"], atol=0.05, rtol=0)
