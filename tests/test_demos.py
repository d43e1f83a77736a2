"""Demo format round trip and validation; the scripted controller on a toy kinematic world and on real LIBERO."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy.optimize import linprog
from scipy.spatial.transform import Rotation

from openpi.shared.rundir import RunSettingsError
from openpi.training import demos, scripted
from openpi.training import scene_geometry as sg
from openpi.training.demos import synthetic_episode

# ---------------------------------------------------------------------------------------------- format


def test_demo_round_trip(tmp_path):
    ep = synthetic_episode(1, steps=5)
    path = demos.write_demo(tmp_path, ep)
    assert path.name == "libero_spatial__task0__ep1"
    assert demos.list_demos(tmp_path) == [path]
    for mmap in (True, False):
        back = demos.read_demo(path, mmap=mmap)
        for name in demos.ARRAYS:
            np.testing.assert_array_equal(getattr(back, name), getattr(ep, name))
            assert getattr(back, name).dtype == (np.uint8 if name in ("agentview", "wrist") else np.float32)
        assert back.prompt == ep.prompt and back.steps == 5 and back.meta["schema"] == demos.DEMO_SCHEMA
    demos.validate_demo(path)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        demos.write_demo(tmp_path, ep)
    np.testing.assert_array_equal(demos.read_demo(path).actions, ep.actions)  # untouched by the refused write


def test_frame_stride_round_trip_and_mismatch(tmp_path):
    ep = synthetic_episode(0, steps=7)
    ep.meta["frame_stride"] = 3
    ep.agentview, ep.wrist = ep.agentview[::3], ep.wrist[::3]  # frames of steps 0, 3, 6
    back = demos.validate_demo(demos.write_demo(tmp_path, ep))
    assert back.agentview.shape[0] == 3 and back.steps == 7 and list(back.frame_steps()) == [0, 3, 6]
    bad = synthetic_episode(1, steps=7)
    bad.meta["frame_stride"] = 3  # but a frame for every step
    with pytest.raises(demos.DemoFormatError, match=r"agentview has 7 frames, expected ceil\(7 steps / frame_stride 3\) = 3"):
        demos.write_demo(tmp_path, bad)


def test_unfinished_and_foreign_directories_are_skipped(tmp_path):
    demos.write_demo(tmp_path, synthetic_episode(0, steps=3))
    (tmp_path / "demos" / ".libero_spatial__task0__ep9.tmp").mkdir()  # a killed writer's temporary
    (tmp_path / "demos" / "no_meta").mkdir()
    assert [p.name for p in demos.list_demos(tmp_path)] == ["libero_spatial__task0__ep0"]
    with pytest.raises(demos.DemoFormatError, match="no meta.json"):
        demos.read_demo(tmp_path / "demos" / "no_meta")
    with pytest.raises(FileNotFoundError, match="no demos directory"):
        demos.list_demos(tmp_path / "elsewhere")


@pytest.mark.parametrize("field,bad,match", [
    ("actions", np.zeros((5, 6), np.float32), r"actions must be \(5, 7\)"),
    ("states", np.full((5, 8), np.nan, np.float32), "states must be finite"),
    ("wrist", np.zeros((5, 224, 224, 3), np.float32), "wrist must be"),
    ("agentview", np.zeros((5, 224, 200, 3), np.uint8), "agentview must be"),
])
def test_bad_arrays_are_named(tmp_path, field, bad, match):
    ep = synthetic_episode(0, steps=5)
    setattr(ep, field, bad)
    with pytest.raises(demos.DemoFormatError, match=match):
        demos.write_demo(tmp_path, ep)
    assert not (tmp_path / "demos").exists() or demos.list_demos(tmp_path) == []


def test_tampered_demo_fails_validation(tmp_path):
    path = demos.write_demo(tmp_path, synthetic_episode(0, steps=4))
    np.save(path / "actions.npy", np.zeros((3, 7), np.float32))
    with pytest.raises(demos.DemoFormatError, match=r"states must be \(3, 8\) like the 3 actions, found \(4, 8\)"):
        demos.read_demo(path)
    meta = json.loads((path / "meta.json").read_text())
    meta.pop("prompt")
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(demos.DemoFormatError, match="prompt"):
        demos.read_demo(path)


def test_meta_steps_must_match(tmp_path):
    ep = synthetic_episode(0, steps=4)
    ep.meta["steps"] = 7
    with pytest.raises(demos.DemoFormatError, match="steps=7"):
        demos.write_demo(tmp_path, ep)


def test_attempt_summary(tmp_path):
    rows = [(0, 0, True, 100), (0, 1, False, 220), (0, 2, True, 120), (3, 0, False, 5)]
    for task, episode, ok, steps in rows:
        demos.write_attempt(tmp_path, {"suite": "libero_spatial", "task_id": task, "episode": episode,
                                       "prompt": f"p{task}", "success": ok, "steps": steps,
                                       "failure_reason": None if ok else ("max_steps" if task == 0 else
                                                                         "error: RuntimeError('x')"),
                                       "kept": ok})
    summary = demos.summarize_attempts(demos.read_attempts(tmp_path))
    s = summary["suites"]["libero_spatial"]
    assert s["tasks"]["0"]["attempts"] == 3 and s["tasks"]["0"]["successes"] == 2
    assert s["tasks"]["0"]["success_rate"] == pytest.approx(2 / 3)
    assert s["tasks"]["0"]["mean_steps_success"] == pytest.approx(110)
    assert s["tasks"]["0"]["failures"] == {"max_steps": 1}
    assert s["tasks"]["3"]["failures"] == {"error": 1} and s["tasks"]["3"]["mean_steps_success"] is None
    assert summary["total"]["attempts"] == 4 and summary["total"]["successes"] == 2


# ---------------------------------------------------------------------------------------------- controller (pure)


def test_settings_guard_resumes_extends_and_refuses(tmp_path):
    """One run directory: more episodes or tasks extend the folder; another step budget or controller is refused
    naming it; a folder of the older layout is adopted only when its settings agree."""
    cfg = scripted.GenerateConfig(out_dir=str(tmp_path / "a"), task_ids=(0,), episodes_per_task=2)
    assert not scripted.check_or_write_settings(cfg).resumed
    more = dataclasses.replace(cfg, task_ids=(0, 1, 2), episodes_per_task=5, first_episode=3, shard_index=1,
                               num_shards=2)
    assert scripted.check_or_write_settings(more).resumed
    with pytest.raises(RunSettingsError, match="max_steps: stored None vs now 100"):
        scripted.check_or_write_settings(dataclasses.replace(cfg, max_steps=100))
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["settings"]["controller"] == dataclasses.asdict(scripted.ControllerParams())
    old = tmp_path / "old"
    old.mkdir()
    (old / "generate_config.json").write_text(json.dumps({"suite": "libero_spatial", "max_steps": None, "seed": 7}))
    assert not scripted.check_or_write_settings(dataclasses.replace(cfg, out_dir=str(old))).resumed
    (old / "run.json").unlink()
    with pytest.raises(RunSettingsError, match="seed: stored 7 vs now 8"):
        scripted.check_or_write_settings(dataclasses.replace(cfg, out_dir=str(old), seed=8))


def test_parse_goal():
    names = ["akita_black_bowl_1", "plate_1", "basket_1", "alphabet_soup_1"]
    assert scripted.parse_goal([["On", "akita_black_bowl_1", "plate_1"]], names) == \
        scripted.PickPlaceGoal("akita_black_bowl_1", "plate_1")
    assert scripted.parse_goal([["in", "alphabet_soup_1", "basket_1_contain_region"]], names).target == "basket_1"
    with pytest.raises(ValueError, match="exactly one"):
        scripted.parse_goal([["open", "drawer_1"]], names)
    with pytest.raises(ValueError, match="matches no object"):
        scripted.parse_goal([["on", "plate_1", "stove_1"]], names)


@pytest.mark.parametrize("seed", range(4))
def test_rotation_error_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a, b = Rotation.random(random_state=rng), Rotation.random(random_state=rng)
    err = scripted.rotation_error(a.as_quat(), b.as_quat())
    assert ((Rotation.from_rotvec(err) * a).inv() * b).magnitude() < 1e-6  # world-frame: err applied after a
    assert np.linalg.norm(err) <= math.pi + 1e-9


def _box(center, half, yaw_deg=0.0) -> sg.Boxes:
    rot = Rotation.from_euler("z", yaw_deg, degrees=True).as_matrix()
    return sg.Boxes(np.array([center], float), rot[None], np.array([half], float))


@pytest.mark.parametrize("seed", range(3))
def test_boxes_overlap_matches_linear_programming(seed):
    """The separating-axis test against the exact answer: do the two boxes' inequality systems have a common point?"""
    rng = np.random.default_rng(seed)
    for _ in range(200):
        boxes = [sg.Boxes(rng.uniform(-0.2, 0.2, (1, 3)), Rotation.random(random_state=rng).as_matrix()[None],
                          rng.uniform(0.01, 0.15, (1, 3))) for _ in range(2)]
        rows, bounds = [], []
        for b in boxes:
            r, c, h = b.rots[0], b.centers[0], b.halves[0]
            rows += [r.T, -r.T]
            bounds += [h + r.T @ c, h - r.T @ c]
        exact = linprog(np.zeros(3), A_ub=np.vstack(rows), b_ub=np.concatenate(bounds),
                        bounds=[(None, None)] * 3).status == 0
        assert bool(sg.boxes_overlap(*boxes)[0, 0]) == exact
    a, b = _box([0, 0, 0], [0.1, 0.1, 0.1]), _box([0.25, 0, 0], [0.1, 0.1, 0.1])
    assert not sg.boxes_overlap(a, b, margin=0.04)[0, 0] and sg.boxes_overlap(a, b, margin=0.06)[0, 0]


BOWL_OBS = {"akita_black_bowl_1_pos": np.array([-0.2, 0.0, 0.9]), "akita_black_bowl_1_quat": np.array([0, 0, 0, 1.0])}


def _grasp(obstacles: sg.Boxes, obs=BOWL_OBS) -> sg.GraspCandidate:
    return sg.choose_grasp(obs, "akita_black_bowl_1", obstacles, radius=scripted.BOWL.radius,
                           height=scripted.BOWL.grasp_dz, top_z=1.1)[0]


def test_grasp_choice_keeps_the_gripper_off_walls():
    """Free space: the default grasp (fingers along y, on a +-y rim point). A wall 10 cm from the bowl on -y (where
    the outer finger would go): the +y rim. Walls on both y sides: fingers along x, and the wrist yaw turns them."""
    free = _grasp(sg.Boxes.empty())
    assert abs(free.finger_axis[1]) == pytest.approx(1.0) and free.margin == sg.MARGIN_LEVELS[0]
    wall = lambda y: _box([-0.2, y, 0.95], [0.15, 0.005, 0.06])  # noqa: E731
    g = _grasp(wall(-0.1))
    assert g.grip[1] == pytest.approx(0.047, abs=1e-6) and g.margin == sg.MARGIN_LEVELS[0]
    both = sg.Boxes.concat([wall(-0.1), wall(0.1)])
    ranked = sg.choose_grasp(BOWL_OBS, "akita_black_bowl_1", both, radius=0.047, height=0.035, top_z=1.1,
                             num_angles=4)
    assert [abs(c.finger_axis[0]) for c in ranked] == pytest.approx([1, 1, 0, 0], abs=1e-6)
    assert ranked[0].margin > 0 and [c.margin for c in ranked[2:]] == [-1.0, -1.0]  # +-y: a finger in the wall
    assert abs(sg.yaw_for_finger_axis(ranked[0].finger_axis)) == pytest.approx(math.pi / 2)


def test_grasp_on_a_tilted_bowl_takes_an_upright_wall():
    """A bowl tipped 40 degrees about world x (leaning on something): its walls at local +-x stay upright, those
    at +-y lean over, so the pinch goes where the wall is vertical, at the rim point's true height."""
    obs = dict(BOWL_OBS, akita_black_bowl_1_quat=Rotation.from_euler("x", 40, degrees=True).as_quat())
    g = _grasp(sg.Boxes.empty(), obs)
    assert g.wall_tilt == pytest.approx(0.0, abs=1e-6) and abs(g.finger_axis[0]) == pytest.approx(1.0)
    tilted_up = Rotation.from_euler("x", 40, degrees=True).apply([0, 0, scripted.BOWL.grasp_dz])
    np.testing.assert_allclose(g.grip[1:], BOWL_OBS["akita_black_bowl_1_pos"][1:] + tilted_up[1:], atol=1e-9)


def test_corridor_top_sees_only_boxes_near_the_path():
    low, tall = _box([0.0, 0.3, 0.95], [0.05, 0.05, 0.05]), _box([0.0, -0.3, 1.05], [0.05, 0.05, 0.15], 30)
    boxes = sg.Boxes.concat([low, tall])
    assert sg.corridor_top(boxes, np.array([-0.3, 0.0]), np.array([0.3, 0.0]), 0.1) == -math.inf
    assert sg.corridor_top(boxes, np.array([-0.3, 0.25]), np.array([0.3, 0.25]), 0.1) == pytest.approx(1.0)
    assert sg.corridor_top(boxes, np.array([0.0, 0.3]), np.array([0.0, -0.3]), 0.01) == pytest.approx(1.2)


def _toy_world(misses: int = 0):
    """A point gripper that moves by part of the commanded displacement and carries the object once closed at the
    rim; the first ``misses`` closes slip (the object stays where it is)."""
    goal = scripted.PickPlaceGoal("akita_black_bowl_1", "plate_1")
    obj, tgt, eef = np.array([-0.06, 0.2, 0.9]), np.array([0.05, 0.2, 0.9]), np.array([-0.2, 0.0, 1.17])
    ctl = scripted.PickPlaceController(goal)
    held, closed_at, grasp_offset, was_closed, closes = False, None, None, False, 0
    for _ in range(400):
        obs = {"robot0_eef_pos": eef.copy(), "robot0_eef_quat": scripted.DOWN_QUAT,
               "akita_black_bowl_1_pos": obj.copy(), "akita_black_bowl_1_quat": np.array([0, 0, 0, 1.0]),
               "plate_1_pos": tgt}
        a = ctl.act(obs)
        assert a.shape == (7,) and np.all(np.abs(a) <= 1.0)
        np.testing.assert_allclose(a[3:6], 0.0, atol=1e-9)  # already pointing down
        if a[6] > 0 and not was_closed:  # the fingers close: a grasp if they are at the bowl's rim
            closes += 1
            closed_at, grasp_offset = eef.copy(), obj - eef
            at_rim = abs(np.linalg.norm(eef[:2] - obj[:2]) - scripted.BOWL.radius) < 0.015
            held = at_rim and closes > misses
        if a[6] < 0:
            held = False
        was_closed = a[6] > 0
        eef = eef + a[:3] * 0.4 * scripted.POS_LIMIT_M  # the OSC controller covers part of the commanded step
        if held:
            obj = eef + grasp_offset
        if ctl.phase == "done" or ctl.failure:
            break
    return ctl, obj, tgt, closed_at, closes


def test_controller_solves_a_kinematic_toy_world():
    """The phase machine must end with the object released over the target."""
    ctl, obj, tgt, closed_at, closes = _toy_world()
    assert ctl.phase == "done" and not ctl.timed_out and closes == 1 and ctl.regrasps == 0
    assert closed_at is not None and abs(closed_at[2] - (0.9 + scripted.BOWL.grasp_dz)) < 0.005
    assert np.linalg.norm(obj[:2] - tgt[:2]) < 0.015  # object centred over the target ...
    assert 0.0 < obj[2] - tgt[2] < 0.08  # ... and released just above it


def test_controller_grasps_again_after_a_slip_once():
    """A grasp that does not lift the object sends the controller back to the approach; a second slip ends it."""
    ctl, obj, tgt, _, closes = _toy_world(misses=1)
    assert ctl.phase == "done" and ctl.failure is None and closes == 2 and ctl.regrasps == 1
    assert np.linalg.norm(obj[:2] - tgt[:2]) < 0.015
    ctl, obj, _, _, closes = _toy_world(misses=2)
    assert closes == 2 and ctl.failure is not None and ctl.failure.startswith("controller_lost_object")
    np.testing.assert_allclose(obj, [-0.06, 0.2, 0.9])  # never moved


# ---------------------------------------------------------------------------------------------- real LIBERO


@pytest.mark.libero
def test_scripted_controller_solves_a_real_libero_spatial_episode(tmp_path):
    """libero_spatial task 0, initial state 0, recorded: a kept demo in the documented format; a rerun resumes."""
    cfg = scripted.GenerateConfig(out_dir=str(tmp_path), task_ids=(0,), episodes_per_task=1, max_steps=180)
    summary = scripted.generate(cfg, progress=False)
    task = summary["suites"]["libero_spatial"]["tasks"]["0"]
    assert task["attempts"] == 1 and task["successes"] == 1, task
    steps = task["mean_steps_success"]
    print(f"scripted controller: libero_spatial task 0 ep 0 solved in {steps} steps")
    assert steps < 180
    [path] = demos.list_demos(tmp_path)
    ep = demos.validate_demo(path)
    assert ep.agentview.shape == (steps, 224, 224, 3) and ep.wrist.shape == ep.agentview.shape
    assert ep.prompt.startswith("pick up the black bowl") and ep.meta["goal"]["target"] == "plate_1"
    # Gripper closes then opens; the end effector ends near the plate (the bowl was carried there).
    assert (ep.actions[:, 6] > 0).any() and ep.actions[-1, 6] < 0
    assert ep.states[-1, 0] - ep.states[0, 0] > 0.1
    assert ep.agentview.std() > 10 and (ep.agentview[0] != ep.agentview[-1]).any()
    attempt = json.loads(demos.attempt_path(tmp_path, "libero_spatial", 0, 0).read_text())
    assert attempt["success"] and attempt["kept"] and attempt["steps"] == steps

    def no_env(*_):
        raise AssertionError("resume must not rerun a finished episode")

    assert scripted.generate(cfg, env_factory=no_env, progress=False)["total"]["attempts"] == 1
    with pytest.raises(ValueError, match="max_steps"):
        scripted.generate(scripted.GenerateConfig(out_dir=str(tmp_path), task_ids=(0,), episodes_per_task=1,
                                                  max_steps=100), env_factory=no_env, progress=False)


# Training states the earlier controller (fixed +-y rim grasp, no scene geometry) failed, each for its own reason:
# task 2 state 4: the 21 cm hand hit the cabinet; task 4: a finger landed on the open drawer's front wall; task 5:
# the bowl slid off the ramekin and lay tilted, the target rim point was wrong; task 6: a finger hit the drawer
# handle. Each takes ~10-25 s here (no rendering).
@pytest.mark.libero
@pytest.mark.parametrize("task_id,state", [(2, 4), (4, 0), (5, 0), (6, 0)])
def test_scripted_controller_solves_the_cluttered_libero_spatial_scenes(task_id, state):
    from openpi.envs import libero_env

    env = libero_env.LiberoTaskEnv("libero_spatial", task_id, segmentation=False, seed=7)
    try:
        out = scripted.collect_episode(env, state, max_steps=220, record=False)
    finally:
        env.close()
    print(f"task {task_id} state {state}: success={out.success} in {out.steps} steps ({out.failure_reason})")
    assert out.success and out.failure_reason is None, out.failure_reason
    assert out.steps < 200


@pytest.mark.libero
def test_strided_collection_renders_only_kept_frames(env, tmp_path):
    """frame_stride=3: states/actions every step, frames every third step rendered on demand, matching always-on
    rendering of the same steps to within sub-grey-level noise."""
    full = scripted.collect_episode(env, 0, max_steps=7, settle_steps=2, frame_stride=1)
    lazy = scripted.collect_episode(env, 0, max_steps=7, settle_steps=2, frame_stride=3)
    assert full.frames["agentview"].shape == (7, 224, 224, 3) and lazy.frames["agentview"].shape == (3, 224, 224, 3)
    np.testing.assert_array_equal(lazy.frames["states"], full.frames["states"])
    np.testing.assert_array_equal(lazy.frames["actions"], full.frames["actions"])
    for cam in ("agentview", "wrist"):
        kept, ref = lazy.frames[cam].astype(float), full.frames[cam][::3].astype(float)
        assert np.abs(kept - ref).mean() < 1.0
        # ... and each kept frame is closer to its own step than to the step before it
        assert np.abs(kept[1:] - ref[1:]).mean() < np.abs(kept[1:] - full.frames[cam][2:6:3]).mean()
    meta = {"suite": "libero_spatial", "task_id": 0, "episode": 0, "prompt": env.prompt, "steps": 7,
            "frame_stride": 3}
    back = demos.validate_demo(demos.write_demo(tmp_path, demos.DemoEpisode(meta=meta, **lazy.frames)))
    assert back.frame_stride == 3 and list(back.frame_steps()) == [0, 3, 6]
    with pytest.raises(ValueError, match="frame_stride"):
        scripted.collect_episode(env, 0, max_steps=2, frame_stride=0)
