"""Turn one policy inference's recordings into keyed store rows.

Row keys come from the observation's ``meta/*`` entries (sent by the LIBERO client) so server-side recordings join
rollouts by (run_id, suite, task_id, episode, env_step); without them the websocket server's ``connection_id`` and
``request_index`` stand in for run id and env step.
"""
from __future__ import annotations

import fnmatch
import threading
import time
from typing import Any

import numpy as np

from openpi.interp.hooks import resolve_steps
from openpi.interp.spans import span_name_of
from openpi.interp.store import StoreWriter

STEP_SITES = ("llm.expert1.", "llm.layer.", "flow.")  # sites recorded at every denoising step
ACTIONS_SITE = "policy.actions"


def is_step_site(name: str) -> bool:
    return name.startswith(STEP_SITES) and not name.endswith(".prefix_probs")


def _token_indices(table: dict, name: str, n_tokens: int, selected: np.ndarray | None) -> np.ndarray:
    """Joint-sequence index of each stored token row for a residual site."""
    if name.startswith("img."):
        camera = name.split(".")[1]
        start = table["spans"][camera][0]
    elif name.startswith("llm.expert0."):
        start = 0
    elif name.startswith("flow."):
        start = table["spans"]["actions"][0]
    else:
        start = table["prefix_len"]
    local = np.arange(n_tokens) if selected is None else selected
    return start + local


class StoreRecorder:
    """Callable passed to ``Policy(recorder=...)``; thread-safe (the server runs inference off the event loop)."""

    def __init__(self, writer: StoreWriter, records, layout, num_steps: int, flush_every_s: float = 30.0) -> None:
        self.writer = writer
        self.flush_every_s = flush_every_s  # bounds what a killed server loses, however slow the traffic
        self._last_flush = time.monotonic()
        self.num_steps = num_steps
        self.records = records
        self.layout = layout
        self._lock = threading.Lock()

    def _record_for(self, name: str):
        return next(r for r in self.records if fnmatch.fnmatchcase(name, r.site))

    def _token_selection(self, name: str, table: dict) -> np.ndarray | None:
        rec = self._record_for(name)
        idx = self.layout.joint_indices(rec.tokens)
        if idx is None:
            return None
        start = _token_indices(table, name, 1, None)[0]
        return idx - start

    def __call__(self, recordings: dict[str, np.ndarray], table: dict, meta: dict[str, Any],
                 actions: np.ndarray) -> None:
        base = {
            "run_id": str(meta.get("run_id", meta.get("connection_id", "local"))),
            "suite": str(meta.get("suite", "")),
            "task_id": int(meta.get("task_id", -1)),
            "episode": int(meta.get("episode", -1)),
            "env_step": int(meta.get("env_step", meta.get("request_index", -1))),
            "replan_index": int(meta.get("replan_index", meta.get("request_index", -1))),
        }
        with self._lock:
            base["span_table"] = self.writer.add_span_table(table)
            self.writer.add(ACTIONS_SITE, np.asarray(actions, np.float32)[None],
                            base | {"denoise_step": -1, "token_index": -1, "span": "actions"})
            for name, value in recordings.items():
                self._add_site(name, np.asarray(value), table, base)
            self.writer.commit()
            if time.monotonic() - self._last_flush > self.flush_every_s:
                self.writer.flush()
                self._last_flush = time.monotonic()

    def _add_site(self, name: str, value: np.ndarray, table: dict, base: dict) -> None:
        rec = self._record_for(name)
        if is_step_site(name):
            steps = resolve_steps(rec.steps, self.num_steps)  # the recorded steps, in order
            per_step = [(s, value[i, 0]) for i, s in enumerate(steps)]
        else:
            per_step = [(-1, value[0])]
        reduced_tokens = "tokens" in rec.reduce
        for step, arr in per_step:
            keys = base | {"denoise_step": step}
            if ".attn." in name or reduced_tokens or name == "flow.time" or arr.ndim < 2:
                span = rec.tokens if rec.tokens != "all" else ""
                self.writer.add(name, arr[None], keys | {"token_index": -1, "span": span})
                continue
            sel = self._token_selection(name, table)
            tokens = _token_indices(table, name, arr.shape[0], sel)
            self.writer.add(name, arr, keys | {"token_index": tokens,
                                               "span": np.array([span_name_of(table, t) for t in tokens])})

    def close(self) -> None:
        with self._lock:
            self.writer.close()
