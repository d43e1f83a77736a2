"""Held-out SAE metrics, computed in one streaming pass with float64 accumulators.

Definitions (stated next to every number we write, because libraries disagree):

* FVU (fraction of variance unexplained) = sum_i ||x_i - x_hat_i||^2 / sum_i ||x_i - mu||^2, where mu is the
  per-dimension mean of the *evaluation* rows. 0 is perfect; predicting mu for every row gives 1.
  The denominator is computed as sum ||x||^2 - n ||mu||^2 in float64. FVU is invariant to a common scale of x
  and x_hat, so it is the same in raw and in scaled (E||x||^2 = d) units.
* L0 = mean number of non-zero codes per row.
* dead fraction = fraction of latents that are never non-zero on the evaluation rows.
* dense fraction = fraction of latents non-zero on more than `dense_threshold` of the evaluation rows.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

FVU_FORMULA = "sum||x - x_hat||^2 / sum||x - mean_eval(x)||^2 (per-dimension mean over the evaluation rows)"
DEFAULT_DENSE_THRESHOLD = 0.1


def fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    """FVU of one in-memory set of rows (see module docstring)."""
    acc = EvalAccumulator(d_in=np.shape(x)[1], d_sae=1)
    acc.add(x, x_hat, np.zeros((np.shape(x)[0], 1), np.float32))
    return acc.result()["fvu"]


class EvalAccumulator:
    """Streaming FVU / L0 / dead / dense statistics over batches of held-out rows."""

    def __init__(self, d_in: int, d_sae: int, dense_threshold: float = DEFAULT_DENSE_THRESHOLD) -> None:
        self.d_in, self.d_sae, self.dense_threshold = d_in, d_sae, dense_threshold
        self.n = 0
        self.sum_x = np.zeros(d_in, np.float64)
        self.sum_sq = 0.0
        self.sse = 0.0
        self.nnz = 0
        self.fire_counts = np.zeros(d_sae, np.int64)

    def add(self, x: np.ndarray, x_hat: np.ndarray, codes: np.ndarray) -> None:
        """Add rows with their reconstruction and dense codes (batch, d_sae)."""
        active = np.asarray(codes) != 0
        self._add_recon(x, x_hat)
        self.nnz += int(active.sum())
        self.fire_counts += active.sum(axis=0)

    def add_sparse(self, x: np.ndarray, x_hat: np.ndarray, vals: np.ndarray, idx: np.ndarray) -> None:
        """Add rows with sparse codes given as (values, latent indices), both (batch, width)."""
        active = np.asarray(vals) != 0
        self._add_recon(x, x_hat)
        self.nnz += int(active.sum())
        self.fire_counts += np.bincount(np.asarray(idx)[active], minlength=self.d_sae)

    def _add_recon(self, x: np.ndarray, x_hat: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        x_hat = np.asarray(x_hat, np.float64)
        if x.shape != x_hat.shape or x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"x {x.shape} and x_hat {x_hat.shape} must both be (batch, {self.d_in})")
        self.n += x.shape[0]
        self.sum_x += x.sum(axis=0)
        self.sum_sq += float(np.square(x).sum())
        self.sse += float(np.square(x - x_hat).sum())

    def result(self) -> dict:
        """Metrics dict (see module docstring); raises when no rows were added."""
        if self.n == 0:
            raise ValueError("no evaluation rows: cannot compute FVU / L0 on an empty selection")
        mu = self.sum_x / self.n
        total_var = self.sum_sq - self.n * float(mu @ mu)
        freq = self.fire_counts / self.n
        return {
            "fvu": float(self.sse / total_var) if total_var > 0 else float("nan"),
            "fvu_formula": FVU_FORMULA,
            "mse_per_row": float(self.sse / self.n),
            "l0": float(self.nnz / self.n),
            "dead_fraction": float(np.mean(self.fire_counts == 0)),
            "dense_fraction": float(np.mean(freq > self.dense_threshold)),
            "dense_threshold": self.dense_threshold,
            "n_rows": int(self.n),
        }


def evaluate_sae(sae, batches: Iterable[np.ndarray], dense_threshold: float = DEFAULT_DENSE_THRESHOLD) -> dict:
    """Held-out metrics of a `SparseAutoencoder` (inference encoder) over raw row batches."""
    acc = EvalAccumulator(sae.spec.d_in, sae.spec.d_sae, dense_threshold)
    for x in batches:
        codes = sae.encode(x)
        acc.add(x, sae.decode(codes), codes)
    return acc.result()
