"""Training of a Pi0-family model (flow matching; Pi0-FAST: next-token loss) on demonstration directories, with
checkpoints that serve.

Why here and not openpi's trainer: our model is the pure-JAX re-implementation in ``openpi.models``; training it
with exactly the inputs ``create_policy`` builds at serving time (the same ``LiberoTransforms``) means a checkpoint
we write is served without any conversion.

Pipeline per batch: random (episode, step) frames from the demo directories (memory-mapped, so data larger than
memory streams) -> ``LiberoTransforms.inputs`` (images, normalised state, tokenised prompt: identical to serving)
-> target chunk = actions[t : t + horizon] (the last action repeated past the episode end), minus the state for
the first 6 dims when the policy config predicts deltas, normalised with the demos' norm stats, zero-padded to
``action_dim`` -> ``pi0.compute_loss`` (noise ~ N(0, 1), t ~ Beta(1.5, 1)) -> AdamW (global-norm clipping,
linear warmup then cosine decay). Pi0-FAST configs: the normalised target chunk becomes the FAST tokens of the
training sequence (``FastLiberoTransforms.inputs(request, targets)``) and the loss is ``pi0_fast.compute_loss``
(cross-entropy of the postfix tokens); checkpoints also hold the FAST tokenizer folder (``fast_tokenizer/``).
Diffusion Policy presets (``openpi.training.train_dp.PRESETS``) go to ``train_dp``, which shares this module's
data, run directory, optimizer and loop (:func:`run_loop`).

Output layout (``out_dir``, one :class:`openpi.shared.rundir.RunDir`)::

    run.json                           job "flow-matching-train", fingerprint and every setting (a rerun with the
                                       same settings resumes; other settings are refused, naming each change)
    assets/physical-intelligence/libero/norm_stats.json   computed once from the demos
    checkpoints/<step:08d>/            one complete checkpoint each (openpi.shared.rundir.CheckpointDir):
        params/                        Orbax, openpi's released layout -> create_policy(config, "<that folder>")
        assets/physical-intelligence/libero/norm_stats.json
        state.npz                      optimizer state leaves, rng key data, step (bit-exact, for resume)
        meta.json                      written last: {step, policy_config, model, num_params, demo_dirs,
                                       num_frames, fingerprint, loss}
    metrics.jsonl                      one JSON object per logged step: step, loss, grad_norm, lr, steps_per_s,
                                       elapsed_s (entries past the resumed checkpoint are dropped on resume)
    loss.png                           loss curve (log scale) with the learning rate
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import pathlib
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from openpi.models import checkpoint, pi0, pi0_fast
from openpi.models.config import AnyModelConfig, Pi0FASTConfig
from openpi.models.normalize import NormStats, compute_norm_stats, load_norm_stats, normalize, save_norm_stats
from openpi.models.param_shapes import init_params, param_shapes
from openpi.models.tokenizer import EMBEDDED_TOKENIZER
from openpi.policies import policy_config as pc
from openpi.policies.fast_policy import FastLiberoTransforms, batch_fast_observation
from openpi.policies.libero_policy import (IMAGE_KEY, PROMPT_KEY, STATE_KEY, WRIST_KEY, LiberoTransforms,
                                           batch_observation)
from openpi.shared.io import atomic_path, jsonable, read_json, write_json_atomic, write_text_atomic
from openpi.shared.rundir import CheckpointDir, RunDir, RunSettingsError, atomic_dir, run_option
from openpi.training import augment as aug
from openpi.training import demos as demo_io

logger = logging.getLogger(__name__)
NORM_STATS_REL = pathlib.Path("assets") / pc.LIBERO_ASSET_ID / "norm_stats.json"
DELTA_DIMS = 6
RUN_JOB = "flow-matching-train"


# ------------------------------------------------------------------------------------------------ data


class DemoDataset:
    """Every step with frames of every demo under the given roots, as (frame, state, action chunk, prompt)."""

    def __init__(self, roots: Sequence[str | pathlib.Path], horizon: int) -> None:
        paths = [p for r in roots for p in demo_io.list_demos(r)]
        if not paths:
            raise ValueError(f"no complete demos found under {[str(r) for r in roots]}")
        self.episodes = [demo_io.read_demo(p, mmap=True) for p in paths]
        self.paths = paths
        self.horizon = horizon
        sizes = {ep.agentview.shape[1] for ep in self.episodes}
        if len(sizes) != 1:
            raise ValueError(f"demos mix image sizes {sorted(sizes)}; generate them with one --resize-size")
        # Only steps with frames are samples; their action chunks still use every step's action.
        self.index = np.concatenate([np.stack([np.full(len(ep.frame_steps()), i), ep.frame_steps()], 1)
                                     for i, ep in enumerate(self.episodes)])

    def __len__(self) -> int:
        return len(self.index)

    def chunk(self, episode: int, t: int) -> np.ndarray:
        """actions[t : t + horizon] (horizon, 7), the last action repeated past the end of the episode."""
        acts = self.episodes[episode].actions
        rows = np.minimum(np.arange(t, t + self.horizon), len(acts) - 1)
        return np.asarray(acts[rows], np.float32)

    def item(self, i: int) -> dict[str, Any]:
        e, t = (int(x) for x in self.index[i])
        ep = self.episodes[e]
        f = t // ep.frame_stride
        return {IMAGE_KEY: np.asarray(ep.agentview[f]), WRIST_KEY: np.asarray(ep.wrist[f]),
                STATE_KEY: np.asarray(ep.states[t], np.float32), PROMPT_KEY: ep.prompt,
                "actions": self.chunk(e, t)}

    def all_states_actions(self, delta_actions: bool) -> tuple[np.ndarray, np.ndarray]:
        """Every state (N, 8) and every per-step training action (N, 7), the latter in model space (deltas)."""
        states = np.concatenate([np.asarray(ep.states, np.float32) for ep in self.episodes])
        actions = np.concatenate([np.asarray(ep.actions, np.float32) for ep in self.episodes])
        if delta_actions:
            actions = actions.copy()
            actions[:, :DELTA_DIMS] -= states[:, :DELTA_DIMS]
        return states, actions


def compute_demo_norm_stats(dataset: DemoDataset, delta_actions: bool) -> dict[str, NormStats]:
    states, actions = dataset.all_states_actions(delta_actions)
    return {"state": compute_norm_stats(states), "actions": compute_norm_stats(actions)}


def fast_training_chunks(roots: Sequence[str | pathlib.Path], horizon: int, stride: int = 1,
                         delta_actions: bool = True, norm_stats: str | pathlib.Path | None = None
                         ) -> tuple[np.ndarray, NormStats]:
    """(N, horizon, 7) chunks of every demo as a Pi0-FAST model sees its targets (first 6 dims minus the state
    when ``delta_actions``, quantile-normalised), one every ``stride`` steps, and the action stats used (from
    ``norm_stats``, else computed from the same demos): what a FAST tokenizer for these demos is fitted on."""
    data = DemoDataset(roots, horizon)
    chunks = []
    for e, ep in enumerate(data.episodes):
        for t in range(0, ep.steps, stride):
            chunk = data.chunk(e, t).copy()
            if delta_actions:
                chunk[:, :DELTA_DIMS] -= np.asarray(ep.states[t, :DELTA_DIMS], np.float32)
            chunks.append(chunk)
    stats = (load_norm_stats(norm_stats) if norm_stats else compute_demo_norm_stats(data, delta_actions))["actions"]
    return normalize(np.stack(chunks), stats, quantile=True), stats


def action_targets(chunk: np.ndarray, raw_state: np.ndarray, transforms: LiberoTransforms) -> np.ndarray:
    """Env actions (H, 7) -> what the model must output (H, action_dim): the inverse of ``transforms.outputs``."""
    chunk = np.asarray(chunk, np.float32).copy()
    if transforms.delta_actions:
        chunk[:, :DELTA_DIMS] -= raw_state[:DELTA_DIMS]
    if transforms.norm_stats is not None:
        chunk = normalize(chunk, transforms.norm_stats["actions"], transforms.quantile_norm)
    out = np.zeros((chunk.shape[0], transforms.config.action_dim), np.float32)
    out[:, : chunk.shape[1]] = chunk
    return out


def make_batch(items: list[dict[str, Any]], transforms: LiberoTransforms) -> tuple[Any, np.ndarray]:
    """Demo items -> (model Observation, target actions (B, H, action_dim)), preprocessed as at serving time.
    Pi0-FAST's targets enter the observation as the FAST tokens of its training sequence."""
    requests = [{k: v for k, v in it.items() if k != "actions"} for it in items]
    targets = np.stack([action_targets(it["actions"], np.asarray(it[STATE_KEY], np.float32).reshape(-1),
                                       transforms) for it in items])
    if isinstance(transforms, FastLiberoTransforms):
        return batch_fast_observation([transforms.inputs(r, t) for r, t in zip(requests, targets)]), targets
    return batch_observation([transforms.inputs(r) for r in requests]), targets


# ------------------------------------------------------------------------------------------------ config


@dataclasses.dataclass
class TrainConfig:
    """Training settings. Fields declared with ``run_option`` say where to read and write and how often to log or
    save; they never change the weights, so they stay out of the run's fingerprint (a resumed run may change them).
    Which demos are trained on is fingerprinted by content (demo names and lengths), not by folder path, so a run
    moved to another machine resumes."""

    demo_dirs: tuple[str, ...] = run_option()
    out_dir: str = run_option()
    policy_config: str = "pi0_tiny_spatial"
    init_checkpoint: str | None = None  # openpi checkpoint to fine-tune from (else seeded random init)
    tokenizer: str | None = run_option(None)  # PaliGemma tokenizer for real configs; fingerprinted by content
    fast_tokenizer: str | None = run_option(None)  # Pi0-FAST: FAST tokenizer folder (default: the config's)
    dtype: str | None = None  # override the config's compute dtype
    num_steps: int = 2000
    batch_size: int = 8
    peak_lr: float = 3e-4
    end_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 1e-10
    clip_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    seed: int = 0
    augment: bool = False  # image augmentation (openpi.training.augment, default AugmentConfig) in every step
    save_every: int = run_option(500)
    keep_last: int | None = run_option(3)  # delete older checkpoints (None: keep all)
    log_every: int = run_option(10)
    overwrite: bool = run_option(False)  # start over in out_dir (its checkpoints and metrics are deleted)

    def __post_init__(self) -> None:
        self.demo_dirs = tuple(str(d) for d in self.demo_dirs)
        for name in ("num_steps", "batch_size", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.num_steps:
            raise ValueError(f"warmup_steps must be in [0, num_steps={self.num_steps}), got {self.warmup_steps}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {self.keep_last}")


def model_config(cfg: TrainConfig) -> AnyModelConfig:
    base = pc.get_config(cfg.policy_config).model
    return base if cfg.dtype is None else dataclasses.replace(base, dtype=cfg.dtype)


def count_params(config: AnyModelConfig) -> int:
    return int(sum(np.prod(s) for s in param_shapes(config).values()))


OPTIMIZER_FIELDS = ("peak_lr", "end_lr", "warmup_steps", "num_steps", "weight_decay", "clip_grad_norm", "b1", "b2")


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    return _optimizer(tuple(getattr(cfg, f) for f in OPTIMIZER_FIELDS))


@functools.lru_cache(maxsize=8)
def _optimizer(settings: tuple) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = dict(zip(OPTIMIZER_FIELDS, settings))
    schedule = optax.warmup_cosine_decay_schedule(init_value=o["peak_lr"] / (o["warmup_steps"] + 1),
                                                  peak_value=o["peak_lr"], warmup_steps=o["warmup_steps"],
                                                  decay_steps=o["num_steps"], end_value=o["end_lr"])
    opt = optax.chain(optax.clip_by_global_norm(o["clip_grad_norm"]),
                      optax.adamw(schedule, b1=o["b1"], b2=o["b2"], weight_decay=o["weight_decay"]))
    return opt, schedule


@functools.lru_cache(maxsize=8)
def make_train_step(config: AnyModelConfig, optimizer: optax.GradientTransformation,
                    augment: aug.AugmentConfig | None = None):
    """jit(params, opt_state, obs, targets, rng) -> (params, opt_state, {loss, grad_norm}).

    Cached per (config, optimizer, augment) so a resumed run in the same process reuses the compiled step (~30 s
    on CPU).
    """

    def loss_fn(params, obs, targets, rng):
        if isinstance(config, Pi0FASTConfig):  # next-token loss on the FAST postfix (targets are in obs)
            return jnp.mean(pi0_fast.compute_loss(config, params, obs))
        return jnp.mean(pi0.compute_loss(config, params, obs, targets, rng=rng))

    def step(params, opt_state, obs, targets, rng):
        if augment is not None:  # [augment] images only, from the step's rng: resume replays it exactly
            aug_rng, rng = jax.random.split(rng)
            obs = aug.augment_observation(obs, aug_rng, augment)
        loss, grads = jax.value_and_grad(loss_fn)(params, obs, targets, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1))


# ------------------------------------------------------------------------------------------------ run directory


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def demos_settings(dataset: DemoDataset) -> dict[str, Any]:
    """The demos by content (names, lengths, frame strides), not by folder path, so a moved run still resumes."""
    demos = sorted((p.name, len(ep.actions), ep.frame_stride) for p, ep in zip(dataset.paths, dataset.episodes))
    digest = hashlib.sha256(json.dumps(demos).encode()).hexdigest()[:16]
    return {"n_demos": len(demos), "n_frames": len(dataset), "sha256": digest}


def run_settings(cfg: TrainConfig, dataset: DemoDataset, tokenizer_path: pathlib.Path,
                 fast_tokenizer_dir: pathlib.Path | None = None) -> dict[str, Any]:
    """Everything the weights depend on: the config's settings, the demos by content and the tokenizer files."""
    out = {"train": cfg, "demos": demos_settings(dataset), "tokenizer_sha256": _sha256(tokenizer_path)}
    if fast_tokenizer_dir is not None:  # absent for Pi0 runs, so their fingerprints are unchanged
        out["fast_tokenizer_sha256"] = _sha256(fast_tokenizer_dir / "tokenizer.json")
    return out


def open_run(cfg: TrainConfig, settings: dict[str, Any], job: str = RUN_JOB) -> RunDir:
    """The run directory: new, resumed (same settings) or refused naming each changed setting."""
    out_dir = pathlib.Path(cfg.out_dir).expanduser().resolve()
    if (out_dir / "train_config.json").is_file() and not (out_dir / "run.json").is_file() and not cfg.overwrite:
        raise RunSettingsError(f"{out_dir} holds a training run in the older layout (train_config.json, <step>/ "
                               "folders) that this version cannot resume; choose another --out-dir or pass "
                               "--overwrite")
    if cfg.overwrite:
        for name in ("metrics.jsonl", "loss.png", "train_config.json"):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / NORM_STATS_REL.parts[0], ignore_errors=True)
        for old in out_dir.glob("[0-9]*/train_meta.json"):  # step folders of the older layout
            shutil.rmtree(old.parent)
    return RunDir(out_dir, job, settings, overwrite=cfg.overwrite)


def checkpoints(out_dir: str | pathlib.Path, keep_last: int | None = None) -> CheckpointDir:
    """The run's checkpoints: ``<out>/checkpoints/<step:08d>/``, each one servable by ``create_policy``."""
    return CheckpointDir(pathlib.Path(out_dir).expanduser().resolve() / "checkpoints", keep_last=keep_last)


def _servable(params, norm_stats: dict[str, NormStats], tokenizer_path: pathlib.Path | None,
              fast_tokenizer_dir: pathlib.Path | None = None):
    """``write_extra`` of a checkpoint: what ``create_policy(config, step_dir)`` loads (params, norm stats,
    for the real configs the tokenizer, for Pi0-FAST its FAST tokenizer folder)."""

    def write(step_dir: pathlib.Path) -> None:
        checkpoint.save_params(step_dir, jax.device_get(params))
        save_norm_stats(step_dir / NORM_STATS_REL, norm_stats)
        if tokenizer_path is not None and tokenizer_path != EMBEDDED_TOKENIZER:
            shutil.copy(tokenizer_path, step_dir / "assets" / "paligemma_tokenizer.model")
        if fast_tokenizer_dir is not None:
            shutil.copytree(fast_tokenizer_dir, step_dir / "fast_tokenizer")

    return write


def train_state(opt_state, rng, step: int) -> dict[str, Any]:
    """The bit-exact part of a checkpoint besides the params (those are read back from the Orbax ``params/``)."""
    return {"opt_state": opt_state, "rng": np.asarray(jax.random.key_data(rng)), "step": np.asarray(step, np.int64)}


def resume_or_init(ckpts: CheckpointDir, optimizer: optax.GradientTransformation, seed: int,
                   load_params: Callable[[pathlib.Path], Any], fresh_params: Callable[[], Any],
                   metrics_path: pathlib.Path):
    """(params, opt_state, rng, start step, checkpoint folder or None) of every model family's run: the newest
    complete checkpoint (params read by ``load_params(step_dir)``, the rest bit-exact from its state, metrics logged
    past it dropped), or a fresh start from ``fresh_params()`` (metrics.jsonl deleted: rows of a run whose
    checkpoints are gone describe other weights)."""
    step = ckpts.latest()
    if step is None:
        metrics_path.unlink(missing_ok=True)
        params = jax.tree.map(jnp.asarray, fresh_params())
        return params, optimizer.init(params), jax.random.key(seed), 0, None
    step_dir = ckpts.step_dir(step)
    params = jax.tree.map(jnp.asarray, load_params(step_dir))
    template = train_state(optimizer.init(params), jax.random.key(0), 0)
    state, _ = ckpts.restore(template, step)
    if int(state["step"]) != step:
        raise checkpoint.CheckpointError(f"{step_dir}: folder says step {step}, its state says {int(state['step'])}")
    truncate_metrics(metrics_path, step)
    logger.info("resuming from %s (step %d)", step_dir, step)
    opt_state = jax.tree.map(jnp.asarray, state["opt_state"])
    return params, opt_state, jax.random.wrap_key_data(jnp.asarray(state["rng"])), step, step_dir


def package_checkpoint(step_dir: str | pathlib.Path, dest: str | pathlib.Path) -> pathlib.Path:
    """Copy what serving needs from a training checkpoint (params, assets, a Pi0-FAST checkpoint's
    ``fast_tokenizer/`` and its metadata as train_meta.json; not the optimizer state, which is twice the size of
    the params) to a new directory ``dest``, e.g. to ship it in a package."""
    step_dir, dest = pathlib.Path(step_dir), pathlib.Path(dest)
    if not (step_dir / "meta.json").is_file() or not (step_dir / "params").is_dir():
        raise FileNotFoundError(f"{step_dir} is not a complete training checkpoint (no meta.json or params/)")
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; refusing to overwrite it")
    meta = read_json(step_dir / "meta.json", "checkpoint metadata")
    with atomic_dir(dest) as tmp:
        for name in ("params", "assets", "fast_tokenizer"):
            if name == "fast_tokenizer" and not (step_dir / name).is_dir():
                continue
            shutil.copytree(step_dir / name, tmp / name)
        write_json_atomic(tmp / "train_meta.json", {k: v for k, v in meta.items() if k != "num_leaves"})
    return dest


# ------------------------------------------------------------------------------------------------ metrics


def read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: pathlib.Path, last_step: int) -> None:
    """Drop entries logged after ``last_step`` (by a run killed before its next checkpoint)."""
    rows = [r for r in read_metrics(path) if r["step"] <= last_step]
    write_text_atomic(path, "".join(json.dumps(jsonable(r)) + "\n" for r in rows))


def plot_loss(metrics: list[dict[str, Any]], path: pathlib.Path) -> None:
    """loss.png: batch loss and its running mean (log scale) with the learning rate on a second axis.

    Uses a bare ``Figure`` (no pyplot), so it works under any matplotlib backend and never changes it."""
    from matplotlib.figure import Figure

    if not metrics:
        return
    steps = np.array([m["step"] for m in metrics])
    loss = np.array([np.nan if m["loss"] is None else m["loss"] for m in metrics], dtype=float)
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    lines = ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss (batch)")
    if len(loss) >= 10:
        k = max(len(loss) // 20, 2)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        lines += ax.plot(steps[k - 1:], smooth, lw=1.8, label=f"loss (mean of {k})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (flow matching, FAST tokens or DP noise MSE)")
    ax2 = ax.twinx()
    lines += ax2.plot(steps, [m["lr"] for m in metrics], color="grey", lw=0.8, ls="--", label="learning rate")
    ax2.set_ylabel("learning rate")
    ax.legend(handles=lines, loc="upper right")
    ax.set_title("training loss")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


# ------------------------------------------------------------------------------------------------ loop


def _tokenizer_path(cfg: TrainConfig, policy: pc.PolicyConfig) -> pathlib.Path:
    if not policy.needs_checkpoint:
        return pathlib.Path(cfg.tokenizer) if cfg.tokenizer else EMBEDDED_TOKENIZER
    ckpt = pathlib.Path(cfg.init_checkpoint).expanduser() if cfg.init_checkpoint else None
    return pc.find_tokenizer(ckpt, cfg.tokenizer)


def train(cfg: TrainConfig, progress: bool = True, stop_at: int | None = None) -> dict[str, Any]:
    """Train (or resume) until ``num_steps`` (or, for a time-boxed run, ``stop_at``, saving a checkpoint there).

    Returns {step, first_loss, final_loss, steps_per_s, checkpoint, num_params}; losses and speed are read from
    metrics.jsonl, so they cover earlier (resumed) runs too, and steps_per_s excludes the first (compiling) entry.
    """
    from openpi.training import train_dp

    if cfg.policy_config in train_dp.PRESETS:
        return train_dp.train(cfg, progress, stop_at)
    end = cfg.num_steps if stop_at is None else min(stop_at, cfg.num_steps)
    policy = pc.get_config(cfg.policy_config)
    mcfg = model_config(cfg)
    dataset = DemoDataset(cfg.demo_dirs, mcfg.action_horizon)
    tok_path = _tokenizer_path(cfg, policy)
    fast_dir = pc.find_fast_tokenizer(policy, None, cfg.fast_tokenizer) if policy.is_fast else None
    run = open_run(cfg, run_settings(cfg, dataset, tok_path, fast_dir))
    out_dir = run.root
    stats_path = out_dir / NORM_STATS_REL
    if stats_path.exists():
        norm_stats = load_norm_stats(stats_path)
    else:
        norm_stats = compute_demo_norm_stats(dataset, policy.delta_actions)
        save_norm_stats(stats_path, norm_stats)
    transforms = pc.make_transforms(policy, mcfg, tok_path, norm_stats, fast_dir)
    optimizer, schedule = make_optimizer(cfg)
    ckpts = checkpoints(out_dir, cfg.keep_last)
    metrics_path = out_dir / "metrics.jsonl"

    def fresh_params():
        if cfg.init_checkpoint:
            return checkpoint.load_params(cfg.init_checkpoint, mcfg, dtype=np.float32)
        return init_params(mcfg, seed=cfg.seed)

    params, opt_state, rng, start, saved = resume_or_init(
        ckpts, optimizer, cfg.seed, lambda d: checkpoint.load_params(d, mcfg, dtype=np.float32), fresh_params,
        metrics_path)
    num_params = count_params(mcfg)
    logger.info("%s: %d parameters, %d demo frames in %d episodes", cfg.policy_config, num_params, len(dataset),
                len(dataset.episodes))
    train_step = make_train_step(mcfg, optimizer, aug.AugmentConfig() if cfg.augment else None)  # [augment]

    def batch_for(step: int):
        picks = np.random.default_rng([cfg.seed, step]).integers(0, len(dataset), cfg.batch_size)
        obs, targets = make_batch([dataset.item(int(i)) for i in picks], transforms)
        return obs, jnp.asarray(targets)

    meta = {"policy_config": cfg.policy_config, "model": mcfg.to_dict(), "num_params": num_params,
            "demo_dirs": list(cfg.demo_dirs), "num_frames": len(dataset), "fingerprint": run.fingerprint}
    saved = run_loop(cfg, (params, opt_state, rng), start, end, train_step, batch_for, schedule, ckpts, meta,
                     lambda p: _servable(p, norm_stats, tok_path, fast_dir), out_dir, saved, progress)
    return result(metrics_path, max(end, start), saved, num_params)


def run_loop(cfg: TrainConfig, state: tuple, start: int, end: int, train_step: Callable, batch_for: Callable,
             schedule: optax.Schedule, ckpts: CheckpointDir, meta: dict[str, Any],
             servable: Callable[[Any], Callable[[pathlib.Path], None]], out_dir: pathlib.Path,
             saved: pathlib.Path | None, progress: bool) -> pathlib.Path | None:
    """The training loop every model family shares: steps ``start..end`` of ``train_step(params, opt_state,
    *batch_for(step), rng)`` (the next batch is built in a thread while the step runs), ``metrics.jsonl`` every
    ``log_every`` steps, a checkpoint (``servable(params)`` writes what serving loads) every ``save_every``.
    Returns the last checkpoint folder."""
    params, opt_state, rng = state
    metrics_path = out_dir / "metrics.jsonl"
    last_loss = None
    t_start = time.monotonic()
    t_window, steps_window = t_start, 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool, open(metrics_path, "a") as log:
        pending = pool.submit(batch_for, start) if start < end else None
        bar = tqdm(range(start, end), initial=start, total=cfg.num_steps, desc="train", disable=not progress)
        for step in bar:
            batch = pending.result()
            if step + 1 < end:
                pending = pool.submit(batch_for, step + 1)
            rng, step_rng = jax.random.split(rng)
            params, opt_state, info = train_step(params, opt_state, *batch, step_rng)
            steps_window += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == end or step == start:
                loss = float(info["loss"])
                if not np.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {done}; last checkpoint: {saved}")
                now = time.monotonic()
                row = {"step": done, "loss": loss, "grad_norm": float(info["grad_norm"]),
                       "lr": float(schedule(step)), "steps_per_s": steps_window / max(now - t_window, 1e-9),
                       "elapsed_s": now - t_start}
                t_window, steps_window = now, 0
                last_loss = loss
                log.write(json.dumps(jsonable(row)) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}")
            if done % cfg.save_every == 0 or done == end:
                saved = ckpts.save(done, train_state(opt_state, rng, done), {**meta, "loss": last_loss},
                                   write_extra=servable(params))
                plot_loss(read_metrics(metrics_path), out_dir / "loss.png")
    return saved


def result(metrics_path: pathlib.Path, step: int, saved: pathlib.Path | None, num_params: int) -> dict[str, Any]:
    """What ``train`` returns: losses and speed read from metrics.jsonl, so they cover earlier (resumed) runs too;
    steps_per_s excludes the first (compiling) entry."""
    metrics = read_metrics(metrics_path)
    timed = [m["steps_per_s"] for m in metrics[1:]]
    return {"step": step, "first_loss": metrics[0]["loss"] if metrics else None,
            "final_loss": metrics[-1]["loss"] if metrics else None,
            "steps_per_s": float(np.median(timed)) if timed else None,
            "checkpoint": str(saved) if saved else None, "num_params": num_params}
