"""Static, offline feature dashboard: an index sorted by a statistic and one HTML page per feature.

Layout under the output folder (all links relative, no scripts, no network):
    index.html                        table of features sorted by the chosen statistic, linking to pages
    features/feature_NNNNN.html       one page per feature
    features/img/hist_NNNNN.png       activation histogram (non-zero activations; zeros counted in the title)
    features/img/actions_NNNNN.png    mean executed action vs env-step offset around the top moments
    thumbs/fNNNNN_rRR.png             top-activating frames (written by openpi.interp.sae.frames)
    mining.json                       the mining report the pages were built from (openpi.interp.sae.mining)
"""

from __future__ import annotations

import html
import pathlib

import numpy as np

from openpi.shared.io import write_json_atomic
from openpi.shared.records import ACTION_NAMES


def _fmt(v, nd: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if np.isfinite(v) else "n/a"
    return html.escape(str(v))


class Raw(str):
    """A table cell holding trusted HTML (everything else is escaped)."""


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, Raw) else _fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def action_names(n: int) -> list[str]:
    """Names of n action dimensions: LIBERO's (openpi.shared.records.ACTION_NAMES), then a7, a8, ..."""
    return list(ACTION_NAMES[:n]) + [f"a{i}" for i in range(len(ACTION_NAMES), n)]


CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:right}th{background:#eee}
td:first-child{text-align:left}.frames{display:flex;flex-wrap:wrap;gap:8px}.frames figure{margin:0;font-size:11px}
.frames img{max-width:280px;border:1px solid #999}"""


def _page(title: str, body: str) -> str:
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>{body}</body></html>"


def _plot_hist(path: pathlib.Path, hist: dict, feature: int) -> None:
    import matplotlib.pyplot as plt

    edges = np.asarray(hist["edges"])
    counts = np.asarray(hist["counts"])
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue")
    ax.set_yscale("log" if counts.max(initial=0) > 0 else "linear")
    ax.set_xlabel("activation (non-zero)")
    ax.set_ylabel("rows")
    ax.set_title(f"feature {feature}: {hist['zeros']} rows at 0", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_actions(path: pathlib.Path, actions: dict, feature: int) -> bool:
    win = actions.get("window_mean") or []
    if not win:
        return False
    import matplotlib.pyplot as plt

    arr = np.asarray([[np.nan if v is None else v for v in row] for row in win], float)
    offs = actions["window_offsets"]
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    for a, name in enumerate(action_names(arr.shape[1])):
        ax.plot(offs, arr[:, a], label=name)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("env steps from top moment")
    ax.set_ylabel("mean executed action")
    ax.set_title(f"feature {feature}: actions around top moments", fontsize=9)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def feature_page(rep: dict, out: pathlib.Path, sae_name: str) -> str:
    """Write the page (and its figures) of one feature; return its path relative to `out`."""
    f = rep["feature"]
    img_dir = out / "features" / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    _plot_hist(img_dir / f"hist_{f:05d}.png", rep["hist"], f)
    parts = [f"<p><a href='../index.html'>&larr; index</a> &middot; SAE {html.escape(sae_name)}</p><h1>Feature {f}</h1>"]
    parts.append(_table(["fire rate", "fire count", "mean when active", "max activation"], [[rep["fire_rate"], rep["fire_count"], rep["mean_when_active"], rep["max_activation"]]]))
    parts.append("<h2>Top-activating moments</h2><div class='frames'>")
    for t in rep["top"]:
        cap = f"#{t['rank']} act {t['activation']:.3f}<br>{html.escape(t['stem'])} step {t['env_step']}"
        if t.get("image"):
            parts.append(f"<figure><img src='../{html.escape(t['image'])}' alt='feature {f} rank {t['rank']}'><figcaption>{cap}</figcaption></figure>")
        else:
            parts.append(f"<figure><figcaption>{cap}<br>(no frame)</figcaption></figure>")
    parts.append("</div>")
    parts.append(f"<h2>Activation histogram</h2><img src='img/hist_{f:05d}.png' alt='histogram'>")
    acts = rep.get("actions")
    if acts:
        names = action_names(len(acts["at_top_mean"]) or len(acts.get("corr") or []))
        rows = [["mean executed at top moments", *acts["at_top_mean"]]]
        if acts.get("corr") is not None:
            rows.append([f"correlation with activation ({acts.get('label', 'predicted')} label, "
                         f"n={acts['corr_rows']})", *acts["corr"]])
        parts.append("<h2>Executed actions</h2>" + _table(["", *names], rows))
        cl = acts["clusters"]
        if cl["centers"]:
            parts.append("<h3>k-means clusters of actions at top moments</h3>" + _table(["cluster (size)", *names], [[f"{i} ({s})", *c] for i, (c, s) in enumerate(zip(cl["centers"], cl["sizes"]))]))
        if _plot_actions(img_dir / f"actions_{f:05d}.png", acts, f):
            parts.append(f"<img src='img/actions_{f:05d}.png' alt='actions around top moments'>")
    parts.append("<h2>Tasks</h2>" + _table(["suite / task", "rows", "fire rate", "mean activation"], [[f"{t['suite']} / {t['task_id']}", t["n_rows"], t["fire_rate"], t["mean_activation"]] for t in rep["tasks"]]))
    if rep.get("prompts") is not None:
        parts.append("<h2>Prompts</h2>" + _table(["prompt", "rows", "fire rate", "mean activation"], [[t["prompt"], t["n_rows"], t["fire_rate"], t["mean_activation"]] for t in rep["prompts"]]))
    rel = f"features/feature_{f:05d}.html"
    (out / rel).write_text(_page(f"feature {f}", "".join(parts)))
    return rel


def sort_value(rep: dict, sort_by: str) -> float:
    """The value of a feature report used to order the index."""
    if sort_by == "action_corr":
        c = (rep.get("actions") or {}).get("corr")
        return float(np.nanmax(np.abs(np.asarray(c, float)))) if c else float("-inf")
    return float(rep[sort_by])


def build_dashboard(report: dict, out_dir: str | pathlib.Path, sae_name: str, sort_by: str = "fire_rate") -> pathlib.Path:
    """Write mining.json, one page per feature and index.html (features sorted by `sort_by`, descending)."""
    out = pathlib.Path(out_dir)
    (out / "features").mkdir(parents=True, exist_ok=True)
    feats = sorted(report["features"], key=lambda r: -sort_value(r, sort_by))
    rows = []
    for rep in feats:
        rel = feature_page(rep, out, sae_name)
        top_task = rep["tasks"][0] if rep["tasks"] else None
        corr = (rep.get("actions") or {}).get("corr")
        rows.append([
            Raw(f"<a href='{rel}'>feature {rep['feature']}</a>"),
            rep["fire_rate"],
            rep["mean_when_active"],
            rep["max_activation"],
            None if not corr else float(np.nanmax(np.abs(np.asarray(corr, float)))),
            "n/a" if top_task is None else f"{top_task['suite']} / {top_task['task_id']}",
        ])
    body = (
        f"<h1>SAE features: {html.escape(sae_name)}</h1>"
        f"<p>{report['n_rows']} rows, {report['n_episodes']} episodes; {len(feats)} features sorted by "
        f"<b>{html.escape(sort_by)}</b> (descending).</p>"
        + _table(["feature", "fire rate", "mean when active", "max activation", "max |corr| with actions", "top task"], rows)
    )
    (out / "index.html").write_text(_page(f"SAE features {sae_name}", body))
    write_json_atomic(out / "mining.json", report, indent=1)
    return out / "index.html"
