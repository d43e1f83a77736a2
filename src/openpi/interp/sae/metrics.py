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


# ------------------------------------------------------------------------------------------------ intervals


class GroupedFVU:
    """Per-group sums from which the FVU of any resample of groups follows exactly, for several reconstructions.

    Why: held-out rows of one episode (or one row block) are not independent, so an interval must resample whole
    groups. Per group we keep the row count, the sum of x, the sum of ||x||^2 and each model's sum of squared
    errors. A resample's FVU is the ratio ``sum w_g sse_g / sum w_g ss_g`` with ``ss_g = sum_{i in g} ||x_i - mu||^2``
    around the mean ``mu`` of all held-out rows (a ratio-estimator bootstrap: re-centring on each resample would
    shrink the denominator whenever an episode is drawn twice and bias the interval upwards). With all weights 1 it
    is exactly the FVU of the module docstring.
    """

    def __init__(self, d_in: int, models: Iterable[str]) -> None:
        self.d_in = d_in
        self.models = tuple(models)
        self.index: dict[object, int] = {}
        self.n: list[float] = []
        self.sum_x: list[np.ndarray] = []
        self.sum_sq: list[float] = []
        self.sse: dict[str, list[float]] = {m: [] for m in self.models}

    def add(self, groups: np.ndarray, x: np.ndarray, recon: dict[str, np.ndarray]) -> None:
        """Add held-out rows ``x`` (b, d) of the given groups (b,) with each model's reconstruction (b, d)."""
        x = np.asarray(x, np.float64)
        groups = np.asarray(groups)
        if groups.shape != (x.shape[0],):
            raise ValueError(f"{groups.shape} group ids for {x.shape[0]} rows")
        missing = [m for m in self.models if m not in recon]
        if missing:
            raise ValueError(f"no reconstruction for {missing}")
        err = {m: np.square(x - np.asarray(recon[m], np.float64)).sum(axis=1) for m in self.models}
        for g in np.unique(groups):
            rows = groups == g
            i = self.index.setdefault(g.item() if hasattr(g, "item") else g, len(self.n))
            if i == len(self.n):
                self.n.append(0.0)
                self.sum_x.append(np.zeros(self.d_in))
                self.sum_sq.append(0.0)
                for m in self.models:
                    self.sse[m].append(0.0)
            self.n[i] += float(rows.sum())
            self.sum_x[i] += x[rows].sum(axis=0)
            self.sum_sq[i] += float(np.square(x[rows]).sum())
            for m in self.models:
                self.sse[m][i] += float(err[m][rows].sum())

    def _fvu(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """FVU per model for weight vectors ``w`` (r, groups) -> (r,) arrays."""
        n, sx, sq = np.asarray(self.n), np.stack(self.sum_x), np.asarray(self.sum_sq)
        mu = sx.sum(axis=0) / n.sum()
        ss = sq - 2.0 * sx @ mu + n * float(mu @ mu)
        tot = w @ ss
        with np.errstate(divide="ignore", invalid="ignore"):
            return {m: np.where(tot > 0, (w @ np.asarray(self.sse[m])) / tot, np.nan) for m in self.models}

    def summary(self, n_boot: int, seed: int, pairs: Iterable[tuple[str, str]] = ()) -> dict:
        """{model: {fvu, ci_low, ci_high}} and {"a-b": {mean, ci_low, ci_high}} for each pair, 95% percentile
        intervals from ``n_boot`` resamples of groups (the same resamples for every model, so differences are
        paired)."""
        g = len(self.n)
        if g == 0:
            raise ValueError("no held-out rows: cannot compute FVU intervals")
        point = self._fvu(np.ones((1, g)))
        rng = np.random.default_rng([seed, 4])
        draws = rng.integers(0, g, size=(n_boot, g))
        w = np.stack([np.bincount(d, minlength=g) for d in draws]).astype(np.float64) if n_boot else np.zeros((0, g))
        boot = self._fvu(w) if n_boot else {m: np.zeros(0) for m in self.models}

        def interval(values: np.ndarray) -> tuple[float | None, float | None]:
            v = values[np.isfinite(values)]
            if g < 2 or v.size == 0:
                return None, None
            return float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))

        out: dict = {"n_groups": g, "n_boot": n_boot, "interval": "95% percentile bootstrap over held-out groups"}
        for m in self.models:
            lo, hi = interval(boot[m])
            out[m] = {"fvu": float(point[m][0]), "ci_low": lo, "ci_high": hi}
        for a, b in pairs:
            lo, hi = interval(boot[a] - boot[b])
            out[f"{a}-{b}"] = {"mean": float(point[a][0] - point[b][0]), "ci_low": lo, "ci_high": hi}
        return out


class PCABaseline:
    """Reconstruction by the training mean plus the top ``n_components`` principal directions of training rows:
    a dense code with as many active directions as the SAE's L0 (``n_components=0`` is the mean predictor)."""

    def __init__(self, sample: np.ndarray, n_components: int) -> None:
        sample = np.asarray(sample, np.float64)
        self.mean = sample.mean(axis=0)
        k = int(min(max(n_components, 0), *sample.shape))
        if k:
            _, _, vt = np.linalg.svd(sample - self.mean, full_matrices=False)
            self.basis = vt[:k]
        else:
            self.basis = np.zeros((0, sample.shape[1]))
        self.n_components = k

    def __call__(self, x: np.ndarray) -> np.ndarray:
        c = np.asarray(x, np.float64) - self.mean
        return self.mean + (c @ self.basis.T) @ self.basis
