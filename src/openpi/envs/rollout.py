"""LIBERO evaluation loop: episodes of a policy in LIBERO, written as records that analyses join by key.

The loop follows openpi's LIBERO client (fixed initial states, settle steps, query the policy when the action
queue is empty and execute the first ``replan_steps`` actions of each chunk, success = the env's ``done``) and
adds what analyses need: per-episode JSON records, unique videos, optional frames + instance masks exactly as
the policy saw them, ``meta/*`` join keys on every request, sharding and resume.

Output layout (``<out>`` = ``RolloutConfig.out_dir``, ``<stem>`` = ``<run_id>__<suite>__task<task_id>__ep<episode>``)::

    <out>/runs/<run_id>.json          settings of the run (checked on resume: changed settings are refused)
    <out>/episodes/<stem>.json        one record per finished episode (its existence = episode done)
    <out>/episodes/_errors/<stem>[__N].json   earlier records of episodes retried after a policy error
    <out>/frames/<stem>.npz           with save_frames
    <out>/results/<run_id>.json       success table over every episode of the run found on disk
    <video_dir>/<stem>__<success|failure>[__N].mp4    never overwritten

Episode record (``<out>/episodes/<stem>.json``), schema ``vla-interp/libero-episode/1``:
    run_id, suite, task_id, episode, init_state_index, seed: identity of the episode (episode i uses initial state i)
    attempt: identity of this attempt at the episode (``<UTC time>-<random hex>``); store rows carry the attempt of
        the request that produced them, so readers drop the rows of earlier attempts (a rerun after a policy error)
    prompt: instruction sent to the policy; original_prompt: the task's instruction
    success (bool): the env reported done; status: "complete" | "policy_error"
    failure_reason: null on success, "max_steps" when the step budget ran out, "policy_error: <text>" when a
        request failed, "bad_policy_reply: <text>" when the reply had no usable (H, 7) ``actions``
    steps: executed policy steps T (settle steps not counted); max_steps, settle_steps, replan_steps, resize_size,
        render_every_step (false: cameras rendered only at query steps; the video holds one frame per query)
    actions: T x 7 executed actions (after any random-action perturbation); states: T x 8 policy state per step
    chunks: list of {env_step, replan_index, actions: H x 7} -- every chunk the policy returned (Pi0-FAST
        replies add ``fast_decode``: {ok, reason, action_tokens, decoding_steps, fitted})
    perturbations: {config, prompt, visual, random_actions, object_shift} (see openpi.envs.perturbations)
    objects_of_interest: BDDL names; object_matches: [{name, instance, instance_id, kind}]
    instance_names: {"<id>": name} of segmentation instances (0 = background); warnings: [str]
    video, frames: paths relative to ``<out>`` (absolute when outside it), or null
    timing: {reset_s, env_s, policy_s, total_s, policy_calls}; finished_at: ISO 8601 UTC time
``env_step`` counts policy steps from 0 (the first step after settling); ``replan_index`` counts policy queries
from 0 within the episode. Every request carries ``meta/run_id, meta/suite, meta/task_id, meta/episode,
meta/attempt, meta/env_step, meta/replan_index``.

The schema itself (key, stem, typed reader and writer, folder layout) lives in ``openpi.shared.records``; this
module only produces records.

Frames (``<out>/frames/<stem>.npz``, with save_frames; one row per rendered step -- every executed step, or only
the query steps without render_every_step -- exactly what the policy was or would have been sent at that step):
``agentview (T,S,S,3) uint8``, ``wrist (T,S,S,3) uint8``,
``agentview_seg (T,S,S) int32``, ``wrist_seg (T,S,S) int32``, ``env_step (T,) int32``, ``replan_index (T,) int32``
(the chunk the executed action came from), ``queried (T,) bool`` (a request was sent at this step),
``instance_names`` (0-d str: JSON {"<id>": name}), ``objects_of_interest`` (0-d str: JSON [names]),
``object_instance_ids`` (0-d str: JSON {name: id}).

Parallel evaluation (``evaluate(..., num_workers=N)``): N spawned worker processes each own their environments
(rendering is ~90% of a CPU step) and run whole episodes, writing their records; the one policy stays in the calling
process and answers each worker's requests over a pipe. Actions depend on a request's ``meta/*`` keys, not on call
order, so the records equal a sequential run's (attempt ids and timings aside).

Summary (``<out>/results/<run_id>.json``): {run_id, suites: {suite: {episodes, successes, errors, success_rate,
tasks: {"<task_id>": {prompt, episodes, successes, errors, success_rate}}}}, total: {episodes, successes, errors,
success_rate}, expected_episodes, missing_episodes}; ``errors`` counts policy_error episodes (also failures).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import logging
import multiprocessing
import os
import pathlib
import pickle
import secrets
import signal
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from typing import Any, Protocol

import numpy as np
import tqdm

from openpi.envs import libero_env
from openpi.envs import perturbations as pert
from openpi.shared.io import jsonable, save_npz_atomic, write_json_atomic
from openpi.shared.rundir import RunDir, run_option
from openpi.shared.records import (ACTION_DIM, EPISODE_SCHEMA, STATE_DIM, SUMMARY_SCHEMA, EpisodeKey,
                                   EpisodeRecord, RecordError, RolloutDir, validate_run_id)

logger = logging.getLogger(__name__)


class PolicyLike(Protocol):
    """Anything with openpi's ``infer``: observation dict in, dict with ``actions`` (H, 7) out."""

    def infer(self, obs: dict) -> dict: ...


class PolicyReplyError(ValueError):
    """The policy answered, but without a usable action chunk."""


# --------------------------------------------------------------------------------------------------
# Planning: which episodes, which shard, where they go
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, order=True)
class EpisodeSpec:
    """One planned episode of a run: an :class:`EpisodeKey` without the run id (plans are shared by runs)."""

    suite: str
    task_id: int
    episode: int

    @property
    def init_state_index(self) -> int:
        return self.episode

    def key(self, run_id: str) -> EpisodeKey:
        return EpisodeKey(run_id, self.suite, self.task_id, self.episode)

    @classmethod
    def of(cls, key: EpisodeKey) -> EpisodeSpec:
        return cls(key.suite, key.task_id, key.episode)


def plan_episodes(suite: str, task_ids: Sequence[int], num_trials: int, first_trial: int = 0) -> list[EpisodeSpec]:
    """Task-major list of episodes ``first_trial .. first_trial + num_trials - 1`` of each task (episode i starts
    from the suite's initial state i; a later ``first_trial`` evaluates on initial states held out of training)."""
    if num_trials < 1:
        raise ValueError(f"num_trials must be >= 1, got {num_trials}")
    if first_trial < 0:
        raise ValueError(f"first_trial must be >= 0, got {first_trial}")
    if len(set(task_ids)) != len(task_ids):
        raise ValueError(f"task ids repeat: {list(task_ids)}")
    return [EpisodeSpec(suite, int(t), e) for t in task_ids for e in range(first_trial, first_trial + num_trials)]


def plan_suite_episodes(suite: str, task_ids: Sequence[int] | None, num_trials: int,
                        first_trial: int = 0) -> list[EpisodeSpec]:
    """``plan_episodes`` for a suite by name: ``task_ids`` None means every task; ids out of range are refused."""
    num_tasks = libero_env.suite_num_tasks(suite)
    ids = list(task_ids) if task_ids is not None else list(range(num_tasks))
    bad = [t for t in ids if not 0 <= t < num_tasks]
    if bad:
        raise ValueError(f"task ids {bad} out of range for {suite} ({num_tasks} tasks)")
    return plan_episodes(suite, ids, num_trials, first_trial)


def shard_episodes(episodes: Sequence[EpisodeSpec], shard_index: int, num_shards: int) -> list[EpisodeSpec]:
    """Round-robin split: shard k gets episodes k, k+n, k+2n, ... (every episode in exactly one shard)."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got shard_index={shard_index}, num_shards={num_shards}")
    return list(episodes[shard_index::num_shards])


def new_attempt() -> str:
    """A fresh attempt identity: UTC time (sortable, readable) plus random hex (unique across shards/hosts)."""
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def unique_path(directory: pathlib.Path, base: str, suffix: str) -> pathlib.Path:
    """``<dir>/<base><suffix>``, or ``<base>__2<suffix>``, ``__3``... -- the first name not taken."""
    path = directory / f"{base}{suffix}"
    k = 2
    while path.exists():
        path = directory / f"{base}__{k}{suffix}"
        k += 1
    return path


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RolloutConfig:
    """Settings of a run id; every field is fingerprinted (``openpi.shared.rundir``) except the run options, which
    say where and how outputs are written, not what the episodes are."""

    run_id: str
    out_dir: pathlib.Path = run_option()
    video_dir: pathlib.Path = run_option()
    seed: int = 7
    resize_size: int = 224
    replan_steps: int = 5
    settle_steps: int = 10
    max_steps: int | None = None  # None: the suite's default
    save_frames: bool = run_option(False)
    save_video: bool = run_option(True)
    video_fps: int = run_option(10)
    # False: render the cameras only on steps that query the policy (~5x faster on CPU); the video and the frames
    # file then hold one row per query (the rows every activation joins to). Images show the end of the step
    # instead of one physics substep before it (LiberoTaskEnv.render_cameras): a mean difference of 0.05-0.3 grey
    # levels per pixel.
    render_every_step: bool = True
    retry_errors: bool = run_option(True)
    max_consecutive_errors: int = run_option(3)
    perturb: pert.PerturbationConfig = dataclasses.field(default_factory=pert.PerturbationConfig)

    def __post_init__(self) -> None:
        validate_run_id(self.run_id)
        self.out_dir = pathlib.Path(self.out_dir)
        self.video_dir = pathlib.Path(self.video_dir)
        for name in ("resize_size", "replan_steps", "video_fps", "max_consecutive_errors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.settle_steps < 0:
            raise ValueError(f"settle_steps must be >= 0, got {self.settle_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        self.perturb.validate()

    def steps_for(self, suite: str) -> int:
        return self.max_steps if self.max_steps is not None else libero_env.max_steps_for_suite(suite)

    @property
    def rollouts(self) -> RolloutDir:
        """The output folder as the schema lays it out (it may not exist yet)."""
        return RolloutDir(self.out_dir, must_exist=False)

    def episode_json(self, spec: EpisodeSpec) -> pathlib.Path:
        return self.rollouts.episode_json(spec.key(self.run_id))

    def frames_npz(self, spec: EpisodeSpec) -> pathlib.Path:
        return self.rollouts.frames_npz(spec.key(self.run_id))


# --------------------------------------------------------------------------------------------------
# File helpers (atomic JSON/npz writes live in openpi.shared.io)
# --------------------------------------------------------------------------------------------------


def _write_video(path: pathlib.Path, frames: Sequence[np.ndarray], fps: int) -> None:
    import imageio.v2 as imageio  # lazy: ffmpeg plugin

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        imageio.mimwrite(tmp, list(frames), fps=fps, macro_block_size=1)
        if path.exists():  # a concurrent writer took the name meanwhile: never overwrite
            raise FileExistsError(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_or_write_run_config(cfg: RolloutConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``<out>/runs/<run_id>.json`` or, when it exists, refuse settings that differ from the stored ones
    (one run directory mechanism: ``openpi.shared.rundir``; ``extra`` such as the server metadata is stored too)."""
    run = RunDir(cfg.out_dir, "libero-eval", cfg, extra={"run_id": cfg.run_id, **(extra or {})},
                 run_json=str(cfg.rollouts.run_json(cfg.run_id).relative_to(cfg.out_dir)),
                 remedy="use another --run-id")
    return run.record


# --------------------------------------------------------------------------------------------------
# One episode
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EpisodeResult:
    record: dict[str, Any]
    video_frames: list[np.ndarray]
    frames: dict[str, np.ndarray] | None


def action_chunk_from_reply(reply: Any, replan_steps: int) -> np.ndarray:
    """Validate a policy reply and return its ``actions`` as a float64 (H, 7) array."""
    if not isinstance(reply, dict) or "actions" not in reply:
        keys = sorted(reply) if isinstance(reply, dict) else type(reply).__name__
        raise PolicyReplyError(f"reply has no 'actions' (got {keys})")
    try:
        chunk = np.asarray(reply["actions"], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PolicyReplyError(f"'actions' is not numeric: {exc}") from exc
    if chunk.ndim != 2 or chunk.shape[1] != 7:
        raise PolicyReplyError(f"'actions' must have shape (H, 7), got {chunk.shape}")
    if chunk.shape[0] < replan_steps:
        raise PolicyReplyError(f"'actions' has {chunk.shape[0]} rows, fewer than replan_steps={replan_steps}")
    if not np.all(np.isfinite(chunk)):
        raise PolicyReplyError("'actions' contains NaN or infinity")
    return chunk


def run_episode(
    env: libero_env.LiberoTaskEnv,
    policy: PolicyLike,
    spec: EpisodeSpec,
    cfg: RolloutConfig,
    *,
    other_prompts: Sequence[str] = (),
) -> EpisodeResult:
    """Run one episode; policy failures end it as failed with the reason recorded (never raised, never silent)."""
    if (spec.suite, spec.task_id) != (env.info.suite, env.info.task_id):
        raise ValueError(f"episode {spec} given an env for {env.info.suite} task {env.info.task_id}")
    if cfg.save_frames and not env.segmentation:
        raise ValueError("save_frames needs an environment created with segmentation=True")
    if cfg.render_every_step:
        return _run_episode(env, policy, spec, cfg, other_prompts)
    env.set_camera_rendering(False)  # rendered on demand at query steps (env.render_cameras)
    try:
        return _run_episode(env, policy, spec, cfg, other_prompts)
    finally:
        env.set_camera_rendering(True)


def _run_episode(env: libero_env.LiberoTaskEnv, policy: PolicyLike, spec: EpisodeSpec, cfg: RolloutConfig,
                 other_prompts: Sequence[str]) -> EpisodeResult:
    t_start = time.perf_counter()
    max_steps = cfg.steps_for(spec.suite)
    plan = pert.plan_episode(
        cfg.perturb,
        seed=cfg.seed,
        suite=spec.suite,
        task_id=spec.task_id,
        episode=spec.episode,
        prompt=env.prompt,
        other_prompts=other_prompts,
    )

    obs = env.reset(spec.init_state_index)
    if plan.object_shift is not None:
        plan.apply_object_shift(env.raw, env.objects_of_interest)
        obs = env.refresh_observation()
    obs = env.settle(obs, cfg.settle_steps)
    reset_s = time.perf_counter() - t_start

    actions: list[np.ndarray] = []
    states: list[np.ndarray] = []
    chunks: list[dict[str, Any]] = []
    video: list[np.ndarray] = []
    frame_rows: dict[str, list] = collections.defaultdict(list)
    queue: collections.deque[np.ndarray] = collections.deque()
    success = False
    failure: str | None = None
    status = "complete"
    env_s = policy_s = 0.0
    replan_index = -1
    attempt = new_attempt()
    key = spec.key(cfg.run_id)

    for env_step in range(max_steps):
        queried = not queue
        frame = None
        if cfg.render_every_step or queried:
            if not cfg.render_every_step:
                obs = env.render_cameras(obs)
            frame = env.policy_frame(obs, cfg.resize_size, with_masks=cfg.save_frames)
            if plan.visual.applies_to("agentview"):
                frame.image, frame.image_seg = plan.visual.apply(frame.image, frame.image_seg)
            if plan.visual.applies_to("wrist"):
                frame.wrist_image, frame.wrist_seg = plan.visual.apply(frame.wrist_image, frame.wrist_seg)
        if queried:
            replan_index += 1
            request = frame.request(
                plan.prompt,
                meta={
                    "run_id": cfg.run_id,
                    "suite": spec.suite,
                    "task_id": spec.task_id,
                    "episode": spec.episode,
                    "attempt": attempt,
                    "env_step": env_step,
                    "replan_index": replan_index,
                },
            )
            t0 = time.perf_counter()
            try:
                reply = policy.infer(request)
                chunk = action_chunk_from_reply(reply, cfg.replan_steps)
            except PolicyReplyError as exc:
                failure, status = f"bad_policy_reply: {exc}", "policy_error"
            except Exception as exc:  # noqa: BLE001 -- any transport/server failure ends the episode, recorded
                failure, status = f"policy_error: {type(exc).__name__}: {exc}", "policy_error"
            policy_s += time.perf_counter() - t0
            if failure is not None:
                logger.warning("%s: %s", key.stem, failure)
                break
            entry = {"env_step": env_step, "replan_index": replan_index, "actions": chunk}
            if isinstance(reply.get("fast_decode"), dict):  # Pi0-FAST: whether the chunk decoded (or was fitted)
                entry["fast_decode"] = reply["fast_decode"]
            chunks.append(entry)
            queue.extend(chunk[: cfg.replan_steps])

        action, _ = plan.random_actions(queue.popleft(), env_step)
        actions.append(action)
        states.append(frame.state if frame is not None else libero_env.policy_state(obs))
        if cfg.save_video and frame is not None:
            video.append(np.concatenate([frame.image, frame.wrist_image], axis=1))
        if cfg.save_frames and frame is not None:
            frame_rows["agentview"].append(frame.image)
            frame_rows["wrist"].append(frame.wrist_image)
            frame_rows["agentview_seg"].append(frame.image_seg)
            frame_rows["wrist_seg"].append(frame.wrist_seg)
            frame_rows["env_step"].append(env_step)
            frame_rows["replan_index"].append(replan_index)
            frame_rows["queried"].append(queried)

        t0 = time.perf_counter()
        obs, _reward, done, _info = env.step(action)
        env_s += time.perf_counter() - t0
        if done:
            success = True
            break
    else:
        failure = "max_steps"

    instance_names = {str(k): v for k, v in env.instance_names.items()}
    record: dict[str, Any] = {
        "schema": EPISODE_SCHEMA,
        "run_id": cfg.run_id,
        "suite": spec.suite,
        "task_id": spec.task_id,
        "episode": spec.episode,
        "attempt": attempt,
        "init_state_index": spec.init_state_index,
        "seed": cfg.seed,
        "prompt": plan.prompt,
        "original_prompt": env.prompt,
        "success": success,
        "status": status,
        "failure_reason": None if success else failure,
        "steps": len(actions),
        "max_steps": max_steps,
        "settle_steps": cfg.settle_steps,
        "replan_steps": cfg.replan_steps,
        "resize_size": cfg.resize_size,
        "render_every_step": cfg.render_every_step,
        "actions": np.asarray(actions, dtype=np.float64).reshape(-1, ACTION_DIM),
        "states": np.asarray(states, dtype=np.float64).reshape(-1, STATE_DIM),
        "chunks": chunks,
        "perturbations": {"config": cfg.perturb.to_json(), **plan.describe()},
        "objects_of_interest": env.objects_of_interest,
        "object_matches": [m.to_json() for m in env.object_matches],
        "instance_names": instance_names,
        "warnings": list(env.warnings) + ([plan.prompt_info["warning"]] if "warning" in plan.prompt_info else []),
        "video": None,
        "frames": None,
        "timing": {
            "reset_s": round(reset_s, 4),
            "env_s": round(env_s, 4),
            "policy_s": round(policy_s, 4),
            "total_s": round(time.perf_counter() - t_start, 4),
            "policy_calls": replan_index + 1,
        },
        "finished_at": _now(),
    }
    frames = None
    if cfg.save_frames:
        size = cfg.resize_size
        frames = {
            "agentview": np.asarray(frame_rows["agentview"], dtype=np.uint8).reshape(-1, size, size, 3),
            "wrist": np.asarray(frame_rows["wrist"], dtype=np.uint8).reshape(-1, size, size, 3),
            "agentview_seg": np.asarray(frame_rows["agentview_seg"], dtype=np.int32).reshape(-1, size, size),
            "wrist_seg": np.asarray(frame_rows["wrist_seg"], dtype=np.int32).reshape(-1, size, size),
            "env_step": np.asarray(frame_rows["env_step"], dtype=np.int32),
            "replan_index": np.asarray(frame_rows["replan_index"], dtype=np.int32),
            "queried": np.asarray(frame_rows["queried"], dtype=bool),
            "instance_names": np.asarray(json.dumps(instance_names)),
            "objects_of_interest": np.asarray(json.dumps(env.objects_of_interest)),
            "object_instance_ids": np.asarray(json.dumps(env.object_instance_ids)),
        }
    return EpisodeResult(record, video, frames)


def write_episode(result: EpisodeResult, cfg: RolloutConfig) -> dict[str, Any]:
    """Write video (unique name), frames, then the JSON record (last: its existence marks the episode done).

    The record goes through the schema's typed writer (``EpisodeRecord``), so a field the readers cannot parse
    fails here, before anything is written, not in an analysis weeks later.
    """
    rec = result.record
    record = EpisodeRecord.from_json(dict(rec, schema=EPISODE_SCHEMA), f"episode record of run {cfg.run_id}")
    if record.key.run_id != cfg.run_id:
        raise RecordError(f"episode record of run {record.key.run_id!r} written by run {cfg.run_id!r}")
    spec = EpisodeSpec.of(record.key)
    if cfg.save_video and result.video_frames:
        tag = "success" if rec["success"] else "failure"
        video_path = unique_path(cfg.video_dir, f"{record.key.stem}__{tag}", ".mp4")
        _write_video(video_path, result.video_frames, cfg.video_fps)
        rec["video"] = _relative_or_absolute(video_path, cfg.out_dir)
    if result.frames is not None:
        frames_path = cfg.frames_npz(spec)
        save_npz_atomic(frames_path, result.frames, compress=True)
        rec["frames"] = _relative_or_absolute(frames_path, cfg.out_dir)
    record.raw = jsonable(rec, default=repr)
    record.write(cfg.episode_json(spec))
    return rec


def _relative_or_absolute(path: pathlib.Path, root: pathlib.Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def episode_status(path: pathlib.Path) -> str:
    """'missing', 'complete' or 'policy_error' for an episode record path (unreadable records raise)."""
    if not path.exists():
        return "missing"
    return EpisodeRecord.read(path).status


def _archive_error_record(cfg: RolloutConfig, spec: EpisodeSpec) -> None:
    """Keep the record (and frames) of an episode that failed on a policy error before it is rerun."""
    rollouts = cfg.rollouts
    rollouts.errors_dir.mkdir(parents=True, exist_ok=True)
    target = unique_path(rollouts.errors_dir, spec.key(cfg.run_id).stem, ".json")
    os.replace(cfg.episode_json(spec), target)
    frames = cfg.frames_npz(spec)
    if frames.exists():
        os.replace(frames, target.with_suffix(".npz"))


# --------------------------------------------------------------------------------------------------
# Many episodes
# --------------------------------------------------------------------------------------------------

EnvFactory = Callable[[str, int, bool, int], libero_env.LiberoTaskEnv]


def default_env_factory(suite: str, task_id: int, segmentation: bool, seed: int) -> libero_env.LiberoTaskEnv:
    return libero_env.LiberoTaskEnv(suite, task_id, segmentation=segmentation, seed=seed)


class _TaskEnvs:
    """Runs episodes in the environment of their task: one env at a time, reused by the task's following episodes
    (plans are task-major and creating an env costs 8-13 s). Shared by the in-process loop and the workers."""

    def __init__(self, factory: EnvFactory, cfg: RolloutConfig, close_envs: bool) -> None:
        self.factory, self.cfg, self.close_envs = factory, cfg, close_envs
        self.env: libero_env.LiberoTaskEnv | None = None
        self.prompts: dict[str, list[str]] = {}

    def run(self, policy: PolicyLike, spec: EpisodeSpec) -> dict[str, Any]:
        """Run ``spec`` and write its record (archiving an earlier policy-error record first); return the record."""
        cfg = self.cfg
        if self.env is None or (self.env.info.suite, self.env.info.task_id) != (spec.suite, spec.task_id):
            self.close()
            self.env = self.factory(spec.suite, spec.task_id, cfg.save_frames, cfg.seed)
        if cfg.perturb.prompt_mode == "other_task" and spec.suite not in self.prompts:
            self.prompts[spec.suite] = libero_env.suite_task_prompts(spec.suite)
        if cfg.episode_json(spec).exists():
            _archive_error_record(cfg, spec)
        result = run_episode(self.env, policy, spec, cfg, other_prompts=self.prompts.get(spec.suite, ()))
        return write_episode(result, cfg)

    def close(self) -> None:
        if self.env is not None and self.close_envs:
            self.env.close()
        self.env = None


class _Tally:
    """Progress bar and consecutive policy errors over episodes in the order they finish."""

    def __init__(self, cfg: RolloutConfig, total: int, skipped: int, progress: bool) -> None:
        self.max_errors = cfg.max_consecutive_errors
        self.bar = tqdm.tqdm(total=total, initial=skipped, desc=cfg.run_id, disable=not progress, unit="ep")
        self.done = self.successes = self.consecutive_errors = 0

    def add(self, spec: EpisodeSpec, rec: dict[str, Any]) -> str | None:
        """Count a finished episode; returns why the run must stop when too many policy errors came in a row."""
        self.done += 1
        self.successes += int(rec["success"])
        self.bar.set_postfix_str(f"task {spec.task_id} ep {spec.episode} success {self.successes}/{self.done}")
        self.bar.update(1)
        if rec["status"] != "policy_error":
            self.consecutive_errors = 0
            return None
        self.consecutive_errors += 1
        if self.consecutive_errors >= self.max_errors:
            return f"aborting after {self.consecutive_errors} consecutive policy errors; last: {rec['failure_reason']}"
        return None


def evaluate(
    cfg: RolloutConfig,
    policy: PolicyLike,
    episodes: Sequence[EpisodeSpec],
    *,
    expected: Sequence[EpisodeSpec] | None = None,
    env_factory: EnvFactory | None = None,
    close_envs: bool = True,
    run_extra: dict[str, Any] | None = None,
    progress: bool = True,
    num_workers: int = 1,
) -> dict[str, Any]:
    """Run (this shard's) episodes, skipping finished ones; write records and the run's summary; return it.

    ``expected`` is the whole plan over all shards (for the summary's missing count); default ``episodes``.
    One environment per task is created (with segmentation when frames are saved) and reused across episodes.
    ``num_workers`` > 1 steps the environments in that many worker processes while ``policy`` stays here and
    answers their requests (:func:`_evaluate_in_workers`): the same records, faster when rendering dominates.
    Workers build their own environments, so ``env_factory`` must then pickle (a module-level function).
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    factory = env_factory or default_env_factory
    if num_workers > 1:
        try:
            pickle.dumps(factory)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise TypeError(
                f"env_factory {factory!r} cannot be sent to worker processes (num_workers={num_workers}): {exc}. "
                "Pass a module-level function (lambdas, closures and local functions do not pickle), or num_workers=1"
            ) from exc
    check_or_write_run_config(cfg, run_extra)
    pending: list[EpisodeSpec] = []
    for spec in episodes:
        status = episode_status(cfg.episode_json(spec))
        if status == "missing" or (status == "policy_error" and cfg.retry_errors):
            pending.append(spec)
    skipped = len(episodes) - len(pending)
    if skipped:
        logger.info("resume: %d of %d episodes already have a record", skipped, len(episodes))

    tally = _Tally(cfg, len(episodes), skipped, progress)
    try:
        if num_workers == 1:
            envs = _TaskEnvs(factory, cfg, close_envs)
            try:
                for spec in pending:
                    abort = tally.add(spec, envs.run(policy, spec))
                    if abort is not None:
                        raise RuntimeError(abort)
            finally:
                envs.close()
        elif pending:
            _evaluate_in_workers(cfg, policy, pending, factory, close_envs, min(num_workers, len(pending)), tally)
    finally:
        tally.bar.close()
        summary = summarize(cfg.out_dir, cfg.run_id, expected if expected is not None else episodes)
        write_json_atomic(cfg.rollouts.results_json(cfg.run_id), summary, indent=1)
    return summary


# --------------------------------------------------------------------------------------------------
# Worker processes: environments (and their rendering, ~90% of a CPU step) there, the one policy here
# --------------------------------------------------------------------------------------------------
# Parent -> worker: an EpisodeSpec to run, None to stop, or the answer to a request: ("reply", dict) | ("error",
# exception). Worker -> parent: ("infer", observation), ("done", {success, status, failure_reason}) after the record
# is written, or ("failed", traceback) when the episode raised (the worker then exits).

_START_METHOD = "spawn"  # JAX, imported in the parent, does not survive fork
_STOP_TIMEOUT_S = 30.0


class _ParentPolicy:
    """A worker's policy: each request is answered by the parent's policy over the worker's pipe."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def infer(self, obs: dict) -> dict:
        try:
            self.conn.send(("infer", obs))
            kind, payload = self.conn.recv()
        except (EOFError, OSError):
            # The parent is gone: exit (SystemExit passes run_episode's handler) instead of recording policy errors.
            raise SystemExit("evaluation worker: the parent process closed the connection") from None
        if kind == "error":
            raise payload
        return payload


def _worker_main(conn: Connection, cfg: RolloutConfig, factory: EnvFactory, close_envs: bool) -> None:
    """Entry point of a worker process: run the episodes the parent sends, write their records, report each."""
    libero_env.configure_headless_gl()  # before robosuite is imported, as in the parent
    envs = _TaskEnvs(factory, cfg, close_envs)
    policy = _ParentPolicy(conn)
    try:
        while (spec := conn.recv()) is not None:
            try:
                rec = envs.run(policy, spec)
            except Exception:  # noqa: BLE001 -- the parent names the episode and stops the run
                conn.send(("failed", traceback.format_exc()))
                return
            conn.send(("done", {k: rec[k] for k in ("success", "status", "failure_reason")}))
    except EOFError:  # the parent is gone
        return
    finally:
        envs.close()


def _answer(policy: PolicyLike, obs: dict) -> tuple[str, Any]:
    """The policy's reply to a worker's request, or the exception it raised (the worker records it as a policy
    error, with the same text as a sequential run unless the exception does not survive pickling)."""
    try:
        return "reply", policy.infer(obs)
    except Exception as exc:  # noqa: BLE001 -- belongs to the episode, recorded there
        try:
            return "error", pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001 -- an exception that does not pickle travels as its text
            return "error", RuntimeError(f"{type(exc).__name__}: {exc}")


@dataclasses.dataclass
class _Worker:
    """The parent's handle on one worker process and the episode it was given (to name it in errors)."""

    index: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    spec: EpisodeSpec | None = None  # the episode it is running; None when idle

    def assign(self, spec: EpisodeSpec) -> None:
        self.spec = spec
        self.send(spec)

    def send(self, message: Any) -> None:
        try:
            self.conn.send(message)
        except OSError:  # it died: the wait loop reports that, naming its episode
            pass

    def receive(self, run_id: str) -> tuple[str, Any]:
        """Its next message, or a clear error naming its episode when the process is gone."""
        if self.conn.poll():
            try:
                return self.conn.recv()
            except EOFError:
                pass
        self.process.join(timeout=5)
        code = self.process.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited (code {code})"
        raise RuntimeError(f"evaluation worker {self.index} (pid {self.process.pid}) {how} while running episode "
                           f"{self.spec.key(run_id).stem}; its own error, if any, is on stderr")


def _evaluate_in_workers(cfg: RolloutConfig, policy: PolicyLike, pending: Sequence[EpisodeSpec], factory: EnvFactory,
                         close_envs: bool, num_workers: int, tally: _Tally) -> None:
    """Run ``pending`` in ``num_workers`` processes, each owning its environments, handing out episodes in plan
    order to whichever worker is free and answering each request with ``policy`` as it arrives.

    Records equal the sequential run's: a request's noise is keyed by its ``meta/*``, not by call order, and each
    is answered alone -- ``infer_batch`` would differ from single calls by float rounding. A worker that raises or
    dies stops the run with an error naming its episode; after too many consecutive policy errors no episode is
    handed out, the running ones finish, then the run stops as the sequential one does.
    """
    ctx = multiprocessing.get_context(_START_METHOD)
    queue = collections.deque(pending)
    workers: list[_Worker] = []
    abort: str | None = None
    try:
        for index in range(num_workers):
            conn, child_conn = ctx.Pipe()
            process = ctx.Process(target=_worker_main, args=(child_conn, cfg, factory, close_envs),
                                  name=f"libero-eval-{index}", daemon=True)
            process.start()
            child_conn.close()
            workers.append(_Worker(index, process, conn))
            workers[-1].assign(queue.popleft())
        while busy := [w for w in workers if w.spec is not None]:
            ready = set(mp_wait([h for w in busy for h in (w.conn, w.process.sentinel)]))
            for w in busy:
                if ready.isdisjoint((w.conn, w.process.sentinel)):
                    continue
                kind, payload = w.receive(cfg.run_id)
                if kind == "infer":
                    w.send(_answer(policy, payload))
                elif kind == "done":
                    reason = tally.add(w.spec, payload)
                    abort = abort or reason
                    w.spec = None
                    if abort is None and queue:
                        w.assign(queue.popleft())
                else:
                    raise RuntimeError(f"evaluation worker {w.index} failed on episode "
                                       f"{w.spec.key(cfg.run_id).stem}:\n{payload}")
        if abort is not None:
            raise RuntimeError(abort)
    finally:
        _stop_workers(workers)


def _stop_workers(workers: Sequence[_Worker]) -> None:
    """Idle workers are told to stop (they close their environments); busy ones (the run failed) are terminated."""
    for w in workers:
        if w.spec is None:
            try:
                w.conn.send(None)
            except OSError:  # already gone
                pass
        else:
            w.process.terminate()
    for w in workers:
        w.process.join(timeout=_STOP_TIMEOUT_S)
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        w.conn.close()


def _rate(successes: int, episodes: int) -> float | None:
    return round(successes / episodes, 6) if episodes else None


def summarize(out_dir: pathlib.Path, run_id: str, expected: Iterable[EpisodeSpec] | None = None) -> dict[str, Any]:
    """Success table over every episode record of ``run_id`` under ``out_dir`` (suite -> task)."""
    validate_run_id(run_id)
    rollouts = RolloutDir(out_dir, must_exist=False)
    suites: dict[str, dict[str, Any]] = {}
    seen: set[EpisodeSpec] = set()
    for rec in (rollouts.records(run_id) if rollouts.episodes_dir.is_dir() else ()):
        seen.add(EpisodeSpec.of(rec.key))
        s = suites.setdefault(rec.key.suite, {"episodes": 0, "successes": 0, "errors": 0, "tasks": {}})
        t = s["tasks"].setdefault(str(rec.key.task_id), {"prompt": rec.raw.get("original_prompt"), "episodes": 0,
                                                         "successes": 0, "errors": 0})
        for bucket in (s, t):
            bucket["episodes"] += 1
            bucket["successes"] += int(rec.success)
            bucket["errors"] += int(rec.status == "policy_error")
    total = {"episodes": 0, "successes": 0, "errors": 0}
    for s in suites.values():
        s["tasks"] = dict(sorted(s["tasks"].items(), key=lambda kv: int(kv[0])))
        for t in s["tasks"].values():
            t["success_rate"] = _rate(t["successes"], t["episodes"])
        s["success_rate"] = _rate(s["successes"], s["episodes"])
        for k in total:
            total[k] += s[k]
    total["success_rate"] = _rate(total["successes"], total["episodes"])
    expected_set = set(expected) if expected is not None else None
    return {
        "schema": SUMMARY_SCHEMA,
        "run_id": run_id,
        "suites": dict(sorted(suites.items())),
        "total": total,
        "expected_episodes": None if expected_set is None else len(expected_set),
        "missing_episodes": None if expected_set is None else len(expected_set - seen),
        "written_at": _now(),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Plain-text success table (suite / task / successes / episodes / rate)."""
    lines = [f"run {summary['run_id']}", f"{'suite':<16} {'task':>4} {'succ':>5} {'eps':>5} {'err':>4} {'rate':>7}  prompt"]

    def pct(rate: float | None) -> str:
        return "   n/a" if rate is None else f"{100 * rate:6.1f}%"

    for suite, s in summary["suites"].items():
        for task_id, t in s["tasks"].items():
            lines.append(
                f"{suite:<16} {task_id:>4} {t['successes']:>5} {t['episodes']:>5} {t['errors']:>4} {pct(t['success_rate'])}  "
                f"{(t['prompt'] or '')[:60]}"
            )
        lines.append(f"{suite:<16} {'all':>4} {s['successes']:>5} {s['episodes']:>5} {s['errors']:>4} {pct(s['success_rate'])}")
    tot = summary["total"]
    lines.append(f"{'total':<16} {'':>4} {tot['successes']:>5} {tot['episodes']:>5} {tot['errors']:>4} {pct(tot['success_rate'])}")
    if summary.get("missing_episodes"):
        lines.append(f"missing: {summary['missing_episodes']} of {summary['expected_episodes']} planned episodes have no record")
    return "\n".join(lines)
