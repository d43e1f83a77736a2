"""Cost of one training step of the tiny CPU Pi0 at several image resolutions / patch sizes, with and without
image augmentation: what choosing a resolution costs before committing a long run to it.

    python benchmarks/bench_train_step.py                       # default variants, batch 8
    python benchmarks/bench_train_step.py --variants 96/12 96/8:2cam 96/8:2cam+aug --steps 30

A variant is ``<image px>/<patch px>`` (``pi0_tiny_spatial`` is 96/12: an 8 x 8 grid per camera), optionally
``:2cam`` for a model without the always-masked right-wrist slot (``tiny_spatial_config(..., cameras=2)``) and
``+aug`` for image augmentation (``openpi.training.augment``) in the step. Every variant uses ``pi0_tiny_spatial``'s
other settings (SigLIP mu, Gemma dummy experts, 32 prompt tokens, horizon 10) and the optimizer of
``openpi.training.train``, on synthetic batches (the data pipeline is not timed). Variants are timed in
interleaved rounds so that load from other processes spreads over all of them; the per-variant figure is the
median over rounds of steps/s. The last printed line is one JSON object.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

from openpi.models import pi0  # noqa: E402
from openpi.policies.policy_config import tiny_spatial_config  # noqa: E402
from openpi.models.param_shapes import init_params, param_shapes  # noqa: E402
from openpi.training import augment, train  # noqa: E402


@dataclasses.dataclass
class Args:
    variants: tuple[str, ...] = ("96/12", "96/12+aug", "96/12:2cam", "96/8:2cam", "128/8:2cam")
    batch_size: int = 8
    steps: int = 10
    """Timed steps per variant per round."""
    rounds: int = 3


def variant_config(spec: str) -> tuple:
    """'96/8:2cam+aug' -> (Pi0Config, augment on?)."""
    spec, plus, aug_flag = spec.partition("+")
    if plus and aug_flag != "aug":
        raise ValueError(f"unknown variant suffix +{aug_flag!r} (known: +aug)")
    size_patch, _, flag = spec.partition(":")
    if flag not in ("", "2cam"):
        raise ValueError(f"unknown variant flag {flag!r} in {spec!r} (known: 2cam)")
    size, patch = (int(x) for x in size_patch.split("/"))
    return tiny_spatial_config(size, patch, cameras=2 if flag == "2cam" else 3), bool(plus)


def synthetic_batch(config, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    s = config.image_size
    obs = pi0.Observation(
        images={k: jnp.asarray(rng.uniform(-1, 1, (batch, s, s, 3)), jnp.float32) for k in config.image_keys},
        image_masks={k: jnp.asarray(np.full(batch, k != "right_wrist_0_rgb")) for k in config.image_keys},
        state=jnp.asarray(rng.normal(size=(batch, config.action_dim)), jnp.float32),
        tokenized_prompt=jnp.asarray(rng.integers(0, config.vocab_size, (batch, config.max_token_len)), jnp.int32),
        tokenized_prompt_mask=jnp.asarray(np.arange(config.max_token_len)[None].repeat(batch, 0) < 20))
    targets = jnp.asarray(rng.normal(size=(batch, config.action_horizon, config.action_dim)), jnp.float32)
    return obs, targets


def main(args: Args) -> dict:
    tcfg = train.TrainConfig(demo_dirs=("unused",), out_dir="unused", batch_size=args.batch_size)
    optimizer, _ = train.make_optimizer(tcfg)
    runs = {}
    for name in args.variants:
        config, aug_on = variant_config(name)
        step = train.make_train_step(config, optimizer, augment.AugmentConfig() if aug_on else None)
        params = jax.tree.map(jnp.asarray, init_params(config, seed=0))
        state = {"params": params, "opt": optimizer.init(params), "rng": jax.random.key(0)}
        obs, targets = synthetic_batch(config, args.batch_size)
        t0 = time.perf_counter()
        state["params"], state["opt"], info = step(state["params"], state["opt"], obs, targets, state["rng"])
        jax.block_until_ready(info["loss"])
        tokens = len(config.image_keys) * config.tokens_per_image + config.max_token_len + config.suffix_len
        runs[name] = {"config": config, "step": step, "state": state, "batch": (obs, targets),
                      "compile_s": time.perf_counter() - t0, "rates": [], "tokens": tokens,
                      "grid": config.grid,
                      "params": int(sum(np.prod(s) for s in param_shapes(config).values()))}
        print(f"{name}: compiled in {runs[name]['compile_s']:.1f} s, {tokens} tokens", flush=True)
    for r in range(args.rounds):
        for name, run in runs.items():
            st, (obs, targets) = run["state"], run["batch"]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                st["rng"], k = jax.random.split(st["rng"])
                st["params"], st["opt"], info = run["step"](st["params"], st["opt"], obs, targets, k)
            jax.block_until_ready(info["loss"])
            run["rates"].append(args.steps / (time.perf_counter() - t0))
            print(f"round {r} {name}: {run['rates'][-1]:.2f} steps/s", flush=True)
    result = {name: {"steps_per_s": float(np.median(run["rates"])), "s_per_step": 1 / float(np.median(run["rates"])),
                     "rates": [round(x, 3) for x in run["rates"]], "tokens": run["tokens"], "grid": run["grid"],
                     "num_params": run["params"], "compile_s": round(run["compile_s"], 1)}
              for name, run in runs.items()}
    result["_meta"] = {"batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
                       "load_avg": os.getloadavg(), "cpus": os.cpu_count()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
