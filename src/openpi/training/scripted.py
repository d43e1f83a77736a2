"""A privileged-state pick-and-place controller for LIBERO, used to generate demonstrations.

Why privileged: we need demonstrations without human teleoperation. The controller reads what a policy never sees
(object poses ``<name>_pos`` / ``<name>_quat`` from the simulator, the BDDL goal, the scene's collision boxes) and
emits ordinary 7-D LIBERO actions (OSC delta position / axis-angle rotation scaled by the controller's 0.05 m and
0.5 rad limits, gripper -1 open / +1 close), so the recorded (frame, state, action) triples are what a learned
policy must imitate.

It solves goals of the form ``(On <object> <target>)`` / ``(In <object> <target>_..._region)`` with a fixed phase
sequence: rise to a travel height, move above the grasp point, descend (slowly near the object), close, lift,
carry above the target, lower, open, retreat. Bowls are grasped at the rim (fingers straddle the wall); other
objects at their centre. The grasp (which rim point, hence which wrist yaw) is the one whose vertical descent
keeps the gripper clear of every collision box of the scene (``scene_geometry``); travel heights clear the boxes
along the way. Pure numpy: the simulator is read once per episode (``scene_geometry.scene_from_sim``), then only
through the observation dict.
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
from openpi.training import scene_geometry as sg

logger = logging.getLogger(__name__)

POS_LIMIT_M = 0.05  # OSC output_max for position: action 1.0 = 5 cm
ROT_LIMIT_RAD = 0.5
OPEN, CLOSE = -1.0, 1.0
# Gripper pointing straight down (x, y, z, w): 180 degrees about the world x axis; fingers along world y.
DOWN_QUAT = np.array([1.0, 0.0, 0.0, 0.0])


@dataclasses.dataclass(frozen=True)
class GraspGeometry:
    """Where to hold an object, in its own frame (origin ``<name>_pos``, axes from ``<name>_quat``)."""

    radius: float  # grasp points lie on this circle about the object's z axis (0: at the centre)
    grasp_dz: float  # grip-site height above the object's origin when closing


# Bowls in LIBERO: rim wall 4.7 cm from the centre, from 1.5 to 5.3 cm above the body origin (the bowl's bottom).
# The Panda's fingers close along their axis: with the axis radial, the fingers straddle the wall.
BOWL = GraspGeometry(radius=0.047, grasp_dz=0.035)
DEFAULT = GraspGeometry(radius=0.0, grasp_dz=0.02)


def grasp_geometry(name: str) -> GraspGeometry:
    return BOWL if "bowl" in name else DEFAULT


@dataclasses.dataclass(frozen=True)
class PickPlaceGoal:
    obj: str  # object to move (an observation has <obj>_pos)
    target: str  # object it goes on/in


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


def quat_about_z(angle: float) -> np.ndarray:
    """(x, y, z, w) rotation by ``angle`` radians about the world z axis."""
    return np.array([0.0, 0.0, math.sin(angle / 2), math.cos(angle / 2)])


@dataclasses.dataclass
class ControllerParams:
    gain: float = 12.0  # action = gain * position error (m), clipped to [-1, 1]
    rot_gain: float = 1.0
    tolerance_m: float = 0.01  # a waypoint counts as reached within this distance (above_* phases: horizontally)
    rot_tolerance_rad: float = 0.1  # ... and, before descending, the wrist yaw within this angle
    clearance_m: float = 0.03  # travel heights clear the boxes along the way by this much
    min_lift_m: float = 0.08  # lift at least this far above the grasp height (out of a drawer, off a support)
    max_travel_z: float = 1.2  # travel no higher (the arm cannot reach far out up there)
    place_dz: float = 0.04  # release height of the carried object's origin above the target's origin
    slow_dz: float = 0.05  # within this height above the grasp point, descend slowly ...
    slow_action: float = 0.35  # ... with actions clipped to this (about 1 cm per step)
    min_action: float = 0.1  # floor on the position action's size short of a waypoint (no slow exponential tail)
    grasp_tol_m: float = 0.004  # the grasp point must be met this closely, along and across (pads on the wall)
    stall_steps: int = 8  # a phase whose eef moved < stall_m over this many steps is stuck; it counts as arrived
    stall_m: float = 0.004  # ... when within touch_tol_m of the grasp point (touching the object or its support)
    touch_tol_m: float = 0.008
    reach_slack_m: float = 0.025  # ... or, over the object / target and lowering, within this horizontally (the arm
    reach_slack_dz_m: float = 0.04  # stretched out cannot quite reach; lowering then drops the object from higher)
    close_steps: int = 12
    open_steps: int = 8
    lost_m: float = 0.04  # the held object has slipped when its offset from the grip changed by more than this
    max_regrasps: int = 1  # after a slip, go back and grasp again this many times
    phase_timeout: int = 80  # give up on a waypoint after this many steps (the episode then fails)


class PickPlaceController:
    """Stateful phase machine: ``act(obs)`` once per env step; ``phase`` names where it is.

    ``scene`` (from ``scene_geometry.scene_from_sim``) supplies the collision boxes; without it the controller
    assumes free space (unit tests on toy worlds).
    """

    PHASES = ("rise", "above_object", "descend", "close", "lift", "above_target", "lower", "open", "retreat", "done")

    def __init__(self, goal: PickPlaceGoal, params: ControllerParams | None = None,
                 scene: sg.Scene | None = None) -> None:
        self.goal = goal
        self.params = params or ControllerParams()
        self.geometry = grasp_geometry(goal.obj)
        self.scene = scene
        self.phase = "rise"
        self.failure: str | None = None  # why the controller gave up (the episode then fails)
        self.regrasps = 0
        self._grip_offset: np.ndarray | None = None  # eef minus object position once lifting starts
        self.grasp: sg.GraspCandidate | None = None  # chosen grasp (re-chosen while the object moves)
        self._phase_steps = 0
        self._history: list[np.ndarray] = []  # eef positions in the current phase (stall detection)
        self._hold_at: np.ndarray | None = None  # where the eef waits while the fingers close or open
        self._approach_z: float | None = None
        self._carry_z: float | None = None
        self._yaw_quat = DOWN_QUAT
        self._grasp_pose: tuple[np.ndarray, np.ndarray] | None = None  # object pose the grasp was chosen at

    # -- geometry --------------------------------------------------------------------------------------
    def _obstacles(self, obs: dict[str, Any], exclude: tuple[str, ...]) -> sg.Boxes:
        return self.scene.obstacles(obs, exclude) if self.scene is not None else sg.Boxes.empty()

    def _object_pose(self, obs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray(obs[f"{self.goal.obj}_pos"], np.float64),
                sg.quat_xyzw_to_matrix(obs[f"{self.goal.obj}_quat"]))

    def _plan_heights(self, obs: dict[str, Any]) -> None:
        """Approach height: above every box near the path from the eef to the object (the hand is 21 cm wide)."""
        p, g = self.params, self.geometry
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        obj, _ = self._object_pose(obs)
        top = sg.corridor_top(self._obstacles(obs, (self.goal.obj,)), eef[:2], obj[:2], sg.HAND_HALF_X)
        grasp_z = obj[2] + g.grasp_dz
        want = max(top - sg.FINGER_Z[0] + p.clearance_m, grasp_z + p.min_lift_m)
        self._approach_z = min(want, p.max_travel_z)

    def _select_grasp(self, obs: dict[str, Any]) -> None:
        """(Re-)choose the grasp when the object has moved since the last choice (it may still be settling);
        keep the current one unless another is clearly better (no dithering between equals)."""
        pos, rot = self._object_pose(obs)
        if self._grasp_pose is not None:
            moved = np.linalg.norm(pos - self._grasp_pose[0])
            turned = np.linalg.norm(rot - self._grasp_pose[1])
            if moved < 0.003 and turned < 0.03:
                return
        g = self.geometry
        ranked = sg.choose_grasp(obs, self.goal.obj, self._obstacles(obs, (self.goal.obj,)), radius=g.radius,
                                 height=g.grasp_dz, top_z=self._approach_z,
                                 place_xy=np.asarray(obs[f"{self.goal.target}_pos"])[:2])
        best = ranked[0]
        if self.grasp is not None:
            same = [c for c in ranked if c.local_angle == self.grasp.local_angle]
            if same and same[0].margin >= best.margin and same[0].cost <= best.cost + 0.1:
                best = same[0]
        self.grasp = best
        self._grasp_pose = (pos, rot)
        self._yaw_quat = _quat_mul(quat_about_z(sg.yaw_for_finger_axis(best.finger_axis)), DOWN_QUAT)

    def _grip_point(self, obs: dict[str, Any]) -> np.ndarray:
        """The chosen rim point where the object is now (it is tracked, not remembered)."""
        pos, rot = self._object_pose(obs)
        points, _, _ = sg.grasp_points(pos, rot, self.geometry.radius, self.geometry.grasp_dz,
                                       np.array([self.grasp.local_angle]))
        return points[0]

    def _plan_carry(self, obs: dict[str, Any]) -> None:
        """Carry height: the held object's underside clears every box near the path to the target."""
        p = self.params
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        obj, _ = self._object_pose(obs)
        tgt = np.asarray(obs[f"{self.goal.target}_pos"], np.float64)
        hang = eef[2] - obj[2]  # the object's origin (its bottom, for LIBERO objects) below the grip
        top = sg.corridor_top(self._obstacles(obs, (self.goal.obj, self.goal.target)), obj[:2], tgt[:2],
                              sg.HAND_HALF_X)
        want = max(top + hang + p.clearance_m, eef[2] + p.min_lift_m, tgt[2] + p.place_dz + hang + p.min_lift_m)
        self._carry_z = min(want, p.max_travel_z)

    def _place_point(self, obs: dict[str, Any]) -> np.ndarray:
        """Where the eef must be for the held object's origin to sit ``place_dz`` above the target's (closed loop:
        the object's offset from the grip is measured every step)."""
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        obj, _ = self._object_pose(obs)
        tgt = np.asarray(obs[f"{self.goal.target}_pos"], np.float64)
        return tgt + (eef - obj) + np.array([0.0, 0.0, self.params.place_dz])

    # -- phases ----------------------------------------------------------------------------------------
    def _next(self, phase: str) -> None:
        self.phase = phase
        self._phase_steps = 0
        self._history = []
        self._hold_at = None

    def _waypoint(self, obs: dict[str, Any]) -> tuple[np.ndarray, float]:
        """(eef target position, gripper command) of the current phase."""
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        if self._approach_z is None:
            self._plan_heights(obs)
        if self.phase in ("rise", "above_object"):
            self._select_grasp(obs)
        z = self._approach_z
        if self.phase == "rise":
            return np.array([eef[0], eef[1], z]), OPEN
        if self.phase == "above_object":
            grip = self._grip_point(obs)
            return np.array([grip[0], grip[1], z]), OPEN
        if self.phase == "descend":
            return self._grip_point(obs), OPEN
        if self.phase in ("close", "open"):  # hold still where the fingers started to move
            if self._hold_at is None:
                self._hold_at = eef.copy()
            return self._hold_at, (CLOSE if self.phase == "close" else OPEN)
        if self._carry_z is None:
            self._plan_carry(obs)
        z = self._carry_z
        if self.phase == "lift":
            return np.array([eef[0], eef[1], z]), CLOSE
        place = self._place_point(obs)
        if self.phase == "above_target":
            return np.array([place[0], place[1], z]), CLOSE
        if self.phase == "lower":
            return place, CLOSE
        return np.array([eef[0], eef[1], z]), OPEN  # retreat, done

    def _advance(self, err: np.ndarray, rot_err: float) -> bool:
        """Move to the next phase if the current one is finished; True when it moved."""
        p = self.params
        if self.phase == "done":
            return False
        hold = {"close": p.close_steps, "open": p.open_steps}
        if self.phase in hold:
            finished = self._phase_steps >= hold[self.phase]
        elif self.phase in ("rise", "lift", "retreat"):
            finished = abs(err[2]) < 0.02  # in the air only the height matters
        else:
            xy, dz = float(np.linalg.norm(err[:2])), abs(float(err[2]))
            turned = True
            if self.phase in ("above_object", "above_target"):
                # Over the spot near travel height, wrist turned: the next phase goes straight down.
                reached = xy < p.tolerance_m and dz < 0.03
                stuck_ok = xy < p.reach_slack_m and dz < p.reach_slack_dz_m
                turned = rot_err < p.rot_tolerance_rad
            elif self.phase == "descend":
                reached = xy < p.grasp_tol_m and dz < p.grasp_tol_m
                stuck_ok = xy < p.touch_tol_m and dz < p.touch_tol_m
            else:  # lower
                reached = float(np.linalg.norm(err)) < p.tolerance_m
                stuck_ok = xy < p.reach_slack_m and dz < p.reach_slack_dz_m
            finished = turned and (reached or (self._stalled() and stuck_ok))
        if finished:
            self._next(self.PHASES[self.PHASES.index(self.phase) + 1])
        elif self._phase_steps > p.phase_timeout:
            self.failure = f"controller_timeout: stuck in phase {self.phase}"
        return finished

    @property
    def timed_out(self) -> bool:
        """The controller gave up (a waypoint not reached in time, or the object lost again after a regrasp)."""
        return self.failure is not None

    def _check_hold(self, obs: dict[str, Any]) -> None:
        """While carrying: if the object no longer moves with the grip (a missed or slipped grasp), start over from
        the approach with a fresh grasp choice, up to ``max_regrasps`` times."""
        if self.phase not in ("lift", "above_target", "lower"):
            return
        offset = np.asarray(obs["robot0_eef_pos"], np.float64) - self._object_pose(obs)[0]
        if self._grip_offset is None:
            self._grip_offset = offset
            return
        if np.linalg.norm(offset - self._grip_offset) <= self.params.lost_m:
            return
        if self.regrasps >= self.params.max_regrasps:
            self.failure = f"controller_lost_object: in phase {self.phase} after {self.regrasps} regrasp(s)"
            return
        self.regrasps += 1
        self._next("rise")
        self.grasp, self._grasp_pose, self._grip_offset = None, None, None
        self._approach_z, self._carry_z = None, None

    def _stalled(self) -> bool:
        n = self.params.stall_steps
        return len(self._history) > n and np.linalg.norm(self._history[-1] - self._history[-1 - n]) < self.params.stall_m

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """One 7-D action towards the current waypoint, after advancing past a finished phase."""
        p = self.params
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        self._check_hold(obs)
        self._history.append(eef)
        target, grip = self._waypoint(obs)
        rot = rotation_error(obs["robot0_eef_quat"], self._yaw_quat)
        if self._advance(target - eef, float(np.linalg.norm(rot))):
            target, grip = self._waypoint(obs)
        self._phase_steps += 1
        action = np.zeros(7)
        limit = 1.0
        if self.phase == "descend" and eef[2] - target[2] < p.slow_dz:
            limit = p.slow_action  # near the object and its neighbours: creep
        move = p.gain * (target - eef)
        size = float(np.linalg.norm(move))
        if 0.0 < size < p.min_action and np.linalg.norm(target - eef) > p.grasp_tol_m / 2:
            move *= p.min_action / size
        action[:3] = np.clip(move, -limit, limit)
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
    ctl = PickPlaceController(goal, params, sg.scene_from_sim(inner.sim, list(inner.objects_dict)))
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
        if ctl.failure is not None:
            reason = ctl.failure
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

