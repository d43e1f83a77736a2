"""Joining a recorded run (store rows from the real StoreWriter/StoreRecorder) with a synthetic rollout folder.

Planted layout: a 4x4 patch grid on 32x32 images; instance 5 (the object of interest) fills one 2x2-patch
quadrant that changes with every policy query; "attending" episodes put the base camera's attention on that
quadrant. The helpers here are imported by test_evaluate_attention_iou.py.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from openpi.models.hooks import HookPoint, HookTable, Record
from openpi.interp.recorded_run import JoinError, RecordedRun, RowLayout
from openpi.interp.recorder import StoreRecorder
from openpi.interp.store import ActivationStore, StoreWriter

GRID, IMG, T, REPLAN, HEADS = 4, 32, 8, 2, 2
OBJ_ID, OTHER_ID = 5, 7
QUADRANTS = [(0, 0), (0, 2), (2, 0), (2, 2)]  # top-left patch of the object per query (env steps 0, 2, 4, 6)
TABLE = {"model": "pi0", "seq_len": 60, "prefix_len": 56, "grid": [GRID, GRID],
         "spans": {"base_0_rgb": [0, 16], "left_wrist_0_rgb": [16, 32], "right_wrist_0_rgb": [32, 48],
                   "instruction": [49, 53], "template": [[48, 49], [53, 54]], "pad": [54, 56],
                   "state": [56, 57], "actions": [57, 60]},
         "camera_valid": {"base_0_rgb": True, "left_wrist_0_rgb": True, "right_wrist_0_rgb": False}}


# The hook points of this synthetic 60-token model: attention of the 4 suffix queries (state + 3 actions).
HOOKS = HookTable([HookPoint(f"llm.layer.{i}.attn.probs", ("batch", "head", "query", "key"), True, 56, 4)
                   for i in range(4)], {"state": (56, 57), "actions": (57, 60), "suffix": (56, 60)}, 60)


def object_patches(query_index: int) -> list[int]:
    r, c = QUADRANTS[query_index % 4]
    return [(r + dr) * GRID + (c + dc) for dr in (0, 1) for dc in (0, 1)]


def attention_row(query_index: int, attend: bool, visual: float, state_query: bool = False) -> np.ndarray:
    """One (keys,) probability row: base camera mass on the object (attend) or on the opposite quadrant."""
    row = np.zeros(60)
    patches = object_patches(query_index if attend else query_index + 3)
    if state_query:  # the state token looks only at the wrist camera (must be dropped by the join)
        row[16:32] = 1.0 / 16
        return row
    row[patches] = 0.7 * visual / len(patches)
    row[16:32] = 0.3 * visual / 16
    rest = 1.0 - visual
    row[49:53] = 0.6 * rest / 4
    row[48] = row[53] = 0.1 * rest
    row[56] = 0.1 * rest
    row[57:60] = 0.1 * rest / 3
    return row


def make_run(root: pathlib.Path, episodes: list[dict], *, selector: str = "actions", per_head: bool = False,
             layers=(0, 1), steps=(0, 1), frames: bool = True) -> tuple[pathlib.Path, pathlib.Path]:
    """Store (real writer + recorder) and rollout folder (real file format) for the given episodes.

    Each episode dict: run_id, task_id, episode, success, attend, visual (fraction), prompt_mode, and optionally
    attempt (default "a1": the attempt that wrote the record and the rows) and stale_attempt (an earlier attempt
    whose rows, recorded first with wrong attention, stay in the store as a rerun episode's would).
    """
    store, rollouts = root / "store", root / "rollouts"
    writer = StoreWriter(store, {"name": "synthetic"}, writer_id="w0", shard_rows=7)
    reduce = "" if per_head else "&reduce=heads"
    rec = Record.parse(f"llm.layer.*.attn.probs?tokens={selector}&steps={','.join(map(str, steps))}{reduce}")
    recorder = StoreRecorder(writer, (rec,), HOOKS, num_steps=max(steps) + 1)
    for ep in episodes:
        suite = ep.get("suite", "libero_spatial")
        queried = [s for s in range(T) if s % REPLAN == 0]
        attempts = ([(ep["stale_attempt"], not ep["attend"])] if "stale_attempt" in ep else [])
        for attempt, attend in attempts + [(ep.get("attempt", "a1"), ep["attend"])]:
            for qi, step in enumerate(queried):
                act = np.stack([attention_row(qi, attend, ep["visual"])] * 3)
                if selector in ("", "suffix"):
                    act = np.concatenate([attention_row(qi, attend, ep["visual"], state_query=True)[None], act])
                one = np.broadcast_to(act, (HEADS, *act.shape)) if per_head else act
                if per_head and ep.get("fixed_head"):  # the last head always looks at the first quadrant
                    fixed = np.stack([attention_row(0, True, ep["visual"])] * 3)
                    one = np.concatenate([one[:-1], fixed[-act.shape[0]:][None]])
                value = np.stack([one] * len(steps))[:, None].astype(np.float32)  # (steps, batch, ...)
                meta = {"run_id": ep["run_id"], "suite": suite, "task_id": ep["task_id"], "episode": ep["episode"],
                        "attempt": attempt, "env_step": step, "replan_index": qi}
                recorder({f"llm.layer.{i}.attn.probs": value for i in layers}, TABLE, meta, np.zeros((3, 7)))
        seg = np.zeros((T, IMG, IMG), np.int32)
        seg[:, 24:32, 0:8] = OTHER_ID
        for s in range(T):
            r, c = QUADRANTS[(s // REPLAN) % 4]
            seg[s, r * 8:(r + 2) * 8, c * 8:(c + 2) * 8] = OBJ_ID
        write_episode(rollouts, ep, seg, frames=frames)
    recorder.close()
    return store, rollouts


def write_episode(rollouts: pathlib.Path, ep: dict, seg: np.ndarray, *, frames: bool = True) -> None:
    """Episode record and frames file (the client's formats) of one episode of T env steps queried every REPLAN
    steps; ``seg`` (T, H, W) instance masks of both cameras (instance OBJ_ID is the object of interest, drawn red
    in the images)."""
    suite = ep.get("suite", "libero_spatial")
    stem = f"{ep['run_id']}__{suite}__task{ep['task_id']}__ep{ep['episode']}"
    queried = [s for s in range(T) if s % REPLAN == 0]
    images = np.zeros((*seg.shape, 3), np.uint8)
    images[..., 0] = (seg == OBJ_ID) * 200
    ids = {} if ep.get("no_object") else {"akita_black_bowl_1": OBJ_ID}
    (rollouts / "episodes").mkdir(parents=True, exist_ok=True)
    record = {"schema": "vla-interp/libero-episode/1", "run_id": ep["run_id"], "suite": suite,
              "task_id": ep["task_id"], "episode": ep["episode"], "attempt": ep.get("attempt", "a1"),
              "init_state_index": ep["episode"],
              "prompt": "" if ep.get("prompt_mode", "original") == "empty" else "pick up the bowl",
              "original_prompt": "pick up the bowl", "success": ep["success"], "status": "complete",
              "steps": T, "chunks": [{"env_step": s, "replan_index": i, "actions": [[0.0] * 7] * 3}
                                     for i, s in enumerate(queried)],
              "perturbations": {"config": {"prompt_mode": ep.get("prompt_mode", "original")}},
              "objects_of_interest": ["akita_black_bowl_1"], "frames": f"frames/{stem}.npz"}
    (rollouts / "episodes" / f"{stem}.json").write_text(json.dumps(record))
    if frames:
        (rollouts / "frames").mkdir(parents=True, exist_ok=True)
        np.savez_compressed(rollouts / "frames" / f"{stem}.npz", agentview=images, wrist=images.copy(),
                            agentview_seg=seg, wrist_seg=seg.copy(), env_step=np.arange(T, dtype=np.int32),
                            replan_index=np.arange(T, dtype=np.int32) // REPLAN,
                            queried=np.arange(T) % REPLAN == 0,
                            instance_names=np.asarray(json.dumps({"0": "bg", "5": "akita_black_bowl_1",
                                                                  "7": "plate_1"})),
                            objects_of_interest=np.asarray(json.dumps(["akita_black_bowl_1"])),
                            object_instance_ids=np.asarray(json.dumps(ids)))


def rewrite_frames(path: pathlib.Path, **changes) -> None:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    np.savez_compressed(path, **arrays)


EP = {"run_id": "r0", "task_id": 0, "episode": 0, "success": True, "attend": True, "visual": 0.8}


def test_join_selects_action_queries_and_frames(tmp_path):
    store, rollouts = make_run(tmp_path, [EP], selector="")  # rows hold the state query too
    run = RecordedRun(store, rollouts)
    qs = list(run.queries())
    assert [q.env_step for q in qs] == [0, 2, 4, 6]
    q = qs[1]
    assert q.attention.shape == (2, 2, 1, 3, 60) and q.axes == ("steps", "layers", "heads", "queries", "keys")
    # the state query (wrist-only) is dropped: every kept query has the planted base-camera mass
    np.testing.assert_allclose(q.attention[..., :16].sum(-1), 0.7 * 0.8, atol=1e-6)
    assert set(np.flatnonzero(q.attention[0, 0, 0, 0, :16])) == set(object_patches(1))
    assert q.masks["base_0_rgb"][0, 16] == OBJ_ID and q.frame_row == 2  # quadrant (0, 2) at env step 2
    assert q.object_ids == {"akita_black_bowl_1": OBJ_ID} and q.success and q.prompt == "pick up the bowl"
    assert not q.per_head


def test_join_is_by_env_step_not_row_order(tmp_path):
    store, rollouts = make_run(tmp_path, [EP])
    path = next((rollouts / "frames").glob("*.npz"))
    with np.load(path) as z:
        perm = np.random.default_rng(0).permutation(T)
        rewrite_frames(path, **{k: z[k][perm] for k in ("agentview", "wrist", "agentview_seg", "wrist_seg",
                                                         "env_step", "replan_index", "queried")})
    for q in RecordedRun(store, rollouts, reduce=("steps", "heads", "queries")).queries():
        qi = q.env_step // REPLAN
        cov = q.masks["base_0_rgb"].reshape(GRID, 8, GRID, 8).transpose(0, 2, 1, 3).reshape(16, -1)
        assert set(np.flatnonzero((cov == OBJ_ID).all(1))) == set(object_patches(qi))
        assert q.attention.shape == (2, 60)


def test_reduce_and_per_head(tmp_path):
    store, rollouts = make_run(tmp_path, [EP], per_head=True, layers=(0, 3), steps=(1,))
    run = RecordedRun(store, rollouts, layers=[3], reduce=("queries",))
    q = next(run.queries())
    assert q.per_head and q.attention.shape == (1, 1, HEADS, 60) and q.layers == [3] and q.steps == [1]


def test_missing_frames_file_is_a_clear_error(tmp_path):
    store, rollouts = make_run(tmp_path, [EP, EP | {"episode": 1}])
    (rollouts / "frames" / "r0__libero_spatial__task0__ep1.npz").unlink()
    with pytest.raises(JoinError, match=r"ep1 have no frames file"):
        RecordedRun(store, rollouts).episode_keys()
    run = RecordedRun(store, rollouts, on_missing="skip")
    assert [k.episode for k in run.episode_keys()] == [0] and "skipped" in run.warnings[0]


def test_missing_episode_record_and_env_step(tmp_path):
    store, rollouts = make_run(tmp_path, [EP])
    path = next((rollouts / "frames").glob("*.npz"))
    rewrite_frames(path, env_step=np.arange(T, dtype=np.int32) + 100)
    with pytest.raises(JoinError, match="no row for env_step 0"):
        list(RecordedRun(store, rollouts).queries())
    rewrite_frames(path, env_step=np.arange(T, dtype=np.int32), queried=np.ones(T, bool) & (np.arange(T) != 4))
    with pytest.raises(JoinError, match="env_step 4 is not marked as a policy query"):
        list(RecordedRun(store, rollouts).queries())
    next((rollouts / "episodes").glob("*.json")).unlink()
    with pytest.raises(JoinError, match="no episode record"):
        RecordedRun(store, rollouts).episode_keys()


def test_bad_selection_errors(tmp_path):
    store, rollouts = make_run(tmp_path, [EP])
    with pytest.raises(JoinError, match=r"layers \[7\] are not recorded"):
        RecordedRun(store, rollouts, layers=[7])
    with pytest.raises(JoinError, match=r"no rows of site .* match \{'denoise_step': \[5\]\}.*'denoise_step': \[0, 1\]"):
        list(RecordedRun(store, rollouts, steps=[5]).queries())


def test_row_layout_comes_from_the_store_not_the_shape(tmp_path):
    """(heads, keys) and (queries, keys) rows can have the same shape; the stored axes tell them apart."""
    store, rollouts = make_run(tmp_path, [EP], selector="")
    layout = RowLayout.of(ActivationStore(store), "llm.layer.0.attn.probs")
    assert layout.axes == ("query", "key") and layout.token_index.tolist() == [56, 57, 58, 59]
    assert layout.action_rows(TABLE).tolist() == [1, 2, 3]  # the state query (joint 56) is not an action token
    with pytest.raises(JoinError, match="include no action token"):
        RowLayout("s", ("query", "key"), np.array([56])).action_rows(TABLE)
    with pytest.raises(JoinError, match="include non-action tokens"):
        RowLayout("s", ("key",), np.array([56, 57])).action_rows(TABLE)


def test_store_without_site_info_is_refused(tmp_path):
    """Rows added without the recorder's site info (an older store): a clear error, never a guessed layout."""
    _, rollouts = make_run(tmp_path, [EP])
    with StoreWriter(tmp_path / "old", {"name": "synthetic"}, writer_id="w") as w:
        w.add_span_table(TABLE)
        w.add("llm.layer.0.attn.probs", np.zeros((1, 2, 60), np.float32),
              {"run_id": "r0", "suite": "libero_spatial", "task_id": 0, "episode": 0, "attempt": "a1", "env_step": 0,
               "replan_index": 0, "denoise_step": 0, "token_index": -1, "span": "actions", "span_table": 0})
    with pytest.raises(JoinError, match=r"has no \['request', 'row_axes'\].*re-record"):
        RecordedRun(tmp_path / "old", rollouts)


def test_rows_of_an_earlier_attempt_are_dropped(tmp_path):
    """A rerun episode leaves the first attempt's rows (planted: attention off the object) in the store; the join
    reads only the attempt that wrote the record and says how many rows it dropped."""
    store, rollouts = make_run(tmp_path, [EP | {"attempt": "a2", "stale_attempt": "a1"}])
    assert len(ActivationStore(store).keys("llm.layer.0.attn.probs")["run_id"]) == 2 * 4 * 2  # 2 attempts
    run = RecordedRun(store, rollouts)
    qs = list(run.queries())
    assert [q.env_step for q in qs] == [0, 2, 4, 6]
    for q in qs:
        assert set(np.flatnonzero(q.attention[0, 0, 0, 0, :16])) == set(object_patches(q.replan_index))
    assert run.stale_rows == {"r0__libero_spatial__task0__ep0": {"a1": 8}}
    assert any("dropped 8 stale rows" in w for w in run.warnings)
    record = next((rollouts / "episodes").glob("*.json"))
    record.write_text(record.read_text().replace('"a2"', '"a9"'))
    with pytest.raises(JoinError, match=r"recorded by attempt 'a9'.*attempts \['a1', 'a2'\]"):
        RecordedRun(store, rollouts).episode_keys()


def test_the_query_a_policy_error_ended_on_is_skipped_and_others_must_have_chunks(tmp_path):
    """The server answered the last query but the client never got the reply: that query has rows but no chunk.
    It is skipped (with a warning); a query without a chunk anywhere else is an error."""
    store, rollouts = make_run(tmp_path, [EP])
    path = next((rollouts / "episodes").glob("*.json"))
    record = json.loads(path.read_text())
    record["chunks"] = record["chunks"][:3]  # the query at env step 6 never got its reply
    path.write_text(json.dumps(record | {"status": "policy_error"}))
    run = RecordedRun(store, rollouts)
    assert [q.env_step for q in run.queries()] == [0, 2, 4]
    assert any("env_step 6 that ended it on a policy error" in w for w in run.warnings)
    path.write_text(json.dumps(record | {"status": "complete"}))
    with pytest.raises(JoinError, match="rows at env_step 6 but its record"):
        list(RecordedRun(store, rollouts).queries())
