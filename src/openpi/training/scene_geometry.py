"""Collision geometry for the scripted controller: oriented boxes, the Panda gripper, and grasp selection.

Why: a grasp point that ignores the scene fails in clutter. Measured on libero_spatial with the earlier
controller: the 21 cm wide hand hit the wooden cabinet when the bowl stood at the table centre (task 2), a finger
landed on the open drawer's front wall (task 4), on the bowl's own wall when it lay tilted against the ramekin
(task 5), and on the closed drawer's handle (task 6). Every collision geom of a LIBERO scene is a box (or has a
bounding box in MuJoCo's ``geom_aabb``), so the scene is a set of oriented boxes; the gripper is three boxes; a
grasp candidate is feasible when the gripper's vertical descent column keeps a margin from every box.

Only ``scene_from_sim`` touches the simulator (once per episode, after reset); everything else is numpy over the
observation dict: movable objects' boxes are stored in the object's frame and posed with ``<name>_pos`` /
``<name>_quat`` (xyzw) from the current observation, fixtures' boxes (table, cabinet, stove) in the world frame.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

ROBOT_BODY_PREFIXES = ("robot0_", "gripper0_", "mount0_")


def quat_xyzw_to_matrix(q: np.ndarray) -> np.ndarray:
    x, y, z, w = np.asarray(q, np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


@dataclasses.dataclass(frozen=True)
class Boxes:
    """N oriented boxes: ``centers`` (N, 3), ``rots`` (N, 3, 3) box axes -> frame, ``halves`` (N, 3) half sizes."""

    centers: np.ndarray
    rots: np.ndarray
    halves: np.ndarray

    def __len__(self) -> int:
        return len(self.centers)

    @staticmethod
    def empty() -> "Boxes":
        return Boxes(np.zeros((0, 3)), np.zeros((0, 3, 3)), np.zeros((0, 3)))

    @staticmethod
    def concat(parts: list["Boxes"]) -> "Boxes":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Boxes.empty()
        return Boxes(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("centers", "rots", "halves")))

    def posed(self, pos: np.ndarray, rot: np.ndarray) -> "Boxes":
        """Boxes given in a body frame -> the frame in which the body sits at ``pos`` with rotation ``rot``."""
        return Boxes(self.centers @ rot.T + pos, np.einsum("ij,njk->nik", rot, self.rots), self.halves)

    def world_extent(self) -> np.ndarray:
        """(N, 3) half extents of each box's axis-aligned bounding box."""
        return np.einsum("nij,nj->ni", np.abs(self.rots), self.halves)


def boxes_overlap(a: Boxes, b: Boxes, margin: float = 0.0) -> np.ndarray:
    """(len(a), len(b)) bool: do box i of ``a`` grown by ``margin`` on every side and box j of ``b`` intersect?

    Separating-axis test over the 15 candidate axes (3 + 3 face normals, 9 edge cross products).
    """
    ha = (a.halves + margin)[:, None, :]  # (A, 1, 3)
    hb = b.halves[None, :, :]  # (1, B, 3)
    # r[., ., i, j] = a's axis i . b's axis j; t = b's centre minus a's centre, in a's frame.
    r = np.einsum("aki,bkj->abij", a.rots, b.rots)  # (A, B, 3, 3)
    t = np.einsum("aki,abk->abi", a.rots, b.centers[None, :, :] - a.centers[:, None, :])  # (A, B, 3)
    ar = np.abs(r) + 1e-9  # guards parallel edges
    separated = np.zeros(t.shape[:2], bool)
    for i in range(3):  # a's face normals
        separated |= np.abs(t[..., i]) > ha[..., i] + (hb * ar[..., i, :]).sum(-1)
    for j in range(3):  # b's face normals
        separated |= np.abs((t * r[..., :, j]).sum(-1)) > (ha * ar[..., :, j]).sum(-1) + hb[..., j]
    for i in range(3):  # edge x edge
        i1, i2 = (i + 1) % 3, (i + 2) % 3
        for j in range(3):
            j1, j2 = (j + 1) % 3, (j + 2) % 3
            proj = np.abs(t[..., i2] * r[..., i1, j] - t[..., i1] * r[..., i2, j])
            ra = ha[..., i1] * ar[..., i2, j] + ha[..., i2] * ar[..., i1, j]
            rb = hb[..., j1] * ar[..., i, j2] + hb[..., j2] * ar[..., i, j1]
            separated |= proj > ra + rb
    return ~separated


# ------------------------------------------------------------------------------------------------ the scene


@dataclasses.dataclass(frozen=True)
class Scene:
    """Collision boxes of everything but the robot. ``movable[name]`` is in the frame of object ``name``."""

    fixed: Boxes
    movable: dict[str, Boxes]

    def obstacles(self, obs: dict[str, Any], exclude: tuple[str, ...] = ()) -> Boxes:
        """World-frame boxes of the fixtures and of every object not in ``exclude``, posed as in ``obs``."""
        parts = [self.fixed]
        for name, boxes in self.movable.items():
            if name in exclude:
                continue
            parts.append(boxes.posed(np.asarray(obs[f"{name}_pos"], np.float64),
                                     quat_xyzw_to_matrix(obs[f"{name}_quat"])))
        return Boxes.concat(parts)


def _mat_from_wxyz(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q
    return quat_xyzw_to_matrix(np.array([x, y, z, w]))


def scene_from_sim(sim, object_names: list[str]) -> Scene:
    """Every colliding geom of a MuJoCo scene as an oriented box (its ``geom_aabb`` in the geom frame), robot and
    world-body geoms (floor, walls) left out. Geoms of a body named ``<object>_...`` belong to that object and are
    stored in its frame (the pose of body ``<object>_main``, which is what ``<object>_pos/_quat`` report)."""
    m, d = sim.model, sim.data
    owners: dict[str, str] = {}
    for b in range(m.nbody):
        name = m.body_id2name(b) or ""
        matches = [o for o in object_names if name.startswith(o + "_")]
        if matches:
            owners[name] = max(matches, key=len)
    fixed: list[tuple] = []
    movable: dict[str, list[tuple]] = {}
    for g in range(m.ngeom):
        body = int(m.geom_bodyid[g])
        name = m.body_id2name(body) or ""
        if body == 0 or not (m.geom_contype[g] or m.geom_conaffinity[g]) or name.startswith(ROBOT_BODY_PREFIXES):
            continue
        center_local, half = m.geom_aabb[g][:3], m.geom_aabb[g][3:]
        rot = np.asarray(d.geom_xmat[g]).reshape(3, 3)
        center = np.asarray(d.geom_xpos[g]) + rot @ center_local
        obj = owners.get(name)
        if obj is None:
            fixed.append((center, rot, half))
            continue
        main = m.body_name2id(f"{obj}_main")
        if main < 0:
            raise ValueError(f"object {obj!r} has no body named {obj}_main to take its pose from")
        p, r = np.asarray(d.body_xpos[main]), _mat_from_wxyz(np.asarray(d.body_xquat[main]))
        movable.setdefault(obj, []).append((r.T @ (center - p), r.T @ rot, half))

    def stack(rows: list[tuple]) -> Boxes:
        if not rows:
            return Boxes.empty()
        return Boxes(*(np.array([row[k] for row in rows], np.float64) for k in range(3)))

    return Scene(stack(fixed), {k: stack(v) for k, v in movable.items()})


# ------------------------------------------------------------------------------------------------ the gripper

# Panda gripper, open, pointing down, in a frame centred on the grip site (robot0_eef_pos) with x = finger axis
# (the fingers close along it), z = up. Extents are the MuJoCo collision geoms' bounding boxes measured in LIBERO
# (finger meshes 1.3-5.0 cm from the centre, from 1.3 cm below the grip site to 4.9 cm above; the hand mesh
# +-10.6 cm along the fingers, +-4 cm across); the hand starts 4.5 cm up (its bounding box, 2.4 cm, is loose).
FINGER_X = (0.013, 0.050)
FINGER_HALF_Y = 0.013
FINGER_Z = (-0.013, 0.049)
HAND_HALF_X, HAND_HALF_Y = 0.106, 0.040
HAND_Z = (0.045, 0.127)


def gripper_column(grip: np.ndarray, finger_axis: np.ndarray, top_z: float) -> Boxes:
    """World boxes swept by the open gripper descending vertically from ``top_z`` (grip-site height) to ``grip``
    with the fingers along ``finger_axis`` (horizontal unit vector)."""
    ax = np.array([finger_axis[0], finger_axis[1], 0.0])
    ax /= np.linalg.norm(ax)
    ay = np.array([-ax[1], ax[0], 0.0])
    rot = np.stack([ax, ay, [0.0, 0.0, 1.0]], axis=1)
    rise = max(0.0, top_z - grip[2])
    rows = []
    for sign in (1.0, -1.0):
        cx = sign * 0.5 * (FINGER_X[0] + FINGER_X[1])
        z0, z1 = FINGER_Z[0], FINGER_Z[1] + rise
        rows.append(([cx, 0.0, 0.5 * (z0 + z1)], [0.5 * (FINGER_X[1] - FINGER_X[0]), FINGER_HALF_Y, 0.5 * (z1 - z0)]))
    z0, z1 = HAND_Z[0], HAND_Z[1] + rise
    rows.append(([0.0, 0.0, 0.5 * (z0 + z1)], [HAND_HALF_X, HAND_HALF_Y, 0.5 * (z1 - z0)]))
    centers = np.array([grip + rot @ np.array(c) for c, _ in rows])
    return Boxes(centers, np.repeat(rot[None], len(rows), 0), np.array([h for _, h in rows], np.float64))


# ------------------------------------------------------------------------------------------------ grasps


@dataclasses.dataclass(frozen=True)
class GraspCandidate:
    local_angle: float  # rim angle in the object frame (radians)
    grip: np.ndarray  # world grip-site position
    finger_axis: np.ndarray  # world, horizontal unit vector
    wall_tilt: float  # |z| of the wall normal at the grip point: 0 = vertical wall (a clean pinch)
    margin: float  # largest clearance level (m) at which the descent column is free; -1: collides at 0
    cost: float


MARGIN_LEVELS = (0.02, 0.012, 0.006, 0.0)
ROBOT_BASE_XY = np.array([-0.66, 0.0])  # LIBERO tabletop scenes mount the Panda here
COMFORT_REACH_M = 0.74  # beyond this horizontal distance from the base the arm slows down pointing down


def grasp_points(pos: np.ndarray, rot: np.ndarray, radius: float, height: float,
                 angles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rim points (K, 3) at local ``angles`` of an object posed (pos, rot); their horizontal radial unit vectors
    (K, 2) (the finger axis that straddles the wall there); and |z| of the wall normals (K,)."""
    local = np.stack([radius * np.cos(angles), radius * np.sin(angles), np.full_like(angles, height)], 1)
    points = local @ rot.T + pos
    normals = np.stack([np.cos(angles), np.sin(angles), np.zeros_like(angles)], 1) @ rot.T
    flat = normals[:, :2]
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    # A wall lying flat has no horizontal normal: fall back to the radial direction from the centre.
    fallback = points[:, :2] - pos[:2]
    flat = np.where(norms > 1e-6, flat / np.maximum(norms, 1e-9), fallback / np.maximum(
        np.linalg.norm(fallback, axis=1, keepdims=True), 1e-9))
    if radius == 0.0:  # a centre grasp: the candidates differ only in the finger direction
        flat = np.stack([np.cos(angles), np.sin(angles)], 1)
    return points, flat, np.abs(normals[:, 2])


def yaw_for_finger_axis(axis_xy: np.ndarray) -> float:
    """Rotation about world z (radians, in (-pi/2, pi/2]) that turns the fingers from world y onto ``axis_xy``
    (the gripper is symmetric, so the axis and its opposite are the same grasp)."""
    yaw = math.atan2(axis_xy[1], axis_xy[0]) - math.pi / 2
    yaw = (yaw + math.pi / 2) % math.pi - math.pi / 2
    return yaw if yaw != -math.pi / 2 else math.pi / 2


def reach_excess(xy: np.ndarray) -> float:
    """How far (m) a horizontal position lies beyond the comfortable reach of the arm pointing down."""
    return max(0.0, float(np.linalg.norm(np.asarray(xy)[:2] - ROBOT_BASE_XY)) - COMFORT_REACH_M)


def choose_grasp(obs: dict[str, Any], obj: str, obstacles: Boxes, *, radius: float, height: float,
                 top_z: float, place_xy: np.ndarray | None = None, num_angles: int = 24,
                 max_wall_tilt: float = 0.6) -> list[GraspCandidate]:
    """Rank grasp candidates on the rim (or, with radius 0, finger directions at the centre) of object ``obj``.

    Ranking: first the clearance level at which the gripper's vertical descent column from ``top_z`` misses every
    obstacle box (``MARGIN_LEVELS``), then a cost that prefers walls standing upright (a pinch on a tilted wall
    slips), little wrist rotation from the default fingers-along-y grasp, and grasp points within easy reach, at
    the object and, when ``place_xy`` is given, where the grip will be when the object sits over ``place_xy``
    (the grip keeps its offset from the object). Returns all candidates, best first.
    """
    pos = np.asarray(obs[f"{obj}_pos"], np.float64)
    rot = quat_xyzw_to_matrix(obs[f"{obj}_quat"])
    angles = np.arange(num_angles) * (2 * math.pi / num_angles)
    points, axes, tilts = grasp_points(pos, rot, radius, height, angles)
    out = []
    for k in range(num_angles):
        if tilts[k] > max_wall_tilt:
            continue
        column = gripper_column(points[k], axes[k], top_z)
        margin = -1.0
        for level in MARGIN_LEVELS:
            if len(obstacles) == 0 or not boxes_overlap(column, obstacles, level).any():
                margin = level
                break
        yaw = abs(yaw_for_finger_axis(axes[k]))
        reach = reach_excess(points[k])
        if place_xy is not None:
            reach += reach_excess(np.asarray(place_xy)[:2] + points[k, :2] - pos[:2])
        cost = 1.0 * tilts[k] + 0.3 * yaw + 10.0 * reach
        out.append(GraspCandidate(float(angles[k]), points[k], axes[k], float(tilts[k]), margin, float(cost)))
    if not out:
        raise ValueError(f"no rim point of {obj} has a wall within {max_wall_tilt} of vertical")
    return sorted(out, key=lambda c: (-c.margin, c.cost))


def corridor_top(obstacles: Boxes, start_xy: np.ndarray, end_xy: np.ndarray, radius: float) -> float:
    """Highest top of any obstacle box whose footprint comes within ``radius`` of the segment start -> end
    (footprints as axis-aligned rectangles): what a load carried along that segment must clear."""
    if len(obstacles) == 0:
        return -math.inf
    ext = obstacles.world_extent()
    lo, hi = obstacles.centers[:, :2] - ext[:, :2], obstacles.centers[:, :2] + ext[:, :2]
    seg = np.linspace(start_xy, end_xy, 25)  # 25 samples: <= 2 cm apart over the table
    nearest = np.clip(seg[None, :, :], lo[:, None, :], hi[:, None, :])
    dist = np.linalg.norm(nearest - seg[None, :, :], axis=-1).min(axis=1)
    near = dist < radius
    if not near.any():
        return -math.inf
    return float((obstacles.centers[near, 2] + ext[near, 2]).max())
