"""Store -> plain arrays: targets joined from rollout records by key (rows deliberately out of order), action-token
labels (token j of the chunk predicted at t is labelled with chunk action j), attempts, and atomic output folders."""

import numpy as np
import pytest

from openpi.interp import export as export_mod
from openpi.interp.export import export_site
from openpi.interp.join import JoinError
from openpi.interp.store import StoreError, StoreWriter
from openpi.shared.records import EpisodeKey, EpisodeRecord

KEY = {"run_id": "r", "suite": "libero_spatial", "task_id": 1}
TABLE = {"seq_len": 12, "prefix_len": 5, "grid": [1, 1], "spans": {"state": [5, 6], "actions": [6, 12]}}
H, REPLAN = 6, 4


def _write_record(root, episode, steps, success, chunks, actions, attempt="a1"):
    rec = EpisodeRecord(key=EpisodeKey(episode=episode, **KEY), attempt=attempt, success=success, status="complete",
                        steps=steps, actions=np.asarray(actions, float), states=np.arange(steps)[:, None] * np.ones(8),
                        chunks=[], prompt=f"task {episode}", original_prompt=f"task {episode}", raw={})
    rec = EpisodeRecord.from_json(rec.to_json() | {"chunks": chunks})
    path = root / "roll" / "episodes" / f"{rec.key.stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rec.write(path)


def _episode(tmp_path, episode, steps, success):
    """Queries at env steps 0, 3, 6, ...; chunk action 0 of the query at s is [episode, s, ...] = executed at s."""
    chunks, actions = [], []
    for q, s in enumerate(range(0, steps, 3)):
        chunk = [[episode, s + i, 0, 0, 0, 0, 1 if (s + i) % 2 else -1] for i in range(3)]
        chunks.append({"env_step": s, "replan_index": q, "actions": chunk})
        actions += chunk[:min(3, steps - s)]
    _write_record(tmp_path, episode, steps, success, chunks, actions)


def _row_keys(episode, step, **kw):
    return {**KEY, "episode": episode, "attempt": "a1", "env_step": step, "replan_index": step // 3,
            "denoise_step": 9, "token_index": -1, "span": "", "span_table": 0} | kw


def test_export_joins_targets_by_key(tmp_path):
    _episode(tmp_path, 0, 12, True)
    _episode(tmp_path, 1, 12, False)
    rng = np.random.default_rng(0)
    with StoreWriter(tmp_path / "store", {"m": 1}, writer_id="w", shard_rows=5) as w:
        for episode, step in rng.permutation([(e, s) for e in (0, 1) for s in range(0, 12, 3)]):
            w.add_span_table({})
            w.add("site", np.array([[episode * 1000 + step, 0.5]], np.float32), _row_keys(episode, step))
            w.commit()
    summary = export_site(tmp_path / "store", "site", tmp_path / "out", rollouts=tmp_path / "roll")
    assert summary["rows"] == 8 and summary["episodes"] == 2
    x = np.load(tmp_path / "out" / "X.npy")
    actions = np.load(tmp_path / "out" / "actions.npy")
    np.testing.assert_array_equal(x[:, 0], actions[:, 0] * 1000 + actions[:, 1])  # the right action for each row
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "states.npy")[:, 0], actions[:, 1])
    success = np.load(tmp_path / "out" / "success.npy")
    np.testing.assert_array_equal(success, (actions[:, 0] == 0).astype(int))
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "gripper_closed.npy"), (actions[:, 1] % 2).astype(int))
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "executed_actions.npy"), actions)  # j = 0: same step
    groups = np.load(tmp_path / "out" / "groups.npy")
    assert len(set(zip(groups, actions[:, 0]))) == 2
    assert summary["label_rule"]["query_rows"] == 8 and summary["attempts"]["dropped_stale_rows"] == 0


def test_export_errors_on_unmatched_rows(tmp_path):
    _episode(tmp_path, 0, 4, True)
    with StoreWriter(tmp_path / "store", {"m": 1}, writer_id="w") as w:
        w.add_span_table({})
        w.add("site", np.zeros((1, 2), np.float32), _row_keys(5, 0))
    with pytest.raises(JoinError, match="rows of episode r__libero_spatial__task1__ep5 have no usable episode record"):
        export_site(tmp_path / "store", "site", tmp_path / "out", rollouts=tmp_path / "roll")
    with pytest.raises(StoreError, match=r"match \{'episode': 99\}.*values present: \{'episode': \[5\]\}"):
        export_site(tmp_path / "store", "site", tmp_path / "out2", where={"episode": 99})
    with pytest.raises(StoreError, match=r"site 'nope' is not in store .* stored sites: \['site'\]"):
        export_site(tmp_path / "store", "nope", tmp_path / "out3")
    with pytest.raises(JoinError, match="pass its parent"):
        export_site(tmp_path / "store", "site", tmp_path / "out4", rollouts=tmp_path / "roll" / "episodes")
    assert not any((tmp_path / f"out{i}").exists() for i in ("", 2, 3, 4))


def _token_run(tmp_path, order_seed, steps=10):
    """Action-token rows of every query: X encodes (episode, env step, j); chunk action j of the query at t is
    [episode, t, j, random...], so a right label reproduces X and a first-action label does not."""
    rng = np.random.default_rng(7)
    truth = {}
    for ep in (0, 1):
        chunks, actions = [], []
        for q, t in enumerate(range(0, steps, REPLAN)):
            chunk = np.concatenate([np.stack([np.full(H, ep), np.full(H, t), np.arange(H)], 1),
                                    rng.normal(size=(H, 4))], 1)
            chunks.append({"env_step": t, "replan_index": q, "actions": chunk.tolist()})
            actions += chunk[:min(REPLAN, steps - t)].tolist()
            truth[(ep, t)] = chunk
        _write_record(tmp_path, ep, steps, ep == 0, chunks, actions)
    rows = [(ep, t, tok) for ep in (0, 1) for t in range(0, steps, REPLAN) for tok in range(5, 12)]  # state + H
    order = np.random.default_rng(order_seed).permutation(len(rows))
    with StoreWriter(tmp_path / "store", {"m": 1}, writer_id="w", shard_rows=9) as w:
        for i in order:
            ep, t, tok = rows[i]
            w.add_span_table(TABLE)
            w.add("resid", np.array([[ep, t, tok - 6]], np.float32),
                  _row_keys(ep, t, replan_index=t // REPLAN, token_index=tok, span="actions"))
            w.commit()
    return truth


@pytest.mark.parametrize("order_seed", [0, 1])
def test_action_token_j_is_labelled_with_chunk_action_j(tmp_path, order_seed):
    truth = _token_run(tmp_path, order_seed)
    summary = export_site(tmp_path / "store", "resid", tmp_path / "out", rollouts=tmp_path / "roll")
    out = tmp_path / "out"
    x, pred = np.load(out / "X.npy"), np.load(out / "actions.npy")
    executed, valid = np.load(out / "executed_actions.npy"), np.load(out / "executed_valid.npy")
    keys = np.load(out / "keys.npz")
    j = keys["action_index"]
    np.testing.assert_array_equal(j, np.where(x[:, 2] >= 0, x[:, 2], -1))  # from token_index and the span table
    for i in range(len(x)):
        ep, t = int(x[i, 0]), int(x[i, 1])
        chunk = truth[(ep, t)]
        np.testing.assert_allclose(pred[i], chunk[max(j[i], 0)], atol=1e-6)  # state token: the query's action 0
        jj = max(j[i], 0)
        assert valid[i] == (jj < REPLAN and t + jj < 10)  # replanned after 4 actions; the episode ends at 10
        if valid[i]:
            np.testing.assert_allclose(executed[i], chunk[jj], atol=1e-6)
        else:
            assert np.isnan(executed[i]).all()
    rule = summary["label_rule"]
    assert rule["action_token_rows"] == 2 * 3 * H and rule["query_rows"] == 2 * 3  # the state tokens
    assert rule["executed_valid_rows"] == int(valid.sum()) == 2 * (4 + 4 + 2) + 6


def test_rows_are_exported_in_key_order_whatever_order_the_store_received_them(tmp_path):
    """Two evaluation workers interleave their requests differently from run to run: the export must not carry
    that arrival order into the analyses (which shuffle, split and bootstrap rows)."""
    outs = []
    for seed in (0, 1):
        root = tmp_path / str(seed)
        root.mkdir()
        _token_run(root, order_seed=seed)
        export_site(root / "store", "resid", root / "out", rollouts=root / "roll")
        outs.append(root / "out")
    for name in ("X.npy", "actions.npy", "executed_actions.npy", "groups.npy", "task_id.npy"):
        np.testing.assert_array_equal(np.load(outs[0] / name), np.load(outs[1] / name), err_msg=name)
    keys = [np.load(o / "keys.npz") for o in outs]
    for col in keys[0].files:
        np.testing.assert_array_equal(keys[0][col], keys[1][col], err_msg=col)
    ep, step, tok = keys[0]["episode"], keys[0]["env_step"], keys[0]["token_index"]
    assert np.all(np.diff(ep * 10**6 + step * 10**3 + tok) > 0)  # episode, then env step, then token


def test_failed_export_leaves_the_previous_folder_untouched(tmp_path, monkeypatch):
    _token_run(tmp_path, 0)
    export_site(tmp_path / "store", "resid", tmp_path / "out", rollouts=tmp_path / "roll")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}

    def boom(plan, tmp):
        assert (tmp / "X.npy").is_file()  # the new X.npy is already written (in the temporary folder)
        raise OSError("disk full while writing targets")

    monkeypatch.setattr(export_mod, "_write_targets", boom)
    with pytest.raises(OSError, match="disk full"):
        export_site(tmp_path / "store", "resid", tmp_path / "out", rollouts=tmp_path / "roll",
                    where={"episode": [0]})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "roll", "store"]  # no temporary left
    # an input that fails its check: refused before anything is written
    (tmp_path / "empty_roll" / "episodes").mkdir(parents=True)
    with pytest.raises(JoinError, match="no usable episode record"):
        export_site(tmp_path / "store", "resid", tmp_path / "out", rollouts=tmp_path / "empty_roll")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before


def test_export_keeps_only_the_attempt_that_wrote_the_record(tmp_path):
    """Rows of a first attempt (stale, encoded -1) stay in the store under the same keys; the export keeps the
    rows of the attempt named in the record, and without records refuses the ambiguity."""
    _episode(tmp_path, 0, 6, True)
    with StoreWriter(tmp_path / "store", {"m": 1}, writer_id="w") as w:
        for attempt, value in (("a0", -1.0), ("a1", 1.0)):
            for step in (0, 3):
                w.add_span_table({})
                w.add("site", np.array([[value]], np.float32), _row_keys(0, step, attempt=attempt))
    summary = export_site(tmp_path / "store", "site", tmp_path / "out", rollouts=tmp_path / "roll")
    assert summary["rows"] == 2 and (np.load(tmp_path / "out" / "X.npy") == 1.0).all()
    assert summary["attempts"]["dropped_stale_rows"] == 2
    assert summary["attempts"]["stale_rows_by_episode"] == {"r__libero_spatial__task1__ep0": {"a0": 2}}
    assert set(np.load(tmp_path / "out" / "keys.npz")["attempt"]) == {"a1"}
    with pytest.raises(JoinError, match=r"r__libero_spatial__task1__ep0: attempts \['a0', 'a1'\]"):
        export_site(tmp_path / "store", "site", tmp_path / "out_plain")
    assert not (tmp_path / "out_plain").exists()


class _ReplyLost:
    """Transport test double around a real policy: once, the server answers (and records the rows) but the reply
    never reaches the client, which ends the episode on a policy error, as a dropped connection does."""

    def __init__(self, policy, episode: int, replan_index: int) -> None:
        self.policy, self.fail_at = policy, (episode, replan_index)

    def infer(self, obs: dict) -> dict:
        reply = self.policy.infer(obs)
        if (obs["meta/episode"], obs["meta/replan_index"]) == self.fail_at:
            self.fail_at = None
            raise ConnectionError("connection lost before the reply arrived")
        return reply


@pytest.mark.libero
def test_resumed_run_exports_only_the_final_attempt(env, tmp_path):
    """The retry path end to end: a real tiny policy records through Policy.infer + StoreRecorder, episode 1 fails
    on its third query, the resumed client reruns it. The store then holds 9 queries of rows for 6 answered
    queries of the final attempts; the export keeps exactly those 6 x 10 action-token rows."""
    from openpi.envs import rollout
    from openpi.interp.store import ActivationStore
    from openpi.policies.policy_config import create_policy
    from openpi.shared.records import RolloutDir

    site = "llm.expert1.layer.3.resid_post"
    policy = create_policy("pi0_tiny_spatial", record_sites=[f"{site}?tokens=actions&steps=-1"],
                           record_dir=str(tmp_path / "store"))
    cfg = rollout.RolloutConfig(run_id="retry", out_dir=tmp_path / "roll", video_dir=tmp_path / "videos",
                                max_steps=9, settle_steps=1, replan_steps=3, save_video=False,
                                render_every_step=False)
    plan = rollout.plan_episodes("libero_spatial", [0], 2)
    client = _ReplyLost(policy, episode=1, replan_index=2)
    first = rollout.evaluate(cfg, client, plan, env_factory=lambda *a: env, close_envs=False, progress=False)
    assert first["total"]["errors"] == 1
    rollout.evaluate(cfg, client, plan, env_factory=lambda *a: env, close_envs=False, progress=False)  # resume
    policy.close()
    records = {r.key.episode: r for r in RolloutDir(tmp_path / "roll").records()}
    assert all(r.status == "complete" and len(r.chunks) == 3 for r in records.values())
    stored = ActivationStore(tmp_path / "store").keys(site)
    assert len(stored["run_id"]) == 9 * 10  # 3 + 3 (stale) + 3 queries x 10 action tokens
    summary = export_site(tmp_path / "store", site, tmp_path / "out", rollouts=tmp_path / "roll")
    keys = np.load(tmp_path / "out" / "keys.npz")
    assert summary["rows"] == 6 * 10 and summary["attempts"]["dropped_stale_rows"] == 3 * 10
    for ep, rec in records.items():
        rows = keys["episode"] == ep
        assert set(keys["attempt"][rows]) == {rec.attempt} and rows.sum() == 30
        assert sorted(set(keys["env_step"][rows].tolist())) == [0, 3, 6]
    pred = np.load(tmp_path / "out" / "actions.npy")
    for i in np.flatnonzero(keys["episode"] == 1):  # labels come from the final attempt's chunks
        np.testing.assert_allclose(pred[i], records[1].predicted_action(keys["env_step"][i], keys["action_index"][i]),
                                   atol=1e-6)
    with pytest.raises(JoinError, match=r"retry__libero_spatial__task0__ep1: attempts \["):
        export_site(tmp_path / "store", site, tmp_path / "out_without_records")
