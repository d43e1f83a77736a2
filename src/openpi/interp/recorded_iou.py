"""Attention-object IoU and modality analysis of a recorded LIBERO run (activation store + rollout folder).

Library side of ``evaluate_attention_iou.py`` (the script only parses flags and prints); kept here so the scoring,
summaries and resume logic are importable and tested. Entry point: :func:`evaluate_run`.

Joins every recorded policy query with the frame and instance mask it saw (openpi.interp.recorded_run), averages
the action-query attention over the selected denoising steps, heads and action queries, and scores the chosen
camera's share against the episode's objects of interest with openpi.interp.iou (union and per object, with the
uniform and centre-bias baselines). Runs episode by episode (``--shard-index/--num-shards`` split episodes);
finished episodes are skipped on a rerun, so a killed run resumes. Summaries are rebuilt from every episode file
in OUT at the end of each run.

Diffusion Policy recordings (``enc.<cam>.attn``, the spatial softmax; recorded_run joins them) go through the same
code: the key axis is the cameras' feature-map cells side by side, each camera's part its own distribution at the
last obs step (the queried frame), so ``camera_share`` is 1 by construction; keypoints are the heads (the
head-averaged numbers average the keypoints, head selection picks a keypoint, ``head_kind`` "keypoint") of one
pseudo-layer ``encoder``. Object masks reach the grid through :class:`openpi.interp.iou.GridGeometry` (the saved
frame resized with padding to the model's ``image_hw``, cropped to ``crop_box``, divided into the feature-map cells;
Pi0's is the grid over the whole frame). Attention without text keys has no modality split: ``fraction`` values
and ``visual_linguistic_ratio`` are null, ``table_warnings`` empty, such runs are left out of
``language_corruption``, and ``summary.json`` ``notes`` says so per run. Overlays draw each cell where it lies on
the frame.

Outputs (OUT/):
``run.json`` (openpi.shared.rundir): job ``attention-iou`` and the settings every episode file shares.
``episodes/<stem>.json`` (schema ``vla-interp/recorded-attention-iou/1``), one per episode::

    run_id, suite, task_id, episode, prompt, original_prompt, prompt_mode, success, episode_steps
    settings      {camera, layers, denoise_steps, percentile, sigma_frac}
    grid          [grid_h, grid_w] of the camera patches (from the recording's span table)
    object_ids    {BDDL name: instance id} (matched objects of interest); objects_scored: ids present in the masks
    attention_source {model, head_kind (head | keypoint), sites, and for a Diffusion Policy layer ("encoder"),
                  obs_step ("last"), geometry {camera: {grid, image_hw, crop_box}}}
    warnings      e.g. "no object of interest found in the segmentation" (then every metric is null)
    queries       [{env_step, replan_index, frame_row, time_frac (env_step / episode_steps), phase early|mid|late,
                    fraction {visual, instruction, template, state, actions, <camera>...} (layer mean),
                    visual_linguistic_ratio, cameras {<valid camera with masks>: {soft_mass, uniform_soft_mass,
                    attention_grid, object_cover}} (layer mean; the last two: the camera's attention normalised
                    over its patches and the objects' coverage of each patch, row-major, for the other-frames
                    baseline; all null when no object is in that camera), heads {layers, attention_grid (layers,
                    heads, patches)} (scored camera, only for recordings that kept heads), layer_mean {METRIC...,
                    mask_area, camera_share, warning, baselines {uniform|center_bias: {soft_mass, iou_topk}},
                    objects {"<id>": {soft_mass, iou_topk, pointing_accuracy} | null}}, per_layer [{layer, same as layer_mean,
                    fraction {...} and visual_linguistic_ratio of that layer alone}]}]
    mean          {METRIC: mean over the episode's queries (layer mean)}

METRIC: soft_mass, pointing_accuracy, iou_topk, dice_topk, iou_percentile, iou_otsu, iou_ceiling_percentile,
iou_chance_percentile (definitions: openpi.interp.iou, ATTENTION_VIZ_README.md). Undefined values are null.

``summary_tasks.csv`` / ``summary_suites.csv``: one row per (run_id, prompt_mode, suite[, task_id], layer) with
layer = ``mean`` or a layer index: n_episodes, n_queries, success_rate, mean and episode-bootstrap 95% CI of
iou_topk, soft_mass and soft_mass_lift (soft mass minus uniform attention's), means of pointing_accuracy,
iou_percentile, uniform/centre-bias iou_topk, uniform_soft_mass, and the visual and instruction fractions of that
row's layer (of the layer mean on ``mean`` rows).
``summary.json`` (schema ``vla-interp/recorded-attention-iou-summary/1``): {counts {episodes, expected_episodes,
missing_episodes, queries}, grid, n_patches, bootstrap {n_boot, seed, unit, level}, warnings [str], notes [str]
(what does not apply to Diffusion Policy runs),
soft_mass_by_camera {run_id: {camera: {n_episodes, soft_mass, uniform_soft_mass, lift, other_frames_soft_mass,
lift_over_other_frames: {mean, ci_low, ci_high, n}}}} (other frames: this attention scored against the object
masks of the other episodes' queries, so a fixed spatial habit scores the same and the lift says whether attention
moves with the objects), head_selection {run_id: {camera, layer, head, head_kind, layers, split {rule, train_episodes,
test_episodes}, train_lift_over_other_frames (layers x heads), test {n_episodes, soft_mass, other_frames_soft_mass,
lift_over_other_frames, lift: {mean, ci_low, ci_high, n}}}} (per-head recordings only: the head whose attention
moves most with the objects on training episodes, measured on held-out episodes), success_vs_failure {run_id:
{success|failure: {n_episodes, n_queries, METRIC | uniform_iou_topk | center_bias_iou_topk | visual_fraction |
instruction_fraction | success: {mean, ci_low, ci_high, n}}, difference {iou_topk, soft_mass, pointing_accuracy, visual_fraction: success - failure} |
null}}, modality {run_id: {prompt_modes, visual, instruction, by_phase {early|mid|late: {n_queries, visual,
instruction, visual_linguistic_ratio}}}}, language_corruption (null unless several prompt modes)
{reference_runs, modes {prompt_mode: {run_ids, n_pairs, reference_success_rate, success_rate,
delta_success_rate, visual_fraction {reference, corrupted, delta}, by_phase {phase: {reference, corrupted,
delta}}}}}}. Episodes pair by (suite, task_id, episode) with the run whose prompt_mode is ``original``.
Figures: ``evolution.png`` (soft-mass lift over uniform attention over normalised episode time, successful vs failed
episodes),
``modality_evolution.png`` (visual and instruction fractions over time per prompt mode), and with
``--overlays`` ``overlays/<stem>/s<env_step>.png``, with ``--video`` ``videos/<stem>.mp4``.
"""
from __future__ import annotations

import csv
import pathlib
import shutil
from collections.abc import Sequence
from typing import Literal

import numpy as np
import tqdm

from openpi.interp import attention as A
from openpi.interp import attention_plots as plots
from openpi.interp import iou
from openpi.interp.recorded_run import EpisodeKey, JoinError, PolicyQuery, RecordedRun
from openpi.shared.io import atomic_path, finite_float, read_json
from openpi.shared.rundir import RunDir

SCHEMA = "vla-interp/recorded-attention-iou/1"
METRICS: tuple[str, ...] = ("soft_mass", "pointing_accuracy", "iou_topk", "dice_topk", "iou_percentile",
                            "iou_otsu", "iou_ceiling_percentile", "iou_chance_percentile")
BASE_METRICS: tuple[str, ...] = ("soft_mass", "iou_topk")
PHASES: tuple[str, ...] = ("early", "mid", "late")
RUN_JOB = "attention-iou"
NO_OBJECT_WARNING = "no object of interest found in the segmentation of camera {camera}; metrics are null"
Camera = Literal["base_0_rgb", "left_wrist_0_rgb"]


# --------------------------------------------------------------------------------------------------------------
# Per episode
# --------------------------------------------------------------------------------------------------------------
def phase_of(time_frac: float) -> str:
    """early / mid / late third of the episode."""
    return PHASES[min(2, int(time_frac * 3))]


def _layers_heads_keys(q: PolicyQuery) -> np.ndarray:
    """A query's attention as (layers, heads, keys); heads of length 1 when they were averaged away."""
    if q.axes == ("layers", "heads", "keys"):
        return q.attention
    if q.axes == ("layers", "keys"):
        return q.attention[:, None, :]
    raise ValueError(f"attention of {q.key.stem} at env step {q.env_step} has axes {q.axes}; expected (layers, "
                     "[heads,] keys): load it with steps and queries reduced")


def score_episode(queries: Sequence[PolicyQuery], camera: str, percentile: float, sigma_frac: float) -> dict:
    """Metrics and modality fractions of one episode's queries (attention axes: layers, [heads,] keys; metrics on
    the mean over heads, per-head grids of the scored camera kept for :func:`head_selection`)."""
    q0 = queries[0]
    table = q0.table
    if camera not in table.valid_cameras:
        raise ValueError(f"camera {camera!r} is not a valid camera of the recording (valid: {table.valid_cameras})")
    missing = [q.env_step for q in queries if camera not in q.masks]
    if missing:
        raise JoinError(f"frames of episode {q0.key.stem} have no instance masks for {camera} "
                        f"(env steps {missing[:5]}); rerun the client with --save-frames")
    layers = q0.layers
    geometry = {c: q0.grid_geometry(c) for c in table.valid_cameras}
    split = has_modalities(table)
    by_head = np.stack([_layers_heads_keys(q) for q in queries])  # (N, L, H, K)
    rows = by_head.mean(axis=2)  # (N, L, K)
    rows = np.concatenate([rows.mean(axis=1, keepdims=True), rows], axis=1)  # index 0 = layer mean
    n, l1, _ = rows.shape
    grid = table.grid
    masks = np.stack([q.masks[camera] for q in queries])
    warnings: list[str] = []
    ids = sorted(set(q0.object_ids.values()))
    present = [i for i in ids if i in set(iou.present_ids(masks))]
    absent = [i for i in ids if i not in present]
    if absent and present:
        warnings.append(f"object instance ids {absent} never appear in the {camera} masks of this episode")
    if not present:
        warnings.append(NO_OBJECT_WARNING.format(camera=camera))

    # j = 0: layer mean; attention over cameras alone (a Diffusion Policy) has no modality split: fractions null
    summaries = [A.modality_summary(rows[:, j], table) if split else NO_MODALITIES for j in range(l1)]
    per_query: list[dict] = []
    for i, q in enumerate(queries):
        frac = q.env_step / max(q.episode_steps, 1)
        per_query.append({"env_step": q.env_step, "replan_index": q.replan_index, "frame_row": q.frame_row,
                          "time_frac": frac, "phase": phase_of(frac),
                          "fraction": _fractions(summaries[0], i),
                          "visual_linguistic_ratio": _ratio(summaries[0], i),
                          "cameras": {}})

    def empty_entry() -> dict:
        return {m: None for m in METRICS} | {"mask_area": None, "camera_share": None, "warning": None,
                                             "baselines": None, "objects": {}}

    entries = [[empty_entry() for _ in range(l1)] for _ in range(n)]
    if present:
        cam = A.camera_probs(rows.reshape(n * l1, -1), table, camera)
        iou.validate_attention(cam, source=f"{camera} attention of episode {q0.key.stem}")
        cover = iou.pool_objects_on(masks, present, geometry[camera])
        cover_rep = {k: np.repeat(v, l1, axis=0) for k, v in cover.items()}
        union = iou.MaskInfo.from_coverage(np.clip(sum(cover_rep.values()), 0.0, 1.0))
        res = iou.evaluate(cam, union, percentile, sigma_frac, grid)
        obj = {k: iou.frame_metrics(iou.normalise_rows(cam), iou.MaskInfo.from_coverage(v), percentile)
               for k, v in cover_rep.items()}
        share = cam.sum(axis=1)
        for flat in range(n * l1):
            i, j = divmod(flat, l1)
            e = entries[i][j]
            e.update({m: finite_float(res["attention"][m][flat]) for m in METRICS})
            e["mask_area"] = float(union.area[flat])
            e["camera_share"] = float(share[flat])
            e["warning"] = iou.EMPTY_MASK_WARNING if union.empty[flat] else None
            e["baselines"] = {b: {m: finite_float(res[b][m][flat]) for m in BASE_METRICS}
                              for b in ("uniform", "center_bias")}
            e["objects"] = {str(k): ({m: finite_float(v[m][flat]) for m in iou.PER_OBJECT_FRAME_KEYS}
                                     if cover[k][i].any() else None) for k, v in obj.items()}
    for i, entry in enumerate(per_query):
        entry["layer_mean"] = entries[i][0]
        entry["per_layer"] = [{"layer": lay, **entries[i][j + 1], "fraction": _fractions(summaries[j + 1], i),
                               "visual_linguistic_ratio": _ratio(summaries[j + 1], i)}
                              for j, lay in enumerate(layers)]
    for cam in table.valid_cameras:
        if not all(cam in q.masks for q in queries):
            continue
        got = camera_soft_mass(rows[:, 0], table, cam, np.stack([q.masks[cam] for q in queries]), ids,
                               geometry[cam])
        if got is not None and cam == camera and by_head.shape[2] > 1:
            n_l, n_h = by_head.shape[1:3]
            head_grids = _within_camera(by_head.reshape(n * n_l * n_h, -1), table, cam).reshape(n, n_l, n_h, -1)
            for i, entry in enumerate(per_query):
                entry["heads"] = {"layers": list(layers),
                                  "attention_grid": np.round(head_grids[i], 6).tolist()}
        for i, entry in enumerate(per_query):
            if got is None:
                entry["cameras"][cam] = dict.fromkeys(("soft_mass", "uniform_soft_mass", "attention_grid",
                                                       "object_cover"))
                continue
            soft, unif, p, cover = got
            entry["cameras"][cam] = {"soft_mass": finite_float(soft[i]), "uniform_soft_mass": finite_float(unif[i]),
                                     "attention_grid": [round(float(v), 7) for v in p[i]],
                                     "object_cover": [round(float(v), 5) for v in cover[i]]}
    mean = {m: _mean([e["layer_mean"][m] for e in per_query]) for m in METRICS}
    return {"object_ids": q0.object_ids, "objects_scored": present, "warnings": warnings, "grid": list(grid),
            "attention_source": q0.source, "queries": per_query, "mean": mean,
            "table_warnings": (A.sanity_warnings(A.modality_masses(rows[:, 0], table), table) if split else [])}


# Fractions of attention that does not exist: a Diffusion Policy's per-camera spatial softmax has no instruction
# or other non-image keys, so visual / instruction fractions are null rather than 1 / 0 by construction.
NO_MODALITIES: dict[str, np.ndarray] = {"fraction/visual": np.array([np.nan]),
                                        "fraction/instruction": np.array([np.nan]),
                                        "visual_linguistic_ratio": np.array([np.nan])}


def has_modalities(table: A.SpanTable) -> bool:
    """Whether the attention's keys hold more than camera cells (text, state, actions: Pi0), so that modality
    fractions mean something. A Diffusion Policy's keys are its cameras' feature-map cells, each camera's part
    its own distribution (camera share 1 by construction)."""
    return any(name in table.spans for name in A.NON_CAMERA_SPANS)


def _fractions(summary: dict[str, np.ndarray], i: int) -> dict[str, float | None]:
    """Row i's modality fractions from a :func:`openpi.interp.attention.modality_summary` (or NO_MODALITIES)."""
    return {k.split("/", 1)[1]: finite_float(v[min(i, len(v) - 1)]) for k, v in summary.items()
            if k.startswith("fraction/")}


def _ratio(summary: dict[str, np.ndarray], i: int) -> float | None:
    v = summary["visual_linguistic_ratio"]
    return finite_float(v[min(i, len(v) - 1)])


def camera_soft_mass(rows: np.ndarray, table: A.SpanTable, camera: str, masks: np.ndarray, ids: Sequence[int],
                     geometry: iou.GridGeometry | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(soft mass of each row's attention within ``camera`` on the objects, the same for uniform attention, the
    attention normalised over the camera's patches (rows, patches), the objects' coverage of each patch), or
    None when none of ``ids`` appears in the camera's masks. ``geometry``: how the grid lies on the mask frames
    (default: the table's grid over the whole frame).

    Uniform attention's soft mass is the objects' mean patch coverage (their area fraction), so soft mass / it is
    the lift over looking everywhere alike, at whatever grid the model has."""
    found = set(iou.present_ids(masks))
    present = [i for i in ids if i in found]
    if not present:
        return None
    geometry = geometry or iou.GridGeometry(table.grid)
    cover = np.clip(sum(iou.pool_objects_on(masks, present, geometry).values()), 0.0, 1.0)
    p = _within_camera(rows, table, camera)
    return (p * cover).sum(axis=1), cover.mean(axis=1), p, cover


def _within_camera(rows: np.ndarray, table: A.SpanTable, camera: str) -> np.ndarray:
    """Attention rows (N, keys) -> (N, patches) of ``camera``, renormalised to sum to 1 within the camera."""
    probs = A.camera_probs(rows, table, camera)
    with np.errstate(divide="ignore", invalid="ignore"):
        return probs / probs.sum(axis=1, keepdims=True)


def other_frames_soft_mass(eps: Sequence[dict], cam: str) -> dict[int, np.ndarray]:
    """Per episode (index into ``eps``): each query's attention scored against the object coverage of every
    query of the *other* episodes, averaged -- what a fixed spatial habit (attending the same patches whatever
    the scene) would score. Queries without a stored grid are left out."""
    att, cov, owner = [], [], []
    for i, e in enumerate(eps):
        for q in e["queries"]:
            c = q.get("cameras", {}).get(cam)
            if c and c.get("attention_grid") is not None and c.get("object_cover") is not None:
                att.append(c["attention_grid"])
                cov.append(c["object_cover"])
                owner.append(i)
    owner_arr = np.asarray(owner)
    if len(set(owner)) < 2:
        return {}
    per_query = np.einsum("qp,qp->q", np.asarray(att, np.float64), _other_episodes_cover(np.asarray(cov), owner_arr))
    return {i: per_query[owner_arr == i] for i in sorted(set(owner))}


def _other_episodes_cover(cover: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """(queries, patches): for each query, the mean object coverage of the queries of every *other* episode
    (attention scored on it is the mean of its scores on those queries' masks)."""
    other = (owner[None, :] != owner[:, None]).astype(np.float64)
    return (other @ np.asarray(cover, np.float64)) / other.sum(axis=1)[:, None]


def _stem(result: dict) -> str:
    """The episode stem of an episode result file's contents."""
    return EpisodeKey(result["run_id"], result["suite"], result["task_id"], result["episode"]).stem


HEAD_SPLIT_RULE = "episodes sorted by (suite, task, episode); every third (positions 2, 5, ...) held out"


def head_selection(episodes: Sequence[dict], n_boot: int, seed: int) -> dict:
    """Per run: the (layer, head) whose attention on the scored camera moves most with the objects, chosen on
    training episodes by its lift over the other-frames baseline, then measured on held-out episodes (lift over
    other frames and over uniform, 95% bootstrap intervals over held-out episodes). Needs per-head recordings
    (episode files with ``heads``); runs without them, or with fewer than 2 + 2 episodes, are left out."""
    out: dict = {}
    for run_id in sorted({e["run_id"] for e in episodes}):
        eps = sorted((e for e in episodes if e["run_id"] == run_id),
                     key=lambda e: (e["suite"], e["task_id"], e["episode"]))
        cam = eps[0]["settings"]["camera"]
        grids, covers, owner = [], [], []
        for i, e in enumerate(eps):
            for q in e["queries"]:
                c, h = q.get("cameras", {}).get(cam), q.get("heads")
                if h and c and c.get("object_cover") is not None:
                    grids.append(h["attention_grid"])
                    covers.append(c["object_cover"])
                    owner.append(i)
        owner_arr = np.asarray(owner)
        present = sorted(set(owner))
        test = [i for k, i in enumerate(present) if k % 3 == 2]
        train = [i for i in present if i not in test]
        if len(train) < 2 or len(test) < 2:
            continue
        g = np.asarray(grids, np.float64)  # (Q, L, H, P)
        c = np.asarray(covers, np.float64)  # (Q, P)
        matched = np.einsum("qlhp,qp->qlh", g, c)
        other_mass = np.einsum("qlhp,qp->qlh", g, _other_episodes_cover(c, owner_arr))
        uniform = c.mean(axis=1)[:, None, None]

        def per_episode(v: np.ndarray, idx: list[int]) -> np.ndarray:
            return np.stack([v[owner_arr == i].mean(axis=0) for i in idx])

        train_lift = per_episode(matched - other_mass, train).mean(axis=0)  # (L, H)
        li, hi = (int(v) for v in np.unravel_index(np.nanargmax(train_lift), train_lift.shape))
        sel = (slice(None), li, hi)
        vals = {"soft_mass": per_episode(matched[sel], test),
                "other_frames_soft_mass": per_episode(other_mass[sel], test),
                "lift_over_other_frames": per_episode((matched - other_mass)[sel], test),
                "lift": per_episode((matched - uniform)[sel], test)}
        layers = eps[owner[0]]["queries"][0]["heads"]["layers"]
        kind = (eps[owner[0]].get("attention_source") or {}).get("head_kind", "head")
        out[run_id] = {"camera": cam, "layer": layers[li], "head": hi, "head_kind": kind, "split": {
            "rule": HEAD_SPLIT_RULE, "train_episodes": [_stem(eps[i]) for i in train],
            "test_episodes": [_stem(eps[i]) for i in test]},
            "layers": list(layers),
            "train_lift_over_other_frames": np.round(train_lift, 6).tolist(),
            "test": {"n_episodes": len(test), **iou.bootstrap_means(vals, None, n_boot, seed)}}
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def render_episode(queries: Sequence[PolicyQuery], result: dict, out: pathlib.Path, stem: str, camera: str,
                   overlays: bool, video: bool, overlay_every: int = 1) -> None:
    """Overlay PNGs (valid cameras with frames, one colour scale per figure, the scored objects outlined; of every
    ``overlay_every``-th query, drawing one is most of an episode's scoring time) and an MP4 of the scored camera
    next to the other one (every query)."""
    table = queries[0].table
    cams = [c for c in table.valid_cameras if c in queries[0].frames]
    scored = [int(i) for i in result["objects_scored"]]
    geometry = {c: queries[0].grid_geometry(c) for c in cams}
    split = has_modalities(table)
    movie = []
    for i, (q, entry) in enumerate(zip(queries, result["queries"])):
        draw = overlays and i % overlay_every == 0
        if not (draw or video):
            continue
        row = _layers_heads_keys(q).mean(axis=(0, 1))
        heat = A.camera_heatmaps(row, table, cams)
        # a grid that covers part of the frame (a Diffusion Policy's crop) is drawn where its cells lie
        heat = {c: h if geometry[c].whole_frame else geometry[c].frame_heatmap(h, q.frames[c].shape[:2])
                for c, h in heat.items()}
        m = entry["layer_mean"]
        what = (f"layers {A.ranges_label(q.layers)}, denoising steps {A.ranges_label(q.steps)} (mean)" if split else
                f"mean of {_layers_heads_keys(q).shape[1]} {q.source.get('head_kind', 'head')}s "
                f"({q.source.get('layer', '')}, current frame)")
        title = (f"{stem}, env step {q.env_step} ({'success' if q.success else 'failure'}); {what}\n{camera}: IoU "
                 f"top-k {_fmt(m['iou_topk'])}, soft mass {_fmt(m['soft_mass'])} (uniform "
                 f"{_fmt((m['baselines'] or {}).get('uniform', {}).get('soft_mass'))})")
        outlines = {c: np.isin(q.masks[c], scored) for c in cams if c in q.masks and scored}
        if draw:
            plots.plot_camera_overlays({c: q.frames[c] for c in cams}, heat, out / "overlays" / stem /
                                       f"{A.step_file_stem(q.env_step)}.png", title=title,
                                       shares=({c: float(entry["fraction"].get(c) or 0.0) for c in cams}
                                               if split else None),
                                       outlines=outlines)
        if video:
            top = plots.shared_vmax(heat)
            movie.append(plots.side_by_side([plots.overlay(q.frames[c], heat[c], vmax=top) for c in cams]))
    if video and movie:
        plots.write_mp4(movie, out / "videos" / f"{stem}.mp4", fps=5)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def settings_of(run: RecordedRun, camera: str, steps: Sequence[int] | None, percentile: float,
                sigma_frac: float) -> dict:
    """The settings an episode file records (and the run directory fingerprints), so files never mix settings."""
    return {"camera": camera, "layers": list(run.layer_sites), "denoise_steps": steps,
            "percentile": percentile, "sigma_frac": sigma_frac}


def episode_result(run: RecordedRun, key: EpisodeKey, settings: dict) -> tuple[dict, list[PolicyQuery]]:
    """One episode's result file contents (``settings`` from :func:`settings_of`) and its joined queries."""
    queries = run.episode_queries(key)
    if not queries:
        raise JoinError(f"episode {key.stem} has no recorded policy queries")
    q0 = queries[0]
    scored = score_episode(queries, settings["camera"], settings["percentile"], settings["sigma_frac"])
    result = {"schema": SCHEMA, "run_id": key.run_id, "suite": key.suite, "task_id": key.task_id,
              "episode": key.episode, "prompt": q0.prompt, "original_prompt": q0.original_prompt,
              "prompt_mode": q0.prompt_mode, "success": q0.success, "episode_steps": q0.episode_steps,
              "settings": settings, **scored}
    return result, queries


# --------------------------------------------------------------------------------------------------------------
# Summaries over episodes
# --------------------------------------------------------------------------------------------------------------
def _episode_values(ep: dict, layer: int | None) -> dict[str, float]:
    """Per-episode means of each metric and fraction (layer None = layer mean)."""
    out: dict[str, float] = {}
    qs = ep["queries"]
    entries = [q["layer_mean"] if layer is None else next(e for e in q["per_layer"] if e["layer"] == layer)
               for q in qs]
    for m in METRICS:
        v = _mean([e[m] for e in entries])
        out[m] = np.nan if v is None else v
    for b in ("uniform", "center_bias"):
        v = _mean([e["baselines"][b]["iou_topk"] if e["baselines"] else None for e in entries])
        out[f"{b}_iou_topk"] = np.nan if v is None else v
    v = _mean([e["baselines"]["uniform"]["soft_mass"] if e["baselines"] else None for e in entries])
    out["uniform_soft_mass"] = np.nan if v is None else v
    v = _mean([e["soft_mass"] - e["baselines"]["uniform"]["soft_mass"]
               for e in entries if e["baselines"] and e["soft_mass"] is not None])
    out["soft_mass_lift"] = np.nan if v is None else v
    fractions = [q["fraction"] if layer is None else e["fraction"] for q, e in zip(qs, entries)]
    for f in ("visual", "instruction"):
        v = _mean([fr.get(f) for fr in fractions])
        out[f"{f}_fraction"] = np.nan if v is None else v
    out["success"] = float(ep["success"])
    return out


def _stats(eps: Sequence[dict], layer: int | None, n_boot: int, seed: int) -> dict:
    vals = [_episode_values(e, layer) for e in eps]
    names = list(vals[0])
    table = {k: np.array([v[k] for v in vals]) for k in names}
    boot = iou.bootstrap_means(table, None, n_boot, seed)
    return {"n_episodes": len(eps), "n_queries": sum(len(e["queries"]) for e in eps), **boot}


CSV_FIELDS = ["run_id", "prompt_mode", "suite", "task_id", "layer", "n_episodes", "n_queries", "success_rate",
              "iou_topk", "iou_topk_ci_low", "iou_topk_ci_high", "soft_mass", "soft_mass_ci_low",
              "soft_mass_ci_high", "uniform_soft_mass", "soft_mass_lift", "soft_mass_lift_ci_low",
              "soft_mass_lift_ci_high", "pointing_accuracy", "iou_percentile", "uniform_iou_topk",
              "center_bias_iou_topk", "visual_fraction", "instruction_fraction"]


def _csv_row(group: dict, layer, stats: dict) -> dict:
    row = dict(group) | {"layer": "mean" if layer is None else layer, "n_episodes": stats["n_episodes"],
                         "n_queries": stats["n_queries"], "success_rate": stats["success"]["mean"]}
    for m in ("iou_topk", "soft_mass", "soft_mass_lift"):
        row |= {m: stats[m]["mean"], f"{m}_ci_low": stats[m]["ci_low"], f"{m}_ci_high": stats[m]["ci_high"]}
    for m in ("pointing_accuracy", "iou_percentile", "uniform_iou_topk", "center_bias_iou_topk",
              "uniform_soft_mass", "visual_fraction", "instruction_fraction"):
        row[m] = stats[m]["mean"]
    return {k: ("" if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    """Atomic CSV write (temp file + rename) with the fixed ``CSV_FIELDS`` header."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def summary_tables(episodes: Sequence[dict], n_boot: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(per-task rows, per-suite rows) for the CSV files; layer mean first, then each layer."""
    layers = [e["layer"] for e in episodes[0]["queries"][0]["per_layer"]] if episodes else []
    out = []
    for by_task in (True, False):
        groups: dict[tuple, list[dict]] = {}
        for e in episodes:
            g = (e["run_id"], e["prompt_mode"], e["suite"], e["task_id"] if by_task else "all")
            groups.setdefault(g, []).append(e)
        rows = []
        for g, eps in sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
            info = dict(zip(("run_id", "prompt_mode", "suite", "task_id"), g))
            for layer in [None, *layers]:
                rows.append(_csv_row(info, layer, _stats(eps, layer, n_boot, seed)))
        out.append(rows)
    return out[0], out[1]


def success_vs_failure(episodes: Sequence[dict], n_boot: int, seed: int) -> dict:
    """Per run: episode-bootstrap stats of successful vs failed episodes and their difference of means."""
    out = {}
    for run_id in sorted({e["run_id"] for e in episodes}):
        eps = [e for e in episodes if e["run_id"] == run_id]
        part = {}
        for label, flag in (("success", True), ("failure", False)):
            sel = [e for e in eps if e["success"] == flag]
            part[label] = _stats(sel, None, n_boot, seed) if sel else {"n_episodes": 0, "n_queries": 0}
        if part["success"]["n_episodes"] and part["failure"]["n_episodes"]:
            part["difference"] = {m: part["success"][m]["mean"] - part["failure"][m]["mean"]
                                  for m in ("iou_topk", "soft_mass", "pointing_accuracy", "visual_fraction")}
        else:
            part["difference"] = None
        out[run_id] = part
    return out


def soft_mass_by_camera(episodes: Sequence[dict], n_boot: int, seed: int) -> dict:
    """Per run and camera: soft mass on the objects, uniform attention's soft mass, the lift (their difference),
    the soft mass of the same attention on the other episodes' object masks and the lift over that, each a mean of
    per-episode means with a 95% bootstrap interval over episodes (layer mean)."""
    out: dict = {}
    for run_id in sorted({e["run_id"] for e in episodes}):
        eps = [e for e in episodes if e["run_id"] == run_id]
        cams = sorted({c for e in eps for q in e["queries"] for c in q.get("cameras", {})})
        out[run_id] = {}
        for cam in cams:
            vals: dict[str, list[float]] = {"soft_mass": [], "uniform_soft_mass": [], "lift": []}
            other = other_frames_soft_mass(eps, cam)
            others: dict[str, list[float]] = {"other_frames_soft_mass": [], "lift_over_other_frames": []}
            for i, e in enumerate(eps):
                pairs = [(c["soft_mass"], c["uniform_soft_mass"]) for q in e["queries"]
                         for c in [q.get("cameras", {}).get(cam)] if c and c["soft_mass"] is not None]
                if pairs:
                    soft, unif = np.asarray(pairs, np.float64).T
                    vals["soft_mass"].append(soft.mean())
                    vals["uniform_soft_mass"].append(unif.mean())
                    vals["lift"].append((soft - unif).mean())
                    if i in other and len(other[i]) == len(soft):
                        others["other_frames_soft_mass"].append(other[i].mean())
                        others["lift_over_other_frames"].append((soft - other[i]).mean())
            if not vals["lift"]:
                out[run_id][cam] = {"n_episodes": 0}
                continue
            if len(others["lift_over_other_frames"]) == len(vals["lift"]):
                vals.update(others)
            boot = iou.bootstrap_means({k: np.asarray(v) for k, v in vals.items()}, None, n_boot, seed)
            out[run_id][cam] = {"n_episodes": len(vals["lift"]), **boot}
    return out


def _phase_fractions(eps: Sequence[dict]) -> dict:
    """Mean modality fractions of the queries in each third of the episode."""
    out = {}
    for ph in PHASES:
        qs = [q for e in eps for q in e["queries"] if q["phase"] == ph]
        out[ph] = {"n_queries": len(qs), "visual": _mean([q["fraction"].get("visual") for q in qs]),
                   "instruction": _mean([q["fraction"].get("instruction") for q in qs]),
                   "visual_linguistic_ratio": _mean([q["visual_linguistic_ratio"] for q in qs])}
    return out


def modality_by_run(episodes: Sequence[dict]) -> dict:
    """Per run: overall and per-phase visual / instruction attention fractions."""
    out = {}
    for run_id in sorted({e["run_id"] for e in episodes}):
        eps = [e for e in episodes if e["run_id"] == run_id]
        out[run_id] = {"prompt_modes": sorted({e["prompt_mode"] for e in eps}), "by_phase": _phase_fractions(eps),
                       "visual": _mean([q["fraction"].get("visual") for e in eps for q in e["queries"]]),
                       "instruction": _mean([q["fraction"].get("instruction") for e in eps for q in e["queries"]])}
    return out


def language_corruption(episodes: Sequence[dict], warnings: list[str]) -> dict | None:
    """Change of visual fraction and success of each corrupted prompt mode vs the original-prompt run."""
    modes = sorted({e["prompt_mode"] for e in episodes})
    if len(modes) < 2:
        return None
    originals = {}
    for e in episodes:
        if e["prompt_mode"] == "original":
            originals.setdefault((e["suite"], e["task_id"], e["episode"]), e)
    if not originals:
        warnings.append(f"prompt modes {modes} but no run with prompt_mode 'original': no language-corruption "
                        "comparison")
        return None
    ref_runs = sorted({e["run_id"] for e in originals.values()})
    result = {"reference_runs": ref_runs, "modes": {}}
    for mode in (m for m in modes if m != "original"):
        pairs = [(originals[k], e) for e in episodes if e["prompt_mode"] == mode
                 for k in [(e["suite"], e["task_id"], e["episode"])] if k in originals]
        if not pairs:
            warnings.append(f"prompt mode {mode!r}: no episode pairs with an original-prompt episode "
                            "(same suite, task and episode)")
            continue
        refs, cors = [p[0] for p in pairs], [p[1] for p in pairs]

        def vis(eps: Sequence[dict]) -> float | None:
            return _mean([q["fraction"].get("visual") for e in eps for q in e["queries"]])

        rp, cp = _phase_fractions(refs), _phase_fractions(cors)
        r_s, c_s = float(np.mean([e["success"] for e in refs])), float(np.mean([e["success"] for e in cors]))
        vr, vc = vis(refs), vis(cors)
        result["modes"][mode] = {
            "run_ids": sorted({e["run_id"] for e in cors}), "n_pairs": len(pairs),
            "reference_success_rate": r_s, "success_rate": c_s, "delta_success_rate": c_s - r_s,
            "visual_fraction": {"reference": vr, "corrupted": vc,
                                "delta": None if vr is None or vc is None else vc - vr},
            "by_phase": {ph: {"reference": rp[ph]["visual"], "corrupted": cp[ph]["visual"],
                              "delta": None if rp[ph]["visual"] is None or cp[ph]["visual"] is None
                              else cp[ph]["visual"] - rp[ph]["visual"]} for ph in PHASES},
        }
    return result


def _binned(eps: Sequence[dict], value, bins: int) -> np.ndarray:
    """Mean of ``value(query)`` in equal bins of normalised episode time (NaN where a bin is empty)."""
    sums, counts = np.zeros(bins), np.zeros(bins)
    for e in eps:
        for q in e["queries"]:
            v = value(q)
            if v is not None:
                b = min(bins - 1, int(q["time_frac"] * bins))
                sums[b] += v
                counts[b] += 1
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def plot_summaries(episodes: Sequence[dict], out: pathlib.Path, bins: int = 10) -> None:
    """``evolution.png`` (alignment, success vs failure) and ``modality_evolution.png`` (per prompt mode)."""
    x = (np.arange(bins) + 0.5) / bins
    series = {}
    for label, flag in (("success", True), ("failure", False)):
        eps = [e for e in episodes if e["success"] == flag]
        if eps:
            series[f"{label}ful episodes" if flag else "failed episodes"] = _binned(eps, _lift_of_query, bins)
    plots.plot_evolution(x, series, out / "evolution.png", xlabel="episode time (fraction of steps)",
                         ylabel="soft mass - uniform attention's", reference=(0.0, "uniform attention"),
                         title="attention on the task objects over the episode (scored camera, layer mean)")
    series = {}
    for mode in sorted({e["prompt_mode"] for e in episodes}):
        eps = [e for e in episodes if e["prompt_mode"] == mode]
        series[f"visual ({mode})"] = _binned(eps, lambda q: q["fraction"].get("visual"), bins)
        series[f"instruction ({mode})"] = _binned(eps, lambda q: q["fraction"].get("instruction"), bins)
    plots.plot_evolution(x, series, out / "modality_evolution.png", xlabel="episode time (fraction of steps)",
                         title="modality fractions over the episode")


def _lift_of_query(q: dict) -> float | None:
    m = q["layer_mean"]
    if m["soft_mass"] is None or not m["baselines"]:
        return None
    return m["soft_mass"] - m["baselines"]["uniform"]["soft_mass"]


def _is_diffusion(ep: dict) -> bool:
    return (ep.get("attention_source") or {}).get("model") == "diffusion"


def diffusion_notes(episodes: Sequence[dict]) -> list[str]:
    """What does not apply to the Diffusion Policy runs among ``episodes`` (one note per run), so that the null
    fractions and missing comparisons are never read as measured zeros."""
    notes = []
    for run_id in sorted({e["run_id"] for e in episodes if _is_diffusion(e)}):
        eps = [e for e in episodes if e["run_id"] == run_id]
        sites = eps[0]["attention_source"].get("sites", {})
        note = (f"run {run_id}: Diffusion Policy attention ({', '.join(f'{c}: {s}' for c, s in sites.items())}, "
                f"last obs step = the queried frame): its keypoints play the role of heads (mean over keypoints = "
                f"head average) in one pseudo-layer {eps[0]['attention_source'].get('layer')!r}; each camera is scored "
                "on its own spatial softmax, so camera_share is 1 by construction; visual / instruction fractions do "
                "not exist (no language input) and are null")
        modes = sorted({e["prompt_mode"] for e in eps})
        if len(modes) > 1:
            note += f"; its prompt modes {modes} are not compared (language corruption applies to Pi0 runs only)"
        notes.append(note)
    return notes


def load_episode_results(out: pathlib.Path) -> list[dict]:
    """Every episode file in ``out/episodes`` (all shards), sorted by file name."""
    return [read_json(p, "episode result", hint="delete it to recompute")
            for p in sorted((out / "episodes").glob("*.json"))]


def summarise(out: pathlib.Path, n_boot: int, seed: int, expected: int, warnings: list[str]) -> dict:
    """Rebuild the CSV tables, ``summary.json`` and figures from every episode file; returns the summary."""
    episodes = load_episode_results(out)
    if not episodes:
        raise ValueError(f"no episode results in {out / 'episodes'}")
    for e in episodes:
        warnings.extend(f"{_stem(e)}: {w}" for w in e["warnings"])
    grids = sorted({tuple(e["grid"]) for e in episodes if e.get("grid")})
    if len(grids) > 1:
        warnings.append(f"episode files hold attention on different patch grids {grids}")
    grid = list(grids[0]) if len(grids) == 1 else None
    tasks, suites = summary_tables(episodes, n_boot, seed)
    write_csv(out / "summary_tasks.csv", tasks)
    write_csv(out / "summary_suites.csv", suites)
    summary = {"schema": SCHEMA.replace("/1", "-summary/1"),
               "counts": {"episodes": len(episodes), "expected_episodes": expected,
                          "missing_episodes": max(0, expected - len(episodes)),
                          "queries": sum(len(e["queries"]) for e in episodes)},
               "grid": grid, "n_patches": None if grid is None else grid[0] * grid[1],
               "bootstrap": {"n_boot": n_boot, "seed": seed, "unit": "episode", "level": 0.95},
               "success_vs_failure": success_vs_failure(episodes, n_boot, seed),
               "soft_mass_by_camera": soft_mass_by_camera(episodes, n_boot, seed),
               "head_selection": head_selection(episodes, n_boot, seed),
               "modality": modality_by_run(episodes)}
    notes = diffusion_notes(episodes)
    with_language = [e for e in episodes if not _is_diffusion(e)]
    summary["language_corruption"] = language_corruption(with_language, warnings) if with_language else None
    summary["notes"] = notes
    summary["warnings"] = warnings
    A.write_json(out / "summary.json", summary)
    plot_summaries(episodes, out)
    return summary


# --------------------------------------------------------------------------------------------------------------
# Whole run
# --------------------------------------------------------------------------------------------------------------
def evaluate_run(store: pathlib.Path, rollouts: pathlib.Path, out: pathlib.Path, *,
                 layers: Sequence[int] | None = None, steps: Sequence[int] | None = None,
                 camera: Camera = "base_0_rgb", overlays: bool = False, overlay_every: int = 1, video: bool = False,
                 percentile: float = 90.0, sigma_frac: float = 0.25, n_boot: int = 1000, seed: int = 0,
                 on_missing: Literal["error", "skip"] = "error", shard_index: int = 0,
                 num_shards: int = 1, overwrite: bool = False) -> dict:
    """Score this shard's unfinished episodes into ``out/episodes/``, then rebuild every summary from all of them.

    ``out`` is a run directory (openpi.shared.rundir): ``run.json`` fingerprints every setting that changes an
    episode file (camera, resolved layers, denoising steps, percentile, sigma, missing-data policy), so episode
    files already there are reused only by a rerun with the same settings (resume, other shards, other recorded
    runs scored into the same folder) and other settings are refused naming each difference (``overwrite``
    starts over). Store, rollout folder, shard and figure flags change no number. The summaries are rebuilt whole
    from every episode file on each call (so shards can finish in any order); their bootstrap (``n_boot``,
    ``seed``) is recorded in ``summary.json`` rather than fingerprinted. Returns the ``summary.json`` contents.
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index}, {num_shards}")
    if overlay_every < 1:
        raise ValueError(f"overlay_every must be >= 1, got {overlay_every}")
    out = pathlib.Path(out)
    run = RecordedRun(store, rollouts, layers=layers, steps=steps, reduce=("steps", "queries"),
                      on_missing=on_missing)
    keys = run.episode_keys()
    mine = keys[shard_index::num_shards]
    settings = settings_of(run, camera, steps, percentile, sigma_frac)
    RunDir(out, RUN_JOB, {**settings, "on_missing": on_missing}, overwrite=overwrite)
    if overwrite:
        for name in ("episodes", "overlays", "videos"):
            shutil.rmtree(out / name, ignore_errors=True)
    for key in tqdm.tqdm(mine, desc="episodes", unit="ep"):
        path = out / "episodes" / f"{key.stem}.json"
        if path.exists():
            continue
        result, queries = episode_result(run, key, settings)
        if overlays or video:
            render_episode(queries, result, out, key.stem, camera, overlays, video, overlay_every)
        A.write_json(path, result)
    return summarise(out, n_boot, seed, len(keys), list(run.warnings))
