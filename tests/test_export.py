"""Store -> plain arrays, with targets joined from rollout records by key (rows deliberately out of order)."""
import json

import numpy as np
import pytest

from openpi.interp.export import export_site
from openpi.interp.store import StoreWriter


def _episode(tmp_path, episode, steps, success):
    rec = {"run_id": "r", "suite": "libero_spatial", "task_id": 1, "episode": episode, "prompt": f"task {episode}",
           "success": success, "actions": [[episode, s, 0, 0, 0, 0, 1 if s % 2 else -1] for s in range(steps)],
           "states": [[s] * 8 for s in range(steps)]}
    (tmp_path / "roll" / "episodes").mkdir(parents=True, exist_ok=True)
    (tmp_path / "roll" / "episodes" / f"r__libero_spatial__task1__ep{episode}.json").write_text(json.dumps(rec))


def test_export_joins_targets_by_key(tmp_path):
    _episode(tmp_path, 0, 12, True)
    _episode(tmp_path, 1, 12, False)
    rng = np.random.default_rng(0)
    with StoreWriter(tmp_path / "store", {"m": 1}, writer_id="w", shard_rows=5) as w:
        for episode, step in rng.permutation([(e, s) for e in (0, 1) for s in range(0, 12, 3)]):
            w.add_span_table({})
            w.add("site", np.array([[episode * 1000 + step, 0.5]], np.float32),
                  {"run_id": "r", "suite": "libero_spatial", "task_id": 1, "episode": episode, "env_step": step,
                   "replan_index": step // 3, "denoise_step": 9, "token_index": -1, "span": "", "span_table": 0})
            w.commit()
    summary = export_site(tmp_path / "store", "site", tmp_path / "out", episodes_dir=tmp_path / "roll")
    assert summary["rows"] == 8 and summary["episodes"] == 2
    x = np.load(tmp_path / "out" / "X.npy")
    actions = np.load(tmp_path / "out" / "actions.npy")
    np.testing.assert_array_equal(x[:, 0], actions[:, 0] * 1000 + actions[:, 1])  # the right action for each row
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "states.npy")[:, 0], actions[:, 1])
    success = np.load(tmp_path / "out" / "success.npy")
    np.testing.assert_array_equal(success, (actions[:, 0] == 0).astype(int))
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "gripper_closed.npy"), (actions[:, 1] % 2).astype(int))
    groups = np.load(tmp_path / "out" / "groups.npy")
    assert len(set(zip(groups, actions[:, 0]))) == 2


def test_export_errors_on_unmatched_rows(tmp_path):
    _episode(tmp_path, 0, 4, True)
    with StoreWriter(tmp_path / "store", {"m": 1}, writer_id="w") as w:
        w.add_span_table({})
        w.add("site", np.zeros((1, 2), np.float32), {"run_id": "r", "suite": "libero_spatial", "task_id": 1,
                                                      "episode": 5, "env_step": 0, "replan_index": 0,
                                                      "denoise_step": 9, "token_index": -1, "span": "",
                                                      "span_table": 0})
    with pytest.raises(KeyError, match="no episode record"):
        export_site(tmp_path / "store", "site", tmp_path / "out", episodes_dir=tmp_path / "roll")
    with pytest.raises(ValueError, match="no rows"):
        export_site(tmp_path / "store", "site", tmp_path / "out2", where={"episode": 99})
