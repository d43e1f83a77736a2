"""Feature mining on planted rollouts: NMS top moments, actions, tasks/prompts, frames, dashboard, scripts."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from openpi.interp import join
from openpi.interp.join import JoinError
from openpi.interp.sae import data, frames, io as sae_io, mining, synthetic, tools
from openpi.interp.sae.cli import SaeInputs, ToolArgs
from openpi.shared.records import RolloutDir


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("roll")
    info = synthetic.planted_rollouts(root)
    sae = synthetic.exact_sae(info["atoms"], k=16, arch="batchtopk", threshold=0.05)  # exact codes, noise cut
    sae_io.save_sae(root / "sae", sae)
    return info, sae, root


def _brute_force_nms(val, ep, step, cfg):
    """Greedy NMS over all moments (max over rows per moment), for comparison with the streaming pool."""
    best = {}
    for v, e, s in zip(val, ep, step):
        if v > best.get((e, s), -1):
            best[(e, s)] = v
    order = sorted(best.items(), key=lambda kv: (-kv[1], kv[0][0] * 1000 + kv[0][1]))
    kept, per = [], {}
    for (e, s), v in order:
        t = per.setdefault(e, [])
        if len(t) >= cfg.max_per_episode or any(abs(s - u) < cfg.min_step_gap for u in t):
            continue
        t.append(s)
        kept.append((e, s, v))
        if len(kept) == cfg.top_n:
            break
    return kept


def test_streaming_pool_nms_equals_brute_force():
    rng = np.random.default_rng(0)
    cfg = mining.MiningConfig(top_n=5, max_per_episode=2, min_step_gap=3)
    for trial in range(5):
        n = 3000
        ep = rng.integers(0, 6, n)
        step = rng.integers(0, 40, n)
        val = np.round(rng.gamma(2.0, size=n), 3) + rng.random(n) * 1e-6
        slot = rng.integers(0, 3, n)
        pool = mining.MomentPool(3, cfg.top_n * cfg.per_episode_cap, cfg.per_episode_cap)
        for a in range(0, n, 257):  # small chunks force many compactions
            sl = slice(a, a + 257)
            pool.add(slot[sl], ep[sl] * 100 + step[sl], ep[sl], val[sl], np.arange(n)[sl])
        got = pool.per_slot()
        for s in range(3):
            m = slot == s
            want = _brute_force_nms(val[m], ep[m], step[m], cfg)
            entries = got[s]
            kept = mining.nms(entries, step[entries["pos"]], cfg)
            have = [(int(entries["ep"][i]), int(step[entries["pos"][i]]), float(entries["val"][i])) for i in kept]
            assert have == [(e, s_, pytest.approx(v)) for e, s_, v in want], (trial, s)


def test_mining_recovers_planted_features(planted):
    info, sae, root = planted
    rows = data.open_rows(info["activations"], info["keys"], rollouts=info["rollouts"])
    cfg = mining.MiningConfig(top_n=6, max_per_episode=2, min_step_gap=10, window=3)
    rep = mining.mine(sae, rows, cfg, features=[0, 1, 2], progress=False)
    by = {f["feature"]: f for f in rep["features"]}
    assert rep["n_rows"] == 12 * 40 * 2 and rep["n_episodes"] == 12
    # Feature 2 fires at the event step of every episode, strongest in later episodes; NMS keeps one per episode.
    top2 = by[2]["top"]
    assert [(t["episode"], t["env_step"]) for t in top2] == [(e, 15) for e in (11, 10, 9, 8, 7, 6)]
    assert top2[0]["activation"] == pytest.approx(3.0 * 1.55, rel=1e-3)
    assert top2[0]["stem"] == "runA__libero_goal__task2__ep11" and top2[0]["span"] == "actions"
    # Feature 1 fires only in task 1 (both suites) and with the prompt of task 1.
    tasks = by[1]["tasks"]
    assert {t["task_id"] for t in tasks[:2]} == {1} and all(t["fire_rate"] == 1.0 for t in tasks[:2])
    assert all(t["fire_rate"] == 0.0 for t in tasks[2:])
    assert by[1]["prompts"][0] == {"prompt": "open the drawer", "n_rows": 320, "fire_rate": 1.0, "mean_activation": pytest.approx(1.05, rel=1e-3)}
    # Feature 0 = relu(2 * x of the chunk action the token predicts): correlated with action dim 0 only; its top
    # moments have large x actions.
    corr = np.asarray(by[0]["actions"]["corr"])
    assert corr[0] > 0.85 and np.all(np.abs(corr[1:6]) < 0.6) and by[0]["actions"]["label"] == "predicted"
    assert by[0]["actions"]["at_top_mean"][0] > 0.7
    win = np.asarray(by[0]["actions"]["window_mean"], float)
    assert win.shape == (7, 7) and win[3, 0] == pytest.approx(by[0]["actions"]["at_top_mean"][0])
    cl = by[0]["actions"]["clusters"]
    assert sum(cl["sizes"]) == 6 and len(cl["centers"]) == 3
    # Histogram counts all non-zero activations.
    assert sum(by[1]["hist"]["counts"]) == by[1]["fire_count"] == 320
    assert by[1]["hist"]["zeros"] == rep["n_rows"] - 320


def test_mining_is_independent_of_row_order(planted, tmp_path):
    info, sae, _ = planted
    x = np.load(info["activations"])
    with np.load(info["keys"]) as z:
        keys = {k: z[k] for k in z.files}
    perm = np.random.default_rng(5).permutation(x.shape[0])
    np.save(tmp_path / "x.npy", x[perm])
    np.savez(tmp_path / "k.npz", **{k: v[perm] for k, v in keys.items()})
    cfg = mining.MiningConfig(top_n=4, chunk_rows=97)
    a = mining.mine(sae, data.open_rows(info["activations"], info["keys"]), cfg, features=[0, 2, 5], progress=False)
    b = mining.mine(sae, data.open_rows(tmp_path / "x.npy", tmp_path / "k.npz"), cfg, features=[0, 2, 5], progress=False)
    strip = lambda r: [[{k: v for k, v in t.items() if k != "row"} for t in f["top"]] for f in r["features"]]  # noqa: E731
    assert strip(a) == strip(b)
    assert [f["tasks"] for f in a["features"]] == [f["tasks"] for f in b["features"]]


def test_thumbnails_show_the_joined_frames(planted, tmp_path):
    info, sae, _ = planted
    rows = data.open_rows(info["activations"], info["keys"])
    rep = mining.mine(sae, rows, mining.MiningConfig(top_n=3), features=[2], progress=False)
    tops = {2: rep["features"][0]["top"]}
    tops[2].append({"rank": 3, "stem": "runA__libero_goal__task9__ep99", "env_step": 1})
    stats = frames.write_thumbnails(tops, RolloutDir(info["rollouts"]), tmp_path / "thumbs", tmp_path)
    assert stats["written"] == 3 and stats["missing"] == 1
    assert "task9__ep99.npz" in tops[2][3]["image_error"]
    for t in tops[2][:3]:
        img = np.asarray(Image.open(tmp_path / t["image"]))
        assert img.shape == (16, 32, 3)  # agentview | wrist side by side
        assert tuple(img[0, 0]) == (t["episode"], t["env_step"], 0)


def _tool(info, root, out, select=(), rollouts=True, **kw):
    inputs = SaeInputs(sae=root / "sae", activations=info["activations"], keys=info["keys"], select=tuple(select),
                       rollouts=info["rollouts"] if rollouts else None)
    return ToolArgs(inputs=inputs, out=out, **kw)


def test_dashboard_pages_link_to_existing_files(planted, tmp_path):
    info, sae, root = planted
    index = tools.dashboard(_tool(info, root, tmp_path / "dash", mining=mining.MiningConfig(top_n=3),
                                  features=(0, 1, 2), sort_by="max_activation"))
    html = index.read_text()
    order = [int(m) for m in re.findall(r"feature_(\d+)\.html", html)]
    assert order == [2, 0, 1]  # max activations 4.65 > 1.6 > 1.1
    pages = {p: (tmp_path / "dash" / p) for p in re.findall(r"href='([^']+)'", html)}
    assert len(pages) == 3 and all(p.is_file() for p in pages.values())
    for page in pages.values():
        text = page.read_text()
        links = re.findall(r"(?:href|src)='([^']+)'", text)
        assert links and all((page.parent / link).resolve().is_file() for link in links), page
        assert text.count("<img") >= 1 + 3  # histogram + top frames
    p1 = (tmp_path / "dash" / "features" / "feature_00001.html").read_text()
    assert "open the drawer" in p1 and "Feature 1" in p1
    rep = json.loads((tmp_path / "dash" / "mining.json").read_text())
    assert [f["feature"] for f in rep["features"]] == [0, 1, 2]


def test_scripts_write_their_outputs_and_reject_bad_input(planted, tmp_path):
    info, sae, root = planted
    cfg = mining.MiningConfig(top_n=3)
    fr = tools.top_frames(_tool(info, root, tmp_path / "f", ["action_index=0"], mining=cfg, num_features=3))
    assert fr["n_rows"] == 480 and len(fr["features"]) == 3
    assert all((tmp_path / "f" / t["image"]).is_file() for f in fr["features"] for t in f["top"])
    ac = tools.top_actions(_tool(info, root, tmp_path / "a", mining=cfg, num_features=2, sort_by="action_corr"))
    assert ac["features"][0]["feature"] == 0  # sorted by max |corr with actions|: the planted action feature
    assert (tmp_path / "a" / "top_actions.csv").read_text().splitlines()[0].startswith(
        "feature,fire_rate,max_activation,corr_dx")
    assert ac["label_rule"]["label"] == "predicted" and ac["dropped_stale_rows"] == 0
    pr = tools.top_prompts(_tool(info, root, tmp_path / "p", mining=cfg, features=(1,)))
    assert pr["features"][0]["prompts"][0]["prompt"] == "open the drawer"
    with pytest.raises(ValueError, match=r"empty selection.*values present: \{'span': \['actions'\]\}"):
        tools.top_prompts(_tool(info, root, tmp_path / "q", ["span=image"]))
    with pytest.raises(KeyError, match="unknown key column 'spam'"):
        tools.top_prompts(_tool(info, root, tmp_path / "q", ["spam=1"]))
    with pytest.raises(ValueError, match="--rollouts is required"):
        tools.top_actions(_tool(info, root, tmp_path / "q", rollouts=False))
    with pytest.raises(ValueError, match="outside the dictionary"):
        tools.top_prompts(_tool(info, root, tmp_path / "q", features=(99,)))
    bad = _tool(info, root, tmp_path / "q")
    bad.inputs.rollouts = info["episodes"]  # the episodes/ subfolder instead of the rollout folder
    with pytest.raises(JoinError, match="pass its parent"):
        tools.top_actions(bad)
    assert not (tmp_path / "q").exists()
    # Activations of the wrong width for this SAE.
    np.save(tmp_path / "narrow.npy", np.zeros((960, 5), np.float32))
    narrow = _tool(info, root, tmp_path / "q")
    narrow.inputs.activations = tmp_path / "narrow.npy"
    with pytest.raises(ValueError, match="d=5 but the SAE expects d_in=32"):
        tools.top_prompts(narrow)


def test_keys_missing_columns_are_named(planted, tmp_path):
    info, _, _ = planted
    with np.load(info["keys"]) as z:
        keys = {k: z[k] for k in z.files if k != "env_step"}
    np.savez(tmp_path / "k.npz", **keys)
    with pytest.raises(KeyError, match=r"missing key column\(s\) \['env_step'\]"):
        data.open_rows(info["activations"], tmp_path / "k.npz")


def test_row_labels_follow_the_token_not_the_step(planted, tmp_path):
    """Planted: atom 0 of token j is relu(2 * x of chunk action j). The predicted label reproduces it for every
    token; labelling token 1 with the step's first (executed) action, as before, does not."""
    info, _, _ = planted
    rows = data.open_rows(info["activations"], info["keys"], rollouts=info["rollouts"])
    y, rule = data.row_action_labels(rows, "predicted")
    code0 = info["codes"][:, 0]
    tok = rows.keys["action_index"]
    on = code0 > 0.05
    np.testing.assert_allclose(code0[on], 2 * y[on, 0], atol=1e-6)
    executed, _ = data.row_action_labels(rows, "executed")
    assert np.isnan(executed[tok == 1]).all()  # replanned every step: chunk action 1 is never executed
    np.testing.assert_allclose(executed[tok == 0], y[tok == 0])
    # the old rule: every token of a query labelled with the chunk's first action (= executed at its env step)
    old_rule = join.row_labels(rows.keys, np.full(rows.n, -1), rows.rollouts, "old rule").predicted
    assert np.abs(code0[on & (tok == 1)] - 2 * old_rule[on & (tok == 1), 0]).max() > 0.1
    assert rule["action_token_rows"] == rows.n and rule["label"] == "predicted"


def test_row_labels_need_records_and_action_index(planted, tmp_path):
    info, _, _ = planted
    with np.load(info["keys"]) as z:
        keys = {k: z[k] for k in z.files}
    np.savez(tmp_path / "no_index.npz", **{k: v for k, v in keys.items() if k != "action_index"})
    rows = data.open_rows(info["activations"], tmp_path / "no_index.npz", rollouts=info["rollouts"])
    with pytest.raises(KeyError, match="no 'action_index' column"):
        data.row_action_labels(rows, "predicted")
    keys["episode"] = np.where(keys["episode"] == 3, 99, keys["episode"])
    np.savez(tmp_path / "orphan.npz", **keys)
    with pytest.raises(JoinError, match="rows of episode runA__libero_goal__task0__ep99 have no usable episode record"):
        data.open_rows(info["activations"], tmp_path / "orphan.npz", rollouts=info["rollouts"])


def test_rows_of_two_attempts_are_refused_without_records_and_filtered_with(planted, tmp_path):
    info, _, _ = planted
    x = np.load(info["activations"])
    with np.load(info["keys"]) as z:
        keys = {k: z[k] for k in z.files}
    stale = keys["episode"] == 5
    np.save(tmp_path / "x.npy", np.concatenate([x, x[stale]]))
    np.savez(tmp_path / "k.npz", **{k: np.concatenate([v, v[stale] if k != "attempt" else
                                                       np.full(stale.sum(), "old", v.dtype)]) for k, v in keys.items()})
    with pytest.raises(JoinError, match=r"runA__libero_goal__task2__ep5: attempts \['attempt-5', 'old'\]"):
        data.open_rows(tmp_path / "x.npy", tmp_path / "k.npz")
    rows = data.open_rows(tmp_path / "x.npy", tmp_path / "k.npz", rollouts=info["rollouts"])
    assert rows.n == x.shape[0] and rows.attempts.dropped == int(stale.sum())
