"""evaluate_attention_iou.py (thin script over openpi.interp.recorded_iou) and example_attention_viz.py on a
synthetic recorded run with planted answers; the script is run end to end, the library is also called directly."""
from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import pathlib

import numpy as np
import pytest
from conftest import script
from test_recorded_run import REPLAN, T, make_run, rewrite_frames

from openpi.interp import recorded_iou
from openpi.interp.recorded_run import JoinError

EPISODES = [
    # original prompt: episodes 0, 1 attend to the object and succeed; episode 2 looks elsewhere and fails
    {"run_id": "orig", "task_id": 0, "episode": 0, "success": True, "attend": True, "visual": 0.6},
    {"run_id": "orig", "task_id": 0, "episode": 1, "success": True, "attend": True, "visual": 0.6},
    {"run_id": "orig", "task_id": 1, "episode": 0, "success": False, "attend": False, "visual": 0.6},
    # empty prompt: more visual attention, all fail
    {"run_id": "empty", "task_id": 0, "episode": 0, "success": False, "attend": True, "visual": 0.9,
     "prompt_mode": "empty"},
    {"run_id": "empty", "task_id": 0, "episode": 1, "success": False, "attend": True, "visual": 0.9,
     "prompt_mode": "empty"},
]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    store, rollouts = make_run(root, EPISODES)
    mod = script("evaluate_attention_iou.py")
    out = root / "out"
    summary = mod.main(mod.Args(store=store, rollouts=rollouts, out=out, n_boot=50, overlays=True, video=True))
    return mod, store, rollouts, out, summary


def _episode(out: pathlib.Path, stem: str) -> dict:
    return json.loads((out / "episodes" / f"{stem}.json").read_text())


def test_planted_iou_recovered(evaluated):
    _, _, _, out, _ = evaluated
    good = _episode(out, "orig__libero_spatial__task0__ep0")
    bad = _episode(out, "orig__libero_spatial__task1__ep0")
    assert good["mean"]["iou_topk"] == pytest.approx(1.0) and good["mean"]["pointing_accuracy"] == 1.0
    assert good["mean"]["soft_mass"] == pytest.approx(1.0)  # all base-camera mass on the object
    assert bad["mean"]["iou_topk"] == pytest.approx(0.0) and bad["mean"]["soft_mass"] == pytest.approx(0.0)
    q = good["queries"][1]
    assert q["env_step"] == 2 and q["phase"] == "early" and len(q["per_layer"]) == 2
    assert q["layer_mean"]["objects"]["5"]["iou_topk"] == pytest.approx(1.0)
    assert q["layer_mean"]["baselines"]["uniform"]["iou_topk"] < 0.5
    assert q["fraction"]["visual"] == pytest.approx(0.6) and q["fraction"]["instruction"] == pytest.approx(0.24)
    assert good["warnings"] == []


def test_summaries(evaluated):
    _, _, _, out, summary = evaluated
    svf = summary["success_vs_failure"]["orig"]
    assert svf["success"]["n_episodes"] == 2 and svf["failure"]["n_episodes"] == 1
    assert svf["difference"]["iou_topk"] == pytest.approx(1.0)
    lc = summary["language_corruption"]["modes"]["empty"]
    assert lc["n_pairs"] == 2 and lc["delta_success_rate"] == pytest.approx(-1.0)
    assert lc["visual_fraction"]["delta"] == pytest.approx(0.3)
    assert set(lc["by_phase"]) == {"early", "mid", "late"}
    assert lc["by_phase"]["late"]["delta"] == pytest.approx(0.3)
    rows = list(csv.DictReader(open(out / "summary_tasks.csv")))
    r = next(r for r in rows if r["run_id"] == "orig" and r["task_id"] == "0" and r["layer"] == "mean")
    assert float(r["iou_topk"]) == pytest.approx(1.0) and float(r["success_rate"]) == 1.0 and r["n_episodes"] == "2"
    suites = list(csv.DictReader(open(out / "summary_suites.csv")))
    expected = {(a, b) for a in ("orig", "empty") for b in ("mean", "0", "1")}
    assert {(r["run_id"], r["layer"]) for r in suites} == expected
    for name in ("evolution.png", "modality_evolution.png", "videos/orig__libero_spatial__task0__ep0.mp4",
                 "overlays/orig__libero_spatial__task0__ep0/s0006.png"):
        assert (out / name).stat().st_size > 0


def test_overlay_every_draws_every_nth_query_and_scores_all(tmp_path):
    store, rollouts = make_run(tmp_path, EPISODES[:1])
    summary = recorded_iou.evaluate_run(store, rollouts, tmp_path / "o", overlays=True, overlay_every=3, n_boot=10)
    pngs = sorted(p.name for p in (tmp_path / "o" / "overlays" / "orig__libero_spatial__task0__ep0").glob("*.png"))
    assert pngs == ["s0000.png", "s0006.png"]  # queries 0 and 3 of env steps 0, 2, 4, 6
    assert summary["counts"]["queries"] == 4
    with pytest.raises(ValueError, match="overlay_every"):
        recorded_iou.evaluate_run(store, rollouts, tmp_path / "p", overlays=True, overlay_every=0)


def test_resume_skips_done_episodes_and_refuses_changed_settings(evaluated):
    mod, store, rollouts, out, _ = evaluated
    path = out / "episodes" / "orig__libero_spatial__task0__ep0.json"
    before = path.stat().st_mtime_ns
    mod.main(mod.Args(store=store, rollouts=rollouts, out=out, n_boot=20))
    assert path.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="settings"):
        mod.main(mod.Args(store=store, rollouts=rollouts, out=out, layers=(1,), n_boot=20))


def test_shuffled_images_give_low_iou_and_no_object_warns(tmp_path):
    store, rollouts = make_run(tmp_path, [EPISODES[0], EPISODES[1] | {"no_object": True}])
    path = rollouts / "frames" / "orig__libero_spatial__task0__ep0.npz"
    with np.load(path) as z:  # images and masks move, env_step stays: the frames no longer match the queries
        shift = (np.arange(T) + REPLAN) % T
        rewrite_frames(path, agentview_seg=z["agentview_seg"][shift], agentview=z["agentview"][shift])
    mod = script("evaluate_attention_iou.py")
    summary = mod.main(mod.Args(store=store, rollouts=rollouts, out=tmp_path / "out", n_boot=10))
    shuffled = _episode(tmp_path / "out", "orig__libero_spatial__task0__ep0")
    assert shuffled["mean"]["iou_topk"] == pytest.approx(0.0)
    none = _episode(tmp_path / "out", "orig__libero_spatial__task0__ep1")
    assert "no object of interest" in none["warnings"][0] and none["mean"]["iou_topk"] is None
    assert any("no object of interest" in w for w in summary["warnings"])
    assert summary["language_corruption"] is None


def test_missing_frames_file_errors_before_writing(tmp_path):
    store, rollouts = make_run(tmp_path, EPISODES[:2])
    (rollouts / "frames" / "orig__libero_spatial__task0__ep1.npz").unlink()
    mod = script("evaluate_attention_iou.py")
    with pytest.raises(JoinError, match="no frames file"):
        mod.main(mod.Args(store=store, rollouts=rollouts, out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_library_matches_script(evaluated, tmp_path):
    """The library entry point alone writes the same episode files and summary as the script did."""
    _, store, rollouts, out, summary = evaluated
    direct = recorded_iou.evaluate_run(store, rollouts, tmp_path / "lib", n_boot=50)
    assert direct["counts"] == summary["counts"] and direct["success_vs_failure"] == summary["success_vs_failure"]
    assert direct["language_corruption"] == summary["language_corruption"]
    for p in sorted((out / "episodes").glob("*.json")):
        assert json.loads((tmp_path / "lib" / "episodes" / p.name).read_text()) == json.loads(p.read_text())


def test_script_defaults_match_library():
    """Every CLI flag is a library parameter with the same default (the thin script must not drift)."""
    params = inspect.signature(recorded_iou.evaluate_run).parameters
    args = script("evaluate_attention_iou.py").Args
    fields = dataclasses.fields(args)
    assert {f.name for f in fields} == set(params)
    for f in fields:
        if f.default is not dataclasses.MISSING:
            assert params[f.name].default == f.default, f.name


def test_bad_shard_errors_before_reading(tmp_path):
    with pytest.raises(ValueError, match="shard_index"):
        recorded_iou.evaluate_run(tmp_path / "nostore", tmp_path / "norollouts", tmp_path / "out",
                                  shard_index=2, num_shards=2)
    assert not (tmp_path / "out").exists()


def test_phase_of_thirds():
    assert [recorded_iou.phase_of(t) for t in (0.0, 0.33, 0.34, 0.66, 0.67, 1.0)] == \
        ["early", "early", "mid", "mid", "late", "late"]


def _ep(mode: str, episode: int, success: bool, visual: float, run_id: str | None = None) -> dict:
    qs = [{"phase": ph, "fraction": {"visual": visual + 0.01 * k}, "visual_linguistic_ratio": None}
          for k, ph in enumerate(recorded_iou.PHASES)]
    return {"run_id": run_id or mode, "prompt_mode": mode, "suite": "s", "task_id": 0, "episode": episode,
            "success": success, "queries": qs}


def test_language_corruption_pairs_with_original():
    eps = [_ep("original", 0, True, 0.5), _ep("original", 1, False, 0.5),
           _ep("shuffle", 0, False, 0.7), _ep("shuffle", 9, True, 0.1)]  # episode 9 has no original partner
    warnings: list[str] = []
    res = recorded_iou.language_corruption(eps, warnings)
    m = res["modes"]["shuffle"]
    assert res["reference_runs"] == ["original"] and m["run_ids"] == ["shuffle"] and m["n_pairs"] == 1
    assert m["reference_success_rate"] == 1.0 and m["success_rate"] == 0.0 and m["delta_success_rate"] == -1.0
    assert m["visual_fraction"]["delta"] == pytest.approx(0.2)
    assert m["by_phase"]["late"]["reference"] == pytest.approx(0.52)
    assert m["by_phase"]["late"]["delta"] == pytest.approx(0.2)
    assert warnings == []


def test_language_corruption_without_original_warns():
    warnings: list[str] = []
    assert recorded_iou.language_corruption([_ep("empty", 0, True, 0.5), _ep("shuffle", 0, True, 0.5)],
                                            warnings) is None
    assert "no run with prompt_mode 'original'" in warnings[0]
    assert recorded_iou.language_corruption([_ep("original", 0, True, 0.5)], warnings) is None  # one mode only


def test_example_viz_all_modes(tmp_path):
    store, rollouts = make_run(tmp_path, EPISODES[:1], per_head=True)
    mod = script("example_attention_viz.py")
    out = tmp_path / "viz"
    info = mod.main(mod.Args(store=store, rollouts=rollouts, out=out, mode="all", env_step=2, heads=(1,)))
    for name in ("image/s0002.png", "text/s0002.png", "combined/s0002.png", "viz.json"):
        assert (out / name).stat().st_size > 0
    q = info["queries"][0]
    assert q["env_step"] == 2 and q["fraction"]["base_0_rgb"] == pytest.approx(0.42)
    assert q["top_patch"] in (2, 3, 6, 7)  # quadrant (0, 2): the planted object patches of query 1
    whole = mod.main(mod.Args(store=store, rollouts=rollouts, out=tmp_path / "viz2", mode="image", video=True))
    assert [q["env_step"] for q in whole["queries"]] == [0, 2, 4, 6]
    assert (tmp_path / "viz2" / "image.mp4").stat().st_size > 0


def test_example_viz_heads_need_per_head_recording(tmp_path):
    store, rollouts = make_run(tmp_path, EPISODES[:1])
    mod = script("example_attention_viz.py")
    with pytest.raises(ValueError, match="per-head"):
        mod.main(mod.Args(store=store, rollouts=rollouts, out=tmp_path / "v", heads=(0,)))


def test_soft_mass_lift_over_uniform_per_camera(evaluated):
    """Planted: attending episodes put all base-camera mass on the object (a quarter of the 4x4 grid: uniform soft
    mass 0.25, lift 0.75); the other looks at the opposite quadrant (lift -0.25); the wrist camera's attention is
    spread evenly (lift 0 up to float32 rounding). The grid comes from the data."""
    _, _, _, out, summary = evaluated
    assert summary["grid"] == [4, 4] and summary["n_patches"] == 16
    base = summary["soft_mass_by_camera"]["orig"]["base_0_rgb"]
    wrist = summary["soft_mass_by_camera"]["orig"]["left_wrist_0_rgb"]
    assert base["n_episodes"] == 3 and base["uniform_soft_mass"]["mean"] == pytest.approx(0.25)
    assert base["lift"]["mean"] == pytest.approx((0.75 + 0.75 - 0.25) / 3)
    assert base["lift"]["ci_low"] <= base["lift"]["mean"] <= base["lift"]["ci_high"]
    assert wrist["soft_mass"]["mean"] == pytest.approx(0.25, abs=1e-6) and wrist["lift"]["mean"] == pytest.approx(0.0, abs=1e-6)
    # Other frames: each query's attention on the other two episodes' four quadrants hits one in four.
    assert base["other_frames_soft_mass"]["mean"] == pytest.approx(0.25, abs=1e-5)
    assert base["lift_over_other_frames"]["mean"] == pytest.approx((0.75 + 0.75 - 0.25) / 3, abs=1e-5)
    ep = _episode(out, "orig__libero_spatial__task0__ep0")["queries"][1]["cameras"]["base_0_rgb"]
    assert len(ep["attention_grid"]) == len(ep["object_cover"]) == 16
    assert np.dot(ep["attention_grid"], ep["object_cover"]) == pytest.approx(ep["soft_mass"], abs=1e-5)
    rows = list(csv.DictReader(open(out / "summary_suites.csv")))
    r = next(r for r in rows if r["run_id"] == "orig" and r["layer"] == "mean")
    assert float(r["uniform_soft_mass"]) == pytest.approx(0.25) and float(r["soft_mass_lift"]) == pytest.approx(0.4167, abs=1e-4)
    assert json.loads((out / "run.json").read_text())["job"] == recorded_iou.RUN_JOB


def _episode_with_grids(attention: list[list[float]], covers: list[list[float]]) -> dict:
    queries = [{"cameras": {"cam": {"soft_mass": float(np.dot(a, c)), "uniform_soft_mass": float(np.mean(c)),
                                    "attention_grid": a, "object_cover": c}}} for a, c in zip(attention, covers)]
    return {"run_id": "r", "queries": queries}


def test_other_frames_baseline_separates_a_spatial_habit_from_following_the_objects():
    """Planted: objects sit in patch 0 at one query and patch 1 at the next, in every episode. A policy that always
    looks at patch 0 beats uniform attention (lift 0.25) but not the other-frames baseline (lift 0); one whose
    attention follows the object beats both (lift 0.75 over uniform, 0.5 over other frames)."""
    covers = [[1.0, 0, 0, 0], [0, 1.0, 0, 0]]
    habit = [_episode_with_grids([[1.0, 0, 0, 0]] * 2, covers) for _ in range(3)]
    follow = [_episode_with_grids(covers, covers) for _ in range(3)]
    got = {name: recorded_iou.soft_mass_by_camera(eps, n_boot=50, seed=0)["r"]["cam"]
           for name, eps in (("habit", habit), ("follow", follow))}
    assert got["habit"]["lift"]["mean"] == pytest.approx(0.25)
    assert got["habit"]["other_frames_soft_mass"]["mean"] == pytest.approx(0.5)
    assert got["habit"]["lift_over_other_frames"]["mean"] == pytest.approx(0.0)
    assert got["follow"]["lift"]["mean"] == pytest.approx(0.75)
    assert got["follow"]["lift_over_other_frames"]["mean"] == pytest.approx(0.5)
    # one episode has no other episode to compare with: no other-frames numbers rather than invented ones
    single = recorded_iou.soft_mass_by_camera(follow[:1], n_boot=50, seed=0)["r"]["cam"]
    assert "lift_over_other_frames" not in single and single["lift"]["mean"] == pytest.approx(0.75)


def test_head_selection_picks_the_head_that_follows_the_object_on_held_out_episodes(tmp_path):
    """Planted, per-head recording: head 0 looks at the object's quadrant (which moves every query), head 1 always at
    the first quadrant. Chosen on 4 training episodes, head 0 lifts 0.75 over other frames on the 2 held-out ones;
    head 1's training lift over other frames is 0 (a fixed habit), though it hits the object a quarter of the time."""
    eps = [{"run_id": "orig", "task_id": t, "episode": e, "success": True, "attend": True, "visual": 0.6,
            "fixed_head": True} for t in (0, 1) for e in (0, 1, 2)]
    store, rollouts = make_run(tmp_path, eps, per_head=True)
    summary = recorded_iou.evaluate_run(store, rollouts, tmp_path / "o", n_boot=50)
    sel = summary["head_selection"]["orig"]
    assert (sel["layer"], sel["head"]) == (0, 0) and sel["layers"] == [0, 1]
    assert sel["split"]["test_episodes"] == ["orig__libero_spatial__task0__ep2", "orig__libero_spatial__task1__ep2"]
    assert len(sel["split"]["train_episodes"]) == 4
    np.testing.assert_allclose(sel["train_lift_over_other_frames"], [[0.75, 0.0], [0.75, 0.0]], atol=1e-5)
    assert sel["test"]["n_episodes"] == 2
    assert sel["test"]["lift_over_other_frames"]["mean"] == pytest.approx(0.75, abs=1e-5)
    assert sel["test"]["lift"]["mean"] == pytest.approx(0.75, abs=1e-5)
    # the head-averaged numbers are those of the mean over heads
    base = summary["soft_mass_by_camera"]["orig"]["base_0_rgb"]
    assert base["soft_mass"]["mean"] == pytest.approx((1.0 + 0.25) / 2, abs=1e-5)


def test_head_averaged_recordings_have_no_head_selection(evaluated):
    assert evaluated[4]["head_selection"] == {}


def test_per_layer_modality_fractions_are_each_layers_own(tmp_path):
    """Planted (the review's numbers): layer 0 gives 0.788 of its attention to the cameras, layer 3 gives 0.391.
    Each layer row of the summary must show its own fraction, the mean row their mean (0.5895); the old code
    repeated the mean on every layer row."""
    from test_recorded_run import IMG, OBJ_ID, TABLE, attention_row

    from openpi.interp.attention import SpanTable
    from openpi.interp.recorded_run import EpisodeKey, PolicyQuery

    table = SpanTable.from_dict(TABLE)
    seg = np.zeros((IMG, IMG), np.int32)
    seg[0:16, 0:16] = OBJ_ID
    frame = np.zeros((IMG, IMG, 3), np.uint8)
    key = EpisodeKey("r", "libero_spatial", 0, 0)
    queries = [PolicyQuery(key=key, env_step=2 * i, replan_index=i,
                           attention=np.stack([attention_row(0, True, 0.788), attention_row(0, True, 0.391)]),
                           axes=("layers", "keys"), layers=[0, 3], steps=[0], table=table, table_dict=TABLE,
                           frame_row=2 * i, frames={"base_0_rgb": frame}, masks={"base_0_rgb": seg},
                           object_ids={"akita_black_bowl_1": OBJ_ID}, objects_of_interest=["akita_black_bowl_1"],
                           instance_names={OBJ_ID: "akita_black_bowl_1"}, success=True, prompt="p",
                           original_prompt="p", prompt_mode="original", episode_steps=8, per_head=False)
               for i in range(3)]
    scored = recorded_iou.score_episode(queries, "base_0_rgb", 90.0, 0.25)
    q = scored["queries"][0]
    assert [e["fraction"]["visual"] for e in q["per_layer"]] == pytest.approx([0.788, 0.391])
    assert q["fraction"]["visual"] == pytest.approx((0.788 + 0.391) / 2)
    ep = {"run_id": "r", "prompt_mode": "original", "suite": "libero_spatial", "task_id": 0, "episode": 0,
          "success": True, **scored}
    tasks, suites = recorded_iou.summary_tables([ep], n_boot=10, seed=0)
    by_layer = {r["layer"]: r["visual_fraction"] for r in tasks}
    assert by_layer == pytest.approx({"mean": 0.5895, 0: 0.788, 3: 0.391})
    assert {r["layer"]: r["instruction_fraction"] for r in suites}[3] == pytest.approx(0.6 * (1 - 0.391))
