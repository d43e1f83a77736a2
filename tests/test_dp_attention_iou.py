"""Attention-object IoU on a Diffusion Policy recording (``enc.<cam>.attn``, the spatial softmax): the mask-to-grid
geometry (resize with padding, crop, feature-map cells) and a planted answer end to end through
openpi.interp.recorded_iou.evaluate_run, on stores written by the real StoreWriter / StoreRecorder with the
LeRobot fixture's config, hook table, span table and site info (no model run, no simulation).

Planted layout: LIBERO-sized 224x224 frames; the fixture's model sees them resized to 96x96 and centre-cropped to
84x84 at (6, 6), a 3x3 feature map. The object of interest sits inside one corner cell, a different corner at each
policy query (env steps 0, 2, 4, 6). Agent-view keypoint FOLLOW puts 0.9 of its mass on the object's cell (at the
current frame; at the older history frame it looks at the centre), keypoint HABIT always on cell 0, the other
keypoints spread evenly; the wrist camera's keypoints spread evenly.
"""
from __future__ import annotations

import csv
import fnmatch
import json

import numpy as np
import pytest
from conftest import require_lerobot_policy, script
from test_recorded_run import OBJ_ID, REPLAN, T, write_episode

from openpi.interp import iou, recorded_iou
from openpi.interp.recorded_run import DP_LAYER, JoinError, RecordedRun
from openpi.interp.recorder import StoreRecorder
from openpi.interp.store import StoreWriter
from openpi.models.hooks import Record
from openpi.shared.image_tools import resize_with_pad_nearest

FRAME = 224
CORNERS = [0, 2, 6, 8]  # object cell per query (row-major on the 3x3 grid)
FOLLOW, HABIT = 3, 5
# the corner cells in frame pixels: cell h spans model rows [6 + 28 h, 6 + 28 (h + 1)) of 96, i.e. frame rows
# [14 + 196 h / 3, 14 + 196 (h + 1) / 3) of 224; the object fills [20, 70) / [150, 200) inside them
OBJECT_SPAN = {0: (20, 70), 2: (150, 200)}
OBJECT_COVER = 50 * 50 / (196 / 3) ** 2


# ----------------------------------------------------------------------------------------------- (a) geometry
def test_planted_object_lands_in_its_cell_after_resize_with_padding_and_crop():
    """A non-square model image (96x128: the square frame is scaled to 96x96 and padded 16 px left and right),
    cropped to (8, 8, 80, 112), on a 2x4 grid of 40x28 cells. Frame rows [112, 140) -> model rows [48, 60) -> crop
    rows [40, 52): cell row 1; frame columns [0, 28) -> model [16, 28) -> crop [8, 20): cell column 0. Its 12x12
    model pixels cover 144 / 1120 of cell (1, 0) and nothing else."""
    geo = iou.GridGeometry((2, 4), (96, 128), (8, 8, 80, 112))
    mask = np.zeros((1, FRAME, FRAME), np.int32)
    mask[0, 112:140, 0:28] = OBJ_ID
    cover = iou.pool_objects_on(mask, [OBJ_ID], geo)[OBJ_ID][0]
    np.testing.assert_allclose(cover, np.eye(8)[4] * 144 / 1120, atol=1e-12)
    # the same through the chain done on pixels (nearest resize with padding, crop, block pooling), on random blobs
    rng = np.random.default_rng(0)
    labels = np.zeros((FRAME, FRAME), np.int32)
    for y, x, h, w in rng.integers(0, 180, (6, 4)):
        labels[y:y + h % 40 + 4, x:x + w % 40 + 4] = OBJ_ID
    pixels = resize_with_pad_nearest(labels, 96, 128)[8:88, 8:120] == OBJ_ID
    np.testing.assert_allclose(iou.pool_objects_on(labels[None], [OBJ_ID], geo)[OBJ_ID],
                               iou.pool_binary(pixels[None], (2, 4)).reshape(1, -1), atol=0.02)
    # padding shows no frame: a frame-filling object covers half of each outer cell of a grid over the whole image
    whole = iou.GridGeometry((1, 4), (96, 128), (0, 0, 96, 128))
    np.testing.assert_allclose(iou.pool_binary_on(np.ones((1, FRAME, FRAME), bool), whole), [[0.5, 1, 1, 0.5]])
    # drawing: each frame pixel takes its cell's value, 0 outside the crop
    heat = geo.frame_heatmap(np.arange(8, dtype=np.float32).reshape(2, 4) + 1, (FRAME, FRAME))
    assert heat[126, 10] == 5 and heat[0, 0] == 0 and heat[FRAME - 1, FRAME - 1] == 0
    # the whole-frame geometry is Pi0's pooling itself
    np.testing.assert_array_equal(iou.pool_objects_on(mask, [OBJ_ID], iou.GridGeometry((4, 4)))[OBJ_ID],
                                  iou.pool_objects(mask, [OBJ_ID], (4, 4))[OBJ_ID])


def test_fixture_geometry_puts_the_planted_object_in_its_corner_cell():
    geo = iou.GridGeometry((3, 3), (96, 96), (6, 6, 84, 84))
    for cell in CORNERS:
        cover = iou.pool_objects_on(_seg(cell)[None], [OBJ_ID], geo)[OBJ_ID][0]
        np.testing.assert_allclose(cover, np.eye(9)[cell] * OBJECT_COVER, atol=1e-12)


# ----------------------------------------------------------------------------------------------- synthetic store
def _seg(cell: int) -> np.ndarray:
    seg = np.zeros((FRAME, FRAME), np.int32)
    (r0, r1), (c0, c1) = OBJECT_SPAN[cell // 3], OBJECT_SPAN[cell % 3]
    seg[r0:r1, c0:c1] = OBJ_ID
    return seg


def _peak(cell: int) -> np.ndarray:
    row = np.full(9, 0.1 / 8)
    row[cell] = 0.9
    return row


def make_dp_run(root, episodes: list[dict], sites: str = "enc.*.attn"):
    """Store and rollout folder of a Diffusion Policy run with the planted attention of the module docstring."""
    from openpi.models.diffusion import model as dp
    from openpi.models.diffusion.config import load_config
    from openpi.policies import diffusion_policy as dpp

    config = load_config(require_lerobot_policy() / "config.json")
    n_obs, n_kp = config.n_obs_steps, config.spatial_softmax_num_keypoints
    store, rollouts = root / "store", root / "rollouts"
    writer = StoreWriter(store, {"name": "dp_synthetic", **dpp.dp_config_dict(config)}, writer_id="w0")
    recorder = StoreRecorder(writer, (Record.parse(sites),), dp.hook_table(config), config.inference_steps,
                             site_extras=dpp.dp_site_info(config))
    names = list(dp.camera_names(config).values())  # ["image", "wrist_image"]
    for ep in episodes:
        queried = [s for s in range(T) if s % REPLAN == 0]
        for qi, step in enumerate(queried):
            agent = np.full((n_obs, n_kp, 9), 1 / 9)
            agent[:, HABIT] = _peak(0)
            agent[-1, FOLLOW] = _peak(CORNERS[qi % 4])
            agent[:-1, FOLLOW] = _peak(4)  # the older history frame: not the one scored
            wrist = np.full((n_obs, n_kp, 9), 1 / 9)
            values = {f"enc.{names[0]}.attn": agent[None], f"enc.{names[1]}.attn": wrist[None],
                      f"enc.{names[0]}.features": np.zeros((1, n_obs, 64))}
            values = {k: v.astype(np.float32) for k, v in values.items() if fnmatch.fnmatchcase(k, sites)}
            meta = {"run_id": ep["run_id"], "suite": "libero_spatial", "task_id": ep["task_id"],
                    "episode": ep["episode"], "attempt": "a1", "env_step": step, "replan_index": qi}
            table = dpp.dp_span_table(config, [max(step - REPLAN, 0), step])
            recorder(values, table, meta, np.zeros((config.n_action_steps, 7)))
        seg = np.stack([_seg(CORNERS[(s // REPLAN) % 4]) for s in range(T)])
        write_episode(rollouts, ep, seg)
    recorder.close()
    return store, rollouts


EPISODES = [{"run_id": "dp", "task_id": t, "episode": e, "success": e != 1} for t in (0, 1) for e in (0, 1, 2)]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    store, rollouts = make_dp_run(root, EPISODES)
    summary = recorded_iou.evaluate_run(store, rollouts, root / "out", overlays=True, overlay_every=4, n_boot=50)
    return root / "out", summary


# ----------------------------------------------------------------------------------------------- (b) planted
def test_keypoint_that_follows_the_object_gives_lift_and_is_selected_on_held_out_episodes(evaluated):
    out, summary = evaluated
    base = summary["soft_mass_by_camera"]["dp"]["base_0_rgb"]
    # head average (mean over the 32 keypoints): only FOLLOW moves with the object, HABIT sits on one corner
    follow = 0.9 * OBJECT_COVER
    assert base["n_episodes"] == 6
    assert base["uniform_soft_mass"]["mean"] == pytest.approx(OBJECT_COVER / 9)
    assert base["lift"]["mean"] > 0 and base["lift_over_other_frames"]["mean"] > 0
    # FOLLOW on the other episodes' masks: 0.9 on the object's corner a quarter of the time, 0.1 / 8 on each other
    # corner; every other keypoint scores alike on both (uniform) or on average (HABIT); all divided by 32
    other = follow / 4 + 0.1 / 8 * OBJECT_COVER * 3 / 4
    assert base["lift_over_other_frames"]["mean"] == pytest.approx((follow - other) / 32, rel=1e-3)
    wrist = summary["soft_mass_by_camera"]["dp"]["left_wrist_0_rgb"]
    assert wrist["lift"]["mean"] == pytest.approx(0.0, abs=1e-6)
    sel = summary["head_selection"]["dp"]
    assert (sel["layer"], sel["head"], sel["head_kind"]) == (DP_LAYER, FOLLOW, "keypoint")
    assert sel["layers"] == [DP_LAYER] and sel["camera"] == "base_0_rgb"
    train = np.asarray(sel["train_lift_over_other_frames"])
    assert train.shape == (1, 32) and abs(train[0, HABIT]) < 1e-6
    assert sel["test"]["n_episodes"] == 2 and sel["test"]["lift_over_other_frames"]["mean"] > 0.3
    assert sel["test"]["lift"]["mean"] > 0.4


def test_dp_episode_file_names_its_source_and_leaves_modalities_null(evaluated):
    out, summary = evaluated
    ep = json.loads((out / "episodes" / "dp__libero_spatial__task0__ep0.json").read_text())
    src = ep["attention_source"]
    assert src["model"] == "diffusion" and src["sites"] == {"base_0_rgb": "enc.image.attn",
                                                           "left_wrist_0_rgb": "enc.wrist_image.attn"}
    assert src["geometry"]["base_0_rgb"] == {"grid": [3, 3], "image_hw": [96, 96], "crop_box": [6, 6, 84, 84]}
    assert ep["grid"] == [3, 3] and ep["settings"]["layers"] == [DP_LAYER] and ep["table_warnings"] == []
    q = ep["queries"][1]
    assert q["fraction"] == {"visual": None, "instruction": None} and q["visual_linguistic_ratio"] is None
    assert q["layer_mean"]["camera_share"] == pytest.approx(1.0)
    assert [e["layer"] for e in q["per_layer"]] == [DP_LAYER]
    assert len(q["heads"]["attention_grid"][0]) == 32
    assert summary["modality"]["dp"]["visual"] is None and summary["language_corruption"] is None
    assert any("keypoints play the role of heads" in n and "camera_share is 1" in n for n in summary["notes"])
    rows = list(csv.DictReader(open(out / "summary_suites.csv")))
    assert {r["layer"] for r in rows} == {"mean", DP_LAYER} and rows[0]["visual_fraction"] == ""
    assert (out / "overlays" / "dp__libero_spatial__task0__ep0" / "s0000.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------- (c) not recorded
def test_dp_store_without_attention_sites_names_the_sites_to_record(tmp_path):
    store, rollouts = make_dp_run(tmp_path, EPISODES[:1], sites="enc.image.features")
    with pytest.raises(JoinError, match=r"enc\.<cam>\.attn.*--record 'enc\.\*\.attn'"):
        recorded_iou.evaluate_run(store, rollouts, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(JoinError, match="one attention pseudo-layer"):
        RecordedRun(*make_dp_run(tmp_path / "b", EPISODES[:1]), layers=[0])


def test_example_viz_draws_keypoint_maps_where_the_crop_lies(tmp_path):
    """example_attention_viz.py on a DP recording: image view only (text is refused), keypoints as heads, and the
    selected keypoint's most attended cell is the planted one (the corner the object is in at that query)."""
    store, rollouts = make_dp_run(tmp_path, EPISODES[:1])
    mod = script("example_attention_viz.py")
    out = tmp_path / "viz"
    info = mod.main(mod.Args(store=store, rollouts=rollouts, out=out, heads=(FOLLOW,), video=True))
    assert info["model"] == "diffusion" and "keypoints" in info["selection"]["reduction"]
    assert [q["top_patch"] for q in info["queries"]] == [CORNERS[i % 4] for i in range(len(info["queries"]))]
    assert all(q["visual_linguistic_ratio"] is None and q["fraction"] is None and q["tokens"] == []
               for q in info["queries"])
    assert (out / "image" / "s0000.png").stat().st_size > 0 and (out / "image.mp4").stat().st_size > 0
    assert not (out / "text").exists()
    with pytest.raises(ValueError, match="no text part"):
        mod.main(mod.Args(store=store, rollouts=rollouts, out=tmp_path / "v2", mode="text"))
