"""Bridges from an export to the plain-array scripts: the exact files each one takes, plus the command to run it.

Why: the array scripts (``linear_probe.py``, ``geometry.py``, ``action_pca.py``, ``attention_iou.py``,
``visualize_*.py``) serve any model, so they take plain arrays; a recorded LIBERO run is a store plus a rollout
folder. The export writes, next to ``X.npy``, what each script needs, read from the data (grid, spans, axes),
never from defaults, and ``bridge.json`` lists a command per script that runs as written.

Row sites (vectors: residual streams, token means):
    ``X.npy`` + ``actions.npy`` + ``groups.npy``            -> linear_probe.py (predicted action labels)
    ``geometry/T.npy`` + ``geometry/success.npy``            -> geometry.py (one point per query; one denoising
                                                                step only, else listed as skipped)
    ``actions.npy`` + ``groups.npy`` + ``success.npy``       -> action_pca.py --actions
Attention sites (``llm.layer.<i>.attn.probs``, needs frames: the client's ``--save-frames``):
    ``attention/episodes/<stem>/attention.npy``  (time, steps, layers, heads, queries, keys): one time entry per
        policy query of the episode (env-step order), the action queries only; ``spans.json`` (the episode's span
        table); ``frames.npz`` (``agentview``/``wrist`` as the policy saw them, one row per time entry, joined
        by env step, with ``env_step``); ``queries.json``; ``tokens.json`` (prompt pieces)
        -> visualize_attention.py / visualize_text_attention.py / visualize_combined_attention.py
    ``attention/iou/<camera>.npy`` (N, gh*gw) the camera's part of each query's attention (mean over steps, heads,
        action queries), ``<camera>_masks.npy`` (N, H, W) instance masks keeping only the episode's objects of
        interest, ``groups.npy`` (N,) episode index                     -> attention_iou.py --grid <from the data>
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Any

import numpy as np

from openpi.interp import attention as A
from openpi.interp.episode_frames import CAMERA_TO_FRAME_KEY, frames_path
from openpi.interp.join import JoinError, record_of
from openpi.interp.recorded_run import ATTN_SITE_RE, PolicyQuery, RecordedRun
from openpi.shared.io import write_json_atomic
from openpi.shared.records import EpisodeKey, episode_keys_of_rows

ATTENTION_AXES = "time,steps,layers,heads,queries,keys"


@dataclasses.dataclass
class BridgePlan:
    """Which bridges an export writes (checked before anything is written) and where the export will live."""

    plan: Any  # export.ExportPlan
    out: pathlib.Path
    kind: str  # "attention" | "rows"
    skipped: dict[str, str]

    def write(self, tmp: pathlib.Path) -> dict:
        """Write the bridge files into the export's temporary folder and ``bridge.json``; returns its content."""
        commands = self._attention(tmp) if self.kind == "attention" else self._rows(tmp)
        info = {"kind": self.kind, "commands": commands, "skipped": self.skipped}
        write_json_atomic(tmp / "bridge.json", info, indent=1)
        for name, why in self.skipped.items():
            print(f"export: bridge {name} skipped: {why}", file=sys.stderr)
        return info

    def _path(self, *parts: str) -> str:
        return str(self.out.joinpath(*parts))

    def _result(self, name: str) -> str:
        return str(self.out.with_name(f"{self.out.name}_{name}"))

    def _rows(self, tmp: pathlib.Path) -> dict[str, list[str]]:
        from openpi.interp.export import trajectories_from_export

        commands = {
            "linear_probe.py": ["python", "linear_probe.py", "--features", self._path("X.npy"), "--targets",
                                self._path("actions.npy"), "--groups", self._path("groups.npy"), "--out",
                                self._result("probe")],
            "action_pca.py": ["python", "action_pca.py", "--actions", self._path("actions.npy"), "--episode-ids",
                              self._path("groups.npy"), "--success-labels", self._path("success.npy"), "--out",
                              self._result("action_pca")],
        }
        if "geometry.py" not in self.skipped:
            trajectories_from_export(tmp, tmp / "geometry", verbose=False)
            commands["geometry.py"] = ["python", "geometry.py", "--trajectories", self._path("geometry", "T.npy"),
                                       "--success", self._path("geometry", "success.npy"), "--axes", "query",
                                       "--out", self._result("geometry")]
        return commands

    def _attention(self, tmp: pathlib.Path) -> dict[str, list[str]]:
        plan = self.plan
        layer = int(ATTN_SITE_RE.match(plan.site).group(1))
        run = RecordedRun(plan.store.root, plan.rollouts.root, layers=[layer], where=plan.where)
        keys = plan.kept_keys
        ep_ids, ep_keys = episode_keys_of_rows(keys)
        n_queries = [np.unique(keys["env_step"][ep_ids == e]).size for e in range(len(ep_keys))]
        iou = _IouArrays(tmp / "attention" / "iou", sum(n_queries))
        first = None
        for e, key in enumerate(ep_keys):
            queries = run.episode_queries(key)
            if len(queries) != n_queries[e]:
                raise JoinError(f"{plan.site}: episode {key.stem} has {n_queries[e]} queries in the export but the "
                                f"attention join found {len(queries)}")
            ep_dir = tmp / "attention" / "episodes" / key.stem
            _write_episode(ep_dir, key, queries)
            for q in queries:
                iou.add(q, e)
            first = first or key.stem
        grid = iou.close()
        ep = ("attention", "episodes", first)
        commands = {
            "visualize_attention.py": ["python", "visualize_attention.py", "--attention",
                                       self._path(*ep, "attention.npy"), "--axes", ATTENTION_AXES, "--spans",
                                       self._path(*ep, "spans.json"), "--frames", self._path(*ep, "frames.npz"),
                                       "--env-steps", self._path(*ep, "env_steps.npy"),
                                       "--out", self._result(f"visualize_{first}")],
            "visualize_text_attention.py": ["python", "visualize_text_attention.py", "--attention",
                                            self._path(*ep, "attention.npy"), "--axes", ATTENTION_AXES, "--spans",
                                            self._path(*ep, "spans.json"), "--tokens",
                                            self._path(*ep, "tokens.json"), "--out", self._result(f"text_{first}")],
            "visualize_combined_attention.py": [
                "python", "visualize_combined_attention.py", "--attention", self._path(*ep, "attention.npy"),
                "--axes", ATTENTION_AXES, "--spans", self._path(*ep, "spans.json"), "--frames",
                self._path(*ep, "frames.npz"), "--env-steps", self._path(*ep, "env_steps.npy"), "--tokens",
                self._path(*ep, "tokens.json"), "--out", self._result(f"combined_{first}")],
        }
        for cam in iou.cameras:
            commands[f"attention_iou.py {cam}"] = [
                "python", "attention_iou.py", "--attention", self._path("attention", "iou", f"{cam}.npy"),
                "--masks", self._path("attention", "iou", f"{cam}_masks.npy"), "--grid", str(grid), "--groups",
                self._path("attention", "iou", "groups.npy"), "--out", self._result(f"iou_{cam}")]
        return commands


def plan_bridges(plan: Any, out: pathlib.Path) -> BridgePlan:
    """Decide which bridges apply to an export and check their inputs (frames for attention sites)."""
    axes = plan.info.get("row_axes") or []
    skipped: dict[str, str] = {}
    if "key" in axes:
        if not ATTN_SITE_RE.match(plan.site):
            raise JoinError(f"site {plan.site!r} has attention rows (axes {axes}) but is not an llm.layer.<i>.attn."
                            "probs site; export it with --no-bridges")
        _, ep_keys = episode_keys_of_rows(plan.kept_keys)
        for key in ep_keys:
            path = frames_path(plan.rollouts, record_of(plan.rollouts, key, f"site {plan.site}"))
            if not path.is_file():
                raise JoinError(f"the attention bridges need the frames of episode {key.stem} ({path} missing: run "
                                "the LIBERO client with --save-frames), or export with --no-bridges")
        return BridgePlan(plan, out, "attention", skipped)
    steps = np.unique(plan.kept_keys["denoise_step"])
    if steps.size > 1:
        skipped["geometry.py"] = (f"rows span denoising steps {steps.tolist()}; one trajectory point per query needs "
                                  "one step (export with --denoise-step)")
    return BridgePlan(plan, out, "rows", skipped)


def _write_episode(ep_dir: pathlib.Path, key: EpisodeKey, queries: list[PolicyQuery]) -> None:
    """One episode's inputs of the visualisers: attention over its queries, span table, frames, tokens."""
    tables = {json.dumps(q.table_dict, sort_keys=True) for q in queries}
    if len(tables) != 1:
        raise JoinError(f"episode {key.stem}: its queries have {len(tables)} different span tables")
    ep_dir.mkdir(parents=True)
    np.save(ep_dir / "attention.npy", np.stack([q.attention for q in queries]).astype(np.float32))
    write_json_atomic(ep_dir / "spans.json", queries[0].table_dict, indent=1)
    frames = {CAMERA_TO_FRAME_KEY[c]: np.stack([q.frames[c] for q in queries]) for c in queries[0].frames}
    frames.update({f"{CAMERA_TO_FRAME_KEY[c]}_seg": np.stack([q.masks[c] for q in queries]) for c in queries[0].masks})
    env_steps = np.array([q.env_step for q in queries], np.int32)
    np.savez_compressed(ep_dir / "frames.npz", **frames, env_step=env_steps)
    np.save(ep_dir / "env_steps.npy", env_steps)  # the env step of each attention time entry (--env-steps)
    write_json_atomic(ep_dir / "queries.json", {
        "axes": ATTENTION_AXES, "episode": key.stem, "layers": queries[0].layers, "denoise_steps": queries[0].steps,
        "time": [{"env_step": q.env_step, "replan_index": q.replan_index} for q in queries],
        "queries": "the action query tokens of the recording, in joint-sequence order"}, indent=1)
    tokens, how = prompt_tokens(queries[0].table, queries[0].prompt)
    write_json_atomic(ep_dir / "tokens.json", tokens, indent=None)
    write_json_atomic(ep_dir / "tokens_info.json", {"tokens": how, "prompt": queries[0].prompt}, indent=1)


class _IouArrays:
    """attention_iou.py inputs over every query of the export: per camera (N, gh*gw) shares and (N, H, W) masks."""

    def __init__(self, root: pathlib.Path, n: int) -> None:
        self.root, self.n, self.i = root, n, 0
        self.att: dict[str, np.ndarray] = {}
        self.masks: dict[str, np.ndarray] = {}
        self.groups = np.zeros(n, np.int64)
        self.grid: tuple[int, int] | None = None
        self.cameras: list[str] = []

    def add(self, q: PolicyQuery, group: int) -> None:
        if self.grid is None:
            self.root.mkdir(parents=True)
            self.grid = q.table.grid
            self.cameras = [c for c in q.table.valid_cameras if c in q.masks]
            if not self.cameras:
                raise JoinError(f"episode {q.key.stem}: no instance masks for the valid cameras "
                                f"{list(q.table.valid_cameras)} (frames saved without segmentation?)")
            for cam in self.cameras:
                self.att[cam] = np.lib.format.open_memmap(self.root / f"{cam}.npy", "w+", np.float32,
                                                          (self.n, q.table.length(cam)))
                self.masks[cam] = np.lib.format.open_memmap(self.root / f"{cam}_masks.npy", "w+", np.int32,
                                                            (self.n, *q.masks[cam].shape))
        if q.table.grid != self.grid:
            raise JoinError(f"episode {q.key.stem}: patch grid {q.table.grid} differs from {self.grid}")
        row = A.AttentionArray.with_all_axes(q.attention, q.axes).mean("steps", "layers", "heads", "queries").data
        row = row.reshape(-1)
        ids = np.asarray(sorted(q.object_ids.values()), np.int32)
        for cam in self.cameras:
            self.att[cam][self.i] = row[q.table.indices(cam)]
            self.masks[cam][self.i] = np.where(np.isin(q.masks[cam], ids), q.masks[cam], 0)
        self.groups[self.i] = group
        self.i += 1

    def close(self) -> int:
        """Flush; returns the (square) grid side attention_iou.py takes as --grid."""
        if self.i != self.n:
            raise JoinError(f"attention bridge: {self.i} queries written, {self.n} expected")
        for arr in [*self.att.values(), *self.masks.values()]:
            arr.flush()
        np.save(self.root / "groups.npy", self.groups)
        gh, gw = self.grid
        if gh != gw:
            raise JoinError(f"attention_iou.py takes a square --grid; the recording's patch grid is {gh}x{gw}")
        return gh


def prompt_tokens(table: A.SpanTable, prompt: str, tokenizer: str | pathlib.Path | None = "embedded"
                  ) -> tuple[list[str], str]:
    """One label per prompt position of ``table``: a tokenizer's pieces (default the embedded one; None: none) when
    re-tokenizing the prompt reproduces the recorded layout (Pi0), else positional labels (i0.., t0.., p0..); the
    second value says which."""
    if table.model == "pi0" and tokenizer is not None:
        from openpi.models.tokenizer import EMBEDDED_TOKENIZER, PromptTokenizer

        path = EMBEDDED_TOKENIZER if tokenizer == "embedded" else pathlib.Path(tokenizer)
        n_prompt = table.prompt_indices().size
        tok_model = PromptTokenizer(path, n_prompt, on_overflow="truncate")
        tok = tok_model.tokenize(prompt)
        pieces = tok_model.decode_ids(tok.ids[:tok.length])
        if len(pieces) == n_prompt - table.length("pad") and (tok.instruction[1] - tok.instruction[0]
                                                               == table.length("instruction")):
            return A.align_tokens(pieces, table), f"decoded with {path.name}"
    counters: dict[str, int] = {}
    labels = []
    for kind in A.token_kinds(table):
        i = counters.get(kind, 0)
        counters[kind] = i + 1
        labels.append({"instruction": "i", "template": "t", "pad": "p"}[kind] + str(i))
    return labels, "positional labels: the prompt does not re-tokenize to the recorded span table"
