"""Turn one policy inference's recordings into keyed store rows.

Row keys come from the observation's ``meta/*`` entries (sent by the LIBERO client) so server-side recordings join
rollouts by (run_id, suite, task_id, episode, attempt, env_step); without them the websocket server's
``connection_id`` and ``request_index`` stand in for run id and env step.

Durability: rows are buffered and written as shards (temporary file + rename). The buffer is flushed when a request
starts a new episode (so every finished episode is on disk once the next one begins), when ``shard_rows`` rows are
buffered, every ``flush_every_s`` seconds by a background thread even when no request arrives, and at shutdown
(SIGINT/SIGTERM). A hard kill (``kill -9``, OOM) therefore loses at most the rows of the episodes in progress
that arrived in the last ``flush_every_s`` seconds; a shard never holds half an inference.
"""
from __future__ import annotations

import fnmatch
import threading
import time
from typing import Any

import numpy as np

from openpi.interp.spans import span_name_of
from openpi.interp.store import StoreWriter
from openpi.models.hooks import HookTable, Record, resolve_steps

ACTIONS_SITE = "policy.actions"


def site_info(record: Record, table: HookTable, name: str) -> dict:
    """What the store keeps about a recorded site, so readers never re-parse selectors or guess axes from shapes:
    the request (one-line form), the hook point's axes, the axes of one stored row, and for sites stored whole
    along their token/query axis the joint-sequence index of each kept token."""
    point = table[name]
    info = {"request": record.to_text(), "hook_axes": list(point.recorded_axes),
            "row_axes": list(record.row_axes(point)), "per_step": point.per_step}
    kept = record.kept_tokens(point, table)
    if kept is not None:
        info["token_index"] = [int(i) for i in kept]
        if point.token_step_stride:  # Pi0-FAST decoding points: at step s the token sits at token_index + s
            info["token_step_stride"] = point.token_step_stride
    return info


class StoreRecorder:
    """Callable passed to ``Policy(recorder=...)``; thread-safe (the server runs inference off the event loop)."""

    def __init__(self, writer: StoreWriter, records: tuple[Record, ...], table: HookTable, num_steps: int,
                 flush_every_s: float = 30.0, site_extras: dict[str, dict] | None = None) -> None:
        """``site_extras``: JSON-able facts stored with a site's info beyond what its hook point declares (the
        Diffusion Policy's feature-map grid of its spatial-softmax attention), by exact hook name."""
        self.writer = writer
        self.site_extras = dict(site_extras or {})
        self.flush_every_s = flush_every_s  # bounds what a killed server loses, however slow the traffic
        self._last_flush = time.monotonic()
        self.num_steps = num_steps
        self.records = records
        self.table = table
        table.validate(records, num_steps=num_steps)
        self._lock = threading.Lock()
        self._episode: dict[str, tuple] = {}  # per run: the episode of its latest request
        self._closed = threading.Event()
        self._flusher = threading.Thread(target=self._flush_periodically, name="store-flush", daemon=True)
        self._flusher.start()

    def _flush_periodically(self) -> None:
        while not self._closed.wait(min(1.0, self.flush_every_s)):
            with self._lock:
                if time.monotonic() - self._last_flush >= self.flush_every_s:
                    self._flush()

    def _flush(self) -> None:
        self.writer.flush()
        self._last_flush = time.monotonic()

    def _record_for(self, name: str) -> Record:
        return next(r for r in self.records if fnmatch.fnmatchcase(name, r.site))

    def __call__(self, recordings: dict[str, np.ndarray], table: dict, meta: dict[str, Any],
                 actions: np.ndarray) -> None:
        base = {
            "run_id": str(meta.get("run_id", meta.get("connection_id", "local"))),
            "suite": str(meta.get("suite", "")),
            "task_id": int(meta.get("task_id", -1)),
            "episode": int(meta.get("episode", -1)),
            "attempt": str(meta.get("attempt", "")),
            "env_step": int(meta.get("env_step", meta.get("request_index", -1))),
            "replan_index": int(meta.get("replan_index", meta.get("request_index", -1))),
        }
        episode = (base["suite"], base["task_id"], base["episode"], base["attempt"])
        with self._lock:
            if self._episode.get(base["run_id"], episode) != episode:
                self._flush()  # the previous episode of this run is finished: make it durable now
            self._episode[base["run_id"]] = episode
            base["span_table"] = self.writer.add_span_table(table)
            self.writer.add(ACTIONS_SITE, np.asarray(actions, np.float32)[None],
                            base | {"denoise_step": -1, "token_index": -1, "span": "actions"})
            for name, value in recordings.items():
                self._add_site(name, np.asarray(value), table, base)
            self.writer.commit()

    def _add_site(self, name: str, value: np.ndarray, table: dict, base: dict) -> None:
        rec = self._record_for(name)
        point = self.table[name]
        info = site_info(rec, self.table, name) | self.site_extras.get(name, {})
        if point.per_step:
            steps = resolve_steps(rec.steps, self.num_steps)  # the recorded steps, in order
            valid = int(table.get("valid_steps", self.num_steps))  # Pi0-FAST: steps after its end of sequence
            per_step = [(s, value[i, 0]) for i, s in enumerate(steps) if s < valid]
        else:
            per_step = [(-1, value[0])]
        one_row_per_token = "token" in point.axes and "tokens" not in rec.reduce
        for step, arr in per_step:
            keys = base | {"denoise_step": step}
            if not one_row_per_token:  # attention maps, token means, scalars: one row per step
                span = rec.tokens if rec.tokens != "all" else ""
                index = -1
                if point.token_step_stride and "tokens" not in rec.reduce:  # one query that moves with the step
                    (index,) = point.joint_index_at(info["token_index"], step)
                    span = span_name_of(table, int(index))
                self.writer.add(name, arr[None], keys | {"token_index": int(index), "span": span}, info=info)
                continue
            tokens = point.joint_index_at(info["token_index"], step)
            self.writer.add(name, arr, keys | {"token_index": tokens,
                                               "span": np.array([span_name_of(table, t) for t in tokens])},
                            info=info)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self.writer.close()
