"""Activation matrices, key columns, row selection and episode identities for the SAE tools.

Rows are tied to their origin by key columns (docs/conventions.md): `run_id, suite, task_id, episode, env_step,
replan_index, denoise_step, token_index, span`. Everything downstream joins on these keys, never on row order.
An episode is identified by (run_id, suite, task_id, episode); its *stem* `<run_id>__<suite>__task<t>__ep<e>`
names its rollout record `episodes/<stem>.json` and frames `frames/<stem>.npz`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from openpi.shared.io import read_json

EPISODE_COLUMNS = ("run_id", "suite", "task_id", "episode")
KEY_COLUMNS = ("run_id", "suite", "task_id", "episode", "env_step", "replan_index", "denoise_step", "token_index", "span")
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


def parse_select(items: Sequence[str]) -> dict[str, list[str]]:
    """Parse CLI filters like `span=actions` or `denoise_step=9,10` into {column: [values]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"bad selection {item!r}: expected COLUMN=VALUE[,VALUE...]")
        col, vals = item.split("=", 1)
        out.setdefault(col.strip(), []).extend(v.strip() for v in vals.split(","))
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
        raise ValueError(f"empty selection: no row matches {dict(select)} (out of {n_rows} rows)")
    return idx


def episode_stem(run_id: str, suite: str, task_id: int, episode: int) -> str:
    """File stem of an episode's rollout record (docs/conventions.md)."""
    return f"{run_id}__{suite}__task{int(task_id)}__ep{int(episode)}"


def episode_ids(keys: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """Integer episode id per row and the stem of each id (ids ordered by sorted stem)."""
    check_keys(keys, None, EPISODE_COLUMNS)
    cols = [np.asarray(keys[c]) for c in EPISODE_COLUMNS]
    n = len(cols[0])
    if n == 0:
        return np.zeros(0, np.int64), []
    # Unique over the 4-tuple without building a string per row.
    codes = []
    uniques = []
    for c in cols:
        u, inv = np.unique(c, return_inverse=True)
        uniques.append(u)
        codes.append(inv.astype(np.int64))
    combo = np.stack(codes, axis=1)
    uc, inv = np.unique(combo, axis=0, return_inverse=True)
    stems = [episode_stem(str(uniques[0][a]), str(uniques[1][b]), int(uniques[2][c]), int(uniques[3][d])) for a, b, c, d in uc]
    order = np.argsort(stems, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inv.reshape(-1)], [stems[i] for i in order]


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
    attributes (`keys`, `n`, `d`, `iterate`).
    """

    def __init__(self, x: np.ndarray, rows: np.ndarray, keys: Keys, name: str = "activations") -> None:
        self.x, self.rows, self.keys, self.name = x, np.asarray(rows, np.int64), keys, name

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


def open_rows(activations: str | pathlib.Path, keys_path: str | pathlib.Path, select: Sequence[str] = (), required: Sequence[str] = EPISODE_COLUMNS + ("env_step",)) -> ActivationRows:
    """Memory-mapped activations + key columns (+ optional COLUMN=VALUE filters), validated against each other."""
    x = open_activations(activations)
    keys = load_keys(keys_path, x.shape[0], required)
    rows = select_rows(keys, parse_select(select), x.shape[0]) if select else np.arange(x.shape[0])
    return ActivationRows(x, rows, subset_keys(keys, rows), name=str(activations))


class EpisodeRecords:
    """Rollout records `<episodes_dir>/<stem>.json` (docs/conventions.md), loaded lazily and cached.

    Executed actions are indexed by env step: `actions[t]` is the action executed at env step t.
    """

    def __init__(self, episodes_dir: str | pathlib.Path) -> None:
        self.dir = pathlib.Path(episodes_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"episodes directory not found: {self.dir}")
        self._cache: dict[str, dict] = {}

    def path(self, stem: str) -> pathlib.Path:
        return self.dir / f"{stem}.json"

    def has(self, stem: str) -> bool:
        return self.path(stem).is_file()

    def record(self, stem: str) -> dict:
        if stem not in self._cache:
            p = self.path(stem)
            rec = read_json(p, f"rollout record for episode {stem}")
            acts = np.asarray(rec.get("actions", []), np.float64)
            if acts.ndim != 2 or acts.shape[0] == 0:
                raise ValueError(f"{p}: 'actions' must be a non-empty T x action_dim list, found shape {acts.shape}")
            rec["_actions"] = acts
            self._cache[stem] = rec
        return self._cache[stem]

    def actions(self, stem: str) -> np.ndarray:
        return self.record(stem)["_actions"]

    def prompt(self, stem: str) -> str:
        return str(self.record(stem).get("prompt", ""))


def row_actions(ep_ids: np.ndarray, stems: Sequence[str], env_step: np.ndarray, records: EpisodeRecords, strict: bool = True) -> np.ndarray:
    """Executed action at each row's (episode, env_step): (N, action_dim), joined on keys.

    Raises (strict) when an episode has no record or an env step lies outside its actions; otherwise fills NaN.
    """
    ep_ids = np.asarray(ep_ids)
    env_step = np.asarray(env_step, np.int64)
    out = None
    for e in np.unique(ep_ids):
        stem = stems[e]
        if not records.has(stem):
            if strict:
                raise FileNotFoundError(f"no rollout record for episode {stem} (expected {records.path(stem)})")
            continue
        acts = records.actions(stem)
        if out is None:
            out = np.full((len(ep_ids), acts.shape[1]), np.nan)
        if acts.shape[1] != out.shape[1]:
            raise ValueError(f"{records.path(stem)}: action dimension {acts.shape[1]} differs from other episodes ({out.shape[1]})")
        m = ep_ids == e
        steps = env_step[m]
        bad = (steps < 0) | (steps >= acts.shape[0])
        if bad.any() and strict:
            raise ValueError(f"{records.path(stem)}: env_step {int(steps[bad][0])} outside the {acts.shape[0]} recorded actions")
        vals = np.full((steps.size, acts.shape[1]), np.nan)
        vals[~bad] = acts[steps[~bad]]
        out[m] = vals
    if out is None:
        raise FileNotFoundError(f"none of the {len(np.unique(ep_ids))} episodes has a rollout record in {records.dir}")
    return out
