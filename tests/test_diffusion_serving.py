"""A LeRobot Diffusion Policy served like Pi0: LIBERO requests, server-side observation history per episode, keyed
noise, the websocket server, store recording and loading errors (openpi.policies.diffusion_policy)."""
import importlib.util
import json
import sys

import numpy as np
import pytest

from conftest import LEROBOT_FIXTURES, LEROBOT_POLICY, REPO_ROOT, require_lerobot_policy
from openpi.interp.store import ActivationStore
from openpi.models.diffusion.config import ConfigError
from openpi.models.hooks import AttentionKnockout, Intervention
from openpi.policies import diffusion_policy as dpp
from openpi.policies.policy_config import create_policy, get_config
from openpi.serving.websocket_client import WebsocketClientPolicy
from openpi.serving.websocket_server import LIBERO_REQUIRED_KEYS, BackgroundServer

FIXTURES, POLICY = LEROBOT_FIXTURES, LEROBOT_POLICY


@pytest.fixture(scope="module")
def policy():
    require_lerobot_policy()
    return create_policy("dp_lerobot", str(POLICY))


def request(episode: int, env_step: int, *, size: int = 224, **meta) -> dict:
    """A LIBERO request whose images and state depend on (episode, env_step) only."""
    rng = np.random.default_rng([episode, env_step])
    meta = {"run_id": "r", "suite": "libero_spatial", "task_id": 0, "episode": episode, "attempt": "a",
            "env_step": env_step, "replan_index": env_step // 5} | meta
    return {"observation/image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "observation/state": rng.uniform(-0.5, 0.5, 8).astype(np.float32), "prompt": "pick up the bowl",
            **{f"meta/{k}": v for k, v in meta.items()}}


def test_served_chunk_equals_lerobot_on_the_fixture_history(policy):
    """Through LIBERO request keys: one frame -> LeRobot's select_action after reset (history [f1, f1]); two
    queries -> its generate_actions on [f0, f1]; with LeRobot's own noises, un-normalised."""
    z = np.load(FIXTURES / "diffusion_tiny_io.npz")
    for b in range(2):
        frames = [{"observation/image": z["obs_image_uint8"][b, s].transpose(1, 2, 0),
                   "observation/wrist_image": z["obs_wrist_image_uint8"][b, s].transpose(1, 2, 0),
                   "observation/state": z["obs_state_raw"][b, s], "meta/episode": 90 + b} for s in range(2)]
        noise = np.concatenate([z["sample_init_noise"][b][None], z["ddpm_step_noise"][:, b],
                                np.zeros((1, 16, 7), np.float32)])  # the last step (t = 0) draws no noise
        alone = policy.infer(dict(frames[1], **{"meta/env_step": 0}), noise=noise)
        np.testing.assert_allclose(alone["actions"], z["select_action_ddpm_actions_unnorm"][b], atol=1e-4)
        policy.infer(dict(frames[0], **{"meta/env_step": 0}), noise=noise)
        both = policy.infer(dict(frames[1], **{"meta/env_step": 1}), noise=noise)
        assert both["obs_history"] == {"positions": [0, 1], "reset": False}
        np.testing.assert_allclose(both["actions"], z["ddpm_actions_unnorm"][b], atol=1e-4)


def test_history_is_per_episode_interleaving_does_not_matter_and_new_episodes_reset(policy):
    steps = (0, 5, 10)
    sequential = {(e, t): policy.infer(request(e, t)) for e in (1, 2) for t in steps}
    interleaved = {(e, t): policy.infer(request(e, t)) for t in steps for e in (1, 2)}
    for key, out in sequential.items():
        np.testing.assert_array_equal(interleaved[key]["actions"], out["actions"])
    assert sequential[1, 10]["obs_history"] == {"positions": [5, 10], "reset": False}
    assert sequential[1, 0]["obs_history"] == {"positions": [0, 0], "reset": True}
    # the same query under another attempt is another history: reset to [10, 10], another chunk
    other = policy.infer(request(1, 10, attempt="b"))
    assert other["obs_history"]["reset"] and not np.array_equal(other["actions"], sequential[1, 10]["actions"])
    # env step 0 restarts the episode; a repeated env step replaces the newest frame (same answer again)
    assert policy.infer(request(1, 0))["obs_history"]["reset"]
    first = policy.infer(request(1, 5))
    np.testing.assert_array_equal(first["actions"], sequential[1, 5]["actions"])
    again = policy.infer(request(1, 5))
    assert again["obs_history"] == {"positions": [0, 5], "reset": False}
    np.testing.assert_array_equal(again["actions"], first["actions"])
    assert policy.infer(request(1, 3))["obs_history"]["reset"]  # going backwards: a new episode under that key


def test_history_keys_fallbacks_and_lru_bound():
    h = dpp.ObservationHistory(n_obs_steps=3, max_episodes=2)
    assert h.key_of({"suite": "s", "task_id": 1, "episode": 2}) == ("episode", "", "s", "1", "2", "")
    assert h.key_of({"connection_id": "c", "request_index": 4}) == ("connection", "c")
    assert h.key_of({}) == ("local",)
    frames, info = h.push({"connection_id": "a", "request_index": 0}, "a0")
    assert frames == ["a0"] * 3 and info == {"positions": [0, 0, 0], "reset": True}
    assert h.push({"connection_id": "a", "request_index": 1}, "a1")[0] == ["a0", "a0", "a1"]
    h.push({"connection_id": "b", "request_index": 0}, "b0")
    h.push({"connection_id": "a", "request_index": 2}, "a2")  # a is now the most recently used
    h.push({"connection_id": "c", "request_index": 0}, "c0")  # evicts b
    assert len(h) == 2
    assert h.push({"connection_id": "b", "request_index": 1}, "b1") == (["b1"] * 3, {"positions": [1] * 3,
                                                                                     "reset": True})
    assert h.push({}, "x")[0] == ["x"] * 3 and h.push({}, "y")[0] == ["x", "x", "y"]  # no position: appends


def test_noise_is_keyed_by_the_query_including_ddpm_step_noise(policy):
    keyed = policy.noise_for({"suite": "libero_spatial", "task_id": 0, "episode": 7, "env_step": 0})
    assert keyed.shape == (1, 11, 16, 7)  # x_T + one variance noise per DDPM step
    base = policy.infer(request(7, 0))
    np.testing.assert_array_equal(policy.infer(request(7, 0), noise=keyed[0])["actions"], base["actions"])
    no_step_noise = keyed[0].copy()
    no_step_noise[1:] = 0
    assert not np.allclose(policy.infer(request(7, 0), noise=no_step_noise)["actions"], base["actions"])
    np.testing.assert_array_equal(policy.infer(request(7, 0, run_id="another run"))["actions"], base["actions"])
    with pytest.raises(ValueError, match=r"expected \(11, 16, 7\): x_T then"):
        policy.infer(request(7, 0), noise=np.zeros((16, 7)))
    batch = policy.infer_batch([request(7, 0), request(8, 0), {"observation/image": np.zeros((8, 8))}])
    np.testing.assert_allclose(batch[0]["actions"], base["actions"], atol=1e-5)
    assert isinstance(batch[2], KeyError)


def test_websocket_server_keeps_one_history_per_episode_and_per_connection(policy):
    expected = {(e, t): policy.infer(request(e, t))["actions"] for e in (3, 4) for t in (0, 5)}
    with BackgroundServer(policy, required_keys=LIBERO_REQUIRED_KEYS) as srv, \
            WebsocketClientPolicy("127.0.0.1", srv.port) as c3, WebsocketClientPolicy("127.0.0.1", srv.port) as c4:
        assert c3.get_server_metadata()["model"] == "diffusion"
        for t in (0, 5):
            for e, client in ((3, c3), (4, c4)):
                np.testing.assert_array_equal(client.infer(request(e, t))["actions"], expected[e, t])
        bare = {k: v for k, v in request(5, 0).items() if not k.startswith("meta/")}
        with WebsocketClientPolicy("127.0.0.1", srv.port) as anon:  # no meta: keyed by the server's connection id
            assert anon.infer(bare)["obs_history"] == {"positions": [0, 0], "reset": True}
            assert anon.infer(bare)["obs_history"] == {"positions": [0, 1], "reset": False}


def test_recordings_go_to_the_store_keyed_per_request_with_the_attention_grid(policy, tmp_path):
    store_dir = tmp_path / "acts"
    pol = create_policy("dp_lerobot", str(POLICY), record_dir=str(store_dir),
                        record_sites=["enc.*.attn", "unet.mid.block.1?steps=0,-1"])
    queries = [request(1, 0), request(2, 0), request(1, 5)]
    outs = [pol.infer(q) for q in queries]
    for q, out in zip(queries, outs):  # recording does not change the actions
        np.testing.assert_array_equal(out["actions"], policy.infer(q)["actions"])
    pol.close()
    store = ActivationStore(store_dir)
    x, keys = store.read("enc.image.attn")
    assert x.shape == (3, 2, 32, 9) and np.allclose(x.sum(-1), 1, atol=1e-5)
    assert sorted(zip(keys["episode"].tolist(), keys["env_step"].tolist())) == [(1, 0), (1, 5), (2, 0)]
    assert set(keys["denoise_step"].tolist()) == {-1} and set(keys["token_index"].tolist()) == {-1}
    info = store.site_info("enc.wrist_image.attn")
    assert info["camera"] == "observation.wrist_image" and info["attention_grid"]["grid"] == [3, 3]
    assert info["row_axes"] == ["obs_step", "keypoint", "location"]
    x, keys = store.read("unet.mid.block.1", where={"episode": ["1"], "env_step": ["5"]})
    assert x.shape == (2, 64, 8) and sorted(keys["denoise_step"].tolist()) == [0, 9]
    tables = store.span_tables("unet.mid.block.1", where={"episode": ["1"], "env_step": ["5"]})
    assert tables[0]["obs_positions"] == [0, 5] and tables[0]["spans"] == {}
    assert store.model_config["model_type"] == "diffusion"


def test_loading_errors_name_the_folder_and_the_mismatch(tmp_path):
    with pytest.raises(ValueError, match="needs --policy.dir"):
        create_policy("dp_lerobot")
    (tmp_path / "openpi_ckpt" / "params").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no config.json.*openpi checkpoint"):
        create_policy("dp_lerobot", str(tmp_path / "openpi_ckpt"))
    other = tmp_path / "act"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"type": "act"}))
    with pytest.raises(ConfigError, match="'diffusion' policies only"):
        create_policy("dp_lerobot", str(other))
    raw = json.loads((POLICY / "config.json").read_text())
    for change, pattern in [({"observation.state": {"type": "STATE", "shape": [9]}}, r"9 values, expected 8"),
                            ({"observation.images.top": {"type": "VISUAL", "shape": [3, 96, 96]}},
                             r"3 camera\(s\).*expected 2"),
                            ({"observation.image": None, "observation.images.front": {"type": "VISUAL",
                                                                                      "shape": [3, 96, 96]}},
                             r"not one agent view")]:
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        bad.mkdir()
        features = {k: v for k, v in (raw["input_features"] | change).items() if v is not None}
        (bad / "config.json").write_text(json.dumps(raw | {"input_features": features}))
        with pytest.raises(dpp.ConfigMismatchError, match=pattern):
            create_policy("dp_lerobot", str(bad))
    with pytest.raises(ValueError, match=r"\['compact_prefix', 'tokenizer'\] do not apply"):
        create_policy("dp_lerobot", str(POLICY), tokenizer="x", compact_prefix=True)
    with pytest.raises(ValueError, match="Diffusion Policy config"):
        get_config("dp_lerobot")
    with pytest.raises(ValueError, match="matches no hook point"):
        create_policy("dp_lerobot", str(POLICY), record_sites=["llm.layer.0.attn.probs"], record_dir=str(tmp_path))


def test_hooks_take_interventions_and_refuse_knockouts(policy):
    base = policy.infer(request(6, 0))["actions"]
    with policy.hooks(Intervention("enc.image.features", "zero")):
        edited = policy.infer(request(6, 0))["actions"]
    assert not np.allclose(edited, base)
    np.testing.assert_array_equal(policy.infer(request(6, 0))["actions"], base)
    with pytest.raises(ValueError, match="no attention layers"):
        with policy.hooks([AttentionKnockout(keys="images")]):
            pass


@pytest.mark.libero
def test_eval_policy_script_runs_the_diffusion_policy_unchanged(env, tmp_path):
    """scripts/eval_policy.py with --policy-config dp_lerobot: one short real LIBERO episode, two queries."""
    spec = importlib.util.spec_from_file_location("eval_policy", REPO_ROOT / "scripts" / "eval_policy.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(script)
    args = script.Args(policy_config="dp_lerobot", policy_dir=str(POLICY), task_ids=(0,), num_trials_per_task=1,
                       max_steps=6, num_steps_wait=1, save_video=False, out_dir=str(tmp_path), run_id="dp")
    summary = script.main(args, env_factory=lambda *a: env)
    assert summary["total"]["episodes"] == 1
    rec = json.loads((tmp_path / "episodes" / "dp__libero_spatial__task0__ep0.json").read_text())
    assert rec["status"] == "complete" and rec["steps"] == 6
    assert [c["env_step"] for c in rec["chunks"]] == [0, 5] and np.asarray(rec["chunks"][0]["actions"]).shape == (8, 7)
    run = json.loads((tmp_path / "runs" / "dp.json").read_text())
    assert run["server_metadata"]["model"] == "diffusion"
