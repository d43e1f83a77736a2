"""Checkpoint I/O, full-size parameter trees, tokenizer, normalisation and the LIBERO policy's input checks."""
import json
import shutil

import numpy as np
import pytest

from openpi.models import checkpoint
from openpi.models.config import Pi0Config, tiny_config
from openpi.models.normalize import compute_norm_stats, load_norm_stats, normalize, save_norm_stats, unnormalize
from openpi.models.param_shapes import abstract_params, init_params, param_shapes
from openpi.models.params_util import flatten
from openpi.models.tokenizer import EMBEDDED_TOKENIZER, PromptTokenizer
from openpi.policies.policy_config import create_policy


def test_released_layout_checkpoint_loads_bit_exact(fixture_dir):
    params = flatten(checkpoint.load_params(fixture_dir / "pi0_tiny_ckpt", tiny_config()))
    z = np.load(fixture_dir / "pi0_tiny.npz")
    assert set(params) == {k for k in z.files if not k.startswith(("input/", "output/"))}
    for k, v in params.items():
        np.testing.assert_array_equal(v, z[k])
    bf16 = flatten(checkpoint.load_params(fixture_dir / "pi0_tiny_ckpt" / "params", tiny_config(), dtype="bfloat16"))
    assert str(bf16["action_in_proj/kernel"].dtype) == "bfloat16"


def test_checkpoint_errors_name_the_problem(fixture_dir, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="expected a 'params/' directory"):
        checkpoint.load_params(tmp_path, tiny_config())
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_params(tmp_path / "missing", tiny_config())
    with pytest.raises(checkpoint.CheckpointError, match=r"'PaliGemma/llm/final_norm_1/Dense_0/bias'.*missing"):
        checkpoint.load_params(fixture_dir / "pi0_tiny_ckpt", tiny_config(pi05=True))
    with pytest.raises(checkpoint.CheckpointError, match=r"embedder/input_embedding' has shape \(1024, 64\)"):
        checkpoint.load_params(fixture_dir / "pi0_tiny_ckpt", tiny_config(vocab_size=2048))


def test_save_load_round_trip_with_value_keys_stripped(tmp_path):
    cfg = tiny_config(pi05=True)
    params = init_params(cfg, seed=1)
    # nnx training saves end every leaf with 'value': loading must strip it
    wrapped = {k: {"value": v} for k, v in flatten(params).items()}
    from openpi.models.params_util import unflatten
    checkpoint.save_params(tmp_path / "ck", unflatten(wrapped))
    loaded = flatten(checkpoint.load_params(tmp_path / "ck", cfg))
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(loaded[k], v)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to overwrite"):
        checkpoint.save_params(tmp_path / "ck", params)


@pytest.mark.parametrize("name,config", [("pi0", Pi0Config()), ("pi05", Pi0Config(pi05=True, max_token_len=200))])
def test_full_size_trees_match_openpi_manifests(fixture_dir, name, config):
    manifest = json.loads((fixture_dir / f"{name}_param_manifest.json").read_text())
    ref = {p["path"]: tuple(p["shape"]) for p in manifest["params"]}
    assert param_shapes(config) == ref
    tree = flatten(abstract_params(config))
    assert sum(int(np.prod(v.shape)) for v in tree.values()) == manifest["total_params"]
    checkpoint.validate_shapes(ref, config, "manifest")  # the loader's own check accepts it


def test_tokenizer_formats_and_overflow():
    tok = PromptTokenizer(EMBEDDED_TOKENIZER, max_len=48)
    out = tok.tokenize("pick_up the\nblack bowl ")
    pieces = tok.decode_ids(out.ids[: out.length])
    assert out.ids[0] == 2 and pieces[-1] in ("\n", "▁\n", "<0x0A>")  # BOS ... newline
    assert "".join(pieces[out.instruction[0]:out.instruction[1]]).replace("▁", " ").strip() == "pick up the black bowl"
    assert not out.mask[out.length:].any() and np.all(out.ids[out.length:] == 0)
    st = tok.tokenize("open the drawer", state=np.array([-1.0, 0.0, 0.999]))
    text = "".join(tok.decode_ids(st.ids[: st.length])).replace("▁", " ")
    assert "Task: open the drawer, State: 0 128 255;" in text and text.endswith("Action: ")
    assert "".join(tok.decode_ids(st.ids[st.instruction[0]:st.instruction[1]])).replace("▁", " ").strip() == "open the drawer"
    with pytest.raises(ValueError, match="more than max_token_len=8"):
        PromptTokenizer(EMBEDDED_TOKENIZER, max_len=8).tokenize("pick up the black bowl next to the plate")
    short = PromptTokenizer(EMBEDDED_TOKENIZER, max_len=8, on_overflow="truncate").tokenize("pick up the black bowl next to the plate")
    assert short.length == 8
    with pytest.raises(FileNotFoundError, match="tokenizer model"):
        PromptTokenizer("/nonexistent.model", 8)


def test_normalisation_round_trips_and_passes_extra_dims(tmp_path):
    x = np.random.default_rng(0).normal(3, 2, (500, 7)).astype(np.float32)
    stats = compute_norm_stats(x)
    padded = np.concatenate([x, np.ones((500, 3), np.float32)], axis=1)
    for quantile in (False, True):
        n = normalize(padded, stats, quantile)
        np.testing.assert_array_equal(n[:, 7:], 1.0)
        np.testing.assert_allclose(unnormalize(n, stats, quantile), padded, atol=1e-4)
    assert abs(normalize(x, stats, False).mean()) < 1e-3
    q = normalize(x, stats, True)
    assert abs(np.mean(q < -1) - 0.01) < 0.01
    save_norm_stats(tmp_path / "a" / "norm_stats.json", {"actions": stats, "state": stats})
    assert np.allclose(load_norm_stats(tmp_path / "a" / "norm_stats.json")["actions"].q99, stats.q99)
    with pytest.raises(FileNotFoundError, match="norm_stats.json"):
        load_norm_stats(tmp_path / "missing" / "norm_stats.json")


@pytest.fixture(scope="module")
def tiny_policy():
    return create_policy("pi0_tiny")


def _obs(**over):
    rng = np.random.default_rng(0)
    obs = {"observation/image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
           "observation/wrist_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
           "observation/state": np.zeros(8, np.float32), "prompt": "put the bowl on the plate"}
    obs.update(over)
    return {k: v for k, v in obs.items() if v is not None}


def test_policy_infers_actions_and_labels_untrained(tiny_policy):
    out = tiny_policy.infer(_obs(**{"meta/episode": 3}))
    assert out["actions"].shape == (10, 7) and np.isfinite(out["actions"]).all()
    assert tiny_policy.metadata["trained"] is False and "untrained" in tiny_policy.metadata["warning"]
    noise = np.random.default_rng(1).standard_normal((10, 32)).astype(np.float32)
    a = tiny_policy.infer(_obs(), noise=noise)["actions"]
    b = tiny_policy.infer(_obs(), noise=noise)["actions"]
    np.testing.assert_array_equal(a, b)  # deterministic given the noise


@pytest.mark.parametrize("obs,error,match", [
    (_obs(**{"observation/wrist_image": None}), KeyError, "observation/wrist_image"),
    (_obs(**{"observation/image": np.zeros((256, 256), np.uint8)}), ValueError, r"shape \(H, W, 3\)"),
    (_obs(**{"observation/image": np.zeros((256, 256, 3), np.int32)}), ValueError, "dtype uint8"),
    (_obs(**{"observation/state": np.zeros(5)}), ValueError, "expected 8 floats"),
    (_obs(prompt="pick " * 60), ValueError, "max_token_len=48"),
    (_obs(prompt=None), KeyError, "no 'prompt'"),
])
def test_policy_bad_input_names_the_key(tiny_policy, obs, error, match):
    with pytest.raises(error, match=match):
        tiny_policy.infer(obs)


def test_named_configs_need_their_checkpoint(tmp_path, fixture_dir):
    with pytest.raises(ValueError, match="unknown policy config 'pi7'"):
        create_policy("pi7")
    with pytest.raises(ValueError, match="needs --policy.dir"):
        create_policy("pi05_libero")
    shutil.copytree(fixture_dir / "pi0_tiny_ckpt", tmp_path / "ck")
    with pytest.raises(checkpoint.CheckpointError, match="is missing|has shape"):
        create_policy("pi0_libero", str(tmp_path / "ck"))
    with pytest.raises(checkpoint.CheckpointError, match="expected a 'params/' directory"):
        create_policy("pi0_libero", str(tmp_path))


def test_embedded_trained_checkpoint_is_the_default():
    """The committed checkpoint: the default config, loads with its norm stats, acts, and its card's facts hold."""
    from openpi.policies import policy_config as pc
    from openpi.training import train

    assert pc.DEFAULT_CONFIG == "pi0_tiny_spatial10"
    policy = create_policy()
    assert policy.metadata["trained"] is True and policy.metadata["config"] == "pi0_tiny_spatial10"
    assert policy.metadata["checkpoint"] == str(pc.EMBEDDED_CHECKPOINT)
    out = policy.infer(_obs(prompt="pick up the black bowl on the cookie box and place it on the plate"))
    assert out["actions"].shape == (10, 7) and np.isfinite(out["actions"]).all()
    stats = policy.transforms.norm_stats
    assert stats["state"].mean.shape == (8,) and stats["actions"].mean.shape == (7,)
    meta = json.loads((pc.EMBEDDED_CHECKPOINT / "train_meta.json").read_text())
    assert meta["num_params"] == train.count_params(pc.get_config(pc.DEFAULT_CONFIG).model)
    card = (pc.EMBEDDED_CHECKPOINT / "CARD.md").read_text()
    assert f"{meta['num_params']:,}" in card and f"{meta['step']:,}" in card
    size = sum(p.stat().st_size for p in pc.EMBEDDED_CHECKPOINT.rglob("*") if p.is_file())
    assert size < 20 * 2**20, size
    random = create_policy(random_weights=True)
    assert random.metadata["trained"] is False
    with pytest.raises(ValueError, match="either checkpoint_dir or random_weights"):
        create_policy(checkpoint_dir=str(pc.EMBEDDED_CHECKPOINT), random_weights=True)
