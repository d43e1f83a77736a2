"""The quickstart report on a synthetic output folder: every section, captions, resolvable links, failure
explanations, and a real render in headless Chromium (the screenshot must not be blank)."""
from __future__ import annotations

import html.parser
import json
import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from openpi import report

os.environ.setdefault("MPLBACKEND", "Agg")

STAGES = ["libero_eval", "attention_iou", "export_all_steps", "sae", "export_last_step", "probes", "geometry_input",
          "geometry", "action_pca"]


def _png(path: pathlib.Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((60, 90, 3), 255, np.uint8)
    img[10:50, 10:80] = rng.integers(0, 255, 3, dtype=np.uint8)  # a coloured block: visible, not blank
    Image.fromarray(img).save(path)


def _json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _ci(mean: float) -> dict:
    return {"mean": mean, "ci_low": mean - 0.01, "ci_high": mean + 0.01, "n": 3}


def make_output(root: pathlib.Path, failed: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> pathlib.Path:
    """A small quickstart-shaped folder. ``failed`` stages are marked failed and their outputs left out;
    ``skip`` stages are absent from stages.json and their outputs left out."""
    out = root / "qs"
    (out / "logs").mkdir(parents=True)
    stages = []
    for s in STAGES:
        if s in skip:
            continue
        (out / "logs" / f"{s}.log").write_text(f"log of {s}\n")
        stages.append({"stage": s, "ok": s not in failed, "seconds": 1.5, "log": f"logs/{s}.log"})
    _json(out / "stages.json", stages)
    gone = set(failed) | set(skip)
    _json(out / "rollouts/runs/demo.json", {"run_id": "demo", "suite": "libero_spatial",
                                            "settings": {"seed": 7, "max_steps": 15, "replan_steps": 5},
                                            "server_metadata": {"config": "pi0_tiny", "model": "pi0", "trained": False,
                                                                "action_horizon": 10, "recording": ["llm.layer.*.attn.probs"],
                                                                "warning": "untrained: seeded random weights"}})
    if "libero_eval" not in gone:
        _json(out / "rollouts/results/demo.json", {
            "run_id": "demo", "suites": {"libero_spatial": {"episodes": 4, "successes": 1, "errors": 0, "success_rate": 0.25,
                                                            "tasks": {"0": {"prompt": "put the bowl on the plate", "episodes": 4,
                                                                            "successes": 1, "errors": 0, "success_rate": 0.25}}}},
            "total": {"episodes": 4, "successes": 1, "errors": 0, "success_rate": 0.25}, "missing_episodes": 0})
        import imageio.v2 as imageio

        (out / "videos").mkdir()
        frames = [np.full((32, 64, 3), 40 * i, np.uint8) for i in range(4)]
        imageio.mimwrite(out / "videos" / "demo__libero_spatial__task0__ep0__success.mp4", frames, fps=5)
    if "attention_iou" not in gone:
        att = out / "attention"
        _json(att / "episodes/demo__libero_spatial__task0__ep0.json",
              {"settings": {"camera": "base_0_rgb", "layers": [0, 1], "denoise_steps": None}})
        for i in range(6):
            _png(att / "overlays/demo__libero_spatial__task0__ep0" / f"s{5 * i}.png", i)
        _png(att / "evolution.png", 10)
        _png(att / "modality_evolution.png", 11)
        group = {"n_episodes": 3, "n_queries": 24, "iou_topk": _ci(0.4321), "uniform_iou_topk": _ci(0.0159),
                 "center_bias_iou_topk": _ci(0.0277), "soft_mass": _ci(0.2), "pointing_accuracy": _ci(0.5),
                 "visual_fraction": _ci(0.9)}
        _json(att / "summary.json", {
            "success_vs_failure": {"demo": {"success": {"n_episodes": 0, "n_queries": 0}, "failure": group}},
            "modality": {"demo": {"visual": 0.91, "instruction": 0.05,
                                  "by_phase": {"early": {"n_queries": 9, "visual": 0.9, "instruction": 0.06,
                                                         "visual_linguistic_ratio": 15.0}}}},
            "warnings": ["synthetic warning"]})
        cols = ["run_id", "prompt_mode", "suite", "task_id", "layer", "n_episodes", "n_queries", "success_rate", "iou_topk",
                "iou_topk_ci_low", "iou_topk_ci_high", "soft_mass", "soft_mass_ci_low", "soft_mass_ci_high",
                "pointing_accuracy", "iou_percentile", "uniform_iou_topk", "center_bias_iou_topk", "visual_fraction",
                "instruction_fraction"]
        row = ["demo", "original", "libero_spatial", "all", "mean", "3", "24", "0.0", "0.4321", "0.4", "0.46", "0.2",
               "0.19", "0.21", "0.5", "0.1", "0.0159", "0.0277", "0.9", "0.05"]
        (att / "summary_suites.csv").write_text(",".join(cols) + "\n" + ",".join(row) + "\n")
        (att / "summary_tasks.csv").write_text(",".join(cols) + "\n")
    if "sae" not in gone:
        _json(out / "sae/metrics.json", {"arch": "topk", "d_in": 64, "d_sae": 128, "k": 8, "steps": 200, "n_train_rows": 800,
                                          "held_out": {"fvu": 0.2468, "fvu_formula": "sum||x-x_hat||^2 / sum||x-mean||^2",
                                                       "l0": 8.0, "dead_fraction": 0.125, "dense_fraction": 0.0,
                                                       "dense_threshold": 0.1, "mse_per_row": 1.0, "n_rows": 64},
                                          "source": {"shape": [864, 64]}})
        _png(out / "sae/training_curves.png", 12)
        (out / "sae/dashboard").mkdir()
        (out / "sae/dashboard/index.html").write_text("<html><body>dashboard</body></html>")
    if "probes" not in gone:
        layer = {"layer": "L3", "n_features": 64, "cv": {"r2_mean_at_best": 0.31, "best_alpha": 10.0, "alpha_at_boundary": False},
                 "train": {"r2_mean": 0.5}, "test": {"r2_mean": 0.2875, "r2_per_dim": [0.1, 0.2]},
                 "baselines": {"shuffled": {"r2_mean": -0.1357, "r2_mean_sd": 0.05, "r2_per_dim": [-0.1, -0.2]},
                               "random_features": {"r2_mean": -0.2468, "r2_per_dim": [-0.2, -0.3]}}}
        _json(out / "probes/probe_results.json", {"target_kind": "regression", "target_names": ["dx", "dy"],
                                                   "split": {"n_groups": 4, "n_folds": 2, "n_test_groups": 1},
                                                   "best_layer": "L3", "layers": [layer], "test": layer["test"],
                                                   "baselines": layer["baselines"]})
        for i, n in enumerate(["r2_vs_layer.png", "cv_curves.png", "r2_per_dim.png"]):
            _png(out / "probes" / n, 20 + i)
    if "geometry" not in gone:
        stat = {"mean": 1.5, "ci95": [1.2, 1.8]}
        _json(out / "geometry/geometry.json", {"input": {"shape": [3, 4, 64], "axes": ["query"]},
                                               "analyses": [{"along": "query", "per": None, "groups": {
                                                   "all": {"n_trajectories": 3, "step_distance": stat,
                                                           "relative_step_distance": stat,
                                                           "curvature_deg": {"mean": 97.25, "ci95": [90.0, 100.0]}}}}]})
        _png(out / "geometry/query_profiles.png", 30)
    if "action_pca" not in gone:
        _json(out / "pca/action_pca.json", {"n_rows": 45, "n_episodes": 3, "standardized": True, "dim_names": list("abcdefg"),
                                             "explained_variance_ratio": [0.5, 0.3, 0.2], "n_components_90": 3,
                                             "cumulative_explained_variance_ratio": [0.5, 0.8, 1.0], "constant_dims": []})
        for i, n in enumerate(["explained_variance.png", "trajectories_pc.png", "pca2d_by_task.png"]):
            _png(out / "pca" / n, 40 + i)
    return out


class _Collector(html.parser.HTMLParser):
    """Collects every href/src and checks that every <img>/<video> sits in a <figure> with a caption."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.img_src: list[str] = []
        self.stack: list[str] = []
        self.media_outside_figure: list[str] = []
        self.figures: list[dict] = []
        self.in_caption = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("href", "src"):
            if a.get(k):
                self.refs.append(a[k])
        if tag == "figure":
            self.figures.append({"media": 0, "caption": ""})
        if tag == "img":
            self.img_src.append(a.get("src", ""))
        if tag in ("img", "video"):
            if "figure" not in self.stack:
                self.media_outside_figure.append(a.get("src", "?"))
            else:
                self.figures[-1]["media"] += 1
        if tag == "figcaption":
            self.in_caption = True
        if tag not in ("img", "br", "meta", "source"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self.in_caption = False
        if tag in self.stack:
            while self.stack.pop() != tag:
                pass

    def handle_data(self, data):
        if self.in_caption and self.figures:
            self.figures[-1]["caption"] += data


def _parse(out: pathlib.Path) -> tuple[str, _Collector]:
    page = (out / "index.html").read_text()
    c = _Collector()
    c.feed(page)
    return page, c


def _section_html(page: str, sid: str) -> str:
    m = re.search(rf"<h2 id='{sid}'>(.*?)(?=<h2 id=)", page, re.S)
    assert m, f"section {sid} not in page"
    return m.group(1)


def test_all_sections_captions_and_links(tmp_path):
    out = make_output(tmp_path)
    index = report.write_report(out)
    assert index == out / "index.html"
    page, c = _parse(out)
    rec = json.loads((out / "report.json").read_text())
    assert rec["schema"] == report.SCHEMA
    status = {s["id"]: s["status"] for s in rec["sections"]}
    assert status == {k: "ok" for k in ("evaluation", "attention", "sae", "probes", "geometry", "pca", "overview")}
    # every link and source resolves to an existing file inside the folder
    files = [r for r in c.refs if not r.startswith("#")]
    assert files, "no links at all"
    for r in files:
        assert not r.startswith(("/", "file:", "http")), f"non-relative link {r}"
        assert (out / r).is_file(), f"dangling link {r}"
    # every figure and video is captioned with an explanation, none floats without a caption
    assert not c.media_outside_figure
    assert len(c.figures) >= 12
    for f in c.figures:
        assert f["media"] == 1 and len(f["caption"]) > 60, f
    # overlays: a few (4 of 6), and the dashboard, every PNG of the PCA folder, the video
    overlays = [r for r in c.img_src if "/overlays/" in r]
    assert [pathlib.Path(r).stem for r in overlays] == ["s0", "s10", "s15", "s25"]  # spread over the episode, in order
    assert "sae/dashboard/index.html" in files
    assert "videos/demo__libero_spatial__task0__ep0__success.mp4" in files
    # numbers with their baselines and the formulas a reader needs
    att = _section_html(page, "attention")
    assert "0.432" in att and "0.016" in att and "0.028" in att and "uniform" in att and "centre-bias" in att
    assert "0.422, 0.442" in att  # CI of the failure group's IoU top-k
    sae = _section_html(page, "sae")
    assert "FVU = " in sae and "0.247" in sae
    probes = _section_html(page, "probes")
    assert "0.287" in probes and "-0.136" in probes and "-0.247" in probes and "R&sup2; = 1 -" in probes
    evaluation = _section_html(page, "evaluation")
    lo, hi = report.wilson_interval(1, 4)
    assert f"0.25 [{lo:.2f}, {hi:.2f}]" in evaluation
    assert "Untrained policy" in page
    # every metric file is listed somewhere (All files)
    for p in out.rglob("*"):
        if p.is_file() and p.suffix in (".png", ".json", ".csv", ".mp4", ".log") and p.name != "report.json":
            assert p.relative_to(out).as_posix() in files, f"{p} not linked"


def test_failed_and_missing_sections_explain_why(tmp_path, capsys):
    out = make_output(tmp_path, failed=("probes",), skip=("geometry_input", "geometry"))
    report.write_report(out)
    page, c = _parse(out)
    rec = {s["id"]: s for s in json.loads((out / "report.json").read_text())["sections"]}
    assert rec["probes"]["status"] == "failed" and "probes" in rec["probes"]["reason"]
    assert "logs/probes.log" in rec["probes"]["links"]
    probes = _section_html(page, "probes")
    assert "href='logs/probes.log'" in probes and "failed" in probes
    assert rec["geometry"]["status"] == "missing" and "not run" in rec["geometry"]["reason"]
    assert "geometry.py" in _section_html(page, "geometry")
    assert rec["sae"]["status"] == "ok"
    for r in c.refs:
        assert r.startswith("#") or (out / r).is_file(), r
    report.print_summary(out)
    printed = capsys.readouterr().out
    assert "FAILED: probes" in printed and "section geometry: missing" in printed
    assert "SAE: held-out FVU 0.247" in printed


def test_failed_stage_with_output_from_earlier_run_still_flags(tmp_path):
    """A stage that failed this time must not hide behind an old output: the SAE metrics exist but the
    dashboard stage failed -> the dashboard note links the failing log."""
    out = make_output(tmp_path)
    shutil.rmtree(out / "sae" / "dashboard")
    stages = json.loads((out / "stages.json").read_text())
    stages.append({"stage": "sae_dashboard", "ok": False, "seconds": 0.3, "log": "logs/sae_dashboard.log"})
    (out / "logs" / "sae_dashboard.log").write_text("Traceback ...\n")
    (out / "stages.json").write_text(json.dumps(stages))
    report.write_report(out)
    sae = _section_html((out / "index.html").read_text(), "sae")
    assert "No feature dashboard" in sae and "href='logs/sae_dashboard.log'" in sae


def test_malformed_input_is_named_and_contained(tmp_path):
    out = make_output(tmp_path)
    (out / "probes" / "probe_results.json").write_text("{not json")
    report.write_report(out)
    rec = {s["id"]: s for s in json.loads((out / "report.json").read_text())["sections"]}
    assert rec["probes"]["status"] == "error" and "probe_results.json" in rec["probes"]["reason"]
    assert rec["pca"]["status"] == "ok" and rec["attention"]["status"] == "ok"
    assert "probe_results.json" in (out / "index.html").read_text()


def test_missing_folder_is_an_error_and_nothing_is_created(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.write_report(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_wilson_interval_known_values():
    lo, hi = report.wilson_interval(0, 3)
    assert lo == 0.0 and abs(hi - 0.5615) < 1e-3  # textbook value for 0/3
    lo, hi = report.wilson_interval(5, 10)
    assert abs((lo + hi) / 2 - 0.5) < 1e-12 and abs(lo - 0.2366) < 1e-3


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_renders_in_headless_chromium(tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise AssertionError("chromium not found on PATH: the report render check needs it. "
                             "Install it with `bash scripts/install_report_deps.sh` (apt-get install chromium).")
    out = make_output(tmp_path)
    index = report.write_report(out)
    png = tmp_path / "shot.png"
    cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}",
           "--window-size=1200,2000", index.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    img = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    assert img.shape == (2000, 1200)
    assert img.std() > 10, f"screenshot looks blank (pixel std {img.std():.2f})"
    # text and figures reach well down the page, not only a header
    rows_with_ink = np.flatnonzero((img < 200).mean(axis=1) > 0.01)
    assert rows_with_ink.max() > 1500, f"page content ends at row {rows_with_ink.max()}"


# ---------------------------------------------------------------------------------------------------- from data


def _lift(soft: float, uniform: float, lo: float, hi: float, n: int = 8, other: tuple | None = None) -> dict:
    """A soft_mass_by_camera entry; ``other`` = (other-frames soft mass, lift ci_low, ci_high)."""
    entry = {"n_episodes": n, "soft_mass": _ci(soft), "uniform_soft_mass": _ci(uniform),
             "lift": {"mean": soft - uniform, "ci_low": lo, "ci_high": hi, "n": n}}
    if other is not None:
        entry |= {"other_frames_soft_mass": _ci(other[0]),
                  "lift_over_other_frames": {"mean": soft - other[0], "ci_low": other[1], "ci_high": other[2], "n": n}}
    return entry


def _with_attention(out: pathlib.Path, grid: list[int], lift: dict) -> None:
    summary = json.loads((out / "attention/summary.json").read_text())
    summary |= {"grid": grid, "n_patches": grid[0] * grid[1], "soft_mass_by_camera": {"demo": {"base_0_rgb": lift}}}
    _json(out / "attention/summary.json", summary)
    _json(out / "attention/episodes/demo__libero_spatial__task0__ep0.json",
          {"settings": {"camera": "base_0_rgb", "layers": [0, 1], "denoise_steps": None, "percentile": 80.0,
                        "sigma_frac": 0.3}, "grid": grid})


def test_attention_captions_take_grid_and_settings_from_the_data(tmp_path):
    """The default policy sees 96 px images in 12 px patches: an 8x8 grid, so uniform attention is 1/64 per patch.
    The captions used to say 16x16 and 1/256 whatever the data; every number there must come from the files."""
    out = make_output(tmp_path)
    _with_attention(out, [8, 8], _lift(0.3, 0.05, 0.15, 0.35))
    report.write_report(out)
    att = _section_html((out / "index.html").read_text(), "attention")
    assert "8x8" in att and "1/64 per patch" in att
    assert "16x16" not in att and "256" not in att
    assert "sigma = 0.30 x grid side" in att and "IoU p80" in att and "top 20 % of patches" in att
    # a grid the data does not record is not invented
    summary = json.loads((out / "attention/summary.json").read_text())
    del summary["grid"]
    _json(out / "attention/summary.json", summary)
    _json(out / "attention/episodes/demo__libero_spatial__task0__ep0.json", {"settings": {"camera": "base_0_rgb"}})
    report.write_report(out)
    att = _section_html((out / "index.html").read_text(), "attention")
    assert "grid not recorded" in att and "the same probability on every patch" in att and "x16" not in att


def _verdicts(out: pathlib.Path) -> dict:
    report.write_report(out)
    return {s["id"]: s["verdict"] for s in json.loads((out / "report.json").read_text())["sections"]}


def test_findings_are_called_findings_only_when_the_interval_excludes_the_baseline(tmp_path):
    out = make_output(tmp_path)
    # Attention: lift over uniform with an interval above 0 (finding) ...
    _with_attention(out, [8, 8], _lift(0.31, 0.06, 0.18, 0.32))
    # SAE: held out by episode, the paired difference to PCA with the same L0 excludes 0 (finding) ...
    sae = json.loads((out / "sae/metrics.json").read_text())
    split = {"kind": "episodes", "n_train_episodes": 6, "n_eval_episodes": 2, "n_eval_rows": 64, "unit": "episode"}
    sae |= {"split": split, "baselines": {"split": "episodes", "train_mean": {"fvu": 1.01, "ci_low": 1.0, "ci_high": 1.03},
                                          "pca_same_l0": {"fvu": 0.52, "ci_low": 0.45, "ci_high": 0.6, "n_components": 8},
                                          "pca_minus_sae": {"mean": 0.27, "ci_low": 0.2, "ci_high": 0.33}}}
    sae["held_out"] |= {"fvu_ci_low": 0.2, "fvu_ci_high": 0.3, "split": split}
    _json(out / "sae/metrics.json", sae)
    # ... probes: a test R^2 interval above both baselines (finding).
    pr = json.loads((out / "probes/probe_results.json").read_text())
    pr["test"] |= {"r2_mean_ci_low": 0.12, "r2_mean_ci_high": 0.41}
    _json(out / "probes/probe_results.json", pr)
    v = _verdicts(out)
    assert v["attention"]["status"] == "finding" and "beats uniform attention" in v["attention"]["text"]
    assert "0.250 [0.180, 0.320]" in v["attention"]["text"]
    assert v["sae"]["status"] == "finding" and "2 held-out episodes" in v["sae"]["text"]
    assert v["probes"]["status"] == "finding" and v["evaluation"]["status"] == "finding"
    assert v["geometry"]["status"] == "no finding" and v["pca"]["status"] == "descriptive"  # [90, 100] holds 90
    page = (out / "index.html").read_text()
    assert "<b>Finding:</b>" in _section_html(page, "attention")
    assert "best layer by CV: <code>L3</code>" in _section_html(page, "probes")

    # Non-findings: the lift interval includes 0, the SAE is no better than PCA, the probe is below its shuffled
    # baseline (then it is flagged, never printed as the best layer), and row blocks give no SAE verdict.
    _with_attention(out, [8, 8], _lift(0.07, 0.06, -0.02, 0.04))
    sae["baselines"]["pca_minus_sae"] = {"mean": 0.01, "ci_low": -0.05, "ci_high": 0.06}
    _json(out / "sae/metrics.json", sae)
    pr["test"] |= {"r2_mean": -1.134, "r2_mean_ci_low": -1.5, "r2_mean_ci_high": -0.8}
    pr["baselines"]["shuffled"]["r2_mean"] = -0.242
    _json(out / "probes/probe_results.json", pr)
    geo = json.loads((out / "geometry/geometry.json").read_text())
    geo["analyses"][0]["groups"]["all"]["curvature_deg"] = {"mean": 71.0, "ci95": [64.0, 78.0]}
    _json(out / "geometry/geometry.json", geo)
    v = _verdicts(out)
    assert v["geometry"]["status"] == "finding" and "less than the 90 degrees" in v["geometry"]["text"]
    assert v["attention"]["status"] == "no finding" and "do not look at the task objects" in v["attention"]["text"]
    assert v["sae"]["status"] == "no finding"
    assert v["probes"]["status"] == "below baseline" and "worse than the shuffled baseline" in v["probes"]["text"]
    page = (out / "index.html").read_text()
    probes = _section_html(page, "probes")
    assert "best layer" not in probes and "does not beat its baselines" in probes and "<b>Below baseline:</b>" in probes
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert not any("best layer" in line for line in summary)
    assert any(line.startswith("probes: no layer beats its baselines") for line in summary)
    sae["split"] = sae["held_out"]["split"] = {"kind": "rows", "block_rows": 32, "warning": "row blocks: optimistic"}
    _json(out / "sae/metrics.json", sae)
    v = _verdicts(out)
    assert v["sae"]["status"] == "undetermined" and "--keys" in v["sae"]["text"]
    assert "blocks of 32 rows" in _section_html((out / "index.html").read_text(), "sae")


def test_attention_verdict_names_the_baseline_each_lift_beats(tmp_path):
    """A lift over uniform alone can be a fixed spatial habit; the verdict says which baseline was beaten, and a
    lift that clears neither is no finding, with both intervals in the text."""
    out = make_output(tmp_path)
    _with_attention(out, [8, 8], _lift(0.10, 0.05, 0.02, 0.08, other=(0.09, -0.01, 0.03)))
    v = _verdicts(out)["attention"]
    assert v["status"] == "finding" and "beats uniform attention" in v["text"]
    assert "other episodes' object positions" not in v["text"].split("In detail")[0]
    assert "no different from 0" in v["text"]  # the other-frames lift, reported beside it
    _with_attention(out, [8, 8], _lift(0.10, 0.09, -0.01, 0.03, other=(0.05, 0.02, 0.08)))
    v = _verdicts(out)["attention"]
    assert v["status"] == "finding" and "beats the same attention scored on other episodes' object positions" in v["text"]
    _with_attention(out, [8, 8], _lift(0.10, 0.09, -0.01, 0.03, other=(0.11, -0.03, 0.01)))
    v = _verdicts(out)["attention"]
    assert v["status"] == "no finding" and v["text"].count("no different from 0") == 2
    att = _section_html((out / "index.html").read_text(), "attention")
    assert "lift over other frames [95% CI]" in att


def test_attention_verdict_counts_a_head_only_on_held_out_episodes(tmp_path):
    """Averaged attention shows nothing; the head chosen on training episodes lifts over other frames on held-out
    ones: a finding that names the head and the held-out test. If its held-out interval includes 0, no finding."""
    out = make_output(tmp_path)
    _with_attention(out, [8, 8], _lift(0.10, 0.11, -0.02, 0.0, other=(0.10, -0.01, 0.01)))

    def with_head(lo: float, hi: float) -> None:
        summary = json.loads((out / "attention/summary.json").read_text())
        summary["head_selection"] = {"demo": {
            "camera": "base_0_rgb", "layer": 3, "head": 5, "layers": [0, 1, 2, 3],
            "split": {"rule": "every third held out", "train_episodes": ["a", "b", "c", "d"], "test_episodes": ["e", "f"]},
            "test": {"n_episodes": 2, "soft_mass": _ci(0.2), "other_frames_soft_mass": _ci(0.19),
                     "lift_over_other_frames": {"mean": (lo + hi) / 2, "ci_low": lo, "ci_high": hi, "n": 2},
                     "lift": {"mean": -0.01, "ci_low": -0.02, "ci_high": 0.0, "n": 2}}}}
        _json(out / "attention/summary.json", summary)

    with_head(0.003, 0.005)
    v = _verdicts(out)["attention"]
    assert v["status"] == "finding" and "head 5 of layer 3 follows the objects on held-out episodes" in v["text"]
    assert "chosen on 4 training episodes" in v["text"] and "on 2 held-out episodes" in v["text"]
    att = _section_html((out / "index.html").read_text(), "attention")
    assert "chosen on training episodes, tested on held-out ones" in att and "3 / 5" in att
    with_head(-0.001, 0.005)
    v = _verdicts(out)["attention"]
    assert v["status"] == "no finding" and "in the best head on held-out episodes" in v["text"]
