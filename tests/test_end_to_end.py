"""A real LIBERO episode with the embedded tiny policy through the websocket server, recording attention and
residuals: video, episode JSON, frames, masks and the activation store must join by key without guessing."""
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

from openpi.interp.recorded_run import RecordedRun
from openpi.interp.store import ActivationStore
from openpi.policies.policy_config import create_policy
from openpi.serving.websocket_server import BackgroundServer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_main():
    spec = importlib.util.spec_from_file_location("libero_main", ROOT / "examples" / "libero" / "main.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.libero
def test_tiny_policy_libero_episode_records_and_joins(tmp_path):
    store_dir, out = tmp_path / "store", tmp_path / "rollouts"
    policy = create_policy("pi0_tiny", record_sites=["llm.layer.*.attn.probs?tokens=actions&reduce=heads",
                                                     "llm.expert1.layer.3.resid_post?tokens=actions&steps=-1"],
                           record_dir=str(store_dir))
    main = _load_main()
    with BackgroundServer(policy, port=0) as srv:
        args = main.Args(host="127.0.0.1", port=srv.port, task_ids=(0,), num_trials_per_task=1, max_steps=12,
                         num_steps_wait=2, run_id="e2e", out_dir=str(out), video_out_path=str(tmp_path / "videos"),
                         save_frames=True, connect_timeout_s=60)
        summary = main.main(args)
    policy.close()
    assert summary["total"]["episodes"] == 1 and summary["total"]["errors"] == 0
    rec = json.loads((out / "episodes" / "e2e__libero_spatial__task0__ep0.json").read_text())
    assert rec["status"] == "complete" and rec["steps"] == 12 and len(rec["actions"]) == 12
    assert list((tmp_path / "videos").glob("e2e__libero_spatial__task0__ep0__*.mp4"))
    frames = np.load(out / "frames" / "e2e__libero_spatial__task0__ep0.npz")
    assert frames["agentview"].shape == (12, 224, 224, 3) and frames["agentview_seg"].shape == (12, 224, 224)
    queried_steps = frames["env_step"][frames["queried"]].tolist()
    assert queried_steps == [0, 5, 10]  # replan every 5 steps
    store = ActivationStore(store_dir)
    keys = store.keys("llm.layer.0.attn.probs")
    assert sorted(set(keys["env_step"].tolist())) == queried_steps  # rows keyed by the env step they came from
    assert set(keys["run_id"]) == {"e2e"} and set(keys["episode"]) == {0} and set(keys["suite"]) == {"libero_spatial"}
    resid = store.keys("llm.expert1.layer.3.resid_post")
    assert set(resid["denoise_step"]) == {9} and len(resid["run_id"]) == 3 * 10  # 3 queries x 10 action tokens
    # the executed chunk at each query is the one the server returned and recorded
    actions_rows, action_keys = store.read("policy.actions")
    for row, step in zip(actions_rows, action_keys["env_step"]):
        chunk = next(c for c in rec["chunks"] if c["env_step"] == step)
        np.testing.assert_allclose(row, np.asarray(chunk["actions"]), atol=1e-6)
    run = RecordedRun(store_dir, out)
    queries = list(run.queries())
    assert [q.env_step for q in queries] == queried_steps
    for q in queries:
        np.testing.assert_array_equal(q.frames["agentview"] if "agentview" in q.frames else q.frames["base_0_rgb"],
                                      frames["agentview"][q.frame_row])
        assert q.object_ids  # objects of interest found in the segmentation


@pytest.mark.libero
def test_fast_policy_libero_episode_records_and_scores_attention(tmp_path):
    """Pi0-FAST through the server in LIBERO: attention of every generated action token recorded per decoding
    step, joined with the frames it saw and scored by the attention-IoU analysis as Pi0's rows are."""
    from openpi.interp.recorded_iou import evaluate_run

    store_dir, out = tmp_path / "store", tmp_path / "rollouts"
    policy = create_policy("pi0_fast_tiny_spatial", record_sites=["llm.layer.*.attn.probs?reduce=heads",
                                                                  "llm.decode.layer.2.resid_post"],
                           record_dir=str(store_dir))
    assert policy.metadata["trained"]
    main = _load_main()
    with BackgroundServer(policy, port=0) as srv:
        args = main.Args(host="127.0.0.1", port=srv.port, task_ids=(0,), num_trials_per_task=1, max_steps=10,
                         num_steps_wait=2, run_id="fast", out_dir=str(out), video_out_path=str(tmp_path / "videos"),
                         save_frames=True, connect_timeout_s=60, first_trial=40)
        summary = main.main(args)
    policy.close()
    assert summary["total"]["episodes"] == 1 and summary["total"]["errors"] == 0
    store = ActivationStore(store_dir)
    keys = store.keys("llm.layer.0.attn.probs")
    p = policy.model.config.prefix_len
    np.testing.assert_array_equal(keys["token_index"], p + keys["denoise_step"])  # step s's token sits at P + s
    assert sorted(set(keys["env_step"].tolist())) == [0, 5]
    queries = list(RecordedRun(store_dir, out).queries())
    assert [q.env_step for q in queries] == [0, 5]  # the trained model wrote action tokens at both queries
    rec = json.loads((out / "episodes" / "fast__libero_spatial__task0__ep40.json").read_text())
    assert [c["fast_decode"]["action_tokens"] > 0 for c in rec["chunks"]] == [True, True]
    for q in queries:
        tab = q.table_dict
        a, b = tab["spans"]["actions"]
        assert q.steps == [s for s in range(tab["valid_steps"]) if a <= p + s < b]  # action-token steps only
    result = evaluate_run(store_dir, out, tmp_path / "iou", camera="base_0_rgb", n_boot=50)
    assert result["counts"]["queries"] == 2 and result["counts"]["episodes"] == 1
    # The residual of every executed decoding step exports for the SAE / probe scripts, each row labelled with the
    # chunk's first action (a FAST token is not one chunk row).
    from openpi.interp.export import export_site
    exp = export_site(store_dir, "llm.decode.layer.2.resid_post", tmp_path / "export", rollouts=out)
    ex_keys = np.load(tmp_path / "export" / "keys.npz")
    assert exp["rows"] == len(ex_keys["env_step"]) == sum(c["fast_decode"]["decoding_steps"] for c in rec["chunks"])
    assert (ex_keys["action_index"] == -1).all()
    labels = np.load(tmp_path / "export" / "actions.npy")
    for row, step in zip(labels, ex_keys["env_step"]):
        np.testing.assert_allclose(row, next(c["actions"][0] for c in rec["chunks"] if c["env_step"] == step),
                                   atol=1e-6)
