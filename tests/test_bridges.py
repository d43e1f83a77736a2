"""Bridges: an export of a real tiny recording feeds every array script, run as subprocesses exactly as the
commands in bridge.json say (attention_iou.py, visualize_*.py, linear_probe.py, geometry.py, action_pca.py).

The recording is real (create_policy("pi0_tiny_spatial", record_sites=..., record_dir=...) answering requests with
meta/* keys); the rollout folder is synthetic but written by the LIBERO client's own writer, with the images that
were sent, planted instance masks and the chunks the policy returned."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from openpi.envs import rollout
from openpi.interp.export import export_site

REPO = pathlib.Path(__file__).resolve().parents[1]
ATTN, RESID = "llm.layer.1.attn.probs", "llm.expert1.layer.3.resid_post"
EPISODES, T, REPLAN, OBJ, OTHER = 6, 12, 4, 3, 4


def _frame(rng, ep: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and instance mask: the object of interest (id 3) is a bright square that moves with the step."""
    img = rng.integers(0, 60, (224, 224, 3), dtype=np.uint8)
    seg = np.zeros((224, 224), np.int32)
    r, c = 28 * ((ep + step) % 6), 28 * (step % 7)
    seg[r:r + 56, c:c + 56] = OBJ
    seg[180:210, 180:210] = OTHER
    img[seg == OBJ] = 230
    return img, seg


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from openpi.policies.policy_config import create_policy

    root = tmp_path_factory.mktemp("bridges")
    policy = create_policy("pi0_tiny_spatial", record_sites=[f"{ATTN}?tokens=actions&reduce=heads&steps=-1",
                                                             f"{RESID}?tokens=actions&steps=-1"],
                           record_dir=str(root / "store"))
    cfg = rollout.RolloutConfig(run_id="bridge", out_dir=root / "rollouts", video_dir=root / "videos",
                                save_video=False, save_frames=True, replan_steps=REPLAN)
    rng = np.random.default_rng(0)
    for ep in range(EPISODES):
        spec = rollout.EpisodeSpec("libero_spatial", ep % 2, ep)
        attempt = f"attempt-{ep}"
        frames = {k: [] for k in ("agentview", "wrist", "agentview_seg", "wrist_seg")}
        chunks, actions, states = [], [], []
        for step in range(T):
            img, seg = _frame(rng, ep, step)
            state = rng.normal(size=8).astype(np.float32)
            if step % REPLAN == 0:
                reply = policy.infer({"observation/image": img, "observation/wrist_image": img[::-1].copy(),
                                      "observation/state": state, "prompt": "pick up the black bowl",
                                      **{f"meta/{k}": v for k, v in (("run_id", "bridge"), ("suite", spec.suite),
                                                                    ("task_id", spec.task_id), ("episode", ep),
                                                                    ("attempt", attempt), ("env_step", step),
                                                                    ("replan_index", step // REPLAN))}})
                chunks.append({"env_step": step, "replan_index": step // REPLAN, "actions": reply["actions"]})
            actions.append(chunks[-1]["actions"][step % REPLAN])
            states.append(state)
            for key, value in (("agentview", img), ("wrist", img[::-1]), ("agentview_seg", seg),
                               ("wrist_seg", seg[::-1])):
                frames[key].append(value)
        frames = {k: np.stack(v) for k, v in frames.items()} | {
            "env_step": np.arange(T, dtype=np.int32), "replan_index": np.arange(T, dtype=np.int32) // REPLAN,
            "queried": np.arange(T) % REPLAN == 0, "instance_names": np.asarray(json.dumps({"3": "bowl", "4": "plate"})),
            "objects_of_interest": np.asarray(json.dumps(["akita_black_bowl_1"])),
            "object_instance_ids": np.asarray(json.dumps({"akita_black_bowl_1": OBJ}))}
        record = {"run_id": "bridge", "suite": spec.suite, "task_id": spec.task_id, "episode": ep, "attempt": attempt,
                  "success": ep % 3 != 0, "status": "complete", "steps": T, "actions": np.asarray(actions),
                  "states": np.asarray(states), "chunks": chunks, "prompt": "pick up the black bowl",
                  "original_prompt": "pick up the black bowl", "perturbations": {"config": {"prompt_mode": "original"}},
                  "objects_of_interest": ["akita_black_bowl_1"], "video": None, "frames": None}
        rollout.write_episode(rollout.EpisodeResult(record, [], frames), cfg)
    policy.close()
    return root


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_residual_export_feeds_probe_geometry_and_pca(recorded):
    out = recorded / "export_resid"
    summary = export_site(recorded / "store", RESID, out, rollouts=recorded / "rollouts", where={"denoise_step": [9]})
    n_queries = EPISODES * (T // REPLAN)
    assert summary["rows"] == n_queries * 10 and summary["label_rule"]["action_token_rows"] == n_queries * 10
    commands = json.loads((out / "bridge.json").read_text())["commands"]
    assert set(commands) == {"linear_probe.py", "geometry.py", "action_pca.py"}
    for argv in commands.values():
        _run(argv)
    probe = json.loads((recorded / "export_resid_probe" / "probe_results.json").read_text())
    assert probe["n_rows"] == n_queries * 10 and probe["target_names"][0] == "dx"
    geometry = json.loads((recorded / "export_resid_geometry" / "geometry.json").read_text())
    assert geometry["input"]["shape"][:2] == [EPISODES, T // REPLAN]
    pca = json.loads((recorded / "export_resid_action_pca" / "action_pca.json").read_text())
    assert pca["n_rows"] == n_queries * 10 and pca["n_episodes"] == EPISODES
    # the rollout folder itself is action_pca.py's other input
    _run(["python", "action_pca.py", "--rollouts", str(recorded / "rollouts"), "--out", str(recorded / "pca_roll")])
    assert json.loads((recorded / "pca_roll" / "action_pca.json").read_text())["n_rows"] == EPISODES * T


def test_attention_export_feeds_iou_and_visualisers(recorded):
    out = recorded / "export_attn"
    summary = export_site(recorded / "store", ATTN, out, rollouts=recorded / "rollouts")
    n_queries = EPISODES * (T // REPLAN)
    assert summary["rows"] == n_queries and summary["label_rule"]["query_rows"] == n_queries
    bridge = json.loads((out / "bridge.json").read_text())
    commands = bridge["commands"]
    assert "attention_iou.py base_0_rgb" in commands and commands["attention_iou.py base_0_rgb"][
        commands["attention_iou.py base_0_rgb"].index("--grid") + 1] == "8"  # the tiny model's grid, from the data
    ep_dir = out / "attention" / "episodes" / "bridge__libero_spatial__task0__ep0"
    att = np.load(ep_dir / "attention.npy")
    assert att.shape == (T // REPLAN, 1, 1, 1, 10, 235)  # time, steps, layers, heads (averaged), action queries, keys
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-4)
    with np.load(ep_dir / "frames.npz") as z:  # frames joined by env step: what the policy saw at each query
        assert z["env_step"].tolist() == [0, 4, 8] and z["agentview"].shape == (3, 224, 224, 3)
        assert (z["agentview_seg"][1] == OBJ).sum() == 56 * 56
    masks = np.load(out / "attention" / "iou" / "base_0_rgb_masks.npy")
    assert masks.shape == (n_queries, 224, 224) and set(np.unique(masks)) == {0, OBJ}  # objects of interest only
    for argv in commands.values():
        _run(argv)
    iou = json.loads((recorded / "export_attn_iou_base_0_rgb" / "iou.json").read_text())
    assert iou["counts"]["n_used"] == n_queries and iou["inputs"]["grid"] == [8, 8]
    first = "bridge__libero_spatial__task0__ep0"
    summary = json.loads((recorded / f"export_attn_visualize_{first}" / "attention_summary.json").read_text())
    assert summary["env_steps"] == [0, 4, 8]  # frames joined to the attention by env step, not position
    assert (recorded / f"export_attn_text_{first}" / "text_attention.json").is_file()
    assert list((recorded / f"export_attn_combined_{first}" / "combined").glob("*.png"))
