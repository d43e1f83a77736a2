"""Activation matrices, key columns, row selection, attempts and action labels for the SAE tools.

Rows are tied to their origin by key columns (docs/conventions.md; the episode key and every column name come from
``openpi.shared.records``). Everything downstream joins on these keys, never on row order. With a rollout folder
(``--rollouts``: the LIBERO client's ``--out-dir``) rows are joined to the episode records through
``openpi.interp.join``: only rows of the attempt that wrote each record are kept, and each row's action label is the
chunk action its token predicts (``action_index`` key column, written by export_activations.py) or the action
executed at env step + that index.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from openpi.interp import join
from openpi.interp.store import parse_filter as parse_select
from openpi.shared.records import EPISODE_COLUMNS, EpisodeKey, RolloutDir, episode_keys_of_rows

__all__ = ["EPISODE_COLUMNS", "ActivationRows", "check_keys", "episode_ids", "iter_row_chunks", "load_keys",
           "open_activations", "open_rows", "parse_select", "row_action_labels", "select_rows", "split_episodes",
           "subset_keys"]
Keys = dict[str, np.ndarray]


def open_activations(path: str | pathlib.Path, check_finite: bool = True, chunk_rows: int = 65536) -> np.ndarray:
    """Memory-map a 2-D float `.npy` matrix (rows = vectors) and check it, without loading it into RAM.

    Raises with the file name on a missing file, wrong rank/dtype, zero rows, or NaN/Inf values (with the
    first offending row).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"activation matrix not found: {path}")
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path}: not a plain numeric .npy array ({err})") from err
    if x.ndim != 2:
        raise ValueError(f"{path}: activations must be 2-D (rows, d), found shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{path}: activations must be floating point, found dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{path}: activation matrix is empty, shape {x.shape}")
    if check_finite:
        for start in range(0, x.shape[0], chunk_rows):
            block = np.asarray(x[start : start + chunk_rows])
            bad = ~np.isfinite(block).all(axis=1)
            if bad.any():
                row = start + int(np.argmax(bad))
                raise ValueError(f"{path}: row {row} contains NaN or Inf (all rows must be finite)")
    return x


def load_keys(path: str | pathlib.Path, n_rows: int | None = None, required: Sequence[str] = ()) -> Keys:
    """Load key columns from an `.npz` (one 1-D array per column, equal lengths, no pickled objects)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"key columns file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = {name: z[name] for name in z.files}
    except ValueError as err:
        raise ValueError(f"{path}: key columns must be plain arrays (strings as fixed-width unicode): {err}") from err
    return check_keys(keys, n_rows, required, source=str(path))


def check_keys(keys: Mapping[str, np.ndarray], n_rows: int | None, required: Sequence[str] = (), source: str = "keys") -> Keys:
    """Validate key columns: 1-D, equal length (= n_rows when given), required columns present."""
    missing = [c for c in required if c not in keys]
    if missing:
        raise KeyError(f"{source}: missing key column(s) {missing}; found {sorted(keys)}")
    out = {}
    for name, col in keys.items():
        col = np.asarray(col)
        if col.ndim != 1:
            raise ValueError(f"{source}: key column {name!r} must be 1-D, found shape {col.shape}")
        if n_rows is not None and col.shape[0] != n_rows:
            raise ValueError(f"{source}: key column {name!r} has {col.shape[0]} rows, expected {n_rows} (one per activation row)")
        out[name] = col
    lengths = {len(c) for c in out.values()}
    if len(lengths) > 1:
        raise ValueError(f"{source}: key columns have different lengths {sorted(lengths)}")
    return out


def select_rows(keys: Mapping[str, np.ndarray], select: Mapping[str, Sequence], n_rows: int | None = None) -> np.ndarray:
    """Sorted indices of rows whose key columns match every filter (values coerced to the column dtype).

    Raises when a filter names an unknown column or when nothing matches (an empty selection).
    """
    if n_rows is None:
        n_rows = len(next(iter(keys.values()))) if keys else 0
    mask = np.ones(n_rows, bool)
    for col, values in select.items():
        if col not in keys:
            raise KeyError(f"selection uses unknown key column {col!r}; available: {sorted(keys)}")
        column = keys[col]
        try:
            wanted = np.asarray([np.asarray(v).astype(column.dtype) for v in values])
        except ValueError as err:
            raise ValueError(f"selection {col}={list(values)}: values do not match column dtype {column.dtype}") from err
        mask &= np.isin(column, wanted)
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        present = {c: [v.item() for v in np.unique(keys[c])[:20]] for c in select}
        raise ValueError(f"empty selection: no row matches {dict(select)} (out of {n_rows} rows; values present: "
                         f"{present})")
    return idx


def episode_ids(keys: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[EpisodeKey]]:
    """Integer episode id per row and the key of each id (``openpi.shared.records.episode_keys_of_rows``, after
    checking the key columns)."""
    check_keys(keys, None, EPISODE_COLUMNS)
    return episode_keys_of_rows(keys)


def split_episodes(n_episodes: int, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Assign each episode id to a split (0..len(fractions)-1) with a seeded permutation.

    Every split gets at least one episode; raises when there are fewer episodes than splits.
    """
    fractions = np.asarray(fractions, float)
    if n_episodes < len(fractions):
        raise ValueError(f"need at least {len(fractions)} episodes for an episode-grouped split, found {n_episodes}")
    perm = np.random.default_rng(seed).permutation(n_episodes)
    counts = np.maximum(1, np.floor(fractions / fractions.sum() * n_episodes).astype(int))
    while counts.sum() > n_episodes:
        counts[np.argmax(counts)] -= 1
    counts[0] += n_episodes - counts.sum()
    split = np.empty(n_episodes, np.int64)
    split[perm] = np.repeat(np.arange(len(fractions)), counts)
    return split


def iter_row_chunks(x: np.ndarray, rows: np.ndarray, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (row indices, float32 rows) for sorted `rows` of a (memory-mapped) matrix, `chunk` rows at a time."""
    for start in range(0, len(rows), chunk):
        r = rows[start : start + chunk]
        yield r, np.asarray(x[r], dtype=np.float32)


def subset_keys(keys: Mapping[str, np.ndarray], rows: np.ndarray) -> Keys:
    """Key columns restricted to `rows`."""
    return {k: np.asarray(v)[rows] for k, v in keys.items()}


class ActivationRows:
    """Selected rows of an activation matrix with their key columns (the input of mining and scoring).

    `keys` holds the key columns of the selected rows only (position i = i-th selected row); `iterate(chunk)`
    streams `(positions, X float32)` in order. Another backend (the activation store) only needs the same
    attributes (`keys`, `n`, `d`, `iterate`). `rollouts` is the rollout folder the rows were joined with (None
    without one) and `attempts` which rows of earlier attempts were dropped.
    """

    def __init__(self, x: np.ndarray, rows: np.ndarray, keys: Keys, name: str = "activations",
                 rollouts: RolloutDir | None = None, attempts: join.AttemptSelection | None = None) -> None:
        self.x, self.rows, self.keys, self.name = x, np.asarray(rows, np.int64), keys, name
        self.rollouts, self.attempts = rollouts, attempts

    @property
    def n(self) -> int:
        return int(self.rows.size)

    @property
    def d(self) -> int:
        return int(self.x.shape[1])

    def iterate(self, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.n, chunk):
            pos = np.arange(start, min(start + chunk, self.n))
            r = self.rows[pos]
            contiguous = r[-1] - r[0] == len(r) - 1
            block = self.x[r[0] : r[-1] + 1] if contiguous else self.x[r]
            yield pos, np.asarray(block, np.float32)


def open_rows(activations: str | pathlib.Path, keys_path: str | pathlib.Path, select: Sequence[str] = (),
              rollouts: str | pathlib.Path | None = None,
              required: Sequence[str] = EPISODE_COLUMNS + ("env_step",)) -> ActivationRows:
    """Memory-mapped activations + key columns (+ optional COLUMN=VALUE filters), validated against each other.

    With ``rollouts`` only rows of the attempt that wrote each episode's record are kept (the number dropped is in
    ``rows.attempts``); without, an episode with rows of two attempts is an error.
    """
    x = open_activations(activations)
    keys = load_keys(keys_path, x.shape[0], required)
    rows = select_rows(keys, parse_select(select), x.shape[0]) if select else np.arange(x.shape[0])
    folder = join.open_rollouts(rollouts)
    selected = subset_keys(keys, rows)
    attempts = join.select_attempts(selected, folder, str(activations))
    rows = rows[attempts.keep]
    return ActivationRows(x, rows, subset_keys(keys, rows), str(activations), folder, attempts)


def row_action_labels(rows: ActivationRows, label: str) -> tuple[np.ndarray, dict]:
    """(n, 7) action label of every row (NaN where it does not exist) and a description of the rule, from the
    episode records of ``rows.rollouts`` (see ``openpi.interp.join``)."""
    if label not in join.LABELS:
        raise ValueError(f"unknown action label {label!r}; choose from {list(join.LABELS)}")
    if rows.rollouts is None:
        raise ValueError("action labels need the rollout folder: pass --rollouts (the LIBERO client's --out-dir)")
    if "action_index" in rows.keys:
        aidx = np.asarray(rows.keys["action_index"], np.int64)
    elif "token_index" in rows.keys and (np.asarray(rows.keys["token_index"]) >= 0).any():
        raise KeyError(f"{rows.name}: the keys have token rows but no 'action_index' column, so which chunk action "
                       "each token predicts is unknown; export the rows with export_activations.py")
    else:
        aidx = np.full(rows.n, -1, np.int64)
    labels = join.row_labels(rows.keys, aidx, rows.rollouts, rows.name)
    return labels.get(label), {"label": label, **labels.rule()}
