"""Benchmark our JAX SAE trainer against an established PyTorch trainer (dictionary_learning) on one matrix.

    python benchmarks/bench_sae.py [--activations X.npy] [--arch topk|batchtopk] [--k 32] [--num-latents 2048]
                                   [--batch-size 1024] [--steps 300]

Both trainers see the same training rows in the same batch order (our seeded batch source), scaled the same
way (E||x||^2 = d), with the same k, dictionary size, batch size, steps, Adam learning rate and warm-up /
decay schedule, and are evaluated by the same function on the same held-out rows:
FVU = sum||x - x_hat||^2 / sum||x - mean_eval(x)||^2 (BatchTopK: each with its own inference threshold).
Without --activations a planted-dictionary matrix is generated (d=256, 50k rows).

Wall times are end to end: ours is `openpi.interp.sae.train.train` (compile, b_dec init, checkpoints, final
evaluation and saving included); the reference is its trainer's `update` loop (its geometric-median init
included). Steady-state per-step times (after 10 warm-up steps) are reported too.

Reference install (CPU torch first, then the trainer without its LLM-tracing dependencies):
    pip install torch==2.13.0 && pip install --no-deps dictionary-learning==0.1.0 einops
Last printed line: JSON {reference, speedup (reference time / our time), fvu_ours, fvu_reference, time_ours_s,
time_reference_s, step_ms_ours, step_ms_reference, arch, d, num_latents, k, batch_size, steps, rows, fvu_formula}.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import shutil
import sys
import tempfile
import time
import types

import numpy as np
import tyro


@dataclasses.dataclass
class Args:
    activations: pathlib.Path | None = None
    """(rows, d) .npy; default: a generated planted-dictionary matrix."""
    arch: str = "topk"
    """topk | batchtopk."""
    k: int = 32
    num_latents: int = 2048
    batch_size: int = 1024
    steps: int = 300
    seed: int = 0
    rows: int = 50_000
    """Rows of the generated matrix."""
    d: int = 256
    """Width of the generated matrix."""


def import_reference():
    """(torch, dictionary_learning trainers module, description) or exit with a clear message."""
    hint = "install it with: pip install torch==2.13.0 && pip install --no-deps dictionary-learning==0.1.0 einops"
    try:
        import torch
    except ModuleNotFoundError:
        sys.exit(f"bench_sae.py: the reference trainer needs torch, which is not installed; {hint}")
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None:
        sys.exit(f"bench_sae.py: the reference trainer (dictionary_learning) is not installed; {hint}")
    if "dictionary_learning" not in sys.modules:
        # Its package __init__ imports nnsight (LLM tracing) that the trainers do not need: register the
        # package without running __init__, then import the trainer modules normally.
        pkg = types.ModuleType("dictionary_learning")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["dictionary_learning"] = pkg
    try:
        from dictionary_learning.trainers import batch_top_k, top_k
    except ModuleNotFoundError as err:
        sys.exit(f"bench_sae.py: cannot import the reference trainers ({err}); {hint}")
    from importlib.metadata import version

    return torch, top_k, batch_top_k, f"dictionary_learning {version('dictionary-learning')}"


def main(args: Args) -> dict:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_sae_"))
    try:
        return _run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args: Args, tmp: pathlib.Path) -> dict:
    torch, top_k, batch_top_k, ref_name = import_reference()
    from openpi.interp.sae import metrics as sae_metrics
    from openpi.interp.sae import synthetic
    from openpi.interp.sae import train as sae_train

    path = args.activations
    if path is None:
        x, _ = synthetic.planted_dictionary(d=args.d, n_atoms=args.num_latents // 2, rows=args.rows, active=max(1, args.k // 2), seed=args.seed)
        path = tmp / "x.npy"
        np.save(path, x)
    cfg = sae_train.TrainConfig(arch=args.arch, k=args.k, num_latents=args.num_latents, batch_size=args.batch_size, steps=args.steps, seed=args.seed, split="rows")
    source = sae_train.npy_source(path, cfg)
    r = sae_train.resolve(cfg, source.d, source.n_train)
    eval_x = np.concatenate(list(source.iter_eval(8192)))
    print(f"matrix {path}: d={source.d}, {source.n_train} training rows, {eval_x.shape[0]} held-out rows", flush=True)

    # --- ours ----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    res = sae_train.train(cfg, source, tmp / "ours", progress=False)
    t_ours = time.perf_counter() - t0
    sae = res.sae
    fvu_ours = sae_metrics.fvu(eval_x, sae.reconstruct(eval_x))
    scale = sae.spec.input_scale
    # steady-state step time
    step_fn = sae_train.make_train_step(r, cfg.arch, cfg)
    import jax
    import jax.numpy as jnp

    state = sae_train.init_state(r, cfg.arch, scale, np.zeros(source.d, np.float32), 0)
    xb = jnp.asarray(next(source.iter_train(0)) * np.float32(scale))
    for _ in range(10):
        state, _ = step_fn(state, xb)
    jax.block_until_ready(state)
    t1 = time.perf_counter()
    for _ in range(20):
        state, _ = step_fn(state, xb)
    jax.block_until_ready(state)
    step_ours = (time.perf_counter() - t1) / 20

    # --- reference -----------------------------------------------------------------------------------
    torch.manual_seed(args.seed)
    common = dict(steps=r.steps, activation_dim=source.d, dict_size=r.d_sae, k=r.k, layer=0, lm_name="bench", lr=r.lr,
                  warmup_steps=r.warmup_steps, decay_start=r.decay_start if r.decay_start > r.warmup_steps else None, threshold_beta=cfg.threshold_beta, seed=args.seed, device="cpu")
    if cfg.arch == "topk":
        trainer = top_k.TopKTrainer(threshold_start_step=r.warmup_steps, **common)
    else:
        trainer = batch_top_k.BatchTopKTrainer(threshold_start_step=r.warmup_steps, **common)
    batches = source.iter_train(0)
    t0 = time.perf_counter()
    for step in range(r.steps):
        trainer.update(step, torch.from_numpy(next(batches) * np.float32(scale)))
    t_ref = time.perf_counter() - t0
    ae = trainer.ae
    with torch.no_grad():
        xt = torch.from_numpy(eval_x * np.float32(scale))
        if cfg.arch == "topk":
            x_hat = ae.decode(ae.encode(xt)).numpy()
        else:
            x_hat = ae.decode(ae.encode(xt, use_threshold=True)).numpy()
    fvu_ref = sae_metrics.fvu(eval_x * scale, x_hat)
    xb_t = torch.from_numpy(np.asarray(xb))
    # steady-state step time of the reference (fresh trainer so its schedule stays valid)
    trainer2 = (top_k.TopKTrainer if cfg.arch == "topk" else batch_top_k.BatchTopKTrainer)(threshold_start_step=r.warmup_steps, **common)
    for i in range(10):
        trainer2.update(i, xb_t)
    t1 = time.perf_counter()
    for i in range(10, 30):
        trainer2.update(i, xb_t)
    step_ref = (time.perf_counter() - t1) / 20

    out = {
        "reference": f"{ref_name} {'TopKTrainer' if cfg.arch == 'topk' else 'BatchTopKTrainer'} (torch {torch.__version__}, CPU)",
        "speedup": t_ref / t_ours,
        "fvu_ours": fvu_ours,
        "fvu_reference": fvu_ref,
        "time_ours_s": t_ours,
        "time_reference_s": t_ref,
        "step_ms_ours": 1e3 * step_ours,
        "step_ms_reference": 1e3 * step_ref,
        "step_speedup": step_ref / step_ours,
        "arch": cfg.arch,
        "d": source.d,
        "num_latents": r.d_sae,
        "k": r.k,
        "batch_size": cfg.batch_size,
        "steps": r.steps,
        "rows": int(source.n_train + eval_x.shape[0]),
        "fvu_formula": sae_metrics.FVU_FORMULA,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
