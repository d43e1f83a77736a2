"""Rollout loop on a real LIBERO task with a scripted test-double policy: records, frames, resume, errors, shards."""

import dataclasses
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

from openpi.envs import perturbations as pert
from openpi.envs import rollout

SUITE, TASK = "libero_spatial", 0  # the task of the shared `env` fixture (conftest.py)
REPO = pathlib.Path(__file__).resolve().parents[1]


class ScriptedPolicy:
    """Test double for the policy: returns a fixed chunk whose first entry encodes the replan index."""

    def __init__(self, horizon: int = 4, fail_episodes: tuple[int, ...] = ()) -> None:
        self.horizon, self.fail_episodes = horizon, fail_episodes
        self.requests: list[dict] = []

    def infer(self, obs: dict) -> dict:
        self.requests.append({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in obs.items()})
        if obs["meta/episode"] in self.fail_episodes:
            raise RuntimeError("server exploded")
        chunk = np.zeros((self.horizon, 7))
        chunk[:, 2] = 0.3  # move up a little
        chunk[:, 6] = -1.0
        chunk[:, 0] = 0.01 * obs["meta/replan_index"] + 0.001 * np.arange(self.horizon)
        return {"actions": chunk, "server_timing": {"infer_ms": 1.0}}


def _cfg(out: pathlib.Path, **kw) -> rollout.RolloutConfig:
    base = dict(
        run_id="t1", out_dir=out, video_dir=out / "videos", max_steps=5, settle_steps=1, replan_steps=2,
        save_frames=True, perturb=pert.PerturbationConfig(prompt_mode="synonym", translate_px=(2, 0)),
    )
    base.update(kw)
    return rollout.RolloutConfig(**base)


# ---------------------------------------------------------------------------------------------- pure parts


def test_shard_split_covers_every_episode_once():
    plan = rollout.plan_episodes(SUITE, [0, 3, 7], 7)
    for n in (1, 2, 4, 5, 30):
        shards = [rollout.shard_episodes(plan, k, n) for k in range(n)]
        flat = [e for s in shards for e in s]
        assert sorted(flat) == sorted(plan) and len(flat) == len(set(flat)) == 21
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="shard_index"):
        rollout.shard_episodes(plan, 2, 2)
    with pytest.raises(ValueError, match="repeat"):
        rollout.plan_episodes(SUITE, [1, 1], 2)


def test_plans_start_at_a_held_out_trial_and_check_task_ids():
    plan = rollout.plan_suite_episodes(SUITE, [2], 3, first_trial=40)
    assert [(e.task_id, e.episode, e.init_state_index) for e in plan] == [(2, 40, 40), (2, 41, 41), (2, 42, 42)]
    assert len(rollout.plan_suite_episodes(SUITE, None, 1)) == 10  # every task of libero_spatial
    with pytest.raises(ValueError, match=r"task ids \[10\] out of range for libero_spatial \(10 tasks\)"):
        rollout.plan_suite_episodes(SUITE, [0, 10], 1)
    with pytest.raises(ValueError, match="first_trial"):
        rollout.plan_episodes(SUITE, [0], 1, first_trial=-1)


def test_action_chunk_validation():
    ok = rollout.action_chunk_from_reply({"actions": np.ones((5, 7), np.float32)}, 5)
    assert ok.shape == (5, 7) and ok.dtype == np.float64
    for reply, msg in [
        ({"action": np.ones((5, 7))}, "no 'actions'"),
        ({"actions": np.ones((5, 8))}, r"\(H, 7\)"),
        ({"actions": np.ones((3, 7))}, "fewer than replan_steps"),
        ({"actions": np.full((5, 7), np.nan)}, "NaN"),
        ("oops", "no 'actions'"),
    ]:
        with pytest.raises(rollout.PolicyReplyError, match=msg):
            rollout.action_chunk_from_reply(reply, 5)


def test_run_id_validation():
    for bad in ("a__b", "a/b", "", "a b", "_x"):
        with pytest.raises(ValueError, match="run_id"):
            rollout.validate_run_id(bad)
    assert rollout.validate_run_id("pi05-spatial_v1.2") == "pi05-spatial_v1.2"


def test_unique_video_names_never_overwrite(tmp_path):
    frames = [np.full((16, 32, 3), i * 20, np.uint8) for i in range(5)]
    rec = {"run_id": "t1", "suite": SUITE, "task_id": 2, "episode": 4, "success": True}
    cfg = _cfg(tmp_path, save_frames=False)
    first = rollout.write_episode(rollout.EpisodeResult(dict(rec), frames, None), cfg)["video"]
    first_bytes = (tmp_path / first).read_bytes()
    second = rollout.write_episode(rollout.EpisodeResult(dict(rec), frames, None), cfg)["video"]
    assert first != second and first.endswith("t1__libero_spatial__task2__ep4__success.mp4")
    assert second.endswith("__success__2.mp4")
    assert (tmp_path / first).read_bytes() == first_bytes


def test_summary_table_counts(tmp_path):
    cfg = _cfg(tmp_path, save_frames=False, save_video=False)
    planted = {(0, 0): True, (0, 1): False, (0, 2): True, (4, 0): False}
    for (task, ep), ok in planted.items():
        rec = {"run_id": "t1", "suite": SUITE, "task_id": task, "episode": ep, "success": ok, "original_prompt": f"p{task}",
               "status": "policy_error" if (task, ep) == (4, 0) else "complete"}
        rollout.write_episode(rollout.EpisodeResult(rec, [], None), cfg)
    # A record of another run in the same folder is not counted.
    other = dataclasses.replace(cfg, run_id="t10")
    rollout.write_episode(rollout.EpisodeResult({"run_id": "t10", "suite": SUITE, "task_id": 0, "episode": 0,
                                                 "success": True}, [], None), other)
    s = rollout.summarize(tmp_path, "t1", rollout.plan_episodes(SUITE, [0, 4], 3))
    assert s["suites"][SUITE]["tasks"]["0"] == {"prompt": "p0", "episodes": 3, "successes": 2, "errors": 0,
                                                "success_rate": pytest.approx(2 / 3, abs=1e-6)}
    assert s["suites"][SUITE]["tasks"]["4"]["errors"] == 1
    assert s["total"]["episodes"] == 4 and s["total"]["successes"] == 2
    assert s["expected_episodes"] == 6 and s["missing_episodes"] == 2
    text = rollout.format_summary(s)
    assert "66.7%" in text and "missing: 2 of 6" in text


def _load_script(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _load_main():
    return _load_script("libero_main", REPO / "examples" / "libero" / "main.py")


def test_main_args_match_openpi_defaults_and_spellings():
    import tyro

    main = _load_main()
    a = main.Args()
    assert (a.host, a.port, a.resize_size, a.replan_steps, a.task_suite_name, a.num_steps_wait,
            a.num_trials_per_task, a.seed) == ("0.0.0.0", 8000, 224, 5, "libero_spatial", 10, 50, 7)
    argv = ["--args.task-suite-name", "libero_10", "--task-ids", "1", "2", "--max-steps", "9",
            "--perturb.prompt-mode", "opposite", "--shard-index", "1", "--num-shards", "3", "--save-frames"]
    parsed = tyro.cli(main.Args, args=main._openpi_argv(argv))
    assert parsed.task_suite_name == "libero_10" and parsed.task_ids == (1, 2) and parsed.max_steps == 9
    assert parsed.perturb.prompt_mode == "opposite" and (parsed.shard_index, parsed.num_shards) == (1, 3)
    assert parsed.save_frames


# ---------------------------------------------------------------------------------------------- real LIBERO


@pytest.fixture(scope="module")
def first_run(env, tmp_path_factory):
    """Episode 0 runs normally; every request of episode 1 fails, which (max 1 consecutive error) aborts the run."""
    out = tmp_path_factory.mktemp("rollout")
    cfg = _cfg(out, max_consecutive_errors=1)
    policy = ScriptedPolicy(fail_episodes=(1,))
    plan = rollout.plan_episodes(SUITE, [TASK], 2)
    with pytest.raises(RuntimeError) as abort:
        rollout.evaluate(cfg, policy, plan, env_factory=lambda *a: env, close_envs=False, progress=False)
    return cfg, policy, abort.value


def _record(cfg, episode):
    return json.loads(cfg.episode_json(rollout.EpisodeSpec(SUITE, TASK, episode)).read_text())


@pytest.mark.libero
def test_episode_record_written(first_run, env):
    cfg, policy, _ = first_run
    rec = _record(cfg, 0)
    assert (rec["run_id"], rec["suite"], rec["task_id"], rec["episode"], rec["init_state_index"]) == ("t1", SUITE, TASK, 0, 0)
    assert rec["steps"] == 5 and rec["status"] == "complete" and rec["success"] is False
    assert rec["failure_reason"] == "max_steps"
    actions, states = np.array(rec["actions"]), np.array(rec["states"])
    assert actions.shape == (5, 7) and states.shape == (5, 8)
    assert [c["env_step"] for c in rec["chunks"]] == [0, 2, 4]
    assert [c["replan_index"] for c in rec["chunks"]] == [0, 1, 2]
    for t in range(5):  # executed action t = row t % 2 of chunk t // 2
        np.testing.assert_allclose(actions[t], np.array(rec["chunks"][t // 2]["actions"])[t % 2])
    assert rec["original_prompt"] == env.prompt and rec["prompt"] != env.prompt
    assert rec["perturbations"]["prompt"]["mode"] == "synonym" and rec["perturbations"]["prompt"]["changed"]
    assert rec["perturbations"]["visual"]["translate_px"] == [2, 0]
    assert rec["objects_of_interest"] == ["akita_black_bowl_1", "plate_1"]
    assert (cfg.out_dir / rec["video"]).stat().st_size > 0 and rec["video"].endswith("__failure.mp4")
    assert (cfg.out_dir / rec["frames"]).exists()


@pytest.mark.libero
def test_policy_failure_is_recorded_and_aborts(first_run):
    cfg, policy, abort = first_run
    assert "1 consecutive policy errors" in str(abort)
    assert sum(r["meta/episode"] == 1 for r in policy.requests) == 1
    rec = _record(cfg, 1)
    assert rec["success"] is False and rec["status"] == "policy_error" and rec["steps"] == 0
    assert rec["failure_reason"].startswith("policy_error: RuntimeError") and "server exploded" in rec["failure_reason"]
    summary = json.loads((cfg.out_dir / "results" / "t1.json").read_text())  # written even though the run aborted
    assert summary["total"] == {"episodes": 2, "successes": 0, "errors": 1, "success_rate": 0.0}


@pytest.mark.libero
def test_requests_carry_join_keys_and_frames_are_what_was_sent(first_run):
    cfg, policy, _ = first_run
    sent0 = [r for r in policy.requests if r["meta/episode"] == 0]
    assert len(sent0) == 3
    rec = _record(cfg, 0)
    assert rec["attempt"] and {r["meta/attempt"] for r in sent0} == {rec["attempt"]}  # one attempt, recorded
    for k, req in enumerate(sent0):
        assert {key: req[key] for key in req if key.startswith("meta/")} == {
            "meta/run_id": "t1", "meta/suite": SUITE, "meta/task_id": TASK, "meta/episode": 0,
            "meta/attempt": rec["attempt"], "meta/env_step": 2 * k, "meta/replan_index": k,
        }
        assert req["prompt"] == rec["prompt"]
        np.testing.assert_allclose(req["observation/state"], rec["states"][2 * k])
    frames = np.load(cfg.out_dir / rec["frames"])
    assert frames["agentview"].shape == (5, 224, 224, 3) and frames["agentview_seg"].dtype == np.int32
    np.testing.assert_array_equal(frames["env_step"], np.arange(5))
    np.testing.assert_array_equal(frames["replan_index"], [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(frames["queried"], [True, False, True, False, True])
    np.testing.assert_array_equal(frames["agentview"][frames["queried"]], np.stack([r["observation/image"] for r in sent0]))
    np.testing.assert_array_equal(frames["wrist"][frames["queried"]], np.stack([r["observation/wrist_image"] for r in sent0]))
    # The 2-pixel translation hit image and mask alike: the first two columns are empty in both.
    assert not frames["agentview"][:, :, :2].any() and not frames["agentview_seg"][:, :, :2].any()
    assert frames["agentview"][:, :, 2:].any() and frames["agentview_seg"][:, :, 2:].any()
    names = json.loads(str(frames["instance_names"]))
    ids = json.loads(str(frames["object_instance_ids"]))
    assert json.loads(str(frames["objects_of_interest"])) == ["akita_black_bowl_1", "plate_1"]
    assert names[str(ids["plate_1"])] == "plate_1" and (frames["agentview_seg"] == ids["plate_1"]).any()


@pytest.mark.libero
def test_resume_skips_finished_then_retries_errors(first_run, env):
    cfg, _, _ = first_run
    plan = rollout.plan_episodes(SUITE, [TASK], 2)
    stamps = {p: p.stat().st_mtime_ns for p in (cfg.out_dir / "episodes").glob("*.json")}
    policy = ScriptedPolicy()
    kw = dict(env_factory=lambda *a: env, close_envs=False, progress=False)
    summary = rollout.evaluate(dataclasses.replace(cfg, retry_errors=False), policy, plan, **kw)
    assert policy.requests == [] and summary["total"]["episodes"] == 2
    assert {p: p.stat().st_mtime_ns for p in (cfg.out_dir / "episodes").glob("*.json")} == stamps
    # Changed settings under the same run id are refused before anything is touched.
    with pytest.raises(ValueError, match="different settings"):
        rollout.evaluate(dataclasses.replace(cfg, replan_steps=3), policy, plan, **kw)
    assert {p: p.stat().st_mtime_ns for p in (cfg.out_dir / "episodes").glob("*.json")} == stamps
    # Default resume reruns only the episode that failed on the policy; its old record is archived.
    summary = rollout.evaluate(cfg, policy, plan, **kw)
    assert {r["meta/episode"] for r in policy.requests} == {1}
    assert _record(cfg, 1)["status"] == "complete"
    ep0 = cfg.episode_json(rollout.EpisodeSpec(SUITE, TASK, 0))
    assert ep0.stat().st_mtime_ns == stamps[ep0]
    archived = json.loads((cfg.out_dir / "episodes" / "_errors" / "t1__libero_spatial__task0__ep1.json").read_text())
    assert archived["status"] == "policy_error"
    assert archived["attempt"] != _record(cfg, 1)["attempt"]  # the rerun is a new attempt: its rows are told apart
    assert summary["total"] == {"episodes": 2, "successes": 0, "errors": 0, "success_rate": 0.0}


class _ServedPolicy(ScriptedPolicy):
    metadata = {"policy": "scripted-test-double", "action_horizon": 4}


@pytest.mark.libero
def test_main_end_to_end_over_websocket(env, tmp_path, capsys):
    """examples/libero/main.py against our websocket server: join keys survive the wire, records get written."""
    from openpi.serving.websocket_server import BackgroundServer

    main = _load_main()
    served = _ServedPolicy()
    with BackgroundServer(served, port=0) as srv:
        args = main.Args(host="127.0.0.1", port=srv.port, task_ids=(TASK,), num_trials_per_task=1, max_steps=3,
                         num_steps_wait=1, replan_steps=2, run_id="e2e", out_dir=str(tmp_path),
                         video_out_path=str(tmp_path / "videos"), connect_timeout_s=30)
        summary = main.main(args, env_factory=lambda *a: env)
    assert summary["total"]["episodes"] == 1 and summary["missing_episodes"] == 0
    assert [(r["meta/run_id"], r["meta/episode"], r["meta/env_step"], r["meta/replan_index"]) for r in served.requests] == [
        ("e2e", 0, 0, 0), ("e2e", 0, 2, 1)
    ]
    assert served.requests[0]["observation/image"].shape == (224, 224, 3)
    rec = json.loads((tmp_path / "episodes" / "e2e__libero_spatial__task0__ep0.json").read_text())
    assert rec["steps"] == 3 and rec["status"] == "complete"
    run = json.loads((tmp_path / "runs" / "e2e.json").read_text())
    assert run["server_metadata"] == _ServedPolicy.metadata
    assert "libero_spatial" in capsys.readouterr().out  # the success table was printed


@pytest.mark.libero
def test_rendering_only_at_queries_sends_the_same_observations(env, tmp_path):
    """render_every_step=False renders only the steps that query the policy: same states and actions, images that
    differ from always-on rendering by sub-grey-level noise (end of step vs one substep before), frames and masks
    saved for exactly the query steps, and the env left rendering every step again."""
    plan = rollout.plan_episodes(SUITE, [TASK], 1)
    runs = {}
    for every in (True, False):
        policy = ScriptedPolicy()
        cfg = _cfg(tmp_path / str(every), max_steps=6, render_every_step=every, perturb=pert.PerturbationConfig())
        rollout.evaluate(cfg, policy, plan, env_factory=lambda *a: env, close_envs=False, progress=False)
        runs[every] = (policy.requests, _record(cfg, 0), dict(np.load(cfg.frames_npz(plan[0]))))
    (full_req, full_rec, full_fr), (lazy_req, lazy_rec, lazy_fr) = runs[True], runs[False]
    assert lazy_rec["render_every_step"] is False and full_rec["render_every_step"] is True
    assert [r["meta/env_step"] for r in lazy_req] == [r["meta/env_step"] for r in full_req] == [0, 2, 4]
    np.testing.assert_array_equal(lazy_rec["states"], full_rec["states"])
    np.testing.assert_array_equal(lazy_rec["actions"], full_rec["actions"])
    for a, b in zip(full_req, lazy_req):
        for key in ("observation/image", "observation/wrist_image"):
            assert b[key].dtype == np.uint8 and b[key].shape == (224, 224, 3) and b[key].std() > 10
            assert np.abs(a[key].astype(float) - b[key]).mean() < 1.0, key
    assert full_fr["env_step"].tolist() == list(range(6))
    assert lazy_fr["env_step"].tolist() == [0, 2, 4] and lazy_fr["queried"].all()
    for key, request_key in (("agentview", "observation/image"), ("wrist", "observation/wrist_image")):
        np.testing.assert_array_equal(lazy_fr[key], np.stack([r[request_key] for r in lazy_req]))
        seg_full, seg_lazy = full_fr[f"{key}_seg"][[0, 2, 4]], lazy_fr[f"{key}_seg"]
        assert seg_lazy.max() > 0, f"{key}: no instance in the on-demand masks"
        assert (seg_full == seg_lazy).mean() > 0.99, key  # the same instances, up to the substep's motion
    runs_cfg = json.loads((tmp_path / "False" / "runs" / "t1.json").read_text())
    assert runs_cfg["settings"]["render_every_step"] is False
    obs, *_ = env.step(np.zeros(7))
    assert obs["agentview_image"].dtype == np.uint8 and obs["agentview_image"].std() > 10
    assert obs["agentview_segmentation_element"].max() > 0


@pytest.mark.libero
def test_eval_policy_script_runs_the_embedded_policy_in_process(env, tmp_path, capsys):
    """scripts/eval_policy.py: the default (trained) policy in this process, held-out initial state, on-demand
    rendering; the run records which policy and checkpoint produced the episodes."""
    script = _load_script("eval_policy", REPO / "scripts" / "eval_policy.py")
    args = script.Args(task_ids=(TASK,), first_trial=45, num_trials_per_task=1, max_steps=6, num_steps_wait=1,
                       out_dir=str(tmp_path), run_id="ev")
    summary = script.main(args, env_factory=lambda *a: env)
    assert summary["total"]["episodes"] == 1 and summary["missing_episodes"] == 0
    rec = json.loads((tmp_path / "episodes" / "ev__libero_spatial__task0__ep45.json").read_text())
    assert rec["init_state_index"] == 45 and rec["steps"] == 6 and rec["render_every_step"] is False
    assert [c["env_step"] for c in rec["chunks"]] == [0, 5] and np.isfinite(rec["actions"]).all()
    run = json.loads((tmp_path / "runs" / "ev.json").read_text())
    assert run["server_metadata"]["config"] == "pi0_tiny_spatial10" and run["server_metadata"]["trained"] is True
    with open(rec["video"] if pathlib.Path(rec["video"]).is_absolute() else tmp_path / rec["video"], "rb") as f:
        assert f.read(12)[4:8] == b"ftyp"  # an MP4 with one frame per query
    assert "libero_spatial" in capsys.readouterr().out


@pytest.mark.libero
def test_embedded_policy_reaches_for_the_named_bowl(env, tmp_path):
    """The committed checkpoint acts: within 40 steps from a held-out initial state its gripper closes most of the
    distance to the bowl the prompt names (a planted target read from the simulator, which the policy never sees).
    Seeded random weights of the same network do not (the control that makes the assertion mean something)."""
    from openpi.envs import libero_env
    from openpi.policies.policy_config import create_policy

    bowl = env.objects_of_interest[0]
    cfg = _cfg(tmp_path, max_steps=40, save_frames=False, save_video=False, render_every_step=False, settle_steps=10,
               replan_steps=5, perturb=pert.PerturbationConfig())
    spec = rollout.EpisodeSpec(SUITE, TASK, 45)
    first = env.settle(env.reset(spec.init_state_index), cfg.settle_steps)  # the state every run starts from
    start = float(np.linalg.norm(libero_env.policy_state(first)[:3] - first[f"{bowl}_pos"]))
    gaps = {}
    for name, policy in (("trained", create_policy()), ("random", create_policy(random_weights=True))):
        result = rollout.run_episode(env, policy, spec, cfg)
        np.testing.assert_allclose(result.record["states"][0], libero_env.policy_state(first))
        last = env.raw.env._get_observations()  # after the 40th step
        gaps[name] = (start, float(np.linalg.norm(libero_env.policy_state(last)[:3] - last[f"{bowl}_pos"])))
    (t_start, t_end), (r_start, r_end) = gaps["trained"], gaps["random"]
    print(f"distance gripper-bowl start -> after 40 steps: {gaps}")
    assert t_end < 0.4 * t_start, gaps  # the trained policy closed >= 60% of the gap ...
    assert r_end > 0.7 * r_start, gaps  # ... the untrained one did not
