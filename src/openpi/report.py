"""Build a self-explaining ``index.html`` (and a printed summary) from a quickstart output folder.

Why: the quickstart writes many figures and metric files whose meaning lives in the code. This page puts each
result next to what it shows, how it was computed and what it must beat (baselines, confidence intervals), so a
reader who never saw the code can judge it. A missing section is never silently dropped: it says which stage
failed (with a link to its log) or that the stage was not run.

Input: the folder layout written by ``scripts/quickstart.py`` (every part optional)::

    stages.json                 [{stage, ok, seconds, log}]  (status of each quickstart stage)
    rollouts/runs/*.json        run settings + server metadata (policy config, trained flag)
    rollouts/results/*.json     success table (schema vla-interp/libero-summary/1)
    videos/*.mp4                episode videos
    attention/                  summary.json, summary_{suites,tasks}.csv, evolution.png, modality_evolution.png,
                                overlays/<stem>/s<env_step>.png (evaluate_attention_iou.py --overlays)
    sae/                        metrics.json, training_curves.png; dashboard at sae/dashboard/index.html
                                or sae_dashboard/index.html (sae/dashboard.py) when present
    probes/                     probe_results.json, r2_vs_layer.png, cv_curves.png, r2_per_dim.png
    geometry/                   geometry.json, *_profiles.png, *_by_*.png
    pca/                        action_pca.json, explained_variance.png, pca{2,3}d_by_*.png, trajectories_pc.png
    logs/<stage>.log

Output: ``<out>/index.html`` (written atomically; every ``href``/``src`` is relative and points to an existing
file) and ``<out>/report.json``::

    schema      "vla-interp/report/1"
    sections    [{id, title, status: "ok" | "failed" | "missing" | "error", reason (null when ok),
                  verdict {status: "finding" | "no finding" | "below baseline" | "undetermined" | "descriptive",
                  text} | null, figures [relative png paths shown], links [relative paths linked]}]
    stages      copy of stages.json ([] when absent)
    summary     the printed summary lines

Bad input never stops the page: an unreadable JSON/CSV makes its section ``status: "error"`` with the file name
and the parse error shown in place.

Verdicts: every section opens with one line saying, in plain words, whether its result beats its baseline. The
rule is the same everywhere: a result is a finding when its 95% interval (resampling whole episodes) excludes the
baseline; a point estimate alone is never called a finding. Numbers in captions are read from the result files
(patch grid, uniform mass, counts, settings), never written into the page's text.

Which stage feeds which section comes from ``openpi.pipeline.STAGES``, the list the quickstart runs.
"""
from __future__ import annotations

import csv
import dataclasses
import html
import json
import math
import os
import pathlib
import re
from typing import Any, Callable

from openpi import pipeline
from openpi.shared.io import write_json_atomic, write_text_atomic

SCHEMA = "vla-interp/report/1"
_NUMERIC = re.compile(r"^\s*(-?[0-9.]+(e-?[0-9]+)?|n/a)(\s|$)")

# Which quickstart stages feed each section (a failed one explains a missing section) and the stage whose output
# a section shows (its absence with that stage "ok" is itself a problem): both from the quickstart's own list.
SECTION_STAGES: dict[str, tuple[str, ...]] = {sec: pipeline.section_stages(sec) for sec in pipeline.SECTIONS}
SECTION_PRODUCER: dict[str, str] = {sec: pipeline.section_producer(sec).name for sec in pipeline.SECTIONS}

CSS = """
body{font-family:'DejaVu Sans',Arial,sans-serif;max-width:1150px;margin:0 auto;padding:0 18px 40px;color:#222;
line-height:1.4;font-size:15px}
h1{border-bottom:3px solid #345;padding-bottom:6px}h2{margin-top:34px;border-bottom:1px solid #bbb;color:#234}
h3{margin-bottom:4px;color:#345}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#eef1f5}td.n{text-align:right}
.ok{color:#1a7f37;font-weight:bold}.failed{color:#c62828;font-weight:bold}.missing{color:#9a6700;font-weight:bold}
.error{color:#c62828;font-weight:bold}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:8px 0}
.verdict{padding:6px 10px;margin:8px 0;border-left:5px solid #888;background:#f4f4f4}
.verdict.finding{border-color:#1a7f37;background:#eaf6ec}.verdict.below{border-color:#c62828;background:#fdecea}
.bad{background:#fdecea;border-left:4px solid #c62828;padding:6px 10px;margin:8px 0}
.how{color:#444;font-size:14px}
.glance{background:#f3f6fa;border:1px solid #cfd8e3;padding:8px 14px}
.figs{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;max-width:540px;border:1px solid #ddd;padding:6px;background:#fff}
figure.wide{max-width:100%}
figure img{max-width:100%;display:block}figure video{max-width:520px;display:block}
figcaption{font-size:12.5px;color:#333;margin-top:4px}
code{background:#f2f2f2;padding:0 3px}
details{margin:6px 0}summary{cursor:pointer;color:#234}
"""


# ---------------------------------------------------------------- small helpers


class _BadFile(Exception):
    """An input file exists but cannot be read; the message names the file."""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any, nd: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return "n/a"
        if isinstance(v, int):
            return str(v)
        return f"{v:.{nd}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{nd}f}"
    return _esc(v)


def _ci(stat: dict | None, nd: int = 3) -> str:
    """``mean [lo, hi]`` of a {mean, ci_low, ci_high} record."""
    if not stat:
        return "n/a"
    lo, hi = stat.get("ci_low"), stat.get("ci_high")
    if lo is None and "ci95" in stat:
        lo, hi = (stat["ci95"] or [None, None])[:2]
    return f"{_num(stat.get('mean'), nd)} [{_num(lo, nd)}, {_num(hi, nd)}]"


def _load_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _BadFile(f"cannot read {path}: {e}") from e


def _load_csv(path: pathlib.Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise _BadFile(f"cannot read {path}: {e}") from e


def _f(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _table(headers: list[str], rows: list[list[Any]], raw_cols: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    def cell(i: int, c: Any) -> str:
        text = c if i in raw_cols else _num(c)
        numeric = isinstance(c, (int, float)) or _NUMERIC.match(_strip_tags(str(text))) is not None
        return f"<td class='n'>{text}</td>" if numeric else f"<td>{text}</td>"

    body = "".join("<tr>" + "".join(cell(i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate k/n (sensible at 0 and n, unlike the normal interval)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


# ---------------------------------------------------------------- page model


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One plain-words line: does this section's result beat its baseline?"""

    status: str  # "finding" | "no finding" | "below baseline" | "undetermined" | "descriptive"
    text: str

    LABELS = {"finding": "Finding", "no finding": "Not a finding", "below baseline": "Below baseline",
              "undetermined": "Undetermined", "descriptive": "Descriptive"}

    def html(self) -> str:
        css = {"finding": "finding", "below baseline": "below"}.get(self.status, "")
        return f"<p class='verdict {css}'><b>{self.LABELS[self.status]}:</b> {_esc(self.text)}</p>"


def excludes(lo: float | None, hi: float | None, baseline: float | None) -> str | None:
    """'above' / 'below' when the interval [lo, hi] excludes ``baseline``, 'includes' when not, None without an
    interval."""
    if lo is None or hi is None or baseline is None:
        return None
    return "above" if lo > baseline else "below" if hi < baseline else "includes"


@dataclasses.dataclass
class Section:
    id: str
    title: str
    status: str = "ok"
    reason: str | None = None
    parts: list[str] = dataclasses.field(default_factory=list)
    figures: list[str] = dataclasses.field(default_factory=list)
    links: list[str] = dataclasses.field(default_factory=list)
    verdict: Verdict | None = None


class _Ctx:
    """The output folder plus what every section needs: existence checks and relative links."""

    def __init__(self, out: pathlib.Path) -> None:
        self.out = out
        self.stages: list[dict] = []
        sj = out / "stages.json"
        self.stages_error: str | None = None
        if sj.is_file():
            try:
                data = _load_json(sj)
                if not isinstance(data, list):
                    raise _BadFile(f"{sj}: expected a list of stage records, found {type(data).__name__}")
                self.stages = [s for s in data if isinstance(s, dict) and "stage" in s]
            except _BadFile as e:
                self.stages_error = str(e)

    def rel(self, p: pathlib.Path) -> str:
        return p.relative_to(self.out).as_posix()

    def link(self, sec: Section, p: pathlib.Path, text: str | None = None) -> str:
        """An <a> to an existing file (plain text when it does not exist, so no link ever dangles)."""
        if not p.is_file():
            return f"{_esc(text or p.name)} (missing)"
        r = self.rel(p)
        sec.links.append(r)
        return f"<a href='{_esc(r)}'>{_esc(text or r)}</a>"

    def figure(self, sec: Section, p: pathlib.Path, caption: str, wide: bool = False) -> str:
        if not p.is_file():
            return ""
        r = self.rel(p)
        sec.figures.append(r)
        sec.links.append(r)
        cls = " class='wide'" if wide else ""
        return (f"<figure{cls}><a href='{_esc(r)}'><img src='{_esc(r)}' alt='{_esc(r)}' loading='lazy'></a>"
                f"<figcaption><b>{_esc(r)}</b>: {caption}</figcaption></figure>")

    def stage(self, name: str) -> dict | None:
        for s in self.stages:
            if s.get("stage") == name:
                return s
        return None

    def stage_problem(self, section_id: str) -> tuple[str, str] | None:
        """(status, html reason) when a stage feeding this section failed, else None."""
        for name in SECTION_STAGES.get(section_id, ()):
            s = self.stage(name)
            if s is not None and not s.get("ok", False):
                log = self.out / str(s.get("log", f"logs/{name}.log"))
                link = (f"<a href='{_esc(self.rel(log))}'>{_esc(self.rel(log))}</a>" if log.is_file()
                        else f"{_esc(s.get('log', 'logs/' + name + '.log'))} (log file missing)")
                return "failed", f"stage <code>{_esc(name)}</code> failed after {_num(s.get('seconds'), 1)} s; see {link}."
        return None


def _absent(ctx: _Ctx, sec: Section, expected: str, how_to_run: str) -> Section:
    """Fill a section whose main output is missing with the reason (failed stage -> log link)."""
    prob = ctx.stage_problem(sec.id)
    if prob:
        sec.status, reason = prob
        for name in SECTION_STAGES.get(sec.id, ()):
            s = ctx.stage(name)
            if s is not None and not s.get("ok", False):
                p = ctx.out / str(s.get("log", ""))
                if p.is_file():
                    sec.links.append(ctx.rel(p))
    else:
        producer = SECTION_PRODUCER.get(sec.id, "")
        sec.status = "missing"
        reason = (f"<code>{_esc(expected)}</code> is missing although stage <code>{_esc(producer)}</code> reported ok."
                  if ctx.stage(producer) is not None
                  else f"not run in this output folder ({_esc(expected)} absent). To produce it: {how_to_run}")
    sec.reason = reason
    sec.parts.append(f"<p class='{'bad' if sec.status == 'failed' else 'note'}'>No results: {reason}</p>")
    return sec


# ---------------------------------------------------------------- sections


# What the sections call the recorded quantities, per policy family (``_family``).
WORDS: dict[str, dict[str, str]] = {
    "pi0": {
        "looker": "the action tokens", "unit": "head",
        "attention_title": "2. Attention: where do the action tokens look?",
        "attention_how": "At every policy query the server recorded the attention probabilities of the action tokens "
                         "(queries) over the whole input sequence (keys: image patches of each camera, instruction "
                         "words, prompt template, state, actions), averaged over heads. Here: {sel}; rows are "
                         "averaged over the selected denoising steps, heads and action tokens. The camera's {grid} "
                         "patch attention is renormalised within the camera",
        "overlay": "Attention of the action tokens (mean over layers {layers}, denoising steps, heads and action "
                   "tokens) over each valid camera's {grid} patches",
        "sae_title": "3. Sparse autoencoder: which features does the action expert use?",
        "sae_row": "one action token of one denoising step",
        "geometry_point": "the activation of the probed action-expert layer at the last denoising step, averaged "
                          "over the query's action tokens",
    },
    "diffusion": {
        "looker": "the camera encoders' keypoints", "unit": "keypoint",
        "attention_title": "2. Attention: where do the camera encoders' keypoints look?",
        "attention_how": "At every policy query the server recorded each camera encoder's spatial softmax "
                         "(<code>enc.&lt;camera&gt;.attn</code>): for each keypoint a probability distribution over "
                         "the ResNet feature-map cells of the image region the encoder saw (the centre crop), on the "
                         "current frame. Keypoints play the role of heads; there is no language input, so there are "
                         "no modality fractions. Here: {sel}; rows are averaged over keypoints. Each camera's {grid} "
                         "cell attention",
        "overlay": "Spatial-softmax attention of the camera encoders (mean over keypoints) over each camera's "
                   "{grid} feature-map cells, drawn where the cells lie on the frame",
        "sae_title": "3. Sparse autoencoder: which features does the denoising UNet use?",
        "sae_row": "one UNet block output of one denoising step, channels x chunk positions flattened",
        "geometry_point": "the probed UNet block's output at the last denoising step",
    },
}


def _family(ctx: _Ctx) -> str:
    """'diffusion' when the recorded server served a Diffusion Policy, else 'pi0'."""
    meta = _run_meta(ctx) or {}
    return "diffusion" if (meta.get("server_metadata") or {}).get("model") == "diffusion" else "pi0"


def _run_meta(ctx: _Ctx) -> dict | None:
    runs = sorted((ctx.out / "rollouts" / "runs").glob("*.json"))
    for p in runs:
        try:
            d = _load_json(p)
        except _BadFile:
            continue
        if isinstance(d, dict):
            return d
    return None


def section_evaluation(ctx: _Ctx) -> Section:
    sec = Section("evaluation", "1. Evaluation: does the policy solve the tasks?")
    results = sorted((ctx.out / "rollouts" / "results").glob("*.json"))
    if not results:
        return _absent(ctx, sec, "rollouts/results/*.json", "<code>python examples/libero/main.py ... --out-dir OUT/rollouts</code>")
    sec.parts.append(
        "<p class='how'>Each episode starts from one of the suite's fixed initial states, lets the scene settle, then "
        "asks the policy server for an action chunk every <i>replan_steps</i> environment steps and executes the "
        "first <i>replan_steps</i> actions, until the task's goal predicate holds (success) or <i>max_steps</i> "
        "is reached. Success rate = successes / episodes; the interval is the 95% Wilson score interval "
        "(binomial, valid at 0 % and 100 %). Episodes that ended on a policy error count as failures and are "
        "listed under <i>errors</i>.</p>")
    rows, totals = [], [0, 0]
    for p in results:
        d = _load_json(p)
        for suite, s in (d.get("suites") or {}).items():
            for tid, t in sorted((s.get("tasks") or {}).items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
                n, k = int(t.get("episodes", 0)), int(t.get("successes", 0))
                lo, hi = wilson_interval(k, n)
                rows.append([_esc(d.get("run_id", p.stem)), _esc(suite), _esc(tid), _esc(t.get("prompt", "")), n, k,
                             t.get("errors", 0), f"{_num(k / n if n else None, 2)} [{_num(lo, 2)}, {_num(hi, 2)}]"])
        tot = d.get("total") or {}
        n, k = int(tot.get("episodes", 0)), int(tot.get("successes", 0))
        totals[0] += k
        totals[1] += n
        lo, hi = wilson_interval(k, n)
        rows.append([f"<b>{_esc(d.get('run_id', p.stem))}</b>", "<b>all</b>", "", "", n, k, tot.get("errors", 0),
                     f"<b>{_num(k / n if n else None, 2)} [{_num(lo, 2)}, {_num(hi, 2)}]</b>"])
        if d.get("missing_episodes"):
            sec.parts.append(f"<p class='note'>{_esc(p.name)}: {d['missing_episodes']} planned episode(s) have no "
                             "record yet (run interrupted or other shards still running).</p>")
        sec.links.append(ctx.rel(p))
    sec.verdict = _evaluation_verdict(totals)
    sec.parts.append("<h3>Success table</h3>" + _table(
        ["run", "suite", "task", "instruction", "episodes", "successes", "errors", "success rate [95% CI]"], rows,
        raw_cols=(0, 1, 2, 3, 7)))
    sec.parts.append("<p>Files: " + ", ".join(ctx.link(sec, p) for p in results) + "</p>")
    videos = sorted((ctx.out / "videos").glob("*.mp4"))
    if videos:
        shown = videos[:6]
        figs = []
        for v in shown:
            r = ctx.rel(v)
            sec.links.append(r)
            outcome = "success" if "__success" in v.name else "failure" if "__failure" in v.name else "unknown outcome"
            figs.append(f"<figure><video controls muted preload='metadata' src='{_esc(r)}'></video><figcaption>"
                        f"<b>{_esc(r)}</b> ({outcome}): left the third-person agent-view camera, right the wrist "
                        "camera, exactly as sent to the policy (rotated 180 degrees, resized with padding).</figcaption>"
                        "</figure>")
        sec.parts.append("<h3>Episode videos</h3><div class='figs'>" + "".join(figs) + "</div>")
        if len(videos) > len(shown):
            sec.parts.append("<p>More videos: " + ", ".join(ctx.link(sec, v) for v in videos[len(shown):]) + "</p>")
    else:
        sec.parts.append("<p class='note'>No videos in <code>videos/</code> (client run with <code>--no-save-video</code>?).</p>")
    return sec


def _evaluation_verdict(totals: list[int]) -> Verdict:
    k, n = totals
    if n == 0:
        return Verdict("undetermined", "no finished episode was recorded.")
    lo, hi = wilson_interval(k, n)
    if k == 0:
        return Verdict("no finding", f"the policy succeeded in none of the {n} episodes (95% interval 0% to "
                                     f"{hi:.0%}); it cannot be told apart from a policy that never succeeds.")
    return Verdict("finding", f"the policy succeeded in {k} of {n} episodes ({k / n:.0%}); the 95% interval "
                              f"[{lo:.0%}, {hi:.0%}] excludes 0%, so it does better than a policy that never "
                              "succeeds.")


def _overlay_pngs(ctx: _Ctx, limit: int = 4) -> list[pathlib.Path]:
    root = ctx.out / "attention" / "overlays"
    if not root.is_dir():
        return []
    def order(p: pathlib.Path) -> tuple:
        digits = "".join(ch for ch in p.stem if ch.isdigit())
        return (p.parent.as_posix(), int(digits) if digits else -1, p.name)

    pngs = sorted(root.rglob("*.png"), key=order)
    if len(pngs) <= limit:
        return pngs
    idx = sorted({round(i * (len(pngs) - 1) / (limit - 1)) for i in range(limit)})
    return [pngs[i] for i in idx]


def _step_of(p: pathlib.Path) -> str:
    digits = "".join(ch for ch in p.stem if ch.isdigit())
    return str(int(digits)) if digits else p.stem


def _attention_episode(ctx: _Ctx) -> dict:
    """The first per-episode result file (its settings and grid describe every episode of the run directory)."""
    eps = sorted((ctx.out / "attention" / "episodes").glob("*.json"))
    if not eps:
        return {}
    try:
        d = _load_json(eps[0])
    except _BadFile:
        return {}
    return d if isinstance(d, dict) else {}


def _grid_of(summary: dict, episode: dict) -> tuple[int, int] | None:
    """The camera patch grid recorded with the results (summary.json, else an episode file), or None."""
    for g in (summary.get("grid"), episode.get("grid")):
        if isinstance(g, (list, tuple)) and len(g) == 2 and all(isinstance(v, int) and v > 0 for v in g):
            return int(g[0]), int(g[1])
    return None


# The attention baselines, each a lift whose 95% interval is judged against 0: (summary key, what it beats).
ATTENTION_BASELINES = (("lift", "uniform attention (the objects' share of the image)"),
                       ("lift_over_other_frames", "the same attention scored on other episodes' object positions "
                                                  "(a fixed spatial habit)"))


def _head_part(run: str, sel: dict) -> tuple[str, str | None]:
    """(sentence about the held-out test of the head chosen on training episodes, interval side of its lift over
    other frames)."""
    test = sel.get("test") or {}
    lift, lift_u = test.get("lift_over_other_frames") or {}, test.get("lift") or {}
    side = excludes(lift.get("ci_low"), lift.get("ci_high"), 0.0)
    word = {"above": "above", "below": "below", "includes": "no different from", None: "(no interval)"}[side]
    n_train = len((sel.get("split") or {}).get("train_episodes") or [])
    return (f"{run}/{sel.get('camera')} {sel.get('head_kind', 'head')} {sel.get('head')} of layer {sel.get('layer')} (chosen on {n_train} "
            f"training episodes): on {test.get('n_episodes')} held-out episodes lift over other frames {_ci(lift)}, "
            f"{word} 0 (over uniform {_ci(lift_u)})", side)


def _attention_verdict(by_camera: dict, heads: dict | None = None, looker: str = "the action tokens",
                       unit: str = "head") -> Verdict:
    """Finding when, for some run and camera, the 95% interval of a soft-mass lift (over uniform attention, or over
    the same attention on other episodes' object masks) lies above 0, or when the head chosen on training episodes
    lifts over other frames on held-out episodes."""
    parts, found, judged = [], [], False
    for run, sel in sorted((heads or {}).items()):
        text, side = _head_part(run, sel)
        parts.append(text)
        judged |= side is not None
        if side == "above":
            found.append(f"{run}/{sel.get('camera')} {sel.get('head_kind', 'head')} {sel.get('head')} of layer {sel.get('layer')} follows the "
                         "objects on held-out episodes")
    for run, cams in sorted(by_camera.items()):
        for cam, c in sorted((cams or {}).items()):
            if not c.get("n_episodes"):
                continue
            said = []
            for key, what in ATTENTION_BASELINES:
                lift = c.get(key) or {}
                if lift.get("mean") is None:
                    continue
                side = excludes(lift.get("ci_low"), lift.get("ci_high"), 0.0)
                judged |= side is not None
                if side == "above":
                    found.append(f"{run}/{cam} beats {what}")
                word = {"above": "above", "below": "below", "includes": "no different from", None: "(no interval)"}
                said.append(f"lift over {what.split(' (')[0]} {_ci(lift)}, {word[side]} 0")
            parts.append(f"{run}/{cam}: soft mass {_num((c.get('soft_mass') or {}).get('mean'))} on the objects "
                         f"over {c['n_episodes']} episodes; " + ", ".join(said))
    if not parts or not any(c.get("n_episodes") for cams in by_camera.values() for c in (cams or {}).values()):
        return Verdict("undetermined", "no camera had an object of interest in its masks, so attention on the "
                                       "objects could not be measured.")
    if found:
        return Verdict("finding", f"{looker}' attention on the task objects beats a baseline: "
                                  + "; ".join(found) + " (95% interval of the lift above 0). In detail: "
                                  + "; ".join(parts) + ".")
    if not judged:
        return Verdict("undetermined", "too few episodes for an interval: " + "; ".join(parts) + ".")
    return Verdict("no finding", f"{looker} do not look at the task objects more than uniform attention "
                                 f"or a fixed spatial habit would, on average over {unit}s or in the best {unit} on "
                                 "held-out episodes (no lift's 95% interval lies above 0): " + "; ".join(parts) + ".")


def section_attention(ctx: _Ctx) -> Section:
    words = WORDS[_family(ctx)]
    sec = Section("attention", words["attention_title"])
    att = ctx.out / "attention"
    summary = att / "summary.json"
    if not summary.is_file():
        return _absent(ctx, sec, "attention/summary.json", "<code>python evaluate_attention_iou.py --store S --rollouts R --out OUT/attention --overlays</code>")
    d = _load_json(summary)
    ep = _attention_episode(ctx)
    st = ep.get("settings") or {}
    grid = _grid_of(d, ep)
    cam, layers = st.get("camera", "base_0_rgb"), st.get("layers")
    steps = st.get("denoise_steps")
    pct, sigma = st.get("percentile"), st.get("sigma_frac")
    if grid is not None:
        n_patches = grid[0] * grid[1]
        grid_txt = f"{grid[0]}x{grid[1]}"
        uniform_txt = f"1/{n_patches} per patch"
    else:
        grid_txt, uniform_txt = "(grid not recorded)", "the same probability on every patch"
    sel = (f"camera <code>{_esc(cam)}</code>, layers {_esc(layers if layers is not None else 'all recorded')}, "
           f"denoising steps {_esc(steps if steps is not None else 'all recorded')}")
    sec.verdict = _attention_verdict(d.get("soft_mass_by_camera") or {}, d.get("head_selection"), words["looker"],
                                     words["unit"])
    sec.parts.append(
        "<p class='how'>" + words["attention_how"].format(sel=sel, grid=_esc(grid_txt))
        + " is compared with the segmentation mask of the task's objects of interest at the same environment "
        "step.</p>")
    figs = []
    for p in _overlay_pngs(ctx):
        figs.append(ctx.figure(sec, p, words["overlay"].format(layers=_esc(layers), grid=_esc(grid_txt))
                               + f", upsampled and overlaid on the frame the policy saw at env "
                               f"step {_esc(_step_of(p))} of episode <code>{_esc(p.parent.name)}</code>. Both cameras "
                               "share one colour scale (colour bar: attention probability per patch); the white "
                               "outline marks the scored objects; the title gives each camera's share of the row "
                               "and the query's IoU and soft mass with uniform attention's."))
    if figs:
        sec.parts.append("<h3>Attention overlays</h3><div class='figs'>" + "".join(figs) + "</div>")
    else:
        sec.parts.append("<p class='note'>No overlay PNGs (<code>attention/overlays/</code> absent): run "
                         "<code>evaluate_attention_iou.py</code> with <code>--overlays</code> to get them.</p>")
    by_cam = d.get("soft_mass_by_camera") or {}
    rows = [[_esc(run), _esc(c), v.get("n_episodes"), _ci(v.get("soft_mass")), _ci(v.get("uniform_soft_mass")),
             f"<b>{_ci(v.get('lift'))}</b>", _ci(v.get("other_frames_soft_mass")),
             f"<b>{_ci(v.get('lift_over_other_frames'))}</b>"]
            for run, cams in sorted(by_cam.items()) for c, v in sorted((cams or {}).items()) if v.get("n_episodes")]
    if rows:
        sec.parts.append(
            "<h3>Soft mass on the objects, per camera, against uniform attention</h3><p class='how'><b>Soft mass</b> = "
            "attention probability within the camera that falls on the objects (each patch weighted by how much of "
            "it the objects cover). <b>Uniform</b> = the soft mass of attention spread evenly "
            f"({_esc(uniform_txt)}), i.e. the objects' share of the image. <b>Lift</b> = soft mass - uniform "
            "(0 = no preference for the objects). <b>Other frames</b> = the same attention scored on the object "
            "masks of the other episodes' queries: a policy that always looks at the same patches (say, where "
            "bowls usually are) scores as much there, so a lift over it means the attention moves with the "
            "objects. Means of per-episode means; [brackets] are 95% bootstrap intervals resampling whole "
            "episodes.</p>" + _table(
                ["run", "camera", "episodes", "soft mass [95% CI]", "uniform [95% CI]", "lift [95% CI]",
                 "other frames [95% CI]", "lift over other frames [95% CI]"], rows,
                raw_cols=(0, 1, 3, 4, 5, 6, 7)))
    heads = d.get("head_selection") or {}
    if heads:
        hrows = []
        for run, sel in sorted(heads.items()):
            t, split = sel.get("test") or {}, sel.get("split") or {}
            hrows.append([_esc(run), _esc(sel.get("camera")), f"{sel.get('layer')} / {sel.get('head')}",
                          f"{len(split.get('train_episodes') or [])} / {t.get('n_episodes')}",
                          _ci(t.get("soft_mass")), _ci(t.get("other_frames_soft_mass")),
                          f"<b>{_ci(t.get('lift_over_other_frames'))}</b>", _ci(t.get("lift"))])
        rule = _esc(next(iter(heads.values())).get("split", {}).get("rule", ""))
        sec.parts.append(
            "<h3>One head, chosen on training episodes, tested on held-out ones</h3><p class='how'>Averaging heads "
            "can hide a head that tracks the objects. With attention recorded per head, the head (and layer) whose "
            "attention on the scored camera lifts most over the other-frames baseline is chosen on the training "
            f"episodes and measured on the held-out ones only ({rule}), so choosing the best of many heads does "
            "not inflate the number.</p>" + _table(
                ["run", "camera", "layer / head", "train / held-out episodes", "soft mass [95% CI]",
                 "other frames [95% CI]", "lift over other frames [95% CI]", "lift over uniform [95% CI]"], hrows,
                raw_cols=(0, 1, 4, 5, 6, 7)))
    pct_txt = f"p{_num(pct, 0)}" if pct is not None else "percentile"
    top_txt = (f"top {_num(100 - pct, 0)} % of patches" if pct is not None else "the patches above the percentile")
    sigma_txt = f"sigma = {_num(sigma, 2)} x grid side" if sigma is not None else "sigma recorded in the settings"
    sec.parts.append(
        "<h3>Attention vs. object masks (IoU) with baselines</h3><p class='how'>"
        "<b>IoU top-k</b>: the k most-attended patches (k = number of patches at least half covered by the objects) "
        "vs. those object patches, intersection / union (1 = attention exactly on the objects). <b>Soft mass</b>: "
        "attention probability falling on the objects (coverage-weighted). <b>Pointing</b>: the single most-attended "
        f"patch lies on an object. <b>IoU {_esc(pct_txt)}</b>: {_esc(top_txt)} vs. objects (capped far below 1 "
        "because objects are small). Baselines use the same masks: <b>uniform</b> attention "
        f"({_esc(uniform_txt)}) and a <b>centre-bias</b> Gaussian ({_esc(sigma_txt)}). Attention only means "
        "something where it beats both baselines. Values are means of per-episode means; [brackets] are 95% "
        "bootstrap intervals resampling whole episodes.</p>")
    csv_path = att / "summary_suites.csv"
    if csv_path.is_file():
        rows = []
        for r in _load_csv(csv_path):
            ci = lambda m: f"{_num(_f(r.get(m)))} [{_num(_f(r.get(m + '_ci_low')))}, {_num(_f(r.get(m + '_ci_high')))}]"
            rows.append([_esc(f"{r.get('run_id')}/{r.get('prompt_mode')}"), _esc(r.get("suite")), _esc(r.get("layer")),
                         r.get("n_episodes"), r.get("n_queries"), ci("iou_topk"), _f(r.get("uniform_iou_topk")),
                         _f(r.get("center_bias_iou_topk")), ci("soft_mass"), _f(r.get("pointing_accuracy")),
                         _f(r.get("iou_percentile")), _f(r.get("visual_fraction"))])
        sec.parts.append(_table(["run/prompt", "suite", "layer", "episodes", "queries", "IoU top-k [95% CI]",
                                 "uniform IoU top-k", "centre-bias IoU top-k", "soft mass [95% CI]", "pointing",
                                 f"IoU {pct_txt}", "visual fraction"], rows, raw_cols=(0, 1, 2, 5, 8)))
        sec.parts.append("<p class='how'>Layer <i>mean</i> = attention averaged over the selected layers before scoring; "
                         "numbered rows score one layer, and their visual fraction is that layer's own.</p>")
    rows = []
    for run, groups in (d.get("success_vs_failure") or {}).items():
        for g in ("success", "failure"):
            s = (groups or {}).get(g) or {}
            if not s.get("n_episodes"):
                rows.append([_esc(run), g, 0, 0, "n/a", "n/a", "n/a", "n/a", "n/a"])
                continue
            rows.append([_esc(run), g, s.get("n_episodes"), s.get("n_queries"), _ci(s.get("iou_topk")),
                         _ci(s.get("uniform_iou_topk")), _ci(s.get("center_bias_iou_topk")), _ci(s.get("soft_mass")),
                         _ci(s.get("pointing_accuracy"))])
    if rows:
        sec.parts.append("<h4>Successful vs. failed episodes</h4>" + _table(
            ["run", "outcome", "episodes", "queries", "IoU top-k", "uniform IoU top-k", "centre-bias IoU top-k",
             "soft mass", "pointing"], rows, raw_cols=(0, 1, 4, 5, 6, 7, 8)))
    mod = d.get("modality") or {}
    if mod:
        rows = []
        for run, m in mod.items():
            rows.append([_esc(run), "all", "", m.get("visual"), m.get("instruction"), ""])
            for ph, b in (m.get("by_phase") or {}).items():
                rows.append([_esc(run), _esc(ph), b.get("n_queries"), b.get("visual"), b.get("instruction"),
                             b.get("visual_linguistic_ratio")])
        sec.parts.append(
            "<h3>Modality fractions</h3><p class='how'>Share of each action-token attention row (which sums to 1 over "
            "all keys) that goes to image patches (all valid cameras) vs. the instruction words; the remainder goes to "
            "the prompt template, state and action tokens. Phases are the first, middle and last third of the "
            "episode (env_step / episode length). Visual/linguistic ratio = visual mass / instruction mass.</p>" + _table(
                ["run", "phase", "queries", "visual fraction", "instruction fraction", "visual/linguistic"], rows,
                raw_cols=(0, 1)))
    figs = [ctx.figure(sec, att / "evolution.png", "Soft mass on the task objects minus uniform attention's (the "
                       "lift; dashed line: no preference) against normalised episode time (env step / episode "
                       "length, binned), averaged over queries, separately for successful and failed episodes."),
            ctx.figure(sec, att / "modality_evolution.png", "Visual and instruction attention fractions against "
                       "normalised episode time, one curve per prompt mode (original / perturbed prompts).")]
    if any(figs):
        sec.parts.append("<div class='figs'>" + "".join(figs) + "</div>")
    for w in d.get("warnings") or []:
        sec.parts.append(f"<p class='note'>warning: {_esc(w)}</p>")
    files = [summary, att / "summary_suites.csv", att / "summary_tasks.csv"]
    n_eps = len(list((att / "episodes").glob("*.json")))
    sec.parts.append("<p>Files: " + ", ".join(ctx.link(sec, p) for p in files if p.is_file())
                     + f"; per-episode, per-query metrics in <code>attention/episodes/</code> ({n_eps} files, listed under "
                     "All files).</p>")
    return sec


def _find_dashboard(ctx: _Ctx) -> pathlib.Path | None:
    for cand in (ctx.out / "sae" / "dashboard" / "index.html", ctx.out / "sae_dashboard" / "index.html"):
        if cand.is_file():
            return cand
    return None


def _fvu_stat(b: dict | None) -> dict | None:
    return None if not b else {"mean": b.get("fvu"), "ci_low": b.get("ci_low"), "ci_high": b.get("ci_high")}


def _sae_split_text(split: dict | None) -> str:
    """How the rows were held out, in words, from the trainer's split record."""
    if not split:
        return "How rows were held out was not recorded (an older trainer); its held-out FVU may be optimistic."
    if split.get("kind") == "episodes":
        return (f"It is trained on {split.get('n_train_episodes')} episodes and evaluated on "
                f"{split.get('n_eval_episodes')} held-out episodes it never saw ({split.get('n_eval_rows')} rows).")
    return (f"It is evaluated on held-out blocks of {split.get('block_rows')} rows whose episodes were also trained "
            "on, so the held-out FVU is optimistic.")


def _sae_verdict(m: dict) -> Verdict:
    """Finding when the SAE's held-out FVU is below PCA with the same L0 with the paired interval excluding 0."""
    ho, base = m.get("held_out") or {}, m.get("baselines") or {}
    split = m.get("split") or ho.get("split") or {}
    pca, diff = base.get("pca_same_l0") or {}, base.get("pca_minus_sae") or {}
    if split.get("kind") != "episodes":
        return Verdict("undetermined", "rows were not held out by whole episodes, so the held-out FVU "
                                       f"({_num(ho.get('fvu'))}) may reflect memorised episodes; rerun train_save.py "
                                       "with --keys for a verdict.")
    if not pca:
        return Verdict("undetermined", f"held-out FVU {_num(ho.get('fvu'))}, but no baseline was recorded.")
    side = excludes(diff.get("ci_low"), diff.get("ci_high"), 0.0)
    what = (f"on {split.get('n_eval_episodes')} held-out episodes the SAE leaves {_num(ho.get('fvu'))} of the "
            f"variance unexplained, PCA with as many active directions ({pca.get('n_components')}) leaves "
            f"{_num(pca.get('fvu'))} and predicting the mean leaves {_num((base.get('train_mean') or {}).get('fvu'))}")
    if side == "above":
        return Verdict("finding", f"{what}; the SAE reconstructs better than PCA (95% interval of the difference "
                                  f"{_ci(diff)} excludes 0).")
    if side is None:
        return Verdict("undetermined", f"{what}; too few held-out episodes for an interval.")
    return Verdict("no finding" if side == "includes" else "below baseline",
                   f"{what}; the SAE does not reconstruct better than PCA (difference {_ci(diff)}).")


def section_sae(ctx: _Ctx) -> Section:
    words = WORDS[_family(ctx)]
    sec = Section("sae", words["sae_title"])
    metrics = ctx.out / "sae" / "metrics.json"
    if not metrics.is_file():
        return _absent(ctx, sec, "sae/metrics.json", "<code>python train_save.py --activations X.npy --keys keys.npz --out OUT/sae</code>")
    m = _load_json(metrics)
    ho = m.get("held_out") or {}
    src = m.get("source") or {}
    sec.parts.append(
        f"<p class='how'>A sparse autoencoder rewrites each recorded activation vector x ({words['sae_row']}; "
        f"{_esc(src.get('shape', '?'))} rows x dims exported from the store) as a sparse non-negative "
        f"combination of {_esc(m.get('d_sae', '?'))} learned directions: <code>f = TopK(W_enc (x - b_dec) + b_enc)</code>, "
        f"<code>x_hat = W_dec f + b_dec</code> with <i>{_esc(m.get('arch', '?'))}</i> sparsity (k = {_esc(m.get('k', '?'))}). "
        f"{_esc(_sae_split_text(m.get('split') or ho.get('split')))}</p>"
        "<p class='how'><b>FVU</b> (fraction of variance unexplained) on the held-out rows: "
        "<code>FVU = &Sigma;<sub>i</sub> ||x<sub>i</sub> - x_hat<sub>i</sub>||&sup2; / "
        "&Sigma;<sub>i</sub> ||x<sub>i</sub> - x&#772;||&sup2;</code>, x&#772; = per-dimension mean of the held-out rows "
        "(0 = perfect reconstruction, 1 = no better than predicting the mean). <b>L0</b> = mean number of non-zero "
        "features per row. <b>Dead</b> = fraction of features that never fire on the held-out rows; <b>dense</b> = "
        f"fraction firing on more than {_num(ho.get('dense_threshold'))} of them.</p>")
    if ho.get("fvu_formula"):
        sec.parts.append(f"<p class='how'>Formula as recorded by the trainer: <code>{_esc(ho['fvu_formula'])}</code></p>")
    split = m.get("split") or ho.get("split") or {}
    base = m.get("baselines") or {}
    sec.verdict = _sae_verdict(m)
    rows = [["architecture", _esc(m.get("arch"))], ["input dim d_in", m.get("d_in")], ["features d_sae", m.get("d_sae")],
            ["k", m.get("k")], ["training steps", m.get("steps")], ["training rows", m.get("n_train_rows")],
            ["held-out split", _esc(split.get("kind", "not recorded"))],
            ["held-out episodes", split.get("n_eval_episodes")], ["held-out rows", ho.get("n_rows")],
            ["<b>held-out FVU</b> [95% CI]", _ci({"mean": ho.get("fvu"), "ci_low": ho.get("fvu_ci_low"),
                                                  "ci_high": ho.get("fvu_ci_high")})],
            [f"FVU of PCA with {_esc((base.get('pca_same_l0') or {}).get('n_components', '?'))} components (as many "
             "active directions as the SAE's L0) [95% CI]", _ci(_fvu_stat(base.get("pca_same_l0")))],
            ["FVU of the training mean [95% CI]", _ci(_fvu_stat(base.get("train_mean")))],
            ["held-out L0", ho.get("l0")],
            ["held-out MSE per row", ho.get("mse_per_row")], ["dead fraction (held-out)", ho.get("dead_fraction")],
            ["dense fraction (held-out)", ho.get("dense_fraction")],
            ["dead fraction (end of training)", m.get("final_train_dead_fraction")]]
    splice_path = ctx.out / "sae" / "splice.json"
    if splice_path.is_file():
        sp = _load_json(splice_path)
        rows += [["<b>action error recovered</b> (spliced into the policy)", sp.get("action_error_recovered")],
                 ["action MSE, reconstruction spliced", sp.get("mse_spliced")],
                 ["action MSE, site zero-ablated", sp.get("mse_zero_ablated")]]
    sec.parts.append("<h3>Metrics</h3>" + _table(["metric", "value"], rows, raw_cols=(0,)))
    if split.get("warning"):
        sec.parts.append(f"<p class='note'>{_esc(split['warning'])}.</p>")
    if splice_path.is_file():
        sec.parts.append(
            "<p class='how'><b>Action error recovered</b>: on recorded observations, with the same noise, the "
            "site's activation is replaced by the SAE reconstruction (or zeroed) and the action chunks compared with "
            "the unmodified policy's: <code>1 - E||a_sae - a||&sup2; / E||a_zero - a||&sup2;</code> "
            f"({_esc(sp.get('n_observations'))} observations; 1 = as good as the real activation, 0 = as bad as "
            "deleting it). " + ctx.link(sec, splice_path) + "</p>")
    fig = ctx.figure(sec, ctx.out / "sae" / "training_curves.png",
                     "Training curves against optimiser step: training reconstruction MSE per dimension (in the "
                     "trainer's scaled units), the auxiliary-K loss that revives dead features, the dead-feature "
                     "fraction over a sliding window of training rows, and held-out FVU (formula above) at each "
                     "evaluation.", wide=True)
    if fig:
        sec.parts.append(f"<div class='figs'>{fig}</div>")
    dash = _find_dashboard(ctx)
    if dash is not None:
        sec.parts.append("<p><b>Feature dashboard</b>: " + ctx.link(sec, dash) + " (one page per feature: activation "
                         "histogram, top-activating frames and actions).</p>")
    else:
        prob = None
        s = ctx.stage("sae_dashboard")
        if s is not None and not s.get("ok", False):
            prob = ctx.stage_problem("sae")
        sec.parts.append(f"<p class='note'>No feature dashboard: {prob[1] if prob else 'sae/dashboard.py was not run (expected sae/dashboard/index.html).'}</p>")
    sec.parts.append("<p>Files: " + ", ".join(ctx.link(sec, p) for p in [metrics, ctx.out / "sae" / "cfg.json",
                                                                          ctx.out / "sae" / "curves.json"] if p.is_file()) + "</p>")
    return sec


def _probe_verdict(d: dict) -> Verdict:
    """Finding when the 95% interval of the CV-chosen layer's test R^2 lies above both baselines' means; a test
    R^2 below the shuffled baseline is flagged as such (it is never called the best layer)."""
    layer = d.get("best_layer")
    if d.get("target_kind", "regression") != "regression":
        test, b = d.get("test") or {}, d.get("baselines") or {}
        sh = (b.get("shuffled") or {}).get("accuracy")
        return Verdict("undetermined", f"classification probe on layer {layer}: test accuracy "
                                       f"{_num(test.get('accuracy'))} vs shuffled {_num(sh)}; no interval is "
                                       "recorded for classification probes yet.")
    test, b = d.get("test") or {}, d.get("baselines") or {}
    r2, lo, hi = test.get("r2_mean"), test.get("r2_mean_ci_low"), test.get("r2_mean_ci_high")
    shuffled, rand = (b.get("shuffled") or {}).get("r2_mean"), (b.get("random_features") or {}).get("r2_mean")
    bar = max((v for v in (shuffled, rand) if v is not None), default=None)
    chosen = " (chosen by cross-validation)" if len(d.get("layers") or []) > 1 else ""
    what = (f"layer {layer}{chosen} predicts the held-out episodes' targets with R^2 "
            f"{_num(r2)} [{_num(lo)}, {_num(hi)}], against {_num(shuffled)} with shuffled targets and {_num(rand)} "
            "with random features")
    if r2 is not None and shuffled is not None and r2 < shuffled:
        return Verdict("below baseline", f"{what}: worse than the shuffled baseline, so no layer shows a linearly "
                                         "readable action here.")
    side = excludes(lo, hi, bar)
    if side == "above":
        return Verdict("finding", f"{what}; its 95% interval lies above both baselines.")
    if side is None:
        return Verdict("undetermined", f"{what}; no interval over held-out episodes was recorded.")
    return Verdict("no finding", f"{what}; its 95% interval does not clear the baselines.")


def section_probes(ctx: _Ctx) -> Section:
    sec = Section("probes", "4. Linear probes: is the action linearly readable from the activations?")
    path = ctx.out / "probes" / "probe_results.json"
    if not path.is_file():
        return _absent(ctx, sec, "probes/probe_results.json", "<code>python linear_probe.py --features X.npy --targets actions.npy --groups groups.npy --out OUT/probes</code>")
    d = _load_json(path)
    split = d.get("split") or {}
    names = d.get("target_names") or []
    sec.parts.append(
        "<p class='how'>A ridge regression (linear, L2 penalty chosen by cross-validation) predicts the targets "
        f"({_esc(', '.join(names))}) from the recorded activations of each layer. Episodes are never split: "
        f"{_esc(split.get('n_test_groups', '?'))} of {_esc(split.get('n_groups', '?'))} episodes are held out as the test "
        f"part, the rest form {_esc(split.get('n_folds', '?'))} CV folds that choose the penalty. "
        "<code>R&sup2; = 1 - &Sigma;(y - y_hat)&sup2; / &Sigma;(y - mean(y))&sup2;</code> per dimension on the test part; "
        "the reported value is the mean over dimensions (negative = worse than predicting the test mean). "
        "Two baselines run through the same pipeline: <b>shuffled</b> (each episode gets another episode's whole target "
        "sequence; mean &plusmn; sd over shuffles) and <b>random features</b> (i.i.d. Gaussian features of the same "
        "width). A probe means something only where it clearly beats both.</p>")
    sec.verdict = _probe_verdict(d)
    if d.get("target_kind", "regression") == "regression":
        rows = []
        for L in d.get("layers") or []:
            b = L.get("baselines") or {}
            sh, rf = b.get("shuffled") or {}, b.get("random_features") or {}
            cv = L.get("cv") or {}
            test = L.get("test") or {}
            rows.append([_esc(L.get("layer")), L.get("n_features"), cv.get("r2_mean_at_best"), cv.get("best_alpha"),
                         (L.get("train") or {}).get("r2_mean"),
                         f"<b>{_num(test.get('r2_mean'))}</b> [{_num(test.get('r2_mean_ci_low'))}, "
                         f"{_num(test.get('r2_mean_ci_high'))}]",
                         f"{_num(sh.get('r2_mean'))} &plusmn; {_num(sh.get('r2_mean_sd'))}", rf.get("r2_mean")])
        chosen = (f"best layer by CV: <code>{_esc(d.get('best_layer'))}</code>" if sec.verdict.status == "finding"
                  else f"layer chosen by CV: <code>{_esc(d.get('best_layer'))}</code>, which does not beat its "
                       "baselines")
        sec.parts.append(f"<h3>R&sup2; by layer ({chosen})</h3>" + _table(
            ["layer", "features", "CV R\u00b2", "penalty alpha", "train R\u00b2", "test R\u00b2 [95% CI]",
             "shuffled R\u00b2 (mean \u00b1 sd)", "random-feature R\u00b2"], rows, raw_cols=(0, 5, 6)))
        test, b = d.get("test") or {}, d.get("baselines") or {}
        per, shp = test.get("r2_per_dim") or [], (b.get("shuffled") or {}).get("r2_per_dim") or []
        rfp = (b.get("random_features") or {}).get("r2_per_dim") or []
        rows = [[_esc(n), per[i] if i < len(per) else None, shp[i] if i < len(shp) else None,
                 rfp[i] if i < len(rfp) else None] for i, n in enumerate(names)]
        sec.parts.append("<h3>Test R&sup2; per target dimension (layer chosen by CV)</h3>" + _table(
            ["dimension", "probe", "shuffled", "random features"], rows, raw_cols=(0,)))
        if any((L.get("cv") or {}).get("alpha_at_boundary") for L in d.get("layers") or []):
            sec.parts.append("<p class='note'>The chosen penalty is at an end of the searched range for some layer: "
                             "widen <code>--alphas</code>.</p>")
    else:
        test = d.get("test") or {}
        b = d.get("baselines") or {}
        rows = [[k, test.get(k)] for k in ("accuracy", "balanced_accuracy", "auc", "log_loss", "majority_accuracy")]
        rows.append(["shuffled accuracy", (b.get("shuffled") or {}).get("accuracy")])
        rows.append(["random-feature accuracy", (b.get("random_features") or {}).get("accuracy")])
        sec.parts.append("<h3>Classification probe (layer chosen by CV)</h3>" + _table(["metric", "value"], rows))
    caps = {"r2_vs_layer.png": "Test R&sup2; (mean over target dimensions) of the probe for each layer, with the "
                               "shuffled-target and random-feature baselines computed on the same split.",
            "accuracy_vs_layer.png": "Test accuracy per layer with the shuffled, random-feature and majority-class baselines.",
            "cv_curves.png": "Cross-validated R&sup2; (mean over folds and dimensions) against the ridge penalty alpha for "
                             "each layer; the chosen penalty is the maximum of each curve.",
            "r2_per_dim.png": "Test R&sup2; per target dimension for the layer chosen by cross-validation, next to the "
                             "shuffled baseline."}
    figs = [ctx.figure(sec, ctx.out / "probes" / n, c) for n, c in caps.items()]
    if any(figs):
        sec.parts.append("<div class='figs'>" + "".join(figs) + "</div>")
    sec.parts.append("<p>Files: " + ctx.link(sec, path) + "</p>")
    return sec


def _geometry_verdict(d: dict) -> Verdict:
    """Finding when the curvature's 95% interval excludes 90 degrees (consecutive steps that are not unrelated)."""
    analyses = d.get("analyses") or []
    if not analyses:
        return Verdict("undetermined", "no analysis in geometry.json.")
    a = analyses[0]
    c = ((a.get("groups") or {}).get("all") or {}).get("curvature_deg") or {}
    lo, hi = (c.get("ci95") or [None, None])[:2] if "ci95" in c else (c.get("ci_low"), c.get("ci_high"))
    side = excludes(lo, hi, 90.0)
    what = f"consecutive steps along {a.get('along')} turn by {_num(c.get('mean'), 3)} degrees [{_num(lo, 3)}, {_num(hi, 3)}]"
    if side == "below":
        return Verdict("finding", f"{what}: less than the 90 degrees of unrelated random steps, so the "
                                  "representation moves with some persistence in one direction.")
    if side == "above":
        return Verdict("finding", f"{what}: more than the 90 degrees of unrelated random steps, so it tends to "
                                  "reverse (oscillate).")
    if side is None:
        return Verdict("undetermined", f"{what}; no interval recorded.")
    return Verdict("no finding", f"{what}: not distinguishable from the 90 degrees of unrelated random steps.")


def section_geometry(ctx: _Ctx) -> Section:
    sec = Section("geometry", "5. Geometry: how do representations move along an episode?")
    path = ctx.out / "geometry" / "geometry.json"
    if not path.is_file():
        return _absent(ctx, sec, "geometry/geometry.json", "<code>python geometry.py --trajectories T.npy --success S.npy --out OUT/geometry</code>")
    d = _load_json(path)
    inp = d.get("input") or {}
    sec.parts.append(
        "<p class='how'>Each trajectory is a sequence of representation vectors z<sub>0</sub>..z<sub>N-1</sub> "
        f"(input shape {_esc(inp.get('shape'))}, axes {_esc(inp.get('axes'))}). <b>Step distance</b> = "
        "||z<sub>i+1</sub> - z<sub>i</sub>||; <b>relative step distance</b> = step distance / mean of the two norms; "
        "<b>curvature</b> = angle in degrees between consecutive steps (0 = straight line, 180 = reversal; undefined "
        "next to a near-zero step and then excluded). Means pool all values of a group; [brackets] are 95% bootstrap "
        "intervals resampling whole trajectories. Baseline: steps in unrelated random directions of a "
        "high-dimensional space meet at 90 degrees.</p>")
    sec.verdict = _geometry_verdict(d)
    traj = ctx.out / "export" / "geometry_input" / "trajectories.json"
    if traj.is_file():
        sec.parts.append("<p class='how'>Here each trajectory is one episode; each point is one policy query: "
                         + WORDS[_family(ctx)]["geometry_point"] + " (" + ctx.link(sec, traj, "episode list")
                         + ").</p>")
    rows = []
    for a in d.get("analyses") or []:
        for g, gd in (a.get("groups") or {}).items():
            if not gd:
                continue
            rows.append([_esc(f"{a.get('along')} (per {a.get('per')} {a.get('per_index')})" if a.get("per") else a.get("along")),
                         _esc(g), gd.get("n_trajectories"), _ci(gd.get("step_distance")),
                         _ci(gd.get("relative_step_distance")), _ci(gd.get("curvature_deg"), 1)])
        if len(rows) > 40:
            rows.append(["(more in geometry.json)", "", "", "", "", ""])
            break
    sec.parts.append(_table(["along", "group", "trajectories", "step distance", "relative step distance",
                             "curvature (deg)"], rows, raw_cols=(0, 1, 3, 4, 5)))
    figs = []
    for p in sorted((ctx.out / "geometry").glob("*.png")):
        if p.name.endswith("_profiles.png"):
            cap = (f"Step distance and curvature at each position along <i>{_esc(p.name[:-len('_profiles.png')])}</i> "
                   "(mean and 95% interval over trajectories), successful vs. failed episodes.")
        else:
            along, _, per = p.stem.partition("_by_")
            cap = (f"Geometry along <i>{_esc(along)}</i> summarised for each index of <i>{_esc(per)}</i> "
                   "(mean and 95% interval).")
        figs.append(ctx.figure(sec, p, cap))
    if figs:
        sec.parts.append("<div class='figs'>" + "".join(figs) + "</div>")
    sec.parts.append("<p>Files: " + ctx.link(sec, path) + "</p>")
    return sec


def section_pca(ctx: _Ctx) -> Section:
    sec = Section("pca", "6. Action PCA: how varied are the executed actions?")
    path = ctx.out / "pca" / "action_pca.json"
    if not path.is_file():
        return _absent(ctx, sec, "pca/action_pca.json", "<code>python action_pca.py --rollouts OUT/rollouts --out OUT/pca</code>")
    d = _load_json(path)
    sec.verdict = Verdict("descriptive", f"{d.get('n_components_90')} of {len(d.get('dim_names') or [])} principal "
                                         "components explain 90% of the executed actions' variance; a description of "
                                         "the behaviour, with no baseline to beat.")
    sec.parts.append(
        f"<p class='how'>The {_esc(d.get('n_rows'))} executed 7-D actions of {_esc(d.get('n_episodes'))} episodes are "
        f"{'z-scored per dimension, then ' if d.get('standardized') else ''}decomposed by PCA (SVD). Explained variance "
        "ratio of component k = its variance / total (standardised) variance. Few components for 90 % = the policy "
        f"moves in a low-dimensional way; here <b>{_esc(d.get('n_components_90'))}</b> of "
        f"{_esc(len(d.get('dim_names') or []))} components reach 90 %.</p>")
    evr, cum = d.get("explained_variance_ratio") or [], d.get("cumulative_explained_variance_ratio") or []
    rows = [[f"PC{i + 1}", evr[i], cum[i] if i < len(cum) else None] for i in range(len(evr))]
    sec.parts.append(_table(["component", "explained variance ratio", "cumulative"], rows))
    if d.get("constant_dims"):
        sec.parts.append(f"<p class='note'>Constant action dimensions (left out): {_esc(d['constant_dims'])}</p>")
    caps = {"explained_variance.png": "Explained variance ratio per principal component (bars) and cumulative (line).",
            "trajectories_pc.png": "Each episode's executed actions projected on PC1/PC2, connected in time order "
                                   "(green success, red failure; dot = first step).",
            "pca2d_by_success.png": "All executed actions on PC1/PC2 coloured by episode outcome.",
            "pca2d_by_task.png": "All executed actions on PC1/PC2 coloured by task (suite/task id).",
            "pca2d_by_suite.png": "All executed actions on PC1/PC2 coloured by suite.",
            "pca3d_by_success.png": "PC1-PC3 view coloured by episode outcome.",
            "pca3d_by_task.png": "PC1-PC3 view coloured by task.",
            "pca3d_by_suite.png": "PC1-PC3 view coloured by suite."}
    figs = [ctx.figure(sec, ctx.out / "pca" / n, c) for n, c in caps.items()]
    if any(figs):
        sec.parts.append("<div class='figs'>" + "".join(figs) + "</div>")
    sec.parts.append("<p>Files: " + ", ".join(ctx.link(sec, p) for p in [path, ctx.out / "pca" / "action_pca_scores.npy"]
                                               if p.is_file()) + "</p>")
    return sec


SECTION_BUILDERS: dict[str, Callable[[_Ctx], Section]] = {
    "evaluation": section_evaluation, "attention": section_attention, "sae": section_sae, "probes": section_probes,
    "geometry": section_geometry, "pca": section_pca}
# One builder per section of the quickstart's stage list, in its order (a section without a builder fails here).
SECTIONS: tuple[Callable[[_Ctx], Section], ...] = tuple(SECTION_BUILDERS[sid] for sid in pipeline.SECTIONS)


def section_comparison(ctx: _Ctx) -> Section | None:
    """The two policies of ``comparison.json`` (written by ``--compare-with``) side by side; None without it."""
    from openpi.report_compare import FILE

    path = ctx.out / FILE
    if not path.is_file():
        return None
    d = _load_json(path)
    pols = d.get("policies") or []
    sec = Section("comparison", "7. Comparison of two policies on the same episodes")
    sec.links.append(ctx.rel(path))
    names = [f"{p.get('config') or '?'} ({p.get('model') or '?'})" for p in pols]
    if not d.get("same_episodes"):
        sec.parts.append("<p class='bad'>The two folders did not run the same episodes: the numbers below are not "
                         "paired and differences say little.</p>")
    rows = []
    for name, p in zip(names, pols):
        s = p.get("success") or {}
        rows.append([_esc(name), "success", f"{s.get('successes')}/{s.get('episodes')} ("
                     f"{_num(s.get('rate'), 2)} [{_num(s.get('ci_low'), 2)}, {_num(s.get('ci_high'), 2)}])"])
        for cam, c in (((p.get("attention") or {}).get("by_camera")) or {}).items():
            rows.append([_esc(name), f"attention {_esc(cam)}: lift over uniform / over other frames",
                         f"{_ci(c.get('lift'))} / {_ci(c.get('lift_over_other_frames'))}"])
        h = (p.get("attention") or {}).get("head")
        if h:
            test = h.get("test") or {}
            rows.append([_esc(name), f"{_esc(h.get('head_kind'))} {_esc(h.get('head'))} of layer "
                         f"{_esc(h.get('layer'))} ({_esc(h.get('camera'))}), held out: lift over other frames",
                         _ci(test.get("lift_over_other_frames"))])
        for L in p.get("probes") or []:
            rows.append([_esc(name), f"probe test R&sup2; at <code>{_esc(L.get('layer'))}</code> "
                         f"({_esc(L.get('n_features'))} features; shuffled {_num(L.get('shuffled_r2'))})",
                         f"{_num(L.get('test_r2'))} [{_num(L.get('ci_low'))}, {_num(L.get('ci_high'))}]"])
    sec.parts.append("<p class='how'>Each row repeats a number of that policy's own sections (same definitions, "
                     "baselines and held-out episodes). Success: Wilson 95% interval. Attention: soft-mass lift "
                     "with episode-bootstrap 95% intervals (Pi0: action tokens' attention over image patches; "
                     "Diffusion Policy: the spatial softmax of each camera's encoder). Probes: ridge test R&sup2; on "
                     "held-out episodes, layers input to output. A Diffusion Policy's UNet blocks at the last "
                     "denoising step read the nearly clean chunk as input, so they carry the action almost by "
                     "construction; its <code>cond.global</code> row (the observation encoding) is the one that "
                     "says how much the observation alone makes the action linearly readable.</p>"
                     + _table(["policy", "measure", "value"], rows, raw_cols=(0, 1)))
    succ = [(p.get("success") or {}) for p in pols]
    if len(succ) == 2 and all(s.get("episodes") for s in succ):
        a, b = succ
        apart = (a.get("ci_low") or 0) > (b.get("ci_high") or 1) or (b.get("ci_low") or 0) > (a.get("ci_high") or 1)
        sec.verdict = Verdict("finding" if apart else "no finding",
                              f"success {a['successes']}/{a['episodes']} ({names[0]}) vs {b['successes']}/"
                              f"{b['episodes']} ({names[1]}): the 95% intervals "
                              + ("do not overlap." if apart else "overlap, so these episodes do not tell the two "
                                                                 "policies' success rates apart."))
    return sec


def _safe(fn: Callable[[_Ctx], Section], ctx: _Ctx) -> Section:
    """Run one section builder; an unreadable or malformed input becomes an 'error' section naming the problem."""
    try:
        return fn(ctx)
    except (_BadFile, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        sid = fn.__name__.removeprefix("section_")
        sec = Section(sid, f"{sid}", status="error", reason=f"{type(e).__name__}: {e}")
        sec.parts.append(f"<p class='bad'>This section could not be built: {_esc(sec.reason)}</p>")
        return sec


# ---------------------------------------------------------------- summary


def _summary(ctx: _Ctx, sections: list[Section]) -> list[str]:
    lines = []
    failed = [s["stage"] for s in ctx.stages if not s.get("ok", False)]
    if ctx.stages:
        lines.append(f"stages: {len(ctx.stages) - len(failed)}/{len(ctx.stages)} ok" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    meta = _run_meta(ctx)
    if meta:
        sm = meta.get("server_metadata") or {}
        lines.append(f"policy: {sm.get('config', '?')} ({'trained' if sm.get('trained') else 'UNTRAINED random weights'})")

    def get(path: str) -> Any:
        try:
            return _load_json(ctx.out / path)
        except _BadFile:
            return None

    res = [get(ctx.rel(p)) for p in sorted((ctx.out / "rollouts" / "results").glob("*.json"))]
    for r in res:
        if isinstance(r, dict) and r.get("total"):
            t = r["total"]
            lines.append(f"evaluation [{r.get('run_id')}]: {t.get('successes')}/{t.get('episodes')} episodes succeeded "
                         f"({t.get('errors', 0)} policy errors)")
    att = get("attention/summary.json") if (ctx.out / "attention/summary.json").is_file() else None
    if isinstance(att, dict):
        for run, g in (att.get("success_vs_failure") or {}).items():
            for name in ("success", "failure"):
                s = (g or {}).get(name) or {}
                if s.get("n_episodes"):
                    lines.append(f"attention [{run}/{name}]: IoU top-k {_ci(s.get('iou_topk'))} vs uniform "
                                 f"{_num((s.get('uniform_iou_topk') or {}).get('mean'))}, centre-bias "
                                 f"{_num((s.get('center_bias_iou_topk') or {}).get('mean'))}; visual fraction "
                                 f"{_num((s.get('visual_fraction') or {}).get('mean'))}")
    sae = get("sae/metrics.json") if (ctx.out / "sae/metrics.json").is_file() else None
    if isinstance(sae, dict):
        ho = sae.get("held_out") or {}
        split = (sae.get("split") or ho.get("split") or {}).get("kind", "split not recorded")
        pca = (sae.get("baselines") or {}).get("pca_same_l0") or {}
        lines.append(f"SAE: held-out FVU {_num(ho.get('fvu'))} [{_num(ho.get('fvu_ci_low'))}, "
                     f"{_num(ho.get('fvu_ci_high'))}] ({split} held out) vs PCA with the same L0 "
                     f"{_num(pca.get('fvu'))}; L0 {_num(ho.get('l0'))}, dead {_num(ho.get('dead_fraction'))}")
    pr = get("probes/probe_results.json") if (ctx.out / "probes/probe_results.json").is_file() else None
    if isinstance(pr, dict) and pr.get("target_kind", "regression") == "regression":
        b, t = pr.get("baselines") or {}, pr.get("test") or {}
        nums = (f"test R^2 {_num(t.get('r2_mean'))} [{_num(t.get('r2_mean_ci_low'))}, "
                f"{_num(t.get('r2_mean_ci_high'))}] vs shuffled {_num((b.get('shuffled') or {}).get('r2_mean'))}, "
                f"random features {_num((b.get('random_features') or {}).get('r2_mean'))}")
        status = _probe_verdict(pr).status
        if status == "finding":
            lines.append(f"probes: best layer {pr.get('best_layer')} {nums}")
        elif status == "undetermined":
            lines.append(f"probes: undetermined, no interval over held-out episodes (CV-chosen layer "
                         f"{pr.get('best_layer')}: {nums})")
        else:
            lines.append(f"probes: no layer beats its baselines (CV-chosen layer {pr.get('best_layer')}: {nums})")
    geo = get("geometry/geometry.json") if (ctx.out / "geometry/geometry.json").is_file() else None
    if isinstance(geo, dict) and geo.get("analyses"):
        a = geo["analyses"][0]
        g = (a.get("groups") or {}).get("all") or {}
        lines.append(f"geometry (along {a.get('along')}): curvature {_ci(g.get('curvature_deg'), 1)} deg, "
                     f"relative step {_ci(g.get('relative_step_distance'))}")
    pca = get("pca/action_pca.json") if (ctx.out / "pca/action_pca.json").is_file() else None
    if isinstance(pca, dict):
        lines.append(f"action PCA: {pca.get('n_components_90')} of {len(pca.get('dim_names') or [])} components explain 90% "
                     f"of the variance of {pca.get('n_rows')} actions")
    judged = [f"{s.id} {s.verdict.status}" for s in sections if s.verdict is not None]
    if judged:
        lines.append("verdicts (does each result beat its baseline?): " + ", ".join(judged))
    bad = [s for s in sections if s.status != "ok"]
    for s in bad:
        lines.append(f"section {s.id}: {s.status}: {html.unescape(_strip_tags(s.reason or ''))}")
    return lines


def _strip_tags(text: str) -> str:
    out, inside = [], False
    for ch in text:
        if ch == "<":
            inside = True
        elif ch == ">":
            inside = False
        elif not inside:
            out.append(ch)
    return "".join(out)


# ---------------------------------------------------------------- page


def _all_files(ctx: _Ctx, sec: Section) -> str:
    """Every figure, metric file, video, page and log, grouped by folder (bulk data folders excluded)."""
    keep = {".png", ".json", ".csv", ".mp4", ".html", ".log", ".txt"}
    skip_top = {"store", "export"}
    groups: dict[str, list[pathlib.Path]] = {}
    for p in sorted(ctx.out.rglob("*")):
        if not p.is_file() or p.suffix not in keep or p.name in ("index.html", "report.json"):
            continue
        rel = p.relative_to(ctx.out)
        if rel.parts[0] in skip_top and p.suffix != ".json":
            continue
        groups.setdefault(rel.parent.as_posix(), []).append(p)
    parts = []
    for folder, files in groups.items():
        links = " &middot; ".join(ctx.link(sec, p, p.name) for p in files)
        parts.append(f"<details><summary><code>{_esc(folder)}/</code> ({len(files)} files)</summary><p>{links}</p></details>")
    return "".join(parts)


def _stages_table(ctx: _Ctx, sec: Section) -> str:
    if ctx.stages_error:
        return f"<p class='bad'>{_esc(ctx.stages_error)}</p>"
    if not ctx.stages:
        return "<p class='note'>No <code>stages.json</code>: stage status unknown (report built from files only).</p>"
    rows = []
    for s in ctx.stages:
        status = "<span class='ok'>ok</span>" if s.get("ok") else "<span class='failed'>FAILED</span>"
        log = ctx.out / str(s.get("log", ""))
        rows.append([_esc(s.get("stage")), status, s.get("seconds"), ctx.link(sec, log, "log") if s.get("log") else "no log"])
    return _table(["stage", "status", "seconds", "log"], rows, raw_cols=(0, 1, 3))


def build_html(out: str | os.PathLike) -> tuple[str, list[Section], list[str]]:
    """Return (page, sections, summary lines) for an output folder, without writing anything."""
    ctx = _Ctx(pathlib.Path(out))
    sections = [_safe(fn, ctx) for fn in SECTIONS]
    comparison = section_comparison(ctx)
    summary = _summary(ctx, sections)
    if comparison is not None:
        sections.append(comparison)
    meta = _run_meta(ctx)
    head_sec = Section("overview", "Overview")
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>vla-interp report</title>",
             f"<style>{CSS}</style></head><body><h1>vla-interp report</h1>"]
    if meta:
        sm, st = meta.get("server_metadata") or {}, meta.get("settings") or {}
        parts.append(f"<p>Policy <b>{_esc(sm.get('config', '?'))}</b> ({_esc(sm.get('model', '?'))}, action horizon "
                     f"{_esc(sm.get('action_horizon', '?'))}, checkpoint {_esc(sm.get('checkpoint') or 'none')}); suite "
                     f"<b>{_esc(meta.get('suite', '?'))}</b>; run <code>{_esc(meta.get('run_id', '?'))}</code>; seed "
                     f"{_esc(st.get('seed', '?'))}, max {_esc(st.get('max_steps', '?'))} steps, replanning every "
                     f"{_esc(st.get('replan_steps', '?'))} steps. Recorded sites: "
                     f"{_esc(', '.join(sm.get('recording') or []) or 'none')}.</p>")
        if sm.get("card"):
            parts.append(f"<p class='how'><b>Checkpoint card:</b> {_esc(sm['card'])}</p>")
        if sm.get("trained") is False or sm.get("warning"):
            parts.append(f"<p class='bad'><b>Untrained policy.</b> {_esc(sm.get('warning') or '')}. Every number below shows "
                         "the pipeline working, not behaviour worth interpreting.</p>")
    parts.append("<div class='glance'><h3>At a glance</h3><ul>" + "".join(f"<li>{_esc(line)}</li>" for line in summary)
                 + "</ul></div>")
    nav = " | ".join(f"<a href='#{s.id}'>{_esc(s.title.split(':')[0])}</a>"
                     + ("" if s.status == "ok" else f" <span class='{s.status}'>({s.status})</span>") for s in sections)
    parts.append(f"<p>Sections: {nav} | <a href='#stages'>Stages</a> | <a href='#files'>All files</a></p>")
    for s in sections:
        parts.append(f"<h2 id='{s.id}'>{_esc(s.title)}</h2>" + (s.verdict.html() if s.verdict else "")
                     + "".join(s.parts))
    parts.append("<h2 id='stages'>Stages</h2><p class='how'>Each analysis ran as a separate command; its output is in the "
                 "log.</p>" + _stages_table(ctx, head_sec))
    parts.append("<h2 id='files'>All files</h2><p class='how'>Every figure, metric file, video and log in this folder "
                 "(the activation store and exported arrays are in <code>store/</code> and <code>export/</code>).</p>"
                 + _all_files(ctx, head_sec))
    parts.append("</body></html>")
    sections.append(head_sec)
    return "\n".join(parts), sections, summary


def write_report(out: str | os.PathLike, compare_with: str | os.PathLike | None = None) -> pathlib.Path:
    """Write ``<out>/index.html`` and ``<out>/report.json`` (atomically); returns the index path. With
    ``compare_with`` (another report folder) also ``comparison.json`` and a comparison section."""
    out = pathlib.Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"report: output folder {out} does not exist")
    if compare_with is not None:
        from openpi.report_compare import compare

        compare(out, compare_with)
    page, sections, summary = build_html(out)
    ctx = _Ctx(out)
    record = {"schema": SCHEMA,
              "sections": [{"id": s.id, "title": s.title, "status": s.status,
                            "reason": _strip_tags(html.unescape(s.reason)) if s.reason else None,
                            "verdict": None if s.verdict is None else {"status": s.verdict.status,
                                                                       "text": s.verdict.text},
                            "figures": s.figures, "links": sorted(set(s.links))} for s in sections],
              "stages": ctx.stages, "summary": summary}
    write_text_atomic(out / "index.html", page)
    write_json_atomic(out / "report.json", record, indent=1)
    return out / "index.html"


def summary_lines(out: str | os.PathLike) -> list[str]:
    """The short text summary of an output folder (the same lines as the page's 'At a glance')."""
    return build_html(out)[2]


def print_summary(out: str | os.PathLike) -> None:
    """Print the summary (for the end of the quickstart run)."""
    out = pathlib.Path(out)
    print(f"== vla-interp report: {out / 'index.html'}")
    for line in summary_lines(out):
        print(f"   {line}")
