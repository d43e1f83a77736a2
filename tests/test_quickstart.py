"""The quickstart: its geometry-input step on a planted export, and (slow, real LIBERO) the reduced CI run of the
same command, checking every stage and the report's files."""
from __future__ import annotations

import dataclasses
import html.parser
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from openpi import pipeline, report
from openpi.interp.export import trajectories_from_export

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_trajectories_from_export_joins_by_key(tmp_path):
    """Rows in scrambled order, two episodes of different length: each point must be the mean of exactly its
    query's rows, episodes sorted by key, the shorter one NaN-padded, success taken per episode."""
    rng = np.random.default_rng(0)
    d, tokens = 5, 3
    rows, keys, succ, expect = [], {k: [] for k in ("run_id", "suite", "task_id", "episode", "replan_index")}, [], {}
    for ep, n_q, ok in ((1, 2, 1), (0, 3, 0)):
        for q in range(n_q):
            centre = rng.normal(size=d) * 10
            expect[(ep, q)] = centre
            for t in range(tokens):
                rows.append(centre + (t - 1) * 0.5)  # token offsets -0.5, 0, +0.5 average out to the centre
                for k, v in (("run_id", "r"), ("suite", "s"), ("task_id", 0), ("episode", ep), ("replan_index", q)):
                    keys[k].append(v)
                succ.append(ok)
    perm = rng.permutation(len(rows))
    exp = tmp_path / "export"
    exp.mkdir()
    np.save(exp / "X.npy", np.asarray(rows, np.float32)[perm])
    np.savez(exp / "keys.npz", **{k: np.asarray(v)[perm] for k, v in keys.items()})
    np.save(exp / "success.npy", np.asarray(succ)[perm])
    info = trajectories_from_export(exp, tmp_path / "geo")
    T = np.load(tmp_path / "geo" / "T.npy")
    S = np.load(tmp_path / "geo" / "success.npy")
    assert T.shape == (2, 3, d)
    assert info["episodes"] == [["r", "s", 0, 0], ["r", "s", 0, 1]] and info["n_queries"] == [3, 2]
    for q in range(3):
        np.testing.assert_allclose(T[0, q], expect[(0, q)], atol=1e-5)
    for q in range(2):
        np.testing.assert_allclose(T[1, q], expect[(1, q)], atol=1e-5)
    assert np.isnan(T[1, 2]).all()
    assert S.tolist() == [False, True]


def test_trajectories_from_export_names_missing_success(tmp_path):
    exp = tmp_path / "export"
    exp.mkdir()
    np.save(exp / "X.npy", np.zeros((2, 3), np.float32))
    np.savez(exp / "keys.npz", run_id=np.array(["r", "r"]))
    with pytest.raises(FileNotFoundError, match="success.npy"):
        trajectories_from_export(exp, tmp_path / "geo")
    assert not (tmp_path / "geo").exists()


def _plan(tmp_path) -> pipeline.Plan:
    return pipeline.Plan(out=tmp_path / "qs", config="pi0_tiny_spatial", checkpoint_dir=None, suite="libero_spatial",
                         task_ids=(0, 1), first_trial=40, trials=4, max_steps=220, layer=3, port=8765)


def test_every_stage_feeds_a_report_section_and_every_section_has_a_stage(tmp_path):
    """One list for the quickstart and the report: sae_splice used to run while belonging to no section."""
    sections = {sid for sid in pipeline.SECTIONS}
    built = [fn.__name__.removeprefix("section_") for fn in report.SECTIONS]
    assert built == list(pipeline.SECTIONS)  # the report builds exactly the pipeline's sections, in its order
    for st in pipeline.STAGES:
        assert st.sections and set(st.sections) <= sections, st.name
        assert all(st.name in report.SECTION_STAGES[sec] for sec in st.sections), st.name
        assert set(st.needs) <= {s.name for s in pipeline.STAGES[:pipeline.STAGES.index(st)]}, st.name  # run order
        assert (st.command is None) != (st.inline is None), st.name
    for sec in sections:
        assert report.SECTION_STAGES[sec], sec
        assert report.SECTION_PRODUCER[sec] in report.SECTION_STAGES[sec]
    assert "sae_splice" in report.SECTION_STAGES["sae"] and "sae_dashboard" in report.SECTION_STAGES["sae"]
    # commands build for a plan, with the data path's --rollouts flag and the SAE split by episode
    plan = _plan(tmp_path)
    argv = {st.name: st.argv(plan) for st in pipeline.STAGES if st.command is not None}
    sae = argv["sae"]
    assert sae[sae.index("--keys") + 1] == str(plan.export_all_steps / "keys.npz") and "--holdout-block" not in sae
    assert "--split" not in sae  # the default: whole episodes held out
    for name in ("export_all_steps", "sae_dashboard", "action_pca", "sae_splice", "attention_iou"):
        assert argv[name][argv[name].index("--rollouts") + 1] == str(plan.rollouts), name
    assert not any(flag in a for a in argv.values() for flag in ("--episodes-dir", "--frames-dir"))
    assert argv["libero_eval"][argv["libero_eval"].index("--port") + 1] == "8765"
    assert plan.records == pipeline.RECORDS and plan.probe_sites == (plan.site,)
    probes = argv["probes"]
    assert probes[probes.index("--layer-names") + 1] == "expert1.layer3"


def test_diffusion_plan_records_and_probes_every_unet_stage(tmp_path):
    """A Diffusion Policy plan: its attention, conditioning and one block per UNet stage are recorded, the
    probes compare them input to output, each from its own export (files aligned by key order)."""
    from openpi.models.diffusion import unet
    from openpi.training.train_dp import preset

    names = [n for n, _, _ in unet.block_names(preset("dp_tiny_spatial10")[1])]
    sites = pipeline.dp_probe_sites(names)
    assert sites == ("cond.global", "unet.down.0.block.1", "unet.down.1.block.1", "unet.down.2.block.1",
                     "unet.mid.block.1", "unet.up.0.block.1", "unet.up.1.block.1")
    plan = dataclasses.replace(_plan(tmp_path), config="dp_tiny_spatial10", family="diffusion", dp_probe_sites=sites)
    assert plan.site == pipeline.DP_SAE_SITE and "enc.*.attn" in plan.records
    assert "unet.up.1.block.1?steps=-1" in plan.records and pipeline.DP_SAE_SITE in plan.records  # SAE: all steps
    probes = pipeline.stage("probes").argv(plan)
    feats = probes[probes.index("--features") + 1:probes.index("--targets")]
    assert feats == [str(plan.export_dir(s) / "X.npy") for s in sites] and len(set(feats)) == len(sites)
    assert probes[probes.index("--layer-names") + 1:probes.index("--n-folds")] == list(sites)
    splice = pipeline.stage("sae_splice").argv(plan)
    assert splice[splice.index("--site") + 1] == pipeline.DP_SAE_SITE and "dp_tiny_spatial10" in splice


class _Refs(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("href", "src") and v and not v.startswith("#")]


@pytest.mark.libero
@pytest.mark.slow
def test_quickstart_fast_end_to_end(tmp_path):
    out = tmp_path / "qs"
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "scripts/quickstart.py", "--fast", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-4000:]
    stages = json.loads((out / "stages.json").read_text())
    failed = [s["stage"] for s in stages if not s["ok"]]
    assert not failed, f"failed stages {failed}; logs in {out / 'logs'}; output tail:\n{tail}"
    assert proc.returncode == 0, tail
    assert {s["stage"] for s in stages} >= {"libero_eval", "attention_iou", "sae", "probes", "geometry", "action_pca"}
    rec = json.loads((out / "report.json").read_text())
    assert {s["id"]: s["status"] for s in rec["sections"]} == {
        k: "ok" for k in ("evaluation", "attention", "sae", "probes", "geometry", "pca", "overview")}
    parser = _Refs()
    parser.feed((out / "index.html").read_text())
    assert len(parser.refs) > 20
    for r in parser.refs:
        assert (out / r).is_file(), f"index.html links {r}, which does not exist"
    results = json.loads(next((out / "rollouts" / "results").glob("*.json")).read_text())
    assert results["total"]["episodes"] == 3
    assert list((out / "attention" / "overlays").rglob("*.png")), "no attention overlays"
    assert "vla-interp report" in proc.stdout and "SAE: held-out FVU" in proc.stdout

    # The same report for the embedded Diffusion Policy, compared with the Pi0 run above on the same episodes.
    dp_out = tmp_path / "qs_dp"
    proc = subprocess.run([sys.executable, "scripts/quickstart.py", "--fast", "--policy", "dp", "--out", str(dp_out),
                           "--compare-with", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    stages = {s["stage"] for s in json.loads((dp_out / "stages.json").read_text())}
    assert {"attention_iou", "sae", "sae_splice", "probes", "geometry"} <= stages
    splice = json.loads((dp_out / "sae" / "splice.json").read_text())
    assert splice["site"] == "unet.mid.block.1" and splice["tokens"] == "all" and splice["n_observations"] > 0
    rec = json.loads((dp_out / "report.json").read_text())
    assert {s["id"]: s["status"] for s in rec["sections"]} == {
        k: "ok" for k in ("evaluation", "attention", "sae", "probes", "geometry", "pca", "comparison", "overview")}
    comparison = json.loads((dp_out / "comparison.json").read_text())
    assert comparison["same_episodes"] and [p["model"] for p in comparison["policies"]] == ["diffusion", "pi0"]
    probes = json.loads((dp_out / "probes" / "probe_results.json").read_text())
    assert [L["layer"] for L in probes["layers"]][:2] == ["cond.global", "unet.down.0.block.1"]
    assert "keypoints" in next(s for s in rec["sections"] if s["id"] == "attention")["title"]  # DP wording
