"""The hook API a newcomer uses: one hook table per model, run_with_cache, policy.hooks, loud requests, keyed
noise, finite outputs, and HOOKS.md generated from the tables."""
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from model_fixtures import load_fixture
from openpi.interp.recorder import StoreRecorder
from openpi.interp.store import ActivationStore, StoreWriter
from openpi.models import hook_names, hook_points, hooks_doc
from openpi.models.config import tiny_config
from openpi.models.hooks import AttentionKnockout, Intervention, Record, parse_records
from openpi.models.model import Pi0Model, make_observation
from openpi.models.param_shapes import init_params
from openpi.models.pi0 import hook_table
from openpi.policies.libero_policy import example_observation
from openpi.policies.policy import PolicyOutputError
from openpi.policies.policy_config import create_policy

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def policy():
    return create_policy()  # the embedded default, as a newcomer gets it


@pytest.fixture(scope="module")
def fixture_model():
    cfg, params, obs, z = load_fixture()
    return Pi0Model(cfg, params), obs, jnp.asarray(z["input/noise"])


def test_newcomer_records_and_intervenes_in_under_ten_lines(policy):
    obs = example_observation()
    actions, cache = policy.run_with_cache(obs, names=["llm.expert1.layer.3.resid_post?tokens=actions"])
    act = cache["llm.expert1.layer.3.resid_post"]
    cfg = policy.model.config
    assert act.axes == ("step", "batch", "token", "d_model")
    assert act.value.shape == (10, 1, cfg.action_horizon, cfg.expert.width)
    a0 = cache.span_table["spans"]["actions"][0]
    np.testing.assert_array_equal(act.token_index, np.arange(a0, a0 + cfg.action_horizon))
    with policy.hooks([Intervention("llm.expert1.layer.3.resid_post", "zero", tokens="actions")]):
        edited = policy.infer(obs)["actions"]
    plain = policy.infer(obs)["actions"]  # the block ended: the edit is gone
    np.testing.assert_array_equal(plain, actions)
    assert np.abs(edited - plain).max() > 1e-3
    assert policy.interventions == ()


def test_hooks_context_compiles_each_intervention_set_once(policy):
    obs = example_observation(seed=3)
    iv = Intervention("llm.expert1.layer.0.resid_post", "scale", value=np.float32(0.5), tokens="actions")
    sample = policy.model._sample  # the jit wrapper: its cache grows by one per distinct intervention set
    with policy.hooks(iv):
        first = policy.infer(obs)["actions"]
    size = sample._cache_size()
    with policy.hooks(iv):
        again = policy.infer(obs)["actions"]
    assert sample._cache_size() == size
    np.testing.assert_array_equal(first, again)
    with policy.hooks(Intervention("llm.expert1.layer.0.resid_post", "scale", value=np.float32(0.25),
                                   tokens="actions")):  # same structure, another value: same compiled function
        policy.infer(obs)
    assert sample._cache_size() == size


def test_cache_axes_follow_reductions(policy):
    _, cache = policy.run_with_cache(example_observation(), names=[
        "llm.layer.*.attn.probs?tokens=actions&reduce=heads&steps=-1", "flow.time", "img.base_0_rgb.out"])
    att = cache["llm.layer.2.attn.probs"]
    assert att.axes == ("step", "batch", "query", "key") and att.value.shape[0] == 1
    np.testing.assert_allclose(att.value.sum(-1), 1.0, atol=1e-5)
    assert cache["flow.time"].axes == ("step", "batch") and cache["flow.time"].token_index is None
    assert len([k for k in cache if k.endswith(".attn.probs")]) == policy.model.config.llm.depth


@pytest.mark.parametrize("request_, match", [
    (["llm.expert1.layer.3.resid_pots"], r"matches no hook point.*nearest valid names: llm\.expert1\.layer\.3\.resid_post"),
    (["llm.layer.11.resid_post"], r"matches no hook point.*nearest valid names"),
    (["llm.expert1.layer.*.resid_post?tokens=base_0_rgb"], "not within the tokens"),
    (["flow.time?tokens=actions"], "has no token axis"),
    (["img.base_0_rgb.out?reduce=heads"], "has no head axis"),
    (["llm.expert1.layer.0.resid_post?steps=12"], "out of range for 10 steps"),
])
def test_requests_that_match_nothing_fail_before_anything_runs(request_, match):
    with pytest.raises(ValueError, match=match):
        create_policy(record_sites=request_, record_dir=None)


def test_interventions_and_knockouts_are_checked_too(policy):
    with pytest.raises(ValueError, match="matches no hook point"):
        with policy.hooks(Intervention("llm.expert1.layer.99.resid_post", "zero")):
            pass
    with pytest.raises(ValueError, match="use AttentionKnockout"):
        with policy.hooks(Intervention("llm.layer.0.attn.probs", "zero")):
            pass
    with pytest.raises(ValueError, match="attention layers"):
        with policy.hooks(AttentionKnockout(keys="base_0_rgb", layers="7")):
            pass
    with pytest.raises(TypeError, match="run_with_cache"):
        with policy.hooks(Record("flow.v_t")):
            pass
    assert policy.interventions == () and policy.knockouts == ()


def test_every_called_hook_is_declared_and_every_declared_hook_is_called(fixture_model):
    model, obs, noise = fixture_model
    _, rec = model.sample_actions(obs, noise, records=(Record("*"),))
    assert sorted(rec) == sorted(hook_names(model.config))
    for name, axes in hook_names(model.config).items():
        assert rec[name].ndim == len(axes), name


def test_wrist_camera_rows_carry_wrist_token_indices(fixture_model, tmp_path):
    """Review item 3: the wrist SigLIP rows were keyed as base-camera tokens and tokens=left_wrist_0_rgb raised."""
    model, obs, noise = fixture_model
    cfg = model.config
    table = hook_table(cfg)
    wrist = table.spans["left_wrist_0_rgb"]
    site = "img.left_wrist_0_rgb.layer.0.resid_post"
    records = parse_records([f"{site}?tokens=left_wrist_0_rgb", "img.base_0_rgb.layer.0.resid_post?tokens=0:4"])
    _, rec = model.sample_actions(obs, noise, records=records)
    _, full = model.sample_actions(obs, noise, records=parse_records([site]))
    np.testing.assert_array_equal(rec[site], full[site])  # the camera span is the whole site
    assert rec["img.base_0_rgb.layer.0.resid_post"].shape[1] == 4
    with pytest.raises(ValueError, match="not within the tokens"):
        table.validate(parse_records([f"{site}?tokens=0:4"]))  # base-camera indices on the wrist site
    # Interventions address the same positions: zeroing joint tokens 256..259 zeroes wrist rows 0..3.
    iv = Intervention(site, "zero", tokens=f"{wrist[0]}:{wrist[0] + 4}")
    _, edited = model.sample_actions(obs, noise, records=parse_records([site]), interventions=(iv,))
    assert np.all(np.asarray(edited[site])[:, :4] == 0) and np.all(np.asarray(edited[site])[:, 4:] != 0)
    # The store keys wrist rows by their joint indices.
    writer = StoreWriter(tmp_path / "store", {"name": "t"}, writer_id="w")
    recorder = StoreRecorder(writer, records[:1], table, num_steps=10)
    span_tab = {"spans": {k: list(v) for k, v in table.spans.items()}}
    recorder({site: np.asarray(rec[site])[:1]}, span_tab, {"run_id": "r", "episode": 0, "env_step": 0},
             np.zeros((10, 7), np.float32))
    recorder.close()
    store = ActivationStore(tmp_path / "store")
    keys = store.keys(site)
    np.testing.assert_array_equal(keys["token_index"], np.arange(*wrist))
    assert store.sites[site]["row_axes"] == ["d_model"]
    assert store.sites[site]["token_index"] == list(range(*wrist))
    assert store.sites[site]["request"] == f"{site}?tokens=left_wrist_0_rgb"


def test_pi05_state_bins_have_their_own_span():
    """Review item 6: Pi0.5's discretised state in the prompt was counted as template (0 attention on state)."""
    policy = create_policy("pi05_tiny", random_weights=True)
    _, cache = policy.run_with_cache(example_observation(), names=["llm.layer.0.attn.probs?tokens=actions&reduce=heads"])
    spans = cache.span_table["spans"]
    s0, s1 = spans["state"]
    assert s1 - s0 >= 8  # eight state values, each at least one token
    p0 = policy.table.spans["prompt"][0]
    ids = policy.transforms.inputs(example_observation())["tokenized_prompt"][s0 - p0:s1 - p0]
    tokens = policy.transforms.tokenizer.decode_ids(ids)
    assert all(t.strip("▁").isdigit() for t in tokens if t.strip("▁")), tokens
    mass = cache["llm.layer.0.attn.probs"].value[..., s0:s1].sum()
    assert mass > 0


def test_flow_noise_is_keyed_by_the_query_not_by_call_order(policy):
    """Review item 5: one noise stream across episodes made a steered episode shift every later episode's noise."""
    meta = {"meta/suite": "libero_spatial", "meta/task_id": 0, "meta/episode": 41, "meta/env_step": 5}
    obs = example_observation() | meta
    first = policy.infer(obs)["actions"]
    for i in range(3):  # other queries in between (a longer earlier episode) change nothing
        policy.infer(example_observation(seed=i) | meta | {"meta/episode": 40, "meta/env_step": i})
    np.testing.assert_array_equal(policy.infer(obs | {"meta/run_id": "another-run"})["actions"], first)
    other = policy.infer(obs | {"meta/env_step": 10})["actions"]
    assert np.abs(other - first).max() > 0
    keyless = {k: v for k, v in example_observation().items() if not k.startswith("meta/")}
    assert np.abs(policy.infer(keyless)["actions"] - policy.infer(keyless)["actions"]).max() > 0  # a stream


def test_non_finite_answers_are_errors_not_actions(policy):
    obs = example_observation()
    obs["observation/state"] = np.full(8, 3e38, np.float32)
    with pytest.raises(ValueError, match="'observation/state' is out of range"):
        policy.infer(obs)
    with policy.hooks(Intervention("flow.v_t", "add", value=np.float32(np.nan), steps="3")):
        with pytest.raises(PolicyOutputError, match="non-finite actions.*interventions"):
            policy.infer(example_observation())
    with pytest.raises(ValueError, match=r"\.\.\. \(100000 characters\)"):
        policy.infer(example_observation() | {"prompt": "x " * 50000})


def test_hooks_md_is_generated_from_the_hook_tables():
    assert (REPO / "HOOKS.md").read_text() == hooks_doc.render(), \
        "HOOKS.md is stale: run python -m openpi.models.hooks_doc --write"
    names = hook_names(tiny_config())
    assert names["llm.layer.0.attn.probs"] == ("step", "batch", "head", "query", "key")
    assert {p.name for p in hook_points(tiny_config())} == set(names)


def test_sae_splice_is_an_intervention_with_the_sae_reconstruction(tmp_path):
    from openpi.interp.sae import model as sae_model

    cfg = tiny_config()
    model = Pi0Model(cfg, init_params(cfg, seed=0))
    rng = np.random.default_rng(0)
    obs = make_observation({k: rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8) for k in cfg.image_keys},
                           {k: np.array([True]) for k in cfg.image_keys}, np.zeros((1, 32), np.float32),
                           rng.integers(1, 1024, (1, 16)), np.arange(16)[None] < 9)
    noise = jnp.asarray(rng.standard_normal((1, 10, 32)).astype(np.float32))
    d = cfg.expert.width
    spec = sae_model.SAESpec(d_in=d, d_sae=2 * d, k=2 * d, arch="topk", input_scale=1.0)
    eye = np.concatenate([np.eye(d), -np.eye(d)], axis=1).astype(np.float32)  # exact: relu(x) - relu(-x) = x
    sae = sae_model.SparseAutoencoder(spec, {"W_enc": eye, "b_enc": np.zeros(2 * d, np.float32), "W_dec": eye.T,
                                             "b_dec": np.zeros(d, np.float32)})
    site = "llm.expert1.layer.1.resid_post"
    plain, _ = model.sample_actions(obs, noise)
    spliced, _ = model.sample_actions(obs, noise, interventions=(sae.splice(site),))
    np.testing.assert_allclose(np.asarray(spliced), np.asarray(plain), atol=1e-5)
    assert sae.splice(site).fn is sae.splice(site).fn  # one function object: compiled once
