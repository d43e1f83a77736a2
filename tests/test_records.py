"""The one record schema: episode keys and stems, typed episode records, rollout folders."""
import numpy as np
import pytest

from openpi.shared.records import (EpisodeKey, EpisodeRecord, RecordError, RolloutDir, episode_keys_of_rows,
                                   validate_run_id)


def _record(**over):
    rec = {"schema": "vla-interp/libero-episode/1", "run_id": "r1", "suite": "libero_spatial", "task_id": 2,
           "episode": 41, "attempt": "a1", "success": True, "status": "complete", "steps": 3,
           "prompt": "pick", "actions": np.arange(21.0).reshape(3, 7).tolist(), "states": np.zeros((3, 8)).tolist(),
           "chunks": [{"env_step": 0, "replan_index": 0, "actions": (np.arange(70.0).reshape(10, 7) + 100).tolist()}]}
    rec.update(over)
    return rec


def test_key_stem_round_trip_and_run_id_rules():
    key = EpisodeKey("pi05-x_1", "libero_10", 3, 12)
    assert key.stem == "pi05-x_1__libero_10__task3__ep12" and EpisodeKey.from_stem(key.stem) == key
    with pytest.raises(ValueError, match="run_id"):
        validate_run_id("a__b")
    with pytest.raises(RecordError, match="not an episode stem"):
        EpisodeKey.from_stem("nothing")


def test_row_episode_ids_follow_keys_not_positions():
    keys = {"run_id": np.array(["b", "a", "b", "a"]), "suite": np.array(["s"] * 4), "task_id": np.array([0, 1, 0, 1]),
            "episode": np.array([5, 5, 5, 6])}
    ids, found = episode_keys_of_rows(keys)
    assert found == sorted(found) and [found[i].run_id for i in ids] == ["b", "a", "b", "a"]
    assert ids[0] == ids[2] and ids[1] != ids[3]


def test_episode_record_labels_token_j_with_chunk_action_j(tmp_path):
    rec = EpisodeRecord.from_json(_record())
    np.testing.assert_array_equal(rec.predicted_action(0, 4), np.arange(28.0, 35.0) + 100)
    np.testing.assert_array_equal(rec.executed_action(2), np.arange(14.0, 21.0))
    assert rec.executed_action(3) is None
    with pytest.raises(RecordError, match="no chunk was returned at env_step 1"):
        rec.predicted_action(1, 0)
    path = tmp_path / "episodes" / f"{rec.key.stem}.json"
    path.parent.mkdir()
    rec.write(path)
    back = RolloutDir(tmp_path).record(rec.key)
    assert back.attempt == "a1" and back.key == rec.key and back.chunks[0].actions.shape == (10, 7)


@pytest.mark.parametrize("bad, match", [({"actions": [[1.0, 2.0]]}, r"'actions' has shape \(1, 2\)"),
                                        ({"task_id": "x"}, "task_id|invalid literal"),
                                        ({"schema": "other/1"}, "schema 'other/1'"),
                                        ({"chunks": [{"env_step": 0}]}, r"chunks\[0\] is malformed")])
def test_bad_records_name_the_field(bad, match):
    with pytest.raises(RecordError, match=match):
        EpisodeRecord.from_json(_record(**bad), "ep.json")


def test_rollout_dir_refuses_the_episodes_folder_itself_with_a_hint(tmp_path):
    (tmp_path / "episodes").mkdir()
    with pytest.raises(RecordError, match="pass its parent"):
        RolloutDir(tmp_path / "episodes")
    rd = RolloutDir(tmp_path)
    assert rd.keys() == []
    with pytest.raises(RecordError, match="has no record"):
        rd.record(EpisodeKey("r", "s", 0, 0))
