"""Keyed, sharded, append-only activation store.

Layout::

    STORE/store.json                 format, model config, site row shapes/dtypes (written once, checked on append)
    STORE/shards/<writer>-<n>.npz    one shard: for each site ``<site>|data`` (rows, ...) and key columns
                                     ``<site>|key|<name>``, plus ``__spans__`` (JSON span tables; rows point to
                                     them by the ``span_table`` key)

Every row is one vector (a token's activation at one denoising step) or one vector group (an attention map), keyed
by KEY_COLUMNS, so analyses join on keys, never on row order. Shards are written to a temporary name and renamed, so
a killed writer leaves only complete shards; several writers (SLURM array tasks) use distinct writer ids. Readers
stream one shard at a time, so memory stays bounded by the shard size whatever the store size.
"""
from __future__ import annotations

import json
import pathlib
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from openpi.shared.io import read_json, save_npz_atomic, write_json_atomic
from openpi.shared.records import KEY_COLUMNS

FORMAT = "vla-interp-store/2"  # /2: the attempt key column, per-site request/axes/token info
_SEP = "|"


class StoreError(ValueError):
    """A damaged, missing or mismatched store."""


def _site_file_key(site: str, part: str) -> str:
    return f"{site}{_SEP}{part}"


def _read_store_json(root: pathlib.Path) -> dict:
    path = root / "store.json"
    info = read_json(path, "activation store index", error=StoreError)
    if info.get("format") != FORMAT:
        raise StoreError(f"{path}: format {info.get('format')!r}, expected {FORMAT!r}")
    return info


class StoreWriter:
    """Buffers rows; ``commit`` after each group (one inference) writes a shard once ``shard_rows`` are buffered,
    and ``close`` writes the rest. Span-table indices are local to the shard being built."""

    def __init__(self, root: str | pathlib.Path, model_config: dict, *, writer_id: str | None = None,
                 shard_rows: int = 4096) -> None:
        self.root = pathlib.Path(root)
        self.model_config = model_config
        self.writer_id = writer_id or uuid.uuid4().hex[:12]
        if _SEP in self.writer_id or "/" in self.writer_id:
            raise ValueError(f"writer id {self.writer_id!r} may not contain '{_SEP}' or '/'")
        self.shard_rows = shard_rows
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        self._info = self._open_info()
        self._buffers: dict[str, list[tuple[np.ndarray, dict]]] = {}
        self._spans: list[str] = []
        self._rows = 0
        self._seq = len(list((self.root / "shards").glob(f"{self.writer_id}-*.npz")))

    def _open_info(self) -> dict:
        path = self.root / "store.json"
        if path.exists():
            info = _read_store_json(self.root)
            if info["model_config"] != self.model_config:
                raise StoreError(f"{path}: store was written with another model config; refusing to mix "
                                 f"(stored {info['model_config']}, writing {self.model_config})")
            return info
        info = {"format": FORMAT, "model_config": self.model_config, "sites": {}, "key_columns": list(KEY_COLUMNS)}
        self._write_json(info)
        return info

    def _write_json(self, info: dict) -> None:
        write_json_atomic(self.root / "store.json", info, indent=1)

    def add_span_table(self, table: dict) -> int:
        """Register a span table for rows added next; returns its index for the ``span_table`` key."""
        text = json.dumps(table, sort_keys=True)
        if not self._spans or self._spans[-1] != text:
            self._spans.append(text)
        return len(self._spans) - 1

    def add(self, site: str, rows: np.ndarray, keys: dict[str, Any], info: dict | None = None) -> None:
        """Add rows (n, ...) for a site; key values are scalars (broadcast) or length-n arrays. ``info`` (JSON-able:
        the request, axis names, kept token indices) is stored with the site's row shape in ``store.json`` and
        must be the same for every row of the site."""
        rows = np.asarray(rows)
        n = rows.shape[0]
        cols = {}
        for name, kind in KEY_COLUMNS.items():
            if name not in keys:
                raise KeyError(f"row keys for site {site!r} lack {name!r}; required: {list(KEY_COLUMNS)}")
            value = np.asarray(keys[name])
            value = np.broadcast_to(value, (n,)) if value.ndim == 0 else value
            if value.shape != (n,):
                raise ValueError(f"key {name!r} for site {site!r} has shape {value.shape}, expected ({n},)")
            cols[name] = value.astype(str if kind is str else np.int64)
        sites = self._info["sites"]
        spec = {"row_shape": list(rows.shape[1:]), "dtype": rows.dtype.str, **(info or {})}
        if site in sites and sites[site] != spec:
            raise StoreError(f"site {site!r}: rows of shape {rows.shape[1:]} {rows.dtype} do not match the store's "
                             f"{sites[site]} ({self.root / 'store.json'})")
        if site not in sites:
            current = _read_store_json(self.root)  # another writer may have added sites meanwhile
            current["sites"].setdefault(site, spec)
            if current["sites"][site] != spec:
                raise StoreError(f"site {site!r} already stored with {current['sites'][site]}, got {spec}")
            self._info = current
            self._write_json(current)
        self._buffers.setdefault(site, []).append((rows, cols))
        self._rows += n

    def commit(self) -> None:
        """Mark the end of a group of rows sharing span tables (one inference); writes a shard when full."""
        if self._rows >= self.shard_rows:
            self.flush()

    def flush(self) -> pathlib.Path | None:
        if not self._rows:
            return None
        arrays: dict[str, np.ndarray] = {"__spans__": np.asarray(self._spans or ["{}"])}
        for site, parts in self._buffers.items():
            arrays[_site_file_key(site, "data")] = np.concatenate([p[0] for p in parts])
            for name in KEY_COLUMNS:
                arrays[_site_file_key(site, f"key{_SEP}{name}")] = np.concatenate([p[1][name] for p in parts])
        final = self.root / "shards" / f"{self.writer_id}-{self._seq:06d}.npz"
        save_npz_atomic(final, arrays, compress=False)
        self._seq += 1
        self._buffers.clear()
        self._spans = []
        self._rows = 0
        return final

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Filter = dict[str, Any] | Callable[[dict[str, np.ndarray]], np.ndarray] | None


def parse_filter(items: Sequence[str]) -> dict[str, list[str]]:
    """Command-line filters ``COLUMN=VALUE[,VALUE...]`` (e.g. ``span=actions denoise_step=8,9``) -> {column:
    [values]}; values are cast to the column's dtype when rows are selected."""
    out: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"bad selection {item!r}: expected COLUMN=VALUE[,VALUE...]")
        col, vals = item.split("=", 1)
        out.setdefault(col.strip(), []).extend(v.strip() for v in vals.split(","))
    return out


def _values(column: np.ndarray, limit: int = 20) -> list:
    """The distinct values of a key column, for error messages (first ``limit``)."""
    u = np.unique(column)
    out = [v.item() for v in u[:limit]]
    return out + [f"... {u.size - limit} more"] if u.size > limit else out


def _select(keys: dict[str, np.ndarray], where: Filter) -> np.ndarray:
    n = len(next(iter(keys.values())))
    if where is None:
        return np.ones(n, bool)
    if callable(where):
        return np.asarray(where(keys), bool)
    keep = np.ones(n, bool)
    for name, wanted in where.items():
        if name not in keys:
            raise KeyError(f"filter on unknown key {name!r}; keys are {list(keys)}")
        values = wanted if isinstance(wanted, (list, tuple, set, np.ndarray)) else [wanted]
        keep &= np.isin(keys[name], np.asarray(list(values)).astype(keys[name].dtype))
    return keep


class ActivationStore:
    """Read side: manifest of keys per site and memory-bounded streaming of rows."""

    def __init__(self, root: str | pathlib.Path, expect_model_config: dict | None = None) -> None:
        self.root = pathlib.Path(root)
        self.info = _read_store_json(self.root)
        if expect_model_config is not None and self.info["model_config"] != expect_model_config:
            raise StoreError(f"{self.root / 'store.json'}: model config does not match the expected one")
        self.shards = sorted(p for p in (self.root / "shards").glob("*.npz") if not p.name.startswith("."))

    @property
    def sites(self) -> dict[str, dict]:
        return self.info["sites"]

    @property
    def model_config(self) -> dict:
        return self.info["model_config"]

    def _open(self, shard: pathlib.Path):
        try:
            return np.load(shard, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise StoreError(f"shard {shard} is damaged: {exc}") from exc

    def _check_site(self, site: str) -> None:
        if site not in self.sites:
            raise KeyError(f"site {site!r} is not in store {self.root}; stored sites: {sorted(self.sites)}")

    def _shard_keys(self, z, site: str) -> dict[str, np.ndarray] | None:
        if _site_file_key(site, "data") not in z.files:
            return None
        return {name: z[_site_file_key(site, f"key{_SEP}{name}")] for name in KEY_COLUMNS}

    def keys(self, site: str, where: Filter = None) -> dict[str, np.ndarray]:
        """The manifest of a site: key columns of every (selected) row, in stream order."""
        self._check_site(site)
        parts: list[dict[str, np.ndarray]] = []
        for shard in self.shards:
            with self._open(shard) as z:
                keys = self._shard_keys(z, site)
                if keys is not None:
                    keep = _select(keys, where)
                    parts.append({k: v[keep] for k, v in keys.items()} | {"shard": np.full(keep.sum(), shard.name)})
        if not parts:
            return {k: np.zeros(0, str if t is str else np.int64) for k, t in KEY_COLUMNS.items()}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def site_info(self, site: str) -> dict:
        """What the recorder stored about a site (request, ``hook_axes``, ``row_axes``, ``token_index`` of the kept
        tokens for token-axis sites), so readers never guess a row layout from its shape."""
        self._check_site(site)
        info = self.sites[site]
        missing = [k for k in ("request", "row_axes") if k not in info]
        if missing:
            raise StoreError(f"{self.root / 'store.json'}: site {site!r} has no {missing} (rows added without the "
                             "recorder's site info, e.g. by a store older than this reader); re-record the site")
        return info

    def require_keys(self, site: str, where: Filter = None) -> dict[str, np.ndarray]:
        """Like :meth:`keys`, but a selection that matches no row is an error naming the values that exist."""
        keys = self.keys(site, where)
        if len(keys["run_id"]):
            return keys
        if not isinstance(where, dict):
            raise StoreError(f"no rows of site {site!r} in {self.root} match the filter")
        everything = self.keys(site)
        present = {c: _values(everything[c]) for c in where if c in everything}
        unknown = [c for c in where if c not in everything]
        if unknown:
            raise StoreError(f"filter on unknown key column(s) {unknown}; key columns: {list(KEY_COLUMNS)}")
        raise StoreError(f"no rows of site {site!r} in {self.root} match {where} (site has "
                         f"{len(everything['run_id'])} rows; values present: {present})")

    def span_tables(self, site: str, where: Filter = None) -> list[dict]:
        """Span table of each selected row (in stream order)."""
        tables: list[dict] = []
        for shard in self.shards:
            with self._open(shard) as z:
                keys = self._shard_keys(z, site)
                if keys is None:
                    continue
                spans = [json.loads(s) for s in z["__spans__"]]
                tables += [spans[i] for i in keys["span_table"][_select(keys, where)]]
        return tables

    def num_rows(self, site: str, where: Filter = None) -> int:
        return len(self.keys(site, where)["run_id"])

    def iter_batches(self, site: str, batch_size: int = 1024, *, where: Filter = None, shuffle: bool = False,
                     seed: int = 0, dtype=None) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Yield (rows, keys) batches. Holds at most about two shards in memory; ``shuffle`` permutes shard order
        and rows within a window of at least two batches (deterministic for a seed)."""
        self._check_site(site)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.shards)) if shuffle else np.arange(len(self.shards))
        window = 2 * batch_size if shuffle else batch_size
        xs: np.ndarray | None = None
        ks: dict[str, np.ndarray] = {}
        for i in order:
            with self._open(self.shards[i]) as z:
                keys = self._shard_keys(z, site)
                if keys is None:
                    continue
                keep = _select(keys, where)
                if not keep.any():
                    continue
                x = z[_site_file_key(site, "data")][keep]
            x = x if dtype is None else x.astype(dtype)
            keys = {k: v[keep] for k, v in keys.items()}
            xs = x if xs is None else np.concatenate([xs, x])
            ks = keys if not ks else {k: np.concatenate([ks[k], keys[k]]) for k in ks}
            while len(xs) >= window:
                xs, ks = self._maybe_shuffle(xs, ks, shuffle, rng)
                yield xs[:batch_size], {k: v[:batch_size] for k, v in ks.items()}
                xs, ks = xs[batch_size:], {k: v[batch_size:] for k, v in ks.items()}
        if xs is not None and len(xs):
            xs, ks = self._maybe_shuffle(xs, ks, shuffle, rng)
            for start in range(0, len(xs), batch_size):
                yield xs[start:start + batch_size], {k: v[start:start + batch_size] for k, v in ks.items()}

    @staticmethod
    def _maybe_shuffle(xs: np.ndarray, ks: dict[str, np.ndarray], shuffle: bool, rng: np.random.Generator):
        if not shuffle:
            return xs, ks
        perm = rng.permutation(len(xs))
        return xs[perm], {k: v[perm] for k, v in ks.items()}

    def read(self, site: str, where: Filter = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Everything selected at once (only for selections known to fit in memory)."""
        batches = list(self.iter_batches(site, batch_size=1 << 20, where=where))
        if not batches:
            raise StoreError(f"no rows of site {site!r} in {self.root} match {where}")
        return (np.concatenate([b[0] for b in batches]),
                {k: np.concatenate([b[1][k] for b in batches]) for k in batches[0][1]})
