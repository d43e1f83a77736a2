"""Parallel LIBERO evaluation (``rollout.evaluate(num_workers=N)``): worker processes own the environments, the one
policy stays in the test process; the records equal the sequential run's, and a broken worker names its episode."""

import json
import os
import time

import numpy as np
import pytest

from openpi.envs import libero_env
from openpi.envs import rollout

SUITE = "libero_spatial"
VOLATILE = ("attempt", "finished_at", "timing")  # differ between any two runs of an episode


class ObservedPolicy:
    """Test double whose actions are computed from what it was sent (state and image brightness), so equal
    records mean the workers' environments produced the same observations; fails at one request if asked."""

    def __init__(self, fail_at: tuple[int, int] | None = None) -> None:
        self.fail_at = fail_at
        self.requests: list[tuple[int, int, int]] = []

    def infer(self, obs: dict) -> dict:
        key = (obs["meta/episode"], obs["meta/env_step"], obs["meta/replan_index"])
        self.requests.append(key)
        if (key[0], key[2]) == self.fail_at:
            raise RuntimeError("server exploded")
        state = np.asarray(obs["observation/state"], dtype=np.float64)
        chunk = np.zeros((6, 7))
        chunk[:, 0] = 0.3 * np.tanh(state[1])
        chunk[:, 2] = 0.1 + obs["observation/image"].mean() / 1000 + 0.01 * np.arange(6)
        chunk[:, 6] = -1.0
        return {"actions": chunk}


def segmented_env(suite: str, task_id: int, segmentation: bool, seed: int) -> libero_env.LiberoTaskEnv:
    """Module-level (so it pickles into the workers): the same kind of env as the shared ``env`` fixture."""
    return libero_env.LiberoTaskEnv(suite, task_id, segmentation=True, seed=seed)


def broken_env(suite: str, task_id: int, segmentation: bool, seed: int) -> libero_env.LiberoTaskEnv:
    """Task 0 builds slowly (the other worker's failure must not wait for it), task 1 raises, task 2 crashes."""
    if task_id == 1:
        raise ValueError("scene of task 1 cannot be built")
    if task_id == 2:
        os._exit(3)
    time.sleep(120)
    raise AssertionError("the worker building task 0 should have been stopped")


def _cfg(out, **kw) -> rollout.RolloutConfig:
    base = dict(run_id="par", out_dir=out, video_dir=out / "videos", max_steps=10, settle_steps=1, replan_steps=5,
                save_video=False, render_every_step=False, max_consecutive_errors=1)
    return rollout.RolloutConfig(**{**base, **kw})


def _records(cfg: rollout.RolloutConfig, plan) -> list[dict]:
    recs = [json.loads(cfg.episode_json(spec).read_text()) for spec in plan]
    return [{k: v for k, v in rec.items() if k not in VOLATILE} for rec in recs]


@pytest.mark.libero
def test_two_workers_write_the_records_of_one(env, tmp_path):
    """Same plan, 1 vs 2 workers: identical records (actions, states, chunks, success, steps, failure reasons).
    Episode 1 fails on the policy at its 2nd request; with max_consecutive_errors=1 both runs stop, the parallel one
    after letting the running episode 0 finish."""
    plan = rollout.plan_episodes(SUITE, [0], 2)
    runs = {}
    for workers in (1, 2):
        cfg = _cfg(tmp_path / f"w{workers}")
        policy = ObservedPolicy(fail_at=(1, 1))
        factory = (lambda *a: env) if workers == 1 else segmented_env
        with pytest.raises(RuntimeError, match="1 consecutive policy errors; last: policy_error: RuntimeError: server"):
            rollout.evaluate(cfg, policy, plan, env_factory=factory, close_envs=workers > 1, progress=False,
                             num_workers=workers)
        summary = json.loads(cfg.rollouts.results_json(cfg.run_id).read_text())
        runs[workers] = (cfg, policy, _records(cfg, plan), summary)
    (_, seq_policy, seq, seq_summary), (par_cfg, par_policy, par, par_summary) = runs[1], runs[2]
    assert [r["status"] for r in seq] == ["complete", "policy_error"] and seq[0]["steps"] == 10
    assert seq[1]["steps"] == 5 and len(seq[0]["chunks"]) == 2 and np.ptp(np.array(seq[0]["actions"])[:, 0]) > 0
    assert par == seq
    assert sorted(par_policy.requests) == sorted(seq_policy.requests)
    assert {k: v for k, v in par_summary.items() if k != "written_at"} == {
        k: v for k, v in seq_summary.items() if k != "written_at"}
    # Resume with workers: nothing left to run, so no worker starts and the policy is not asked.
    idle = ObservedPolicy()
    summary = rollout.evaluate(_cfg(par_cfg.out_dir, retry_errors=False), idle, plan, env_factory=segmented_env,
                               progress=False, num_workers=2)
    assert idle.requests == [] and summary["total"]["episodes"] == 2


@pytest.mark.parametrize("task_id, message", [
    (1, r"(?s)evaluation worker \d failed on episode par__libero_spatial__task1__ep0:\n.*ValueError: scene of task 1"),
    (2, r"evaluation worker \d \(pid \d+\) exited \(code 3\) while running episode par__libero_spatial__task2__ep0"),
])
def test_a_broken_worker_stops_the_run_naming_its_episode(tmp_path, task_id, message):
    """An env that raises, or a worker process that dies, ends the run at once (the other worker, still building
    its env, is stopped) with an error naming the episode; the summary is still written."""
    cfg = _cfg(tmp_path)
    plan = [rollout.EpisodeSpec(SUITE, 0, 0), rollout.EpisodeSpec(SUITE, task_id, 0)]
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=message):
        rollout.evaluate(cfg, ObservedPolicy(), plan, env_factory=broken_env, progress=False, num_workers=2)
    assert time.monotonic() - start < 60
    assert json.loads(cfg.rollouts.results_json("par").read_text())["missing_episodes"] == 2


def test_workers_need_a_picklable_env_factory(tmp_path):
    plan = [rollout.EpisodeSpec(SUITE, 0, 0)]
    with pytest.raises(TypeError, match="cannot be sent to worker processes.*module-level function"):
        rollout.evaluate(_cfg(tmp_path), ObservedPolicy(), plan, env_factory=lambda *a: None, num_workers=2)
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        rollout.evaluate(_cfg(tmp_path), ObservedPolicy(), plan, num_workers=0)
    assert not (tmp_path / "runs").exists()  # refused before anything was written
