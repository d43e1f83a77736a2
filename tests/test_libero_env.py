"""LIBERO environment wrapper: real simulation (libero_spatial task 0), masks aligned with the policy's images."""

import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from openpi.envs import libero_env as le
from openpi.envs import perturbations as pert
from openpi.shared import image_tools

SUITE, TASK = "libero_spatial", 0  # the task of the shared `env` fixture (conftest.py)


# ---------------------------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("seed", range(5))
def test_quat_to_axis_angle_matches_scipy(seed):
    q = np.random.default_rng(seed).normal(size=4)
    q /= np.linalg.norm(q)
    if q[3] < 0:  # same rotation; openpi's formula returns the angle in [0, 2pi) -- compare on w >= 0
        q = -q
    np.testing.assert_allclose(le.quat_xyzw_to_axis_angle(q), Rotation.from_quat(q).as_rotvec(), atol=1e-9)
    np.testing.assert_allclose(le.quat_xyzw_to_axis_angle(np.array([0, 0, 0, 1.0])), np.zeros(3))


def test_lut_maps_geoms_to_instances():
    lut = le.build_instance_lut({0: "a", 3: "b", 4: "b", 9: "c"}, ["a", "b", "c"], size=6)
    elem = np.array([[-1, 0, 3], [4, 9, 5], [2, 99, -7]])
    np.testing.assert_array_equal(le.apply_instance_lut(lut, elem), [[0, 1, 2], [2, 3, 0], [0, 0, 0]])
    with pytest.raises(KeyError, match="not in the instance list"):
        le.build_instance_lut({1: "zzz"}, ["a"], size=2)


def test_match_objects_of_interest_exact_parent_unmatched():
    names = {1: "akita_black_bowl_1", 2: "wooden_cabinet_1", 3: "wooden_cabinet_10", 4: "plate_1"}
    matches, warnings = le.match_objects_of_interest(
        ["akita_black_bowl_1", "wooden_cabinet_1_top_region", "main_table_stove_front_region"], names
    )
    assert [(m.instance_id, m.kind) for m in matches] == [(1, "exact"), (2, "parent"), (None, "unmatched")]
    assert len(warnings) == 1 and "main_table_stove_front_region" in warnings[0]
    _, warnings = le.match_objects_of_interest(["ghost_1", "ghost_2"], names)
    assert any("none of the objects of interest" in w for w in warnings)
    _, warnings = le.match_objects_of_interest([], names)
    assert warnings == ["the task declares no objects of interest"]


def test_max_steps_table():
    assert le.max_steps_for_suite("libero_10") == 520
    with pytest.raises(ValueError, match="no default max steps"):
        le.max_steps_for_suite("libero_100")


# ---------------------------------------------------------------------------------------------- real LIBERO


@pytest.fixture(scope="module")
def obs0(env):
    return env.reset(0)


@pytest.mark.libero
def test_observation_layout_and_state(env, obs0):
    for cam in le.CAMERAS:
        assert obs0[f"{cam}_image"].shape == (256, 256, 3) and obs0[f"{cam}_image"].dtype == np.uint8
        assert obs0[f"{cam}_segmentation_element"].shape == (256, 256, 1)
    state = le.policy_state(obs0)
    assert state.shape == (8,)
    np.testing.assert_allclose(state[:3], obs0["robot0_eef_pos"])
    # Axis-angle encodes the same rotation as the env's quaternion (x, y, z, w).
    quat = obs0["robot0_eef_quat"]
    assert (Rotation.from_rotvec(state[3:6]) * Rotation.from_quat(quat).inv()).magnitude() < 1e-6
    np.testing.assert_allclose(state[6:], obs0["robot0_gripper_qpos"])
    frame = env.policy_frame(obs0, 224)
    req = frame.request(env.prompt, meta={"episode": 3})
    assert set(req) == {"observation/image", "observation/wrist_image", "observation/state", "prompt", "meta/episode"}
    assert req["observation/image"].shape == (224, 224, 3) and req["prompt"] == env.prompt
    # The policy image is the raw camera rotated by 180 degrees, then resized.
    np.testing.assert_array_equal(
        frame.image, image_tools.resize_with_pad(obs0["agentview_image"][::-1, ::-1].copy(), 224, 224)
    )


@pytest.mark.libero
@pytest.mark.parametrize("camera", le.CAMERAS)
def test_mask_lines_up_with_policy_image(env, obs0, camera):
    """After flip + resize-with-pad, each object's mask pixels still carry that object's colour."""
    raw, raw_mask = obs0[f"{camera}_image"], env.instance_mask(obs0, camera)
    img, mask = le.preprocess_image(raw, 224), le.preprocess_mask(raw_mask, 224)
    assert mask.shape == (224, 224) and mask.dtype == np.int32
    ids = [k for k in np.unique(mask) if k > 0 and (mask == k).sum() >= 150]
    assert len(ids) >= 5, f"too few visible instances in {camera}: {ids}"

    def colour_error(m):
        errs = []
        for k in ids:
            ref = raw[raw_mask == k].astype(float).mean(0)
            errs.append(np.abs(img[m == k].astype(float).mean(0) - ref).mean() if (m == k).any() else 255.0)
        return np.array(errs)

    good = colour_error(mask)
    assert good.max() < 4.0, dict(zip(ids, good))
    # Controls: a mask that skipped the rotation, or is off by 6 pixels, does not line up.
    unrotated = image_tools.resize_with_pad_nearest(raw_mask, 224, 224)
    assert colour_error(unrotated).mean() > 5 * good.mean() + 10
    assert colour_error(np.roll(mask, 6, axis=1)).mean() > 3 * good.mean()


@pytest.mark.libero
def test_lut_equals_robosuite_instance_mapping(env):
    obs = env.refresh_observation()
    for cam in le.CAMERAS:
        # robosuite's own instance sensor (per-pixel Python mapping), rendered from the same state.
        sensor, _ = env.raw.env._create_segementation_sensor(cam, 256, 256, "instance", f"{cam}_segmentation")
        slow = sensor({})[..., 0]
        fast = env.instance_mask(obs, cam)
        assert len(np.unique(slow)) >= 5
        np.testing.assert_array_equal(fast, slow)


@pytest.mark.libero
def test_objects_of_interest_matched_and_visible(env, obs0):
    assert env.objects_of_interest == ["akita_black_bowl_1", "plate_1"]
    assert all(m.kind == "exact" for m in env.object_matches) and env.warnings == []
    ids = env.object_instance_ids
    assert [env.instance_names[ids[n]] for n in env.objects_of_interest] == env.objects_of_interest
    mask = le.preprocess_mask(env.instance_mask(obs0, le.AGENT_CAMERA), 224)
    for name, k in ids.items():
        assert (mask == k).sum() > 100, name
    json.dumps([m.to_json() for m in env.object_matches])


@pytest.mark.libero
def test_reset_is_deterministic_and_steps_move_the_robot(env, obs0):
    again = env.reset(0)  # the fixture reset to the same initial state: identical pixels
    np.testing.assert_array_equal(again["agentview_image"], obs0["agentview_image"])
    np.testing.assert_array_equal(again["agentview_segmentation_element"], obs0["agentview_segmentation_element"])
    obs = env.settle(again, 2)
    before = le.policy_state(obs)
    obs, reward, done, info = env.step(np.array([0, 0, 1.0, 0, 0, 0, -1]))  # move up
    after = le.policy_state(obs)
    assert after[2] > before[2] and not done
    with pytest.raises(ValueError, match="7 finite floats"):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match="out of range"):
        env.reset(10_000)


@pytest.mark.libero
def test_object_shift_moves_the_object(env):
    before = env.refresh_observation()["plate_1_pos"].copy()
    info = pert.shift_object(env.raw, "plate_1", (0.05, -0.02, 0.0))
    after = env.refresh_observation()["plate_1_pos"]
    np.testing.assert_allclose(after - before, [0.05, -0.02, 0.0], atol=1e-6)
    assert info["object"] == "plate_1" and json.dumps(info)
    with pytest.raises(ValueError, match="not a movable object"):
        pert.shift_object(env.raw, "wooden_cabinet_1", (0.1, 0, 0))
