"""A LIBERO task environment for evaluation and analysis: observations in the form openpi policies expect.

Why this module exists: openpi's LIBERO client does its preprocessing inline (rotate the 256x256 cameras by
180 degrees, resize with padding to 224, 8-float state). Our analyses also need the *instance segmentation*
of exactly those pixels, and the ids of the task's objects of interest. Everything that turns a raw LIBERO
observation into what the policy sees lives here, so images and masks can never be transformed differently.

Conventions
- Cameras: ``agentview`` (-> ``observation/image``) and ``robot0_eye_in_hand`` (-> ``observation/wrist_image``).
- Instance ids: ``v > 0`` is instance ``instance_names[v]`` (robosuite's order of ``model.instances_to_ids``,
  same numbering as robosuite's ``*_segmentation_instance`` observation), ``0`` is table/walls/background.
- Masks are computed from robosuite's *element* (geom) segmentation through a lookup table built from
  ``model.geom_ids_to_instances`` (rebuilt after every reset: a hard reset rebuilds the MuJoCo model). This equals
  robosuite's per-pixel Python mapping and costs well under a millisecond.
- The LIBERO import is lazy: pure helpers (state, preprocessing, object matching) work without LIBERO installed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from openpi.shared import image_tools

logger = logging.getLogger(__name__)

# Max policy steps per suite (openpi's evaluation loop; settle steps come on top).
SUITE_MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
# Action executed while objects settle after reset: no motion, gripper open.
SETTLE_ACTION = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
AGENT_CAMERA = "agentview"
WRIST_CAMERA = "robot0_eye_in_hand"
CAMERAS = (AGENT_CAMERA, WRIST_CAMERA)
DEFAULT_RESOLUTION = 256


def configure_headless_gl() -> None:
    """Default to EGL offscreen rendering (Mesa llvmpipe on CPU machines); must run before robosuite is imported."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


def max_steps_for_suite(suite: str) -> int:
    if suite not in SUITE_MAX_STEPS:
        raise ValueError(f"no default max steps for suite {suite!r}; known: {sorted(SUITE_MAX_STEPS)} (pass max_steps)")
    return SUITE_MAX_STEPS[suite]


# --------------------------------------------------------------------------------------------------
# Observation -> policy request
# --------------------------------------------------------------------------------------------------


def quat_xyzw_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w) -> axis * angle (3,). Identity (or w = +-1) gives zeros."""
    q = np.asarray(quat, dtype=np.float64)
    if q.shape != (4,):
        raise ValueError(f"expected a quaternion of shape (4,), got {q.shape}")
    w = min(1.0, max(-1.0, float(q[3])))
    sin_half = math.sqrt(1.0 - w * w)
    if math.isclose(sin_half, 0.0):
        return np.zeros(3)
    return q[:3] * (2.0 * math.acos(w) / sin_half)


def policy_state(raw_obs: dict[str, Any]) -> np.ndarray:
    """8 floats: end-effector position (3), end-effector axis-angle (3), gripper joint positions (2)."""
    for key in ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"):
        if key not in raw_obs:
            raise KeyError(f"LIBERO observation lacks {key!r} (has {sorted(raw_obs)[:12]}...)")
    return np.concatenate(
        [
            np.asarray(raw_obs["robot0_eef_pos"], dtype=np.float64),
            quat_xyzw_to_axis_angle(raw_obs["robot0_eef_quat"]),
            np.asarray(raw_obs["robot0_gripper_qpos"], dtype=np.float64),
        ]
    )


def preprocess_image(image: np.ndarray, size: int) -> np.ndarray:
    """Raw LIBERO camera (upside down) -> what the policy sees: rotate 180 degrees, bilinear resize with pad."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 camera image, got {image.dtype} {image.shape}")
    return image_tools.resize_with_pad(np.ascontiguousarray(image[::-1, ::-1]), size, size)


def preprocess_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Instance mask (H, W) or (H, W, 1) -> the same rotation and resize geometry as the image, nearest sampling."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"expected an integer HxW instance mask, got {mask.dtype} {mask.shape}")
    out = image_tools.resize_with_pad_nearest(np.ascontiguousarray(mask[::-1, ::-1]), size, size)
    return out.astype(np.int32, copy=False)


@dataclasses.dataclass
class PolicyFrame:
    """One observation as the policy sees it (plus masks under the identical transform, when available)."""

    image: np.ndarray  # (size, size, 3) uint8, agent view
    wrist_image: np.ndarray  # (size, size, 3) uint8
    state: np.ndarray  # (8,) float64
    image_seg: np.ndarray | None = None  # (size, size) int32 instance ids
    wrist_seg: np.ndarray | None = None

    def request(self, prompt: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """The dict sent to the policy server (openpi's LIBERO keys, plus ``meta/*`` join keys)."""
        req: dict[str, Any] = {
            "observation/image": self.image,
            "observation/wrist_image": self.wrist_image,
            "observation/state": self.state,
            "prompt": str(prompt),
        }
        for key, value in (meta or {}).items():
            req[f"meta/{key}"] = value
        return req


# --------------------------------------------------------------------------------------------------
# Segmentation lookup table and objects of interest
# --------------------------------------------------------------------------------------------------


def build_instance_lut(
    geom_ids_to_instances: dict[int, str], instance_order: Sequence[str], size: int
) -> np.ndarray:
    """Table ``lut[element_id + 1] -> instance id`` (0 for geoms of no instance and for background, element -1)."""
    index = {name: i + 1 for i, name in enumerate(instance_order)}
    needed = max([size, *[g + 1 for g in geom_ids_to_instances]])
    lut = np.zeros(needed + 1, dtype=np.int32)
    for geom_id, inst in geom_ids_to_instances.items():
        if inst not in index:
            raise KeyError(f"geom {geom_id} belongs to instance {inst!r}, which is not in the instance list")
        lut[geom_id + 1] = index[inst]
    return lut


def apply_instance_lut(lut: np.ndarray, element_seg: np.ndarray) -> np.ndarray:
    """Element (geom id, -1 = nothing) segmentation -> instance ids; ids outside the table map to 0."""
    seg = np.asarray(element_seg)
    if seg.ndim == 3 and seg.shape[-1] == 1:
        seg = seg[..., 0]
    idx = seg.astype(np.int64) + 1
    inside = (idx >= 0) & (idx < len(lut))
    return np.where(inside, lut[np.clip(idx, 0, len(lut) - 1)], 0).astype(np.int32)


@dataclasses.dataclass
class ObjectMatch:
    """How one BDDL object of interest maps onto segmentation instances."""

    name: str
    instance: str | None  # matched instance name
    instance_id: int | None
    kind: str  # "exact" | "parent" (a region/site of that object) | "unmatched"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def match_objects_of_interest(
    objects: Sequence[str], instance_names: dict[int, str]
) -> tuple[list[ObjectMatch], list[str]]:
    """Map BDDL names to instance ids: exact name, else the longest instance ``X`` with name ``X_<part>``.

    BDDL objects of interest may be regions or sites of a fixture (``wooden_cabinet_1_top_region``), which are
    drawn as part of that fixture (``wooden_cabinet_1``). Returns the matches and warnings (never silent).
    """
    by_name = {name: idx for idx, name in instance_names.items()}
    matches: list[ObjectMatch] = []
    warnings: list[str] = []
    for obj in objects:
        if obj in by_name:
            matches.append(ObjectMatch(obj, obj, by_name[obj], "exact"))
            continue
        parents = [name for name in by_name if obj.startswith(name + "_")]
        if parents:
            parent = max(parents, key=len)
            matches.append(ObjectMatch(obj, parent, by_name[parent], "parent"))
            continue
        matches.append(ObjectMatch(obj, None, None, "unmatched"))
        warnings.append(f"object of interest {obj!r} matches no segmentation instance")
    if objects and all(m.kind == "unmatched" for m in matches):
        warnings.append(
            f"none of the objects of interest {list(objects)} match a segmentation instance "
            f"(instances: {sorted(by_name)})"
        )
    if not objects:
        warnings.append("the task declares no objects of interest")
    return matches, warnings


# --------------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    suite: str
    task_id: int
    name: str
    prompt: str  # the benchmark's language instruction (what openpi sends)
    bddl_file: str
    num_init_states: int


def suite_task_prompts(suite: str) -> list[str]:
    """Language instructions of every task in a suite, in task-id order (for 'another task's instruction')."""
    bench = _load_suite(suite)
    return [bench.get_task(i).language for i in range(bench.n_tasks)]


def suite_num_tasks(suite: str) -> int:
    return _load_suite(suite).n_tasks


def _load_suite(suite: str):
    configure_headless_gl()
    from libero.libero import benchmark  # lazy: heavy import, optional dependency

    suites = benchmark.get_benchmark_dict()
    if suite not in suites:
        raise ValueError(f"unknown LIBERO suite {suite!r}; known suites include {sorted(SUITE_MAX_STEPS)}")
    return suites[suite]()


class LiberoTaskEnv:
    """One LIBERO task with 256x256 cameras, optional instance segmentation, and openpi-style observations."""

    def __init__(
        self,
        suite: str,
        task_id: int,
        *,
        resolution: int = DEFAULT_RESOLUTION,
        segmentation: bool = True,
        seed: int = 7,
    ) -> None:
        self._bench = _load_suite(suite)
        if not 0 <= task_id < self._bench.n_tasks:
            raise ValueError(f"task_id {task_id} out of range for {suite} ({self._bench.n_tasks} tasks)")
        from libero.libero import get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        task = self._bench.get_task(task_id)
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        if not os.path.exists(bddl):
            raise FileNotFoundError(f"BDDL file for {suite} task {task_id} not found: {bddl}")
        self.init_states = np.asarray(self._bench.get_task_init_states(task_id))
        self.info = TaskInfo(suite, task_id, task.name, task.language, bddl, len(self.init_states))
        self.resolution = resolution
        self.segmentation = segmentation
        self.seed = seed
        self._env = OffScreenRenderEnv(
            bddl_file_name=bddl,
            camera_heights=resolution,
            camera_widths=resolution,
            camera_segmentations="element" if segmentation else None,
        )
        self._env.seed(seed)
        self._lut: np.ndarray | None = None
        self.instance_names: dict[int, str] = {}
        self.object_matches: list[ObjectMatch] = []
        self.warnings: list[str] = []
        self._refresh_instance_tables()

    # -- raw access -------------------------------------------------------------------------------
    @property
    def raw(self):
        """The wrapped LIBERO ``OffScreenRenderEnv`` (for perturbations and tests)."""
        return self._env

    @property
    def prompt(self) -> str:
        return self.info.prompt

    @property
    def objects_of_interest(self) -> list[str]:
        return list(self._env.obj_of_interest)

    # -- episode control ----------------------------------------------------------------------------
    def reset(self, init_state_index: int) -> dict[str, Any]:
        """Seed, (hard) reset, load the suite's fixed initial state; rebuild the segmentation tables."""
        if not 0 <= init_state_index < len(self.init_states):
            raise ValueError(
                f"init_state_index {init_state_index} out of range: {self.info.suite} task {self.info.task_id} "
                f"has {len(self.init_states)} initial states"
            )
        self._env.seed(self.seed)
        self._env.reset()
        obs = self._env.set_init_state(self.init_states[init_state_index])
        self._refresh_instance_tables()
        return obs

    def _camera_observables(self) -> list[str]:
        """The observables that render: both cameras' images, plus their segmentation when it is on."""
        names = [f"{cam}_image" for cam in CAMERAS]
        if self.segmentation:
            names += [f"{cam}_segmentation_element" for cam in CAMERAS]
        return names

    def set_camera_rendering(self, enabled: bool) -> None:
        """Switch the cameras' rendering (images and segmentation) in ``step``/``reset`` on or off (off: ~35 ms
        per step instead of ~380 ms on these CPUs). Observations taken while off lack those keys: add them with
        ``render_cameras``."""
        inner = self._env.env
        for name in self._camera_observables():
            inner.modify_observable(name, "enabled", enabled)
            if enabled:
                # robosuite 1.4 resets an enabled observable's timer but not its "sampled this period" flag, so
                # without this the first observation after re-enabling would be a blank float image.
                inner._observables[name]._sampled = False

    def render_cameras(self, raw_obs: dict[str, Any]) -> dict[str, Any]:
        """``raw_obs`` plus the camera images (and segmentation, when on) rendered now, through the cameras' own
        observables (same orientation and dtype as always-on rendering). Always-on rendering samples one physics
        substep before the end of a step, this renders its end: measured mean |difference| 0.05-0.3 of 255 grey
        levels per pixel while the arm moves."""
        inner = self._env.env
        out = dict(raw_obs)
        for name in self._camera_observables():
            observable = inner._observables[name]
            was_enabled = observable.is_enabled()
            if not was_enabled:
                observable.set_enabled(True)
            observable.update(0.0, {}, force=True)
            out[name] = np.array(observable.obs)
            if not was_enabled:
                observable.set_enabled(False)
        return out

    def refresh_observation(self) -> dict[str, Any]:
        """Re-render after the simulator state was edited directly (e.g. an object was moved)."""
        return self._env.regenerate_obs_from_state(self._env.get_sim_state())

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, dict]:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (7,) or not np.all(np.isfinite(action)):
            raise ValueError(f"LIBERO actions are 7 finite floats, got shape {action.shape}: {action}")
        return self._env.step(action.tolist())

    def settle(self, raw_obs: dict[str, Any], num_steps: int) -> dict[str, Any]:
        """Let objects fall into place with a no-op action (the env's ``done`` is ignored meanwhile)."""
        for _ in range(num_steps):
            raw_obs, _, _, _ = self._env.step(SETTLE_ACTION.tolist())
        return raw_obs

    def close(self) -> None:
        if getattr(self, "_env", None) is not None:
            try:
                self._env.close()
            finally:
                self._env = None

    # -- segmentation -------------------------------------------------------------------------------
    def _refresh_instance_tables(self) -> None:
        model = self._env.env.model
        order = list(model.instances_to_ids.keys())
        self.instance_names = {i + 1: name for i, name in enumerate(order)}
        self._lut = build_instance_lut(model.geom_ids_to_instances, order, int(self._env.env.sim.model.ngeom))
        self.object_matches, warnings = match_objects_of_interest(self.objects_of_interest, self.instance_names)
        for w in warnings:
            if w not in self.warnings:
                logger.warning("%s task %d: %s", self.info.suite, self.info.task_id, w)
        self.warnings = warnings

    @property
    def object_instance_ids(self) -> dict[str, int]:
        """BDDL object of interest -> instance id (matched ones only)."""
        return {m.name: m.instance_id for m in self.object_matches if m.instance_id is not None}

    def instance_mask(self, raw_obs: dict[str, Any], camera: str) -> np.ndarray:
        """(H, W) int32 instance ids of a raw camera image (same orientation as the raw image)."""
        if not self.segmentation:
            raise RuntimeError("this environment was created with segmentation=False")
        key = f"{camera}_segmentation_element"
        if key not in raw_obs:
            raise KeyError(f"observation lacks {key!r}; cameras with segmentation: {CAMERAS}")
        assert self._lut is not None
        return apply_instance_lut(self._lut, raw_obs[key])

    # -- policy view --------------------------------------------------------------------------------
    def policy_frame(self, raw_obs: dict[str, Any], size: int = 224, with_masks: bool | None = None) -> PolicyFrame:
        """Images rotated and resized exactly as openpi's client does; masks through the identical geometry."""
        with_masks = self.segmentation if with_masks is None else with_masks
        frame = PolicyFrame(
            image=preprocess_image(raw_obs[f"{AGENT_CAMERA}_image"], size),
            wrist_image=preprocess_image(raw_obs[f"{WRIST_CAMERA}_image"], size),
            state=policy_state(raw_obs),
        )
        if with_masks:
            frame.image_seg = preprocess_mask(self.instance_mask(raw_obs, AGENT_CAMERA), size)
            frame.wrist_seg = preprocess_mask(self.instance_mask(raw_obs, WRIST_CAMERA), size)
        return frame

    def __enter__(self) -> LiberoTaskEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
