"""Our JAX SAE trainer next to the PyTorch references, on one matrix, in one run.

    scripts/setup_bench_env.sh                        # once: .venv-bench with torch + the references
    .venv-bench/bin/python benchmarks/bench_sae.py [--arch topk|batchtopk] [--d 1024] [--num-latents 8192]
                                                   [--k 32] [--batch-size 1024] [--steps 100] [--rows 60000]

References (each optional; one missing is skipped with a one-line message saying how to install it):
dictionary_learning's TopKTrainer / BatchTopKTrainer (its own `update` loop), eai-sparsify's SparseCoder (TopK;
its fused encoder and sparse decoder, driven by a loop written here as its Trainer's inner step: fvu loss,
gradient parallel to decoder rows removed, Adam, decoder rows renormalised), sae-lens' TopK/BatchTopK TrainingSAE
(`training_forward_pass`, gradient clipping at 1, Adam: its trainer's step; its `use_sparse_activations` path has
no CPU backward in torch 2.13, so it runs dense). sparsify's and sae-lens' decoder bias starts at the first batch's
mean (sparsify's trainer does this; sae-lens 6 starts at zero, which leaves FVU far above the others after a few
hundred steps on uncentred activations); dictionary_learning and ours start at the geometric median.

All see the same training rows in the same batch order (our seeded batch source), scaled the same way
(E||x||^2 = d), with the same k, dictionary size, batch size, steps and Adam learning-rate schedule (warm-up,
constant, linear decay); all are evaluated by one function on the same held-out rows:
FVU = sum||x - x_hat||^2 / sum||x - mean_eval(x)||^2 (BatchTopK: dictionary_learning and ours use their inference
thresholds, sae-lens its batch top-k over the evaluation chunk). Without --activations a planted-dictionary matrix is
generated. Steady-state step times are the median of --timed-steps (20) steps after --warmup-steps (10) on one
fixed batch; samples/s = batch / step time. Where torch sees a GPU the references run on it (ours runs where jax
runs), both in TF32 for float32 matrix products; everything else is float32. `floor_ms` is the forward encoder
matmul alone (batch x d times d x latents, jit); every trainer has to pay it once per step.

Last printed line: JSON {arch, d, num_latents, k, batch_size, steps, rows, floor_ms, ours: {step_ms, samples_per_s,
fvu, time_s}, references: {name: {step_ms, samples_per_s, fvu, time_s, step_speedup (their step / ours),
fvu_rel_diff}}, skipped: {name: why}, fvu_formula}.
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
from collections.abc import Callable

import numpy as np
import tyro

# On a GPU both sides multiply float32 matrices in TF32 (XLA's default there; torch's "high"), so neither wins by
# precision. On CPU neither setting changes anything.
TORCH_MATMUL_PRECISION = "high"
JAX_MATMUL_PRECISION = "tensorfloat32"
INSTALL_HINT = "create the benchmark env with scripts/setup_bench_env.sh and run this with .venv-bench/bin/python"


@dataclasses.dataclass
class Args:
    activations: pathlib.Path | None = None
    """(rows, d) .npy; default: a generated planted-dictionary matrix."""
    arch: str = "topk"
    """topk | batchtopk."""
    k: int = 32
    num_latents: int = 8192
    batch_size: int = 1024
    steps: int = 100
    seed: int = 0
    rows: int = 60_000
    """Rows of the generated matrix."""
    d: int = 1024
    """Width of the generated matrix."""
    references: tuple[str, ...] = ("dictionary_learning", "sparsify", "sae_lens")
    warmup_steps: int = 10
    timed_steps: int = 20
    """Steady-state step time: the median of this many steps after the warm-up ones (fewer at research width on a
    CPU, where one dense reference step takes seconds)."""


@dataclasses.dataclass
class RefTrainer:
    """A reference trainer reduced to what the benchmark needs: one optimiser step on a batch, and reconstruction."""

    step: Callable[[int, object], None]
    reconstruct: Callable[[object], np.ndarray]


def _import_without_init(name: str) -> None:
    """Register package ``name`` without running its __init__, whose imports serve LLM tracing and data loading
    (dictionary_learning: nnsight; sparsify: datasets, its trainer) rather than the modules benchmarked here."""
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise ModuleNotFoundError(name)
        pkg = types.ModuleType(name)
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = pkg


def _device(torch) -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _import_dictionary_learning():
    _import_without_init("dictionary_learning")
    from dictionary_learning.trainers import batch_top_k, top_k
    return top_k, batch_top_k


def _lr_lambda(r) -> Callable[[int], float]:
    """Our schedule as a multiplier of r.lr (torch LambdaLR)."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1.0) / max(1, r.warmup_steps)) if r.warmup_steps > 0 else 1.0
        return warm * min(1.0, max(0.0, (r.steps - step) / max(1, r.steps - r.decay_start)))
    return factor


def make_dictionary_learning(torch, r, cfg, args) -> RefTrainer:
    top_k, batch_top_k = _import_dictionary_learning()
    common = dict(steps=r.steps, activation_dim=r.d_in, dict_size=r.d_sae, k=r.k, layer=0, lm_name="bench", lr=r.lr,
                  warmup_steps=r.warmup_steps, decay_start=r.decay_start if r.decay_start > r.warmup_steps else None,
                  threshold_beta=cfg.threshold_beta, seed=args.seed, device=_device(torch))
    cls = top_k.TopKTrainer if cfg.arch == "topk" else batch_top_k.BatchTopKTrainer
    trainer = cls(threshold_start_step=r.warmup_steps, **common)

    def reconstruct(x):
        ae = trainer.ae
        with torch.no_grad():
            f = ae.encode(x) if cfg.arch == "topk" else ae.encode(x, use_threshold=True)
            return ae.decode(f).cpu().numpy()
    return RefTrainer(lambda i, x: trainer.update(i, x), reconstruct)


def make_sparsify(torch, r, cfg, args) -> RefTrainer:
    if cfg.arch != "topk":
        raise NotImplementedError("eai-sparsify trains TopK (and GroupMax) coders only, no BatchTopK")
    _import_without_init("sparsify")
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder
    torch.manual_seed(args.seed)
    coder = SparseCoder(r.d_in, SparseCoderConfig(k=r.k, num_latents=r.d_sae), device=_device(torch))
    opt = torch.optim.Adam(coder.parameters(), lr=r.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(r))

    def step(i, x):
        if i == 0:  # its trainer centres the decoder bias on the first batch
            coder.b_dec.data = x.mean(0)
        coder(x).fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        coder.set_decoder_norm_to_unit_norm()

    def reconstruct(x):
        with torch.no_grad():
            return coder(x).sae_out.cpu().numpy()
    return RefTrainer(step, reconstruct)


def make_sae_lens(torch, r, cfg, args) -> RefTrainer:
    if importlib.util.find_spec("sae_lens") is None:
        raise ModuleNotFoundError("sae_lens")
    from sae_lens.saes.sae import TrainStepInput
    if cfg.arch == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE as cls, TopKTrainingSAEConfig as conf
    else:
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE as cls, BatchTopKTrainingSAEConfig as conf
    torch.manual_seed(args.seed)
    # use_sparse_activations: its sparse-tensor path has no CPU backward in torch 2.13 ('aten::view' on SparseCPU)
    sae = cls(conf(d_in=r.d_in, d_sae=r.d_sae, k=r.k, use_sparse_activations=False, device=_device(torch)))
    opt = torch.optim.Adam(sae.parameters(), lr=r.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(r))

    def step(i, x):
        if i == 0:  # sae-lens 6 starts b_dec at zero; centre it as the other trainers do, or FVU says nothing
            sae.b_dec.data = x.mean(0)
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                       n_training_steps=i, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()

    def reconstruct(x):
        with torch.no_grad():
            return sae(x).cpu().numpy()
    return RefTrainer(step, reconstruct)


REFERENCES = {"dictionary_learning": make_dictionary_learning, "sparsify": make_sparsify, "sae_lens": make_sae_lens}


def _median_step_ms(step: Callable[[int], None], sync: Callable[[], None] = lambda: None, warmup: int = 10,
                    timed: int = 20) -> float:
    """Median of ``timed`` steps after ``warmup`` steps."""
    for i in range(warmup):
        step(i)
    sync()
    times = []
    for i in range(warmup, warmup + timed):
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _reconstruct_chunked(torch, trainer: RefTrainer, x: np.ndarray, dev: str, chunk: int = 8192) -> np.ndarray:
    """Held-out reconstruction in chunks, so a 65,536-latent dense code of every evaluation row never coexists."""
    return np.concatenate([trainer.reconstruct(torch.from_numpy(x[i:i + chunk]).to(dev))
                           for i in range(0, len(x), chunk)])


def main(args: Args) -> dict:
    unknown = sorted(set(args.references) - set(REFERENCES))
    if unknown:
        sys.exit(f"bench_sae.py: unknown reference(s) {unknown}; choose from {sorted(REFERENCES)}")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_sae_"))
    try:
        return _run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args: Args, tmp: pathlib.Path) -> dict:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_default_matmul_precision", JAX_MATMUL_PRECISION)
    from openpi.interp.sae import metrics as sae_metrics
    from openpi.interp.sae import synthetic
    from openpi.interp.sae import train as sae_train

    path = args.activations
    if path is None:
        x, _ = synthetic.planted_dictionary(d=args.d, n_atoms=args.num_latents // 2, rows=args.rows,
                                            active=max(1, args.k // 2), seed=args.seed)
        path = tmp / "x.npy"
        np.save(path, x)
    cfg = sae_train.TrainConfig(arch=args.arch, k=args.k, num_latents=args.num_latents, batch_size=args.batch_size,
                                steps=args.steps, seed=args.seed, split="rows")
    source = sae_train.npy_source(path, cfg)
    r = sae_train.resolve(cfg, source.d, source.n_train)
    eval_x = np.concatenate(list(source.iter_eval(8192)))
    print(f"matrix {path}: d={source.d}, {source.n_train} training rows, {eval_x.shape[0]} held-out rows, "
          f"{r.d_sae} latents, k={r.k}, batch {cfg.batch_size}, {r.steps} steps", flush=True)
    out: dict = {"arch": cfg.arch, "d": source.d, "num_latents": r.d_sae, "k": r.k, "batch_size": cfg.batch_size,
                 "steps": r.steps, "rows": int(source.n_train + eval_x.shape[0]), "fvu_formula": sae_metrics.FVU_FORMULA,
                 "references": {}, "skipped": {}}

    # --- ours ----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    res = sae_train.train(cfg, source, tmp / "ours", progress=False)
    t_ours = time.perf_counter() - t0
    scale = res.sae.spec.input_scale
    step_fn = sae_train.make_train_step(r, cfg.arch, cfg)
    state = {"s": sae_train.init_state(r, cfg.arch, scale, np.zeros(source.d, np.float32), 0)}
    xb_np = next(source.iter_train(0)) * np.float32(scale)
    xb = jnp.asarray(xb_np)

    def our_step(_):
        state["s"], _ = step_fn(state["s"], xb)
    counts = {"warmup": args.warmup_steps, "timed": args.timed_steps}
    step_ours = _median_step_ms(our_step, lambda: jax.block_until_ready(state["s"]), **counts)
    out["ours"] = {"step_ms": step_ours, "samples_per_s": 1e3 * cfg.batch_size / step_ours,
                   "fvu": sae_metrics.fvu(eval_x, res.sae.reconstruct(eval_x)), "time_s": t_ours}
    print(f"ours: {step_ours:.1f} ms/step, held-out FVU {out['ours']['fvu']:.4f}, {t_ours:.1f} s end to end",
          flush=True)
    w = jnp.asarray(np.random.default_rng(0).standard_normal((r.d_sae, source.d), np.float32))
    encode = jax.jit(lambda x, w: x @ w.T)
    out["floor_ms"] = _median_step_ms(lambda _: encode(xb, w).block_until_ready(), **counts)
    print(f"forward encoder matmul floor: {out['floor_ms']:.1f} ms ({step_ours / out['floor_ms']:.2f}x below our "
          "step)", flush=True)

    # --- references ----------------------------------------------------------------------------------
    try:
        import torch
    except ModuleNotFoundError:
        for name in args.references:
            out["skipped"][name] = f"torch is not installed; {INSTALL_HINT}"
            print(f"skipped {name}: {out['skipped'][name]}")
        torch = None
    if torch is not None:
        torch.set_float32_matmul_precision(TORCH_MATMUL_PRECISION)  # the precision XLA uses for ours (see module doc)
    dev = None if torch is None else _device(torch)
    xb_t = None if torch is None else torch.from_numpy(np.ascontiguousarray(xb_np)).to(dev)
    for name in args.references if torch is not None else ():
        try:
            make = REFERENCES[name]
            trainer = make(torch, r, cfg, args)
        except (ModuleNotFoundError, ImportError) as err:
            out["skipped"][name] = f"not installed ({err}); {INSTALL_HINT}"
            print(f"skipped {name}: {out['skipped'][name]}")
            continue
        except NotImplementedError as err:
            out["skipped"][name] = str(err)
            print(f"skipped {name}: {err}")
            continue
        batches = source.iter_train(0)
        t0 = time.perf_counter()
        for i in range(r.steps):
            trainer.step(i, torch.from_numpy(next(batches) * np.float32(scale)).to(dev))
        _sync(torch)
        t_ref = time.perf_counter() - t0
        fvu = sae_metrics.fvu(eval_x * scale, _reconstruct_chunked(torch, trainer, eval_x * np.float32(scale), dev))
        fresh = make(torch, r, cfg, args)  # a fresh trainer so its schedule stays valid for the timed steps
        step_ms = _median_step_ms(lambda i: fresh.step(i, xb_t), lambda: _sync(torch), **counts)
        out["references"][name] = {"step_ms": step_ms, "samples_per_s": 1e3 * cfg.batch_size / step_ms, "fvu": fvu,
                                   "time_s": t_ref, "step_speedup": step_ms / step_ours,
                                   "fvu_rel_diff": (out["ours"]["fvu"] - fvu) / fvu}
        print(f"{name}: {step_ms:.1f} ms/step (ours {step_ms / step_ours:.2f}x faster per step), held-out FVU "
              f"{fvu:.4f} (ours {100 * out['references'][name]['fvu_rel_diff']:+.1f}%), {t_ref:.1f} s", flush=True)
    out["torch"] = None if torch is None else torch.__version__
    out["device"] = {"ours": str(jax.devices()[0]), "references": dev}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
