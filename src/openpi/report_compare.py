"""Side-by-side facts of two quickstart report folders (e.g. the tiny Pi0 and the tiny Diffusion Policy on the same
episodes): success, where each looks, how linearly the action is decodable by layer.

Why a separate module: the report sections each read one folder; a comparison reads two and must say when they
are not comparable (different episodes). ``compare(out, other)`` writes ``<out>/comparison.json`` (schema
``vla-interp/report-comparison/1``) so a later ``write_report(out)`` keeps showing it; ``openpi.report`` renders
it as the last section. Every number keeps its interval; nothing is ranked without one.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

from openpi.report import wilson_interval
from openpi.shared.io import write_json_atomic


SCHEMA = "vla-interp/report-comparison/1"
FILE = "comparison.json"


def _read(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def policy_facts(folder: str | pathlib.Path) -> dict[str, Any]:
    """What the comparison shows of one report folder (None where the folder lacks that analysis)."""
    folder = pathlib.Path(folder)
    meta = next(iter(sorted((folder / "rollouts" / "runs").glob("*.json"))), None)
    server = ((_read(meta) or {}).get("server_metadata") or {}) if meta else {}
    episodes: list[list] = []
    k = n = 0
    for p in sorted((folder / "rollouts" / "results").glob("*.json")):
        d = _read(p) or {}
        total = d.get("total") or {}
        k, n = k + int(total.get("successes", 0)), n + int(total.get("episodes", 0))
    for p in sorted((folder / "rollouts" / "episodes").glob("*.json")):
        e = _read(p) or {}
        episodes.append([e.get("suite"), e.get("task_id"), e.get("episode")])
    lo, hi = wilson_interval(k, n) if n else (None, None)
    facts: dict[str, Any] = {"folder": str(folder), "config": server.get("config"), "model": server.get("model"),
                             "success": {"successes": k, "episodes": n, "rate": k / n if n else None,
                                         "ci_low": lo, "ci_high": hi},
                             "episodes": sorted(episodes, key=str)}
    att = _read(folder / "attention" / "summary.json") or {}
    facts["attention"] = {
        "by_camera": {cam: {key: v.get(key) for key in ("soft_mass", "uniform_soft_mass", "lift",
                                                        "lift_over_other_frames")}
                      for run in (att.get("soft_mass_by_camera") or {}).values() for cam, v in run.items()},
        "head": next(({"camera": h.get("camera"), "layer": h.get("layer"), "head": h.get("head"),
                       "head_kind": h.get("head_kind", "head"), "test": h.get("test")}
                      for h in (att.get("head_selection") or {}).values() if h), None)} if att else None
    probes = _read(folder / "probes" / "probe_results.json") or {}
    facts["probes"] = [{"layer": L.get("layer"), "n_features": L.get("n_features"),
                        "test_r2": (L.get("test") or {}).get("r2_mean"),
                        "ci_low": (L.get("test") or {}).get("r2_mean_ci_low"),
                        "ci_high": (L.get("test") or {}).get("r2_mean_ci_high"),
                        "shuffled_r2": ((L.get("baselines") or {}).get("shuffled") or {}).get("r2_mean")}
                       for L in probes.get("layers") or []] or None
    return facts


def compare(out: str | pathlib.Path, other: str | pathlib.Path) -> dict[str, Any]:
    """Write ``<out>/comparison.json``: this folder's facts and ``other``'s, and whether they ran the same
    episodes. ``other`` must be a report folder (its rollouts exist), else an error naming what is missing."""
    other = pathlib.Path(other)
    if not (other / "rollouts" / "results").is_dir():
        raise FileNotFoundError(f"--compare-with {other}: not a quickstart report folder (no rollouts/results/)")
    this, that = policy_facts(out), policy_facts(other)
    record = {"schema": SCHEMA, "policies": [this, that],
              "same_episodes": bool(this["episodes"]) and this["episodes"] == that["episodes"]}
    write_json_atomic(pathlib.Path(out) / FILE, record, indent=1)
    return record
