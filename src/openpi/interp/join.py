"""Joining activation rows with the rollout records that produced them: which attempt, which action label.

Why one module: the export, the attention join and the SAE tools all turn key columns into facts from the episode
records, and each of them used to decide on its own which rows belong to a record and which action a row is
about. Two rules, written once here:

* **Attempts.** A resumed LIBERO client reruns an episode under a new attempt id, and the policy server keeps the
  rows of the earlier attempt under the same (run, suite, task, episode, env_step) keys. With records, only rows
  of the attempt that wrote the record are kept (:func:`select_attempts` says how many stale rows it dropped);
  without records, rows of one episode from several attempts are ambiguous and refused.
* **Labels.** Action token j of the chunk predicted at env step t predicts chunk action j, executed at env step
  t + j when the chunk was executed that far (the client replans after ``replan_steps`` actions or the episode
  ended). :func:`row_labels` gives every row its predicted and executed action; rows that are not one action
  token (token-reduced rows, attention rows, the state token) get the query's chunk action 0.
  ``j = token_index - start of the actions span`` of the row's own span table, never a row position.
  Pi0-FAST's generated tokens are DCT coefficients of the whole chunk, not one chunk row each: their span tables
  say ``actions_are_chunk_rows: false`` and every such row gets chunk action 0 (the action executed at t).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from openpi.shared.records import (ACTION_DIM, EPISODE_COLUMNS, EpisodeKey, RecordError, RolloutDir,
                                   episode_keys_of_rows)

Label = Literal["predicted", "executed"]
LABELS: tuple[str, ...] = ("predicted", "executed")
LABEL_RULE = {
    "predicted": "action-token row j of the query at env step t: action j of the chunk returned at t; other rows "
                 "(token-reduced, attention, state token): the chunk's action 0",
    "executed": "the action executed at env step t + j (t for other rows); undefined (NaN, executed_valid False) "
                "where the episode ended or the client replanned before action j was executed",
}


class JoinError(ValueError):
    """Rows and rollout records that do not match (the message names the episode, file and key)."""


def open_rollouts(path: str | os.PathLike | None) -> RolloutDir | None:
    """The rollout folder at ``path`` (None stays None); a JoinError (with the schema's hint when ``path`` is the
    episodes/ subfolder) when it is not one."""
    if path is None:
        return None
    try:
        return RolloutDir(path)
    except RecordError as exc:
        raise JoinError(str(exc)) from None


# ------------------------------------------------------------------------------------------------------ attempts


@dataclasses.dataclass
class AttemptSelection:
    """Which rows belong to the attempt that produced each episode's record."""

    keep: np.ndarray  # (n,) bool
    stale: dict[str, dict[str, int]]  # episode stem -> {attempt: rows dropped}
    rule: str

    @property
    def dropped(self) -> int:
        return int(sum(n for per in self.stale.values() for n in per.values()))

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "kept_rows": int(self.keep.sum()), "dropped_stale_rows": self.dropped,
                "stale_rows_by_episode": self.stale}

    def message(self, source: str) -> str | None:
        """A one-line note on dropped rows (None when nothing was dropped)."""
        if not self.dropped:
            return None
        eps = ", ".join(f"{stem} ({sum(per.values())})" for stem, per in list(self.stale.items())[:5])
        more = f" and {len(self.stale) - 5} more" if len(self.stale) > 5 else ""
        return (f"{source}: dropped {self.dropped} stale rows of earlier attempts in {len(self.stale)} episode(s): "
                f"{eps}{more}")


def select_attempts(keys: Mapping[str, np.ndarray], rollouts: RolloutDir | None, source: str) -> AttemptSelection:
    """Rows of the attempt that wrote each episode's record (with ``rollouts``); without records, all rows after
    checking that no episode holds rows of two attempts."""
    n = len(next(iter(keys.values()))) if keys else 0
    if rollouts is None:
        refuse_mixed_attempts(keys, source)
        return AttemptSelection(np.ones(n, bool), {}, "no records: every row kept (no episode has two attempts)")
    if "attempt" not in keys:
        raise JoinError(f"{source}: the key columns have no 'attempt' (written before attempts existed?), so rows "
                        "of a rerun episode cannot be told from stale ones; re-export with export_activations.py")
    ep_ids, ep_keys = _episodes(keys, source)
    attempt = np.asarray(keys["attempt"]).astype(str)
    keep = np.zeros(n, bool)
    stale: dict[str, dict[str, int]] = {}
    for e, key in enumerate(ep_keys):
        rec = record_of(rollouts, key, source)
        rows = ep_ids == e
        present, counts = np.unique(attempt[rows], return_counts=True)
        if rec.attempt not in present:
            raise JoinError(f"{source}: episode {key.stem} was recorded by attempt {rec.attempt!r} "
                            f"({rec.path}), but its rows come from attempts {present.tolist()} (rows of another "
                            "rollout folder, or an older store?)")
        keep |= rows & (attempt == rec.attempt)
        dropped = {str(a): int(c) for a, c in zip(present, counts) if a != rec.attempt}
        if dropped:
            stale[key.stem] = dropped
    return AttemptSelection(keep, stale, "rows of the attempt that wrote each episode record (record 'attempt' "
                                         "field = row key 'attempt')")


def refuse_mixed_attempts(keys: Mapping[str, np.ndarray], source: str) -> None:
    """Raise when an episode has rows from two attempts (or, without an attempt column, repeated row keys)."""
    if not keys or not all(c in keys for c in EPISODE_COLUMNS):
        return
    ep_ids, ep_keys = _episodes(keys, source)
    if "attempt" in keys:
        attempt = np.asarray(keys["attempt"]).astype(str)
        pairs = np.unique(np.stack([ep_ids.astype(str), attempt], axis=1), axis=0)
        eps, n_att = np.unique(pairs[:, 0].astype(np.int64), return_counts=True)
        mixed = eps[n_att > 1]
        if mixed.size:
            examples = "; ".join(f"{ep_keys[e].stem}: attempts {sorted(set(attempt[ep_ids == e].tolist()))}"
                                 for e in mixed[:3])
            raise JoinError(f"{source}: {mixed.size} episode(s) hold rows of several attempts ({examples}); "
                            "pass the rollout folder (--rollouts) to keep the attempt that wrote each record")
        return
    cols = [c for c in ("env_step", "denoise_step", "token_index", "span") if c in keys]
    codes = np.stack([ep_ids] + [np.unique(np.asarray(keys[c]), return_inverse=True)[1].reshape(-1) for c in cols],
                     axis=1)
    uniq, counts = np.unique(codes, axis=0, return_counts=True)
    if (counts > 1).any():
        first = uniq[np.argmax(counts > 1)]
        raise JoinError(f"{source}: {int((counts > 1).sum())} row keys occur more than once (e.g. episode "
                        f"{ep_keys[first[0]].stem}); an episode recorded twice cannot be told apart without the "
                        "'attempt' key column")


def _episodes(keys: Mapping[str, np.ndarray], source: str) -> tuple[np.ndarray, list[EpisodeKey]]:
    try:
        return episode_keys_of_rows(keys)
    except RecordError as exc:
        raise JoinError(f"{source}: {exc}") from None


def record_of(rollouts: RolloutDir, key: EpisodeKey, source: str):
    """The episode record of rows keyed ``key``; a JoinError naming the rows' source when there is none."""
    try:
        return rollouts.record(key)
    except RecordError as exc:
        raise JoinError(f"{source}: rows of episode {key.stem} have no usable episode record: {exc}") from None


# ------------------------------------------------------------------------------------------------------- labels


def action_index(token_index: np.ndarray, span_tables: Sequence[Mapping[str, Any]], source: str) -> np.ndarray:
    """Which chunk action each row's token predicts: ``token_index - start of the actions span`` of the row's span
    table for rows inside that span, -1 for every other row (token-reduced rows have token_index -1). Tables with
    ``actions_are_chunk_rows: false`` (Pi0-FAST: a token is a compressed piece of the whole chunk) give -1."""
    token_index = np.asarray(token_index, np.int64)
    if len(span_tables) != len(token_index):
        raise JoinError(f"{source}: {len(span_tables)} span tables for {len(token_index)} rows")
    out = np.full(len(token_index), -1, np.int64)
    spans: dict[int, tuple[int, int]] = {}
    for i in np.flatnonzero(token_index >= 0):
        table = span_tables[i]
        if not table.get("actions_are_chunk_rows", True):
            continue
        if id(table) not in spans:
            try:
                a, b = table["spans"]["actions"]
            except (KeyError, TypeError, ValueError):
                raise JoinError(f"{source}: row {i} has token_index {token_index[i]} but its span table has no "
                                f"'actions' span (table keys: {sorted(table) if isinstance(table, dict) else table})"
                                ) from None
            spans[id(table)] = (int(a), int(b))
        a, b = spans[id(table)]
        if a <= token_index[i] < b:
            out[i] = token_index[i] - a
    return out


@dataclasses.dataclass
class RowLabels:
    """Per-row action labels (see the module docstring); NaN rows where a label does not exist."""

    predicted: np.ndarray  # (n, 7)
    executed: np.ndarray  # (n, 7), NaN where not executed
    executed_valid: np.ndarray  # (n,) bool
    answered: np.ndarray  # (n,) bool: the record holds the chunk of the row's query
    action_index: np.ndarray  # (n,) int, -1 for rows that are not one action token

    def subset(self, rows: np.ndarray) -> RowLabels:
        return RowLabels(self.predicted[rows], self.executed[rows], self.executed_valid[rows], self.answered[rows],
                         self.action_index[rows])

    def get(self, label: str) -> np.ndarray:
        if label not in LABELS:
            raise ValueError(f"unknown action label {label!r}; choose from {list(LABELS)}")
        return self.predicted if label == "predicted" else self.executed

    def rule(self) -> dict[str, Any]:
        """What each label means and how many rows got which kind (for export.json / result JSON)."""
        token = self.action_index >= 0
        return {**LABEL_RULE, "action_token_rows": int(token.sum()), "query_rows": int((~token).sum()),
                "executed_valid_rows": int(self.executed_valid.sum()), "unanswered_rows": int((~self.answered).sum()),
                "j": "token_index - start of the row's actions span"}


def row_labels(keys: Mapping[str, np.ndarray], action_idx: np.ndarray, rollouts: RolloutDir,
               source: str) -> RowLabels:
    """Predicted and executed action of every row, joined on (episode, env_step) and the row's action index.

    A query without a chunk in its record is an error, except the query at which a ``policy_error`` episode failed
    (the server answered, the client never got the reply): its rows come back with ``answered`` False.
    """
    ep_ids, ep_keys = _episodes(keys, source)
    n = len(ep_ids)
    env_step = np.asarray(keys["env_step"], np.int64)
    action_idx = np.asarray(action_idx, np.int64)
    predicted = np.full((n, ACTION_DIM), np.nan)
    executed = np.full((n, ACTION_DIM), np.nan)
    answered = np.ones(n, bool)
    for e, key in enumerate(ep_keys):
        rec = record_of(rollouts, key, source)
        rows = np.flatnonzero(ep_ids == e)
        query_steps = sorted(rec.chunk_at)
        n_exec = len(rec.actions)
        for step in np.unique(env_step[rows]):
            at = rows[env_step[rows] == step]
            chunk = rec.chunk_at.get(int(step))
            if chunk is None:
                if rec.status == "policy_error" and int(step) > max(query_steps, default=-1):
                    answered[at] = False
                    continue
                raise JoinError(f"{source}: episode {key.stem} has rows at env_step {int(step)}, but its record "
                                f"{rec.path} returned no chunk there (queried steps: {query_steps[:8]}"
                                f"{'...' if len(query_steps) > 8 else ''})")
            j = np.maximum(action_idx[at], 0)
            if j.max() >= len(chunk.actions):
                raise JoinError(f"{source}: episode {key.stem} env_step {int(step)}: action token "
                                f"{int(j.max())} outside the chunk of {len(chunk.actions)} actions")
            predicted[at] = chunk.actions[j]
            later = [s for s in query_steps if s > step]
            end = min(later[0] if later else n_exec, n_exec)  # the chunk was executed until the next query
            t = int(step) + j
            ok = t < end
            executed[at[ok]] = rec.actions[t[ok]]
    valid = np.isfinite(executed).all(axis=1)
    return RowLabels(predicted, executed, valid, answered, action_idx)
