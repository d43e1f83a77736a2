"""Normalisation statistics (openpi's norm_stats.json) and z-score / quantile (un)normalisation."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class NormStats:
    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None

    def to_dict(self) -> dict:
        return {k: None if v is None else np.asarray(v).tolist() for k, v in dataclasses.asdict(self).items()}


def load_norm_stats(path: str | pathlib.Path) -> dict[str, NormStats]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"norm stats file {path} not found (expected assets/<asset_id>/norm_stats.json)")
    try:
        raw = json.loads(path.read_text())["norm_stats"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"{path}: expected JSON {{'norm_stats': {{'state': ..., 'actions': ...}}}}: {exc}") from exc
    out = {}
    for key, stats in raw.items():
        missing = {"mean", "std"} - set(stats)
        if missing:
            raise ValueError(f"{path}: norm_stats[{key!r}] lacks {sorted(missing)}")
        out[key] = NormStats(*(None if stats.get(f) is None else np.asarray(stats[f], np.float32)
                               for f in ("mean", "std", "q01", "q99")))
    return out


def save_norm_stats(path: str | pathlib.Path, stats: dict[str, NormStats]) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"norm_stats": {k: v.to_dict() for k, v in stats.items()}}, indent=2))


def _split(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    return x[..., :n], x[..., n:]


def normalize(x: np.ndarray, stats: NormStats, quantile: bool) -> np.ndarray:
    """z-score: (x - mean) / (std + 1e-6); quantile: (x - q01) / (q99 - q01 + 1e-6) * 2 - 1. Dims beyond the
    statistics pass through unchanged."""
    n = len(stats.mean)
    head, rest = _split(np.asarray(x, np.float32), n)
    if quantile:
        if stats.q01 is None or stats.q99 is None:
            raise ValueError("quantile normalisation needs q01/q99 in norm_stats.json")
        head = (head - stats.q01) / (stats.q99 - stats.q01 + EPS) * 2.0 - 1.0
    else:
        head = (head - stats.mean) / (stats.std + EPS)
    return np.concatenate([head, rest], axis=-1).astype(np.float32)


def unnormalize(x: np.ndarray, stats: NormStats, quantile: bool) -> np.ndarray:
    n = len(stats.mean)
    head, rest = _split(np.asarray(x, np.float32), n)
    if quantile:
        head = (head + 1.0) / 2.0 * (stats.q99 - stats.q01 + EPS) + stats.q01
    else:
        head = head * (stats.std + EPS) + stats.mean
    return np.concatenate([head, rest], axis=-1).astype(np.float32)


def compute_norm_stats(x: np.ndarray) -> NormStats:
    """Statistics over all leading axes of ``x`` (..., dim)."""
    flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return NormStats(flat.mean(0).astype(np.float32), flat.std(0).astype(np.float32),
                     np.quantile(flat, 0.01, axis=0).astype(np.float32),
                     np.quantile(flat, 0.99, axis=0).astype(np.float32))
