"""Training loop for TopK / BatchTopK SAEs: streaming batches, AuxK, checkpoints, deterministic resume.

Recipe (Gao et al. 2024; Bussmann et al. 2024 for BatchTopK):
* inputs multiplied by a scalar so that E||x||^2 = d_in on training rows (estimated on a sample);
* `b_dec` initialised to the geometric median (or mean) of that sample, decoder rows random unit vectors,
  encoder = decoder transpose, `b_enc` = 0;
* loss = mean_rows ||x - x_hat||^2 / d_in + auxk_coef * AuxK, where AuxK reconstructs the (stop-gradient)
  residual with up to `auxk_k` dead latents (not active for `dead_window_rows` rows; see `_auxk_loss`),
  normalised by the residual's variance;
* Adam, linear warm-up, constant, linear decay to 0; the decoder-gradient component parallel to each
  decoder row is removed before the update and the rows are renormalised after it;
* BatchTopK: the inference threshold is an exponential moving average of the smallest selected activation
  of each batch (started after warm-up).

Determinism: the batch of step t depends only on (seed, t); the training state (weights, Adam moments,
dead-latent counters, threshold, curves) is checkpointed atomically in the output folder's run directory
(openpi.shared.rundir: run.json fingerprints the config and the exact rows, checkpoints/<step>/ the state, the
same mechanism as the flow-matching trainer), so a killed run rerun with the same command resumes and ends with
the same weights as an uninterrupted run, and a rerun with other settings is refused naming each difference.

Held-out split: whole episodes by default (key columns needed); contiguous row blocks only when asked for
(``split="rows"``). metrics.json states the split next to every held-out number, with a 95% interval that
resamples held-out episodes (or blocks) and two baselines on the same rows: the training mean and PCA with as many
components as the SAE's L0.

Batch sources: anything implementing `BatchSource` (e.g. the activation store); `IndexedRowSource` serves
rows of a memory-mapped `.npy` (only the current batch and a row permutation, 8 bytes per row, are in RAM).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import pathlib
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from openpi.interp.sae import io as sae_io
from openpi.interp.sae import metrics as sae_metrics
from openpi.interp.sae import model as sae_model
from openpi.shared.io import atomic_path, read_json, write_json_atomic
from openpi.shared.records import EPISODE_COLUMNS, episode_keys_of_rows
from openpi.shared.rundir import RunDir, RunSettingsError

logger = logging.getLogger(__name__)

RUN_JOB = "sae-train"
CHECKPOINT_DIR = "checkpoints"  # openpi.shared.rundir.CheckpointDir inside the output folder, removed when done


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainConfig:
    """SAE hyperparameters. `None` means "derived from the data" (see `resolve`)."""

    arch: Literal["topk", "batchtopk"] = "topk"
    """TopK (k per row) or BatchTopK (k * batch per batch; threshold at inference)."""
    k: int = 32
    """Active latents per row (average per row for BatchTopK)."""
    num_latents: int | None = None
    """Dictionary size d_sae (default 8 * d_in)."""
    batch_size: int = 1024
    """Rows per optimisation step."""
    steps: int | None = None
    """Optimisation steps (default: `epochs` passes over the training rows, at least `min_steps`)."""
    epochs: float | None = None
    """Passes over the training rows (default: enough for `min_rows_per_latent` rows per latent, within 1..100)."""
    min_steps: int = 1000
    """Lower bound on the automatic number of steps (small data still gets a real optimisation)."""
    min_rows_per_latent: int = 1000
    """Automatic epochs aim at this many training rows seen per latent."""
    lr: float | None = None
    """Adam learning rate (default 2e-4 * sqrt(2^14 / d_sae), Gao et al.'s scaling)."""
    warmup_frac: float = 0.05
    """Fraction of steps of linear learning-rate warm-up."""
    decay_frac: float = 0.2
    """Fraction of final steps with linear decay of the learning rate to 0."""
    auxk_coef: float = 1.0 / 32.0
    """Weight of the AuxK dead-latent loss."""
    auxk_k: int | None = None
    """Dead latents used by AuxK (default d_in // 2)."""
    dead_window_rows: int | None = None
    """A latent inactive for this many training rows is dead (default min(training rows, 10M))."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Decoder-bias initialisation from a sample of training rows."""
    init_sample_rows: int = 16384
    """Training rows sampled to estimate the input scale and b_dec."""
    threshold_beta: float = 0.99
    """BatchTopK threshold EMA decay."""
    batchtopk_width: int | None = None
    """BatchTopK: per-row slots of the sparse path (default 4k); batches needing more use the exact dense path."""
    backward: Literal["auto", "slots", "dense", "scatter"] = "auto"
    """Weight gradients of the sparse gathers: scatter-add (GPU) or one dense product (CPU); auto picks by backend."""
    split: Literal["episodes", "rows"] = "episodes"
    """Held-out split: whole episodes (needs the key columns run_id, suite, task_id, episode), or contiguous row
    blocks, an explicit choice that leaks (the other tokens, denoising steps and queries of a held-out row's episode
    are in training, so its FVU is optimistic)."""
    holdout_frac: float = 0.05
    """Fraction of episodes (or of row blocks) held out for evaluation."""
    holdout_block: int = 128
    """With --split rows, rows are held out in contiguous blocks of this size (neighbouring rows are correlated)."""
    eval_every: int | None = None
    """Steps between held-out FVU points of the training curve (default steps // 20)."""
    eval_curve_rows: int = 8192
    """Held-out rows used for the training-curve FVU (the final metrics use all held-out rows)."""
    checkpoint_every: int | None = None
    """Steps between checkpoints (default steps // 10)."""
    dense_threshold: float = sae_metrics.DEFAULT_DENSE_THRESHOLD
    """A latent active on more than this fraction of held-out rows counts as dense."""
    n_boot: int = 1000
    """Bootstrap resamples of held-out episodes (or row blocks) for the FVU intervals."""
    seed: int = 0
    """Seed of initialisation, batch order and held-out split."""


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Data-dependent values derived once from the config and the batch source."""

    d_in: int
    d_sae: int
    k: int
    steps: int
    lr: float
    warmup_steps: int
    decay_start: int
    auxk_k: int
    dead_window_rows: int
    eval_every: int
    checkpoint_every: int
    log_every: int


def resolve(cfg: TrainConfig, d_in: int, n_train: int) -> Resolved:
    """Fill the automatic values; raise on impossible settings (k > dictionary, no training rows...)."""
    if n_train < 1:
        raise ValueError("no training rows (empty selection or everything held out)")
    d_sae = cfg.num_latents if cfg.num_latents is not None else 8 * d_in
    if d_sae < 1:
        raise ValueError(f"num_latents must be positive, got {d_sae}")
    if not 1 <= cfg.k <= d_sae:
        raise ValueError(f"k={cfg.k} must be between 1 and the dictionary size num_latents={d_sae}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {cfg.batch_size}")
    if cfg.steps is not None:
        steps = cfg.steps
    else:
        epochs = cfg.epochs
        if epochs is None:
            epochs = min(100.0, max(1.0, cfg.min_rows_per_latent * d_sae / n_train))
        steps = max(cfg.min_steps, math.ceil(epochs * n_train / cfg.batch_size))
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    lr = cfg.lr if cfg.lr is not None else 2e-4 * math.sqrt(2**14 / d_sae)
    warmup = int(round(cfg.warmup_frac * steps))
    decay_start = max(warmup, int(round((1.0 - cfg.decay_frac) * steps)))
    return Resolved(
        d_in=d_in,
        d_sae=d_sae,
        k=cfg.k,
        steps=steps,
        lr=lr,
        warmup_steps=warmup,
        decay_start=decay_start,
        auxk_k=min(d_sae, cfg.auxk_k if cfg.auxk_k is not None else max(1, d_in // 2)),
        dead_window_rows=cfg.dead_window_rows if cfg.dead_window_rows is not None else min(n_train, 10_000_000),
        eval_every=max(1, cfg.eval_every if cfg.eval_every is not None else steps // 20),
        checkpoint_every=max(1, cfg.checkpoint_every if cfg.checkpoint_every is not None else steps // 10),
        log_every=max(1, steps // 1000),
    )


def lr_schedule(r: Resolved) -> Callable[[jax.Array], jax.Array]:
    """Linear warm-up to `lr`, constant, linear decay to 0 from `decay_start` to the last step."""

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / max(1, r.warmup_steps)) if r.warmup_steps > 0 else 1.0
        decay = jnp.clip((r.steps - step) / max(1, r.steps - r.decay_start), 0.0, 1.0)
        return r.lr * warm * decay

    return fn


# ----------------------------------------------------------------------------------------------------
# Batch sources
# ----------------------------------------------------------------------------------------------------
class BatchSource(Protocol):
    """What the trainer needs from a dataset of activation rows.

    `iter_train(start_step)` must yield float32 (batch_size, d) arrays where the batch of step t depends
    only on t (and the source's own seed), so training can restart at any step.
    """

    d: int
    batch_size: int

    @property
    def n_train(self) -> int: ...

    def iter_train(self, start_step: int) -> Iterator[np.ndarray]: ...

    def iter_eval(self, chunk: int) -> Iterator[np.ndarray]: ...

    def sample_train(self, n: int, seed: int) -> np.ndarray: ...

    def fingerprint(self) -> dict: ...


@dataclasses.dataclass(frozen=True)
class HoldoutSplit:
    """Which rows train and which are held out, and the unit they were held out in (episode or row block).

    ``eval_groups`` gives, per held-out row (in ``eval_rows`` order), its episode or block: the unit the FVU
    intervals resample, since rows of one episode are not independent."""

    kind: Literal["episodes", "rows"]
    train_rows: np.ndarray
    eval_rows: np.ndarray
    eval_groups: np.ndarray
    n_train_groups: int
    n_eval_groups: int
    eval_episodes: tuple[str, ...] = ()
    block: int | None = None

    def to_json(self) -> dict:
        """The ``split`` record written next to every held-out number."""
        out = {"kind": self.kind, "n_train_rows": int(self.train_rows.size), "n_eval_rows": int(self.eval_rows.size)}
        if self.kind == "episodes":
            out |= {"n_train_episodes": self.n_train_groups, "n_eval_episodes": self.n_eval_groups,
                    "eval_episodes": list(self.eval_episodes), "unit": "episode"}
        else:
            out |= {"n_train_episodes": None, "n_eval_episodes": None, "block_rows": self.block,
                    "n_train_blocks": self.n_train_groups, "n_eval_blocks": self.n_eval_groups, "unit": "row block",
                    "warning": "row blocks: other tokens, denoising steps and queries of a held-out row's episode "
                               "were trained on, so held-out FVU is optimistic"}
        return out


class IndexedRowSource:
    """Batches drawn from given row indices of a random-access matrix (e.g. `np.load(..., mmap_mode="r")`).

    Each epoch is a seeded permutation of the training rows; a batch's rows are read in sorted order for
    disk locality. Memory: one batch plus one int64 permutation of the training rows.
    """

    def __init__(self, x, split: HoldoutSplit, batch_size: int, seed: int, name: str = "array") -> None:
        self.x = x
        self.d = int(x.shape[1])
        self.batch_size = int(batch_size)
        order = np.argsort(split.eval_rows, kind="stable")
        self.split = dataclasses.replace(split, train_rows=np.sort(np.asarray(split.train_rows, np.int64)),
                                         eval_rows=np.asarray(split.eval_rows, np.int64)[order],
                                         eval_groups=np.asarray(split.eval_groups)[order])
        self.train_rows, self.eval_rows = self.split.train_rows, self.split.eval_rows
        self.seed = int(seed)
        self.name = name
        if self.train_rows.size == 0:
            raise ValueError(f"{name}: no training rows left (empty selection or everything held out)")
        if self.eval_rows.size == 0:
            raise ValueError(f"{name}: no held-out rows (too few rows/episodes for the held-out fraction)")
        self._epoch = -1
        self._perm = np.empty(0, np.int64)

    @property
    def n_train(self) -> int:
        return int(self.train_rows.size)

    def _perm_for(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, 1, epoch])
            self._perm = self.train_rows[rng.permutation(self.n_train)]
            self._epoch = epoch
        return self._perm

    def rows_for_step(self, step: int) -> np.ndarray:
        """Row indices of the batch of `step` (sorted)."""
        n, b = self.n_train, self.batch_size
        pos = step * b
        out = []
        while b > 0:
            epoch, off = divmod(pos, n)
            take = min(b, n - off)
            out.append(self._perm_for(epoch)[off : off + take])
            pos += take
            b -= take
        return np.sort(np.concatenate(out))

    def iter_train(self, start_step: int) -> Iterator[np.ndarray]:
        step = start_step
        while True:
            yield np.asarray(self.x[self.rows_for_step(step)], np.float32)
            step += 1

    def iter_eval(self, chunk: int) -> Iterator[np.ndarray]:
        for start in range(0, self.eval_rows.size, chunk):
            yield np.asarray(self.x[self.eval_rows[start : start + chunk]], np.float32)

    def iter_eval_groups(self, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(held-out rows, their episode or block ids), in the order of :meth:`iter_eval`."""
        for start, x in zip(range(0, self.eval_rows.size, chunk), self.iter_eval(chunk)):
            yield x, self.split.eval_groups[start : start + chunk]

    def sample_train(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 2])
        rows = self.train_rows[np.sort(rng.choice(self.n_train, size=min(n, self.n_train), replace=False))]
        return np.asarray(self.x[rows], np.float32)

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        h.update(self.train_rows.tobytes())
        h.update(self.eval_rows.tobytes())
        return {"name": self.name, "shape": list(self.x.shape), "split": self.split.kind,
                "rows_sha256": h.hexdigest()[:16]}


def holdout_split(n_rows: int, frac: float, block: int, seed: int, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, eval_rows) holding out a seeded fraction of groups (episodes) or of contiguous row blocks."""
    if not 0.0 < frac < 1.0:
        raise ValueError(f"holdout_frac must be in (0, 1), got {frac}")
    group = _row_groups(n_rows, block, groups)
    uniq = np.unique(group)
    n_eval = max(1, int(round(frac * uniq.size)))
    if uniq.size < 2:
        what = "episodes" if groups is not None else f"blocks of {block} rows"
        raise ValueError(f"cannot hold out rows: only {uniq.size} {what} (need >= 2)")
    held = np.random.default_rng([seed, 3]).choice(uniq, size=min(n_eval, uniq.size - 1), replace=False)
    is_eval = np.isin(group, held)
    return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)


def _row_groups(n_rows: int, block: int, groups: np.ndarray | None) -> np.ndarray:
    return np.asarray(groups, np.int64) if groups is not None else np.arange(n_rows, dtype=np.int64) // max(1, block)


def make_split(cfg: TrainConfig, n_rows: int, keys: Mapping[str, np.ndarray] | None, source: str) -> HoldoutSplit:
    """The held-out split ``cfg.split`` asks for over ``n_rows`` rows (``keys`` already restricted to them)."""
    if cfg.split == "episodes":
        if keys is None or any(c not in keys for c in EPISODE_COLUMNS):
            have = "no --keys" if keys is None else f"keys with columns {sorted(keys)}"
            raise ValueError(f"{source}: holding out whole episodes needs the key columns {list(EPISODE_COLUMNS)} "
                             f"(pass --keys KEYS.npz, which export_activations.py writes next to X.npy); found "
                             f"{have}. Pass --split rows to hold out row blocks instead (optimistic: rows of a "
                             "held-out episode are also in training)")
        groups, episodes = episode_keys_of_rows(keys)
        tr, ev = holdout_split(n_rows, cfg.holdout_frac, cfg.holdout_block, cfg.seed, groups)
        held = np.unique(groups[ev])
        return HoldoutSplit("episodes", tr, ev, groups[ev], len(episodes) - held.size, int(held.size),
                            tuple(episodes[i].stem for i in held))
    if cfg.split != "rows":
        raise ValueError(f"split must be 'episodes' or 'rows', got {cfg.split!r}")
    tr, ev = holdout_split(n_rows, cfg.holdout_frac, cfg.holdout_block, cfg.seed)
    blocks = _row_groups(n_rows, cfg.holdout_block, None)
    n_eval = int(np.unique(blocks[ev]).size)
    return HoldoutSplit("rows", tr, ev, blocks[ev], int(np.unique(blocks).size) - n_eval, n_eval,
                        block=cfg.holdout_block)


def npy_source(
    path: str | pathlib.Path,
    cfg: TrainConfig,
    keys: dict[str, np.ndarray] | None = None,
    select: dict[str, list] | None = None,
) -> IndexedRowSource:
    """Batch source over a `.npy` activation matrix (memory-mapped), optionally filtered by key columns.

    Held-out rows are whole episodes (``cfg.split="episodes"``, needs keys) or contiguous row blocks (``"rows"``).
    """
    from openpi.interp.sae import data as sae_data

    x = sae_data.open_activations(path)
    rows = np.arange(x.shape[0])
    if keys is not None:
        keys = sae_data.check_keys(keys, x.shape[0], source=f"keys of {path}")
        if select:
            rows = sae_data.select_rows(keys, select, x.shape[0])
        keys = {c: np.asarray(v)[rows] for c, v in keys.items()}
    elif select:
        raise ValueError("--select needs --keys (the key columns to select on)")
    split = make_split(cfg, rows.size, keys, str(path))
    split = dataclasses.replace(split, train_rows=rows[split.train_rows], eval_rows=rows[split.eval_rows])
    return IndexedRowSource(x, split, cfg.batch_size, cfg.seed, name=str(path))


# ----------------------------------------------------------------------------------------------------
# Initialisation statistics
# ----------------------------------------------------------------------------------------------------
def geometric_median(points: np.ndarray, iters: int = 100, tol: float = 1e-6) -> np.ndarray:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows."""
    pts = np.asarray(points, np.float64)
    guess = pts.mean(axis=0)
    for _ in range(iters):
        dist = np.linalg.norm(pts - guess, axis=1)
        w = 1.0 / np.maximum(dist, 1e-12)
        new = (w[:, None] * pts).sum(axis=0) / w.sum()
        if np.linalg.norm(new - guess) <= tol * max(1.0, np.linalg.norm(guess)):
            return new
        guess = new
    return guess


def init_stats(sample: np.ndarray, method: str) -> tuple[float, np.ndarray]:
    """(input scale so that E||s x||^2 = d, b_dec in scaled units) from a sample of training rows."""
    sample = np.asarray(sample, np.float64)
    ms = float(np.mean(np.sum(sample**2, axis=1)))
    if not ms > 0:
        raise ValueError("training rows are all zero: cannot normalise inputs")
    scale = math.sqrt(sample.shape[1] / ms)
    if method == "geometric_median":
        b_dec = geometric_median(sample * scale)
    elif method == "mean":
        b_dec = (sample * scale).mean(axis=0)
    elif method == "zeros":
        b_dec = np.zeros(sample.shape[1])
    else:
        raise ValueError(f"unknown b_dec_init {method!r}")
    return scale, b_dec.astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Train step
# ----------------------------------------------------------------------------------------------------
def init_state(r: Resolved, arch: str, scale: float, b_dec: np.ndarray, seed: int) -> dict:
    """Initial training state (a pytree of arrays)."""
    params = sae_model.train_params_from(sae_model.init_params(jax.random.PRNGKey(seed), r.d_in, r.d_sae, b_dec))
    opt = _optimizer(r)
    return {
        "params": params,
        "opt_state": opt.init(params),
        "rows_since_fired": jnp.zeros((r.d_sae,), jnp.int32),
        "threshold": jnp.zeros((), jnp.float32),
        "step": jnp.zeros((), jnp.int32),
    }


def _optimizer(r: Resolved) -> optax.GradientTransformation:
    return optax.adam(lr_schedule(r), b1=0.9, b2=0.999, eps=1e-8)


def _auxk_loss(tp, xc, dead, rows_since_fired, residual, k_aux):
    """AuxK (Gao et al.): reconstruct the residual with dead latents, normalised by the residual's variance.

    Cost-bounded variant: the k_aux longest-inactive dead latents form a small dense sub-dictionary whose
    ReLU codes reconstruct the residual (exactly Gao's top-k_aux-of-dead whenever at most k_aux latents are
    dead; with more, the longest-dead ones are used instead of a per-row top-k). Cost ~ batch * k_aux * d_in.
    """
    _, ids = jax.lax.top_k(jnp.where(dead, rows_since_fired, -1), k_aux)
    valid = dead[ids]
    pre = xc @ tp["E"][ids].T + tp["b_enc"][ids]
    codes = jnp.where(valid[None, :], jax.nn.relu(pre), 0.0)
    e_hat = codes @ tp["W_dec"][ids]
    denom = jnp.sum(jnp.square(residual - residual.mean(axis=0)))
    return jnp.sum(jnp.square(residual - e_hat)) / jnp.maximum(denom, 1e-12)


def make_train_step(r: Resolved, arch: str, cfg: TrainConfig) -> Callable:
    """Jitted (state, scaled batch) -> (state, step metrics)."""
    opt = _optimizer(r)
    k, k_aux, window = r.k, r.auxk_k, r.dead_window_rows
    mode = sae_model.resolve_backward(cfg.backward)

    def loss_fn(params, x, dead, since):
        b = x.shape[0]
        x_hat, vals, cols = sae_model.train_forward(params, x, arch, k, mode, cfg.batchtopk_width)
        cols, vals_flat = cols.reshape(-1), vals.reshape(-1)
        active = vals_flat > 0
        residual = jax.lax.stop_gradient(x - x_hat)
        mse = jnp.sum(jnp.square(x - x_hat)) / (b * x.shape[1])
        aux = jax.lax.cond(
            jnp.any(dead) & (cfg.auxk_coef > 0),
            lambda: _auxk_loss(params, x - params["b_dec"], dead, since, residual, k_aux),
            lambda: jnp.zeros((), jnp.float32),
        )
        fired = jnp.zeros((r.d_sae,), jnp.int32).at[cols].max(active.astype(jnp.int32))
        min_active = jnp.min(jnp.where(active, vals_flat, jnp.inf))
        l0 = jnp.sum(active) / b
        return mse + cfg.auxk_coef * aux, (mse, aux, fired, min_active, l0)

    # The state is donated: XLA updates parameters and Adam moments in place instead of allocating ~12 bytes per
    # parameter anew each step (Adam alone: 93 -> 24 ms at d=1024 x 8192 latents on the 2-core CPU). Callers must
    # use only the returned state.
    @functools.partial(jax.jit, donate_argnums=(0,))
    def step_fn(state, x):
        params = state["params"]
        dead = state["rows_since_fired"] >= window
        grads, (mse, aux, fired, min_active, l0) = jax.grad(loss_fn, has_aux=True)(params, x, dead, state["rows_since_fired"])
        w = params["W_dec"]
        g = grads["W_dec"]
        grads = {**grads, "W_dec": g - jnp.sum(g * w, axis=1, keepdims=True) * w}
        updates, opt_state = opt.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        params = {**params, "W_dec": sae_model.unit_rows(params["W_dec"])}
        b = x.shape[0]
        since = jnp.where(fired > 0, 0, jnp.minimum(state["rows_since_fired"] + b, 2**30))
        step = state["step"]
        thr = state["threshold"]
        if arch == "batchtopk":
            m = jnp.where(jnp.isfinite(min_active), min_active, thr)
            start = r.warmup_steps
            thr = jnp.where(step < start, thr, jnp.where(step == start, m, cfg.threshold_beta * thr + (1 - cfg.threshold_beta) * m))
        new = {"params": params, "opt_state": opt_state, "rows_since_fired": since.astype(jnp.int32), "threshold": thr, "step": step + 1}
        out = {"mse": mse, "auxk": aux, "dead_fraction": jnp.mean(dead), "l0": l0, "threshold": thr}
        return new, out

    return step_fn


def make_eval_fn(r: Resolved, arch: str, width: int | None = None) -> Callable:
    """Jitted training-mode reconstruction (TopK / BatchTopK over the eval chunk) for the training curve."""

    @jax.jit
    def fn(params, x):
        return sae_model.train_forward(params, x, arch, r.k, "dense", width)[0]

    return fn


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
    sae: sae_model.SparseAutoencoder
    metrics: dict
    completed: bool


OUTPUT_NAMES = (sae_io.CFG_NAME, sae_io.WEIGHTS_NAME, "metrics.json", "curves.json", "training_curves.png")


def open_run(cfg: TrainConfig, source: BatchSource, out: pathlib.Path, overwrite: bool) -> RunDir:
    """The SAE's run directory (settings = the config and the exact rows), refusing other settings by name."""
    if not (out / "run.json").is_file() and (out / "metrics.json").is_file() and not overwrite:
        raise RunSettingsError(f"{out} holds an SAE written by an older version (metrics.json, no run.json); "
                               "choose another --out or pass --overwrite")
    run = RunDir(out, RUN_JOB, {"train": cfg, "source": source.fingerprint()}, overwrite=overwrite)
    if overwrite:
        for name in OUTPUT_NAMES:
            (out / name).unlink(missing_ok=True)
    return run


def train(
    cfg: TrainConfig,
    source: BatchSource,
    out_dir: str | pathlib.Path,
    stop_after_steps: int | None = None,
    overwrite: bool = False,
    extra_metadata: dict | None = None,
    progress: bool = True,
) -> TrainResult | None:
    """Train (or resume, or return the finished result of) an SAE into `out_dir`.

    Returns None when stopped early by `stop_after_steps` (a checkpoint holds the state).
    """
    out = pathlib.Path(out_dir)
    r = resolve(cfg, source.d, source.n_train)  # raises on impossible settings before anything is written
    run = open_run(cfg, source, out, overwrite)
    done = out / "metrics.json"
    if run.resumed and done.is_file():
        logger.info("%s: already finished, loading it", out)
        return TrainResult(sae_io.load_sae(out), read_json(done, "finished SAE metrics"), completed=True)

    step_fn = make_train_step(r, cfg.arch, cfg)
    eval_fn = make_eval_fn(r, cfg.arch, cfg.batchtopk_width)

    # The scale and b_dec are recomputed deterministically; a checkpoint's copies are checked against them.
    sample = source.sample_train(cfg.init_sample_rows, cfg.seed)
    scale, b_dec = init_stats(sample, cfg.b_dec_init)
    state = init_state(r, cfg.arch, scale, b_dec, cfg.seed)
    curves: dict[str, list] = {"step": [], "mse": [], "auxk": [], "dead_fraction": [], "l0": [], "threshold": [], "lr": [], "eval_step": [], "eval_fvu": []}
    ckpts = run.checkpoints
    ckpts.keep_last = 1
    if ckpts.latest() is not None:
        ck_state, meta = ckpts.restore(state)
        state = jax.tree.map(jnp.asarray, ck_state)
        curves = meta["curves"]
        scale = float(meta["input_scale"])
        logger.info("resuming %s from step %d / %d", out, int(state["step"]), r.steps)

    eval_cache = _eval_subset(source, cfg.eval_curve_rows) * scale
    sched = lr_schedule(r)
    start = int(state["step"])
    stop = r.steps if stop_after_steps is None else min(r.steps, stop_after_steps)

    def checkpoint():
        if int(state["step"]) not in ckpts.steps():
            ckpts.save(int(state["step"]), state, {"input_scale": scale, "curves": curves, "resolved": dataclasses.asdict(r)})

    batches = source.iter_train(start)
    bar = tqdm.tqdm(range(start, stop), desc=f"SAE {cfg.arch} k={r.k} n={r.d_sae}", disable=not progress, initial=start, total=r.steps, mininterval=2.0)
    for step in bar:
        x = next(batches)
        state, m = step_fn(state, jnp.asarray(x * np.float32(scale)))
        if step % r.log_every == 0 or step == r.steps - 1:
            curves["step"].append(step)
            for name in ("mse", "auxk", "dead_fraction", "l0", "threshold"):
                curves[name].append(float(m[name]))
            curves["lr"].append(float(sched(step)))
            bar.set_postfix(mse=f"{curves['mse'][-1]:.4f}", dead=f"{curves['dead_fraction'][-1]:.3f}", refresh=False)
        if (step + 1) % r.eval_every == 0 or step == r.steps - 1:
            x_hat = np.asarray(eval_fn(state["params"], jnp.asarray(eval_cache)))
            curves["eval_step"].append(step + 1)
            curves["eval_fvu"].append(sae_metrics.fvu(eval_cache, x_hat))
        if (step + 1) % r.checkpoint_every == 0 and step + 1 < stop:
            checkpoint()
    if int(state["step"]) < r.steps:
        checkpoint()
        logger.info("stopped at step %d of %d; rerun the same command to resume", int(state["step"]), r.steps)
        return None

    threshold = float(state["threshold"]) if cfg.arch == "batchtopk" else None
    spec = sae_model.SAESpec(d_in=r.d_in, d_sae=r.d_sae, arch=cfg.arch, k=r.k, input_scale=scale)
    sae = sae_model.SparseAutoencoder(spec, sae_model.params_from_train(state["params"]), None if threshold is None else np.full(r.d_sae, threshold, np.float32))
    held, baselines = held_out_metrics(sae, source, sample, cfg)
    metrics = {
        "fingerprint": run.fingerprint,
        "arch": cfg.arch,
        "d_in": r.d_in,
        "d_sae": r.d_sae,
        "k": r.k,
        "steps": r.steps,
        "rows_seen": r.steps * source.batch_size,
        "n_train_rows": source.n_train,
        "batch_size": source.batch_size,
        "lr": r.lr,
        "input_scale": scale,
        "threshold": threshold,
        "split": held["split"],
        "held_out": held,
        "baselines": baselines,
        "final_train_dead_fraction": curves["dead_fraction"][-1] if curves["dead_fraction"] else None,
        "config": dataclasses.asdict(cfg),
        "resolved": dataclasses.asdict(r),
        "source": source.fingerprint(),
    }
    extras = {"training": {k: v for k, v in metrics.items() if k not in ("held_out", "baselines")}}
    if extra_metadata:
        extras.update(extra_metadata)
    sae_io.save_sae(out, sae, extras)
    _plot_curves(out, curves, cfg.arch, held["split"]["kind"])
    write_json_atomic(out / "curves.json", curves, indent=None)
    write_json_atomic(done, metrics, indent=2)
    shutil.rmtree(ckpts.root, ignore_errors=True)
    return TrainResult(sae, metrics, completed=True)


def held_out_metrics(sae: sae_model.SparseAutoencoder, source: IndexedRowSource, sample: np.ndarray,
                     cfg: TrainConfig) -> tuple[dict, dict]:
    """(held-out metrics with their split and FVU interval, baselines on the same rows with the same resamples).

    Baselines: the training mean (FVU about 1: the floor any reconstruction must beat) and PCA of training rows
    with as many components as the SAE's held-out L0 (a dense code with as many active directions)."""
    held = sae_metrics.evaluate_sae(sae, source.iter_eval(4096), cfg.dense_threshold)
    mean_model = sae_metrics.PCABaseline(sample, 0)
    pca = sae_metrics.PCABaseline(sample, int(round(held["l0"])))
    grouped = sae_metrics.GroupedFVU(sae.spec.d_in, ("sae", "pca_same_l0", "train_mean"))
    for x, groups in source.iter_eval_groups(4096):
        grouped.add(groups, x, {"sae": sae.decode(sae.encode(x)), "pca_same_l0": pca(x), "train_mean": mean_model(x)})
    boot = grouped.summary(cfg.n_boot, cfg.seed, pairs=[("pca_same_l0", "sae"), ("train_mean", "sae")])
    split = source.split.to_json()
    held |= {"split": split, "fvu_ci_low": boot["sae"]["ci_low"], "fvu_ci_high": boot["sae"]["ci_high"],
             "interval": f"{boot['interval']} ({boot['n_groups']} {split['unit']}s, {cfg.n_boot} resamples)"}
    baselines = {
        "split": split["kind"],
        "train_mean": {**boot["train_mean"], "what": "every held-out row predicted by the training mean"},
        "pca_same_l0": {**boot["pca_same_l0"], "n_components": pca.n_components,
                        "what": f"training mean + top {pca.n_components} principal directions of "
                                f"{len(sample)} training rows (as many active directions as the SAE's L0)"},
        "pca_minus_sae": boot["pca_same_l0-sae"],
        "mean_minus_sae": boot["train_mean-sae"],
    }
    return held, baselines


def _eval_subset(source: BatchSource, n: int) -> np.ndarray:
    parts, got = [], 0
    for x in source.iter_eval(min(n, 4096)):
        parts.append(x[: n - got])
        got += parts[-1].shape[0]
        if got >= n:
            break
    return np.concatenate(parts).astype(np.float32)


def _plot_curves(out: pathlib.Path, curves: dict, arch: str, split_kind: str) -> None:
    """training_curves.png: loss terms, held-out FVU, dead fraction and (BatchTopK) threshold vs step.

    Drawn on a bare ``Figure`` (no pyplot), so the caller's matplotlib backend is never changed."""
    from matplotlib.figure import Figure

    curves = {k: [np.nan if v is None else v for v in vals] for k, vals in curves.items()}
    panels = [("mse", "train MSE / d (scaled units)", True), ("auxk", "AuxK loss (normalised)", False), ("dead_fraction", "dead fraction (training window)", False)]
    if arch == "batchtopk":
        panels.append(("threshold", "BatchTopK threshold (EMA)", False))
    fig = Figure(figsize=(4.2 * (len(panels) + 1), 3.4))
    axes = fig.subplots(1, len(panels) + 1)
    for ax, (name, title, logy) in zip(axes, panels):
        ax.plot(curves["step"], curves[name])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        if logy and min(curves[name], default=0) > 0:
            ax.set_yscale("log")
    ax = axes[-1]
    ax.plot(curves["eval_step"], curves["eval_fvu"], marker=".")
    unit = "whole episodes" if split_kind == "episodes" else "row blocks (optimistic)"
    ax.set_title(f"held-out FVU ({unit})", fontsize=9)
    ax.set_xlabel("step")
    if min(curves["eval_fvu"], default=0) > 0:
        ax.set_yscale("log")
    fig.tight_layout()
    with atomic_path(out / "training_curves.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
