"""Action readout from SAE codes: ridge regression codes -> action labels on an episode-grouped split.

Protocol (`score_readout`):
* rows are joined to their action label (`ScoringConfig.label`, rule in openpi.interp.join): `predicted` (default)
  = the chunk action the row's token predicts (action j of the chunk returned at the row's env step), `executed`
  = the action executed at env step + j; rows without a label (an action never executed) are dropped;
* episodes (not rows) are split train / validation / test with a seeded permutation;
* features (SAE codes, or raw activations for the baseline) are standardised with training statistics
  (constant features dropped), targets centred with the training mean;
* ridge weights for every lambda of a grid (penalty lambda * n_train on the standardised features), solved
  from the streamed Gram matrix (eigendecomposition for <= `dense_limit` features, conjugate gradients above);
* lambda chosen per action dimension by its validation R^2; train, validation and test metrics reported.

Metrics per action dimension on a split: R^2 = 1 - SSE / sum (y - mean_split(y))^2; MCC of the sign
(y > 0 vs prediction > 0) and MCC of above-median (y > m vs prediction > m, m = training median of that
dimension). MCC = (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)), 0 when a margin is empty.

Result dict: {n_rows: {train, val, test}, n_episodes: {...}, n_features_used, lambda (chosen, per dim),
lambdas (grid), val_r2_per_lambda (grid x dim), train / val / test: SplitMetrics, shuffled_labels, label}, with SplitMetrics =
{r2 (per dim), r2_mean, mcc_sign (per dim), mcc_sign_mean, mcc_median (per dim), mcc_median_mean, n}.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import tqdm

from openpi.interp.join import LABELS
from openpi.interp.sae import data as sae_data
from openpi.shared.io import finite_floats

SPLITS = ("train", "val", "test")
DEFAULT_LAMBDAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


@dataclasses.dataclass
class ScoringConfig:
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    """Train / validation / test fractions of episodes."""
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    """Ridge penalties (times n_train, on standardised features)."""
    seed: int = 0
    """Seed of the episode split."""
    chunk_rows: int = 4096
    dense_limit: int = 4096
    """Use an eigendecomposition of the Gram matrix up to this many features, conjugate gradients above."""
    shuffle_labels: bool = False
    """Control: permute training targets across rows (the readout should then score R^2 <= ~0)."""
    label: str = "predicted"
    """Action label to read out: predicted (the chunk action the row's token predicts) or executed (the action
    executed at env step + token index, where it was executed)."""

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"unknown action label {self.label!r}; choose from {list(LABELS)}")


# A feature stream yields (positions into the row table, features of those rows as dense or sparse matrix).
FeatureStream = Callable[[], Iterator[tuple[np.ndarray, "np.ndarray | sp.csr_matrix"]]]


def sae_feature_stream(sae, rows, chunk: int) -> FeatureStream:
    """SAE codes of `rows` as sparse CSR chunks."""

    def gen():
        for pos, x in rows.iterate(chunk):
            r, j, v = sae.triples(x)
            yield pos, sp.csr_matrix((v.astype(np.float64), (r, j)), shape=(len(pos), sae.spec.d_sae))

    return gen


def activation_feature_stream(rows, chunk: int) -> FeatureStream:
    """Raw activations of `rows` (the baseline readout)."""

    def gen():
        for pos, x in rows.iterate(chunk):
            yield pos, x.astype(np.float64)

    return gen


def mcc(tp: np.ndarray, tn: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Matthews correlation per element (0 where a margin is empty)."""
    tp, tn, fp, fn = (np.asarray(a, np.float64) for a in (tp, tn, fp, fn))
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.where(den > 0, (tp * tn - fp * fn) / np.where(den > 0, den, 1.0), 0.0)


def _confusion(y_pos: np.ndarray, p_pos: np.ndarray) -> np.ndarray:
    """(4, ...) counts TP, TN, FP, FN summed over rows (axis 0)."""
    return np.stack([(y_pos & p_pos).sum(0), (~y_pos & ~p_pos).sum(0), (~y_pos & p_pos).sum(0), (y_pos & ~p_pos).sum(0)])


def _matmul(z, w: np.ndarray) -> np.ndarray:
    return np.asarray(z @ w)


def score_readout(
    features: FeatureStream,
    n_features: int,
    y: np.ndarray,
    ep: np.ndarray,
    cfg: ScoringConfig,
    desc: str = "readout",
    progress: bool = True,
) -> dict:
    """Ridge readout features -> y (see module docstring). y: (N, A) with NaN rows dropped; ep: (N,) episode id."""
    y = np.asarray(y, np.float64)
    ok = np.isfinite(y).all(axis=1)
    if not ok.any():
        raise ValueError(f"no row has a {cfg.label} action label: nothing to score (check --rollouts and the keys)")
    ep = np.asarray(ep, np.int64)
    uniq_eps = np.unique(ep[ok])
    ep_split = sae_data.split_episodes(uniq_eps.size, cfg.fractions, cfg.seed)
    lookup = np.full(int(ep.max()) + 1, -1, np.int64)
    lookup[uniq_eps] = ep_split
    split = np.where(ok, lookup[ep], -1)
    tr = split == 0
    a_dim = y.shape[1]
    y_train = y[tr]
    if cfg.shuffle_labels:
        y = y.copy()
        y[tr] = y_train[np.random.default_rng([cfg.seed, 7]).permutation(y_train.shape[0])]
        y_train = y[tr]
    n_tr = int(tr.sum())
    ybar = y_train.mean(axis=0)
    med = np.median(y_train, axis=0)

    # Pass 1: Gram matrix and cross products on training rows.
    dense = n_features <= cfg.dense_limit
    gram = np.zeros((n_features, n_features)) if dense else sp.csr_matrix((n_features, n_features))
    s1 = np.zeros(n_features)
    zy = np.zeros((n_features, a_dim))
    for pos, z in tqdm.tqdm(features(), desc=f"{desc}: gram", disable=not progress):
        m = tr[pos]
        if not m.any():
            continue
        zt = z[m]
        yt = y[pos[m]] - ybar
        g = zt.T @ zt
        if dense and sp.issparse(g):
            g = g.toarray()
        elif not dense and not sp.issparse(g):
            g = sp.csr_matrix(g)
        gram = gram + g
        s1 += np.asarray(zt.sum(axis=0)).ravel()
        zy += _matmul(zt.T, yt)
    mu = s1 / n_tr
    diag = (gram.diagonal() if sp.issparse(gram) else np.diag(gram)) / n_tr - mu**2
    use = diag > 1e-12 * max(1.0, float(np.max(diag, initial=0.0)))
    if not use.any():
        raise ValueError("every feature is constant on the training rows: nothing to regress on")
    sd = np.sqrt(np.where(use, diag, 1.0))
    idx = np.flatnonzero(use)
    # Standardised covariance C = D^-1 (G/n - mu mu^T) D^-1 and cross-covariance c = D^-1 Z^T (y - ybar) / n.
    c = zy[idx] / n_tr / sd[idx, None]
    lambdas = np.asarray(cfg.lambdas, np.float64)
    if dense:
        cov = (gram[np.ix_(idx, idx)] / n_tr - np.outer(mu[idx], mu[idx])) / np.outer(sd[idx], sd[idx])
        evals, evecs = np.linalg.eigh(cov)
        evals = np.maximum(evals, 0.0)
        proj = evecs.T @ c
        betas = np.stack([evecs @ (proj / (evals + lam)[:, None]) for lam in lambdas])
    else:
        g_sub = gram.tocsr()[idx][:, idx]
        mu_s, sd_s = mu[idx], sd[idx]

        def cov_op(lam):
            def mv(v):
                v = np.asarray(v).ravel()
                u = v / sd_s
                return (g_sub @ u / n_tr - mu_s * (mu_s @ u)) / sd_s + lam * v

            return spla.LinearOperator((idx.size, idx.size), matvec=mv, dtype=np.float64)

        betas = np.zeros((lambdas.size, idx.size, a_dim))
        for li, lam in enumerate(lambdas):
            op = cov_op(lam)
            for a in range(a_dim):
                sol, _ = spla.cg(op, c[:, a], rtol=1e-10, maxiter=5000)
                betas[li, :, a] = sol
    # Weights on the raw features: pred = ybar + (z - mu) D^-1 beta.
    w = np.zeros((lambdas.size, n_features, a_dim))
    w[:, idx] = betas / sd[idx][None, :, None]
    offset = ybar[None, :] - np.einsum("f,lfa->la", mu, w)

    # Pass 2: metrics on every split for every lambda.
    acc = {s: {"sse": np.zeros((lambdas.size, a_dim)), "sy": np.zeros(a_dim), "sy2": np.zeros(a_dim), "n": 0,
               "sign": np.zeros((4, lambdas.size, a_dim)), "med": np.zeros((4, lambdas.size, a_dim))} for s in SPLITS}
    w2 = w.transpose(1, 0, 2).reshape(n_features, -1)
    for pos, z in tqdm.tqdm(features(), desc=f"{desc}: eval", disable=not progress):
        sp_ = split[pos]
        pred = (_matmul(z, w2).reshape(len(pos), lambdas.size, a_dim) + offset[None])
        for si, s in enumerate(SPLITS):
            m = sp_ == si
            if not m.any():
                continue
            yt, pt = y[pos[m]], pred[m]
            a = acc[s]
            a["n"] += int(m.sum())
            a["sse"] += ((pt - yt[:, None, :]) ** 2).sum(0)
            a["sy"] += yt.sum(0)
            a["sy2"] += (yt**2).sum(0)
            a["sign"] += _confusion(np.broadcast_to((yt > 0)[:, None, :], pt.shape), pt > 0)
            a["med"] += _confusion(np.broadcast_to((yt > med)[:, None, :], pt.shape), pt > med)
    metrics = {}
    for s in SPLITS:
        a = acc[s]
        if a["n"] == 0:
            raise ValueError(f"the {s} split has no rows with actions (too few episodes?)")
        sst = a["sy2"] - a["sy"] ** 2 / a["n"]
        with np.errstate(invalid="ignore", divide="ignore"):
            r2 = np.where(sst > 0, 1.0 - a["sse"] / np.where(sst > 0, sst, 1.0), np.nan)
        metrics[s] = {"r2": r2, "mcc_sign": mcc(*a["sign"]), "mcc_median": mcc(*a["med"]), "n": a["n"]}
    # lambda chosen per action dimension by validation R^2 (each dimension is its own ridge problem).
    val_r2 = np.where(np.isfinite(metrics["val"]["r2"]), metrics["val"]["r2"], -np.inf)
    best = np.argmax(val_r2, axis=0)
    cols = np.arange(a_dim)

    def pack(s):
        m = {k: (v[best, cols] if k != "n" else v) for k, v in metrics[s].items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r2_mean = np.nanmean(m["r2"])
        return {
            "r2": finite_floats(m["r2"]),
            "r2_mean": finite_floats(r2_mean),
            "mcc_sign": finite_floats(m["mcc_sign"]),
            "mcc_sign_mean": float(np.mean(m["mcc_sign"])),
            "mcc_median": finite_floats(m["mcc_median"]),
            "mcc_median_mean": float(np.mean(m["mcc_median"])),
            "n": m["n"],
        }

    return {
        "n_rows": {s: acc[s]["n"] for s in SPLITS},
        "n_episodes": {s: int((ep_split == i).sum()) for i, s in enumerate(SPLITS)},
        "n_features_used": int(idx.size),
        "lambda": lambdas[best].tolist(),
        "lambdas": lambdas.tolist(),
        "val_r2_per_lambda": [finite_floats(r) for r in metrics["val"]["r2"]],
        "train": pack("train"),
        "val": pack("val"),
        "test": pack("test"),
        "shuffled_labels": cfg.shuffle_labels,
        "label": cfg.label,
    }
