"""A privileged-state pick-and-place controller for LIBERO, used to generate demonstrations.

Why privileged: we need demonstrations without human teleoperation. The controller reads what a policy never sees
(object poses ``<name>_pos`` from the simulator, the BDDL goal) and emits ordinary 7-D LIBERO actions (OSC delta
position / axis-angle rotation scaled by the controller's 0.05 m and 0.5 rad limits, gripper -1 open / +1 close),
so the recorded (frame, state, action) triples are what a learned policy must imitate.

It solves goals of the form ``(On <object> <target>)`` / ``(In <object> <target>_..._region)`` with a fixed phase
sequence: rise to a safe height, move above the grasp point, descend, close, lift, carry above the target, lower,
open, retreat. Bowls are grasped at the rim (fingers straddle the wall); other objects at their centre.
Pure numpy: the only simulator access is through the observation dict and the parsed goal.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from openpi.envs import libero_env, rollout
from openpi.shared.io import read_json
from openpi.shared.rundir import RunDir, RunSettingsError, differences, run_option, settings_of
from openpi.training import demos

logger = logging.getLogger(__name__)

POS_LIMIT_M = 0.05  # OSC output_max for position: action 1.0 = 5 cm
ROT_LIMIT_RAD = 0.5
OPEN, CLOSE = -1.0, 1.0
# Gripper pointing straight down (x, y, z, w): 180 degrees about the world x axis.
DOWN_QUAT = np.array([1.0, 0.0, 0.0, 0.0])


@dataclasses.dataclass(frozen=True)
class GraspGeometry:
    """Where to hold an object, relative to its body position ``<name>_pos``."""

    offset_xy: tuple[float, float]  # grasp point minus body position (world x, y)
    grasp_dz: float  # eef height above the body position when closing
    carry_dz: float  # height of the body position below the eef while carried (for placing)


# Bowls in LIBERO: rim wall at ~4.7 cm from the centre, rim top ~5 cm above the body origin. The Panda's fingers
# close along world y when pointing down, so the grasp point sits on the rim along +-y and the fingers straddle the
# wall; the controller takes the side farther from other objects (``choose_grasp_side``).
BOWL = GraspGeometry(offset_xy=(0.0, -0.047), grasp_dz=0.035, carry_dz=0.035)
DEFAULT = GraspGeometry(offset_xy=(0.0, 0.0), grasp_dz=0.02, carry_dz=0.02)


def grasp_geometry(name: str) -> GraspGeometry:
    return BOWL if "bowl" in name else DEFAULT


@dataclasses.dataclass(frozen=True)
class PickPlaceGoal:
    obj: str  # object to move (an observation has <obj>_pos)
    target: str  # object it goes on/in


def other_object_positions(obs: dict[str, Any], exclude: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``<name>_pos`` of every object in the observation except the robot and ``exclude``."""
    out = {}
    for key, value in obs.items():
        if key.endswith("_pos") and "_to_" not in key and not key.startswith("robot"):
            name = key[: -len("_pos")]
            if name not in exclude:
                out[name] = np.asarray(value, np.float64)
    return out


def choose_grasp_side(obs: dict[str, Any], goal: PickPlaceGoal, geometry: GraspGeometry) -> float:
    """+1 or -1: which mirror image of the grasp offset (in y) lies farther from every other object."""
    if geometry.offset_xy == (0.0, 0.0):
        return 1.0
    obj = np.asarray(obs[f"{goal.obj}_pos"], np.float64)
    others = list(other_object_positions(obs, (goal.obj, goal.target)).values())
    if not others:
        return 1.0

    def clearance(side: float) -> float:
        point = obj[:2] + np.array([geometry.offset_xy[0], geometry.offset_xy[1] * side])
        return min(float(np.linalg.norm(point - o[:2])) for o in others)

    return 1.0 if clearance(1.0) > clearance(-1.0) else -1.0


def parse_goal(goal_state: list, object_names: list[str]) -> PickPlaceGoal:
    """BDDL goal (``env.parsed_problem['goal_state']``) -> the single pick-and-place it asks for.

    ``In`` goals name a region (``basket_1_contain_region``): it resolves to the longest object name it starts with.
    """
    if len(goal_state) != 1 or len(goal_state[0]) != 3 or str(goal_state[0][0]).lower() not in ("on", "in"):
        raise ValueError(f"scripted controller handles exactly one (On|In obj target) goal, got {goal_state}")
    _, obj, target = (str(x) for x in goal_state[0])
    if target not in object_names:
        parents = [n for n in object_names if target.startswith(n + "_")]
        if not parents:
            raise ValueError(f"goal target {target!r} matches no object among {sorted(object_names)}")
        target = max(parents, key=len)
    if obj not in object_names:
        raise ValueError(f"goal object {obj!r} is not among the movable objects {sorted(object_names)}")
    return PickPlaceGoal(obj, target)


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array([aw * bx + ax * bw + ay * bz - az * by, aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw, aw * bw - ax * bx - ay * by - az * bz])


def rotation_error(current_xyzw: np.ndarray, target_xyzw: np.ndarray) -> np.ndarray:
    """World-frame axis-angle taking ``current`` to ``target`` (shortest way)."""
    cur = np.asarray(current_xyzw, np.float64)
    inv = np.array([-cur[0], -cur[1], -cur[2], cur[3]]) / np.dot(cur, cur)
    q = _quat_mul(np.asarray(target_xyzw, np.float64), inv)
    if q[3] < 0:
        q = -q
    s = math.sqrt(max(0.0, 1.0 - min(1.0, q[3]) ** 2))
    if s < 1e-9:
        return np.zeros(3)
    return q[:3] / s * 2.0 * math.acos(min(1.0, q[3]))


@dataclasses.dataclass
class ControllerParams:
    gain: float = 12.0  # action = gain * position error (m), clipped to [-1, 1]
    rot_gain: float = 1.0
    tolerance_m: float = 0.01  # a waypoint counts as reached within this distance
    safe_dz: float = 0.12  # travel height above the higher of object and target
    max_travel_z: float = 1.2  # ... but no higher (the arm cannot reach far out up there)
    place_dz: float = 0.04  # release height of the carried object's body above the target's position
    close_steps: int = 12
    open_steps: int = 8
    phase_timeout: int = 80  # give up on a waypoint after this many steps (the episode then fails)


class PickPlaceController:
    """Stateful phase machine: ``act(obs)`` once per env step; ``phase`` names where it is."""

    PHASES = ("rise", "above_object", "descend", "close", "lift", "above_target", "lower", "open", "retreat", "done")

    def __init__(self, goal: PickPlaceGoal, params: ControllerParams | None = None) -> None:
        self.goal = goal
        self.params = params or ControllerParams()
        self.geometry = grasp_geometry(goal.obj)
        self.phase = "rise"
        self._phase_steps = 0
        self._travel_z: float | None = None
        self._side = 1.0
        self.timed_out = False

    def _next(self, phase: str) -> None:
        self.phase = phase
        self._phase_steps = 0

    def _waypoint(self, obs: dict[str, Any]) -> tuple[np.ndarray, float]:
        """(eef target position, gripper command) of the current phase."""
        g, p = self.geometry, self.params
        obj = np.asarray(obs[f"{self.goal.obj}_pos"], np.float64)
        tgt = np.asarray(obs[f"{self.goal.target}_pos"], np.float64)
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        if self._travel_z is None:
            high = max(obj[2] + g.grasp_dz, tgt[2] + p.place_dz + g.carry_dz)
            self._travel_z = max(min(high + p.safe_dz, p.max_travel_z), high + 0.05)
            self._side = choose_grasp_side(obs, self.goal, g)
        offset = np.array([g.offset_xy[0], g.offset_xy[1] * self._side])
        grasp = obj + np.array([*offset, g.grasp_dz])
        # Where the eef must be for the carried object's body to sit over the target.
        place = tgt + np.array([*offset, p.place_dz + g.carry_dz])
        z = self._travel_z
        return {
            "rise": (np.array([eef[0], eef[1], z]), OPEN),
            "above_object": (np.array([grasp[0], grasp[1], z]), OPEN),
            "descend": (grasp, OPEN),
            "close": (grasp, CLOSE),
            "lift": (np.array([grasp[0], grasp[1], z]), CLOSE),
            "above_target": (np.array([place[0], place[1], z]), CLOSE),
            "lower": (place, CLOSE),
            "open": (place, OPEN),
            "retreat": (np.array([place[0], place[1], z]), OPEN),
            "done": (np.array([place[0], place[1], z]), OPEN),
        }[self.phase]

    def _advance(self, err: np.ndarray) -> bool:
        """Move to the next phase if the current one is finished; True when it moved."""
        p = self.params
        hold = {"close": p.close_steps, "open": p.open_steps}
        if self.phase == "done":
            return False
        if self.phase in hold:
            finished = self._phase_steps >= hold[self.phase]
        elif self.phase in ("rise", "lift", "retreat"):
            finished = abs(err[2]) < 0.02  # in the air only the height matters
        else:
            finished = float(np.linalg.norm(err)) < p.tolerance_m
        if finished:
            self._next(self.PHASES[self.PHASES.index(self.phase) + 1])
        elif self._phase_steps > p.phase_timeout:
            self.timed_out = True
        return finished

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """One 7-D action towards the current waypoint, after advancing past a finished phase."""
        p = self.params
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        target, grip = self._waypoint(obs)
        if self._advance(target - eef):
            target, grip = self._waypoint(obs)
        self._phase_steps += 1
        action = np.zeros(7)
        action[:3] = np.clip(p.gain * (target - eef), -1.0, 1.0)
        rot = rotation_error(obs["robot0_eef_quat"], DOWN_QUAT)
        action[3:6] = np.clip(p.rot_gain * rot / ROT_LIMIT_RAD, -1.0, 1.0)
        action[6] = grip
        return action


# ------------------------------------------------------------------------------------------------ episodes


@dataclasses.dataclass
class EpisodeOutcome:
    success: bool
    steps: int
    failure_reason: str | None
    goal: PickPlaceGoal
    frames: dict[str, np.ndarray] | None  # agentview, wrist, states, actions (None when not recorded)
    timing: dict[str, float]


def collect_episode(env, init_state_index: int, *, max_steps: int, settle_steps: int = 10, resize: int = 224,
                    record: bool = True, params: ControllerParams | None = None,
                    idle_steps_after_done: int = 10, frame_stride: int = 1) -> EpisodeOutcome:
    """Run the controller on one initial state of a ``LiberoTaskEnv``; with ``record`` keep the state and action of
    every step and what the policy would see (``env.policy_frame``) every ``frame_stride`` steps (with a stride > 1
    cameras are rendered only on those steps, by ``env.render_cameras``). Success = the env's ``done``."""
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
    env.set_camera_rendering(record and frame_stride == 1)
    try:
        return _collect(env, init_state_index, max_steps, settle_steps, resize, record, params,
                        idle_steps_after_done, frame_stride)
    finally:
        env.set_camera_rendering(True)  # leave the env as created: cameras rendered on every step


def _collect(env, init_state_index: int, max_steps: int, settle_steps: int, resize: int, record: bool,
             params: ControllerParams | None, idle_steps_after_done: int, frame_stride: int) -> EpisodeOutcome:
    t0 = time.monotonic()
    obs = env.reset(init_state_index)
    obs = env.settle(obs, settle_steps)
    t1 = time.monotonic()
    inner = env.raw.env
    goal = parse_goal(inner.parsed_problem["goal_state"], list(inner.objects_dict))
    ctl = PickPlaceController(goal, params)
    rows: dict[str, list] = {"agentview": [], "wrist": [], "states": [], "actions": []}
    done, reason, idle = False, "max_steps", 0
    steps = 0
    for step in range(max_steps):
        action = ctl.act(obs)
        if record and step % frame_stride == 0:
            frame = env.policy_frame(obs if frame_stride == 1 else env.render_cameras(obs), resize, with_masks=False)
            rows["agentview"].append(frame.image)
            rows["wrist"].append(frame.wrist_image)
        rows["states"].append(libero_env.policy_state(obs).astype(np.float32))
        rows["actions"].append(action.astype(np.float32))
        obs, _, done, _ = env.step(action)
        steps += 1
        if done:
            reason = None
            break
        if ctl.timed_out:
            reason = f"controller_timeout: stuck in phase {ctl.phase}"
            break
        if ctl.phase == "done":
            idle += 1
            if idle > idle_steps_after_done:
                reason = "controller_finished_without_success"
                break
    frames = None
    if record:
        frames = {k: np.stack(v) for k, v in rows.items()}
    timing = {"reset_s": t1 - t0, "steps_s": time.monotonic() - t1, "total_s": time.monotonic() - t0}
    return EpisodeOutcome(bool(done), steps, reason, goal, frames, timing)


# ------------------------------------------------------------------------------------------------ generation


@dataclasses.dataclass
class GenerateConfig:
    """Demo generation settings. ``run_option`` fields choose which episodes this call attempts (like a shard) or
    where they go, not how an episode is generated, so one out_dir can grow by more tasks or episodes."""

    out_dir: str = run_option()
    suite: str = "libero_spatial"
    task_ids: tuple[int, ...] | None = run_option(None)  # None: every task of the suite
    episodes_per_task: int = run_option(10)  # episode i starts from the suite's initial state i
    first_episode: int = run_option(0)  # episodes first_episode .. first_episode + episodes_per_task - 1
    max_steps: int | None = None  # None: the suite's evaluation budget
    settle_steps: int = 10
    resize_size: int = 224
    frame_stride: int = 1  # render and keep frames every k-th step (states and actions: every step)
    seed: int = 7
    measure_only: bool = False  # no rendering, no demos: only attempt records and success rates
    shard_index: int = run_option(0)
    num_shards: int = run_option(1)


DEMO_JOB = "demo-generation"


def check_or_write_settings(cfg: GenerateConfig) -> RunDir:
    """The out_dir's run directory (``run.json``): resume with the same settings and controller parameters,
    refuse others naming each. A folder of the older layout (``generate_config.json``) is adopted when its
    settings agree."""
    root = pathlib.Path(cfg.out_dir)
    settings = {**settings_of(cfg), "controller": settings_of(ControllerParams())}
    legacy = root / "generate_config.json"
    if legacy.is_file() and not (root / "run.json").is_file():
        old = read_json(legacy, "demo generation settings", error=demos.DemoFormatError)
        diffs = differences(old, {k: settings.get(k) for k in old})
        if diffs:
            raise RunSettingsError(f"{cfg.out_dir} was generated with other settings ({'; '.join(diffs)}); "
                                   "use another --out-dir")
    return RunDir(root, DEMO_JOB, settings)


def generate(cfg: GenerateConfig, env_factory=None, progress: bool = True) -> dict[str, Any]:
    """Attempt every (task, episode) of this shard that has no attempt record yet; keep successful demos.

    Returns the summary over all attempt records on disk (also written to ``<out>/summary.json``).
    """
    if env_factory is None:
        def env_factory(suite: str, task_id: int):
            return libero_env.LiberoTaskEnv(suite, task_id, segmentation=False, seed=cfg.seed)
    task_ids = cfg.task_ids if cfg.task_ids is not None else tuple(range(libero_env.suite_num_tasks(cfg.suite)))
    plan = rollout.shard_episodes(rollout.plan_episodes(cfg.suite, list(task_ids), cfg.episodes_per_task,
                                                          cfg.first_episode),
                                  cfg.shard_index, cfg.num_shards)
    check_or_write_settings(cfg)
    root = cfg.out_dir
    todo = []
    for spec in plan:
        if demos.attempt_path(root, spec.suite, spec.task_id, spec.episode).exists():
            continue
        demo_dir = pathlib.Path(root) / "demos" / demos.demo_stem(spec.suite, spec.task_id, spec.episode)
        if (demo_dir / "meta.json").is_file():  # killed between writing the demo and its attempt record
            meta = demos.read_meta(demo_dir)
            demos.write_attempt(root, {k: meta[k] for k in ("suite", "task_id", "episode", "prompt", "steps")}
                                | {"success": True, "failure_reason": None, "kept": True, "timing": None,
                                   "finished_at": demos.now_iso()})
            continue
        todo.append(spec)
    max_steps = cfg.max_steps or libero_env.max_steps_for_suite(cfg.suite)
    env, env_task = None, None
    bar = tqdm(todo, desc="demos", disable=not progress)
    try:
        for spec in bar:
            if env_task != spec.task_id:
                if env is not None:
                    env.close()
                env, env_task = env_factory(spec.suite, spec.task_id), spec.task_id
            try:
                out = collect_episode(env, spec.init_state_index, max_steps=max_steps, settle_steps=cfg.settle_steps,
                                      resize=cfg.resize_size, record=not cfg.measure_only,
                                      frame_stride=cfg.frame_stride)
                success, steps, reason, timing = out.success, out.steps, out.failure_reason, out.timing
            except Exception as exc:  # one broken episode must not end a long run; it is recorded as a failure
                logger.exception("task %d episode %d failed", spec.task_id, spec.episode)
                out, success, steps, reason, timing = None, False, 0, f"error: {exc!r}", None
            kept = False
            if success and out is not None and out.frames is not None:
                meta = {"suite": spec.suite, "task_id": spec.task_id, "episode": spec.episode,
                        "init_state_index": spec.init_state_index, "prompt": env.prompt, "steps": steps,
                        "success": True, "seed": cfg.seed, "settle_steps": cfg.settle_steps,
                        "resize_size": cfg.resize_size, "frame_stride": cfg.frame_stride, "goal": dataclasses.asdict(out.goal),
                        "controller": {"name": "PickPlaceController", **dataclasses.asdict(ControllerParams())},
                        "created_at": demos.now_iso()}
                demos.write_demo(root, demos.DemoEpisode(meta=meta, **out.frames))
                kept = True
            demos.write_attempt(root, {"suite": spec.suite, "task_id": spec.task_id, "episode": spec.episode,
                                       "prompt": env.prompt, "success": success, "steps": steps,
                                       "failure_reason": reason, "kept": kept, "timing": timing,
                                       "finished_at": demos.now_iso()})
            bar.set_postfix(task=spec.task_id, ep=spec.episode, ok=success, steps=steps)
    finally:
        if env is not None:
            env.close()
    summary = demos.summarize_attempts(demos.read_attempts(root))
    demos.write_json_atomic(pathlib.Path(root) / "summary.json", summary)
    return summary

