"""Latency of jit-compiled ``sample_actions`` (median of N runs after warm-up).

    python benchmarks/bench_model.py                      # tiny Pi0, Pi0.5 and Pi0-FAST on this machine
    python benchmarks/bench_model.py --full               # + bf16 pi05_libero / pi0_fast_libero-sized random weights

Pi0 / Pi0.5 inputs are LIBERO-shaped: three 224 x 224 cameras with the right wrist masked and a 20-token prompt
padded to max_token_len. Each is timed with the full prefix and with prefix compaction (``<name>_compact``:
masked camera and padding dropped, ``Pi0Model(compact_prefix=True)``), alternating calls of the two in one run;
``compaction_speedup`` is full / compact median. The tiny configs are timed again while recording what
``quickstart.py`` records (``<name>_recorded``: suffix attention over every key and the action expert's residuals;
compaction keeps the recordings in the full layout, so it applies there too).

Last printed line: one JSON object {config: {"median_ms", "p90_ms", "compile_s", "device"}, ...,
"compaction_speedup": {config: ratio}}; Pi0-FAST entries also give the decoding steps run ("steps") and
"ms_per_step" (the whole call divided by the steps).
"""
from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from openpi import pipeline
from openpi.models.config import Pi0Config, Pi0FASTConfig, tiny_config, tiny_fast_config
from openpi.models.hooks import Record, parse_records
from openpi.models.model import Pi0FASTModel, Pi0Model, make_fast_observation, make_observation


@dataclasses.dataclass
class Args:
    runs: int = 20
    full: bool = False
    """also time bf16 Pi0.5 / Pi0-FAST of pi05_libero / pi0_fast_libero size with random weights (~8 GB each)"""
    fast_steps: int = 64
    """Pi0-FAST decoding steps (random weights rarely emit EOS, so every step runs; LIBERO chunks are ~30-60)"""


def _random_params(config: Pi0Config | Pi0FASTConfig, dtype) -> dict:
    from openpi.models.param_shapes import abstract_params
    key = jax.random.key(0)
    leaves, treedef = jax.tree.flatten(abstract_params(config))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [0.02 * jax.random.normal(k, l.shape, dtype) for k, l in zip(keys, leaves)])


def _time_calls(name: str, call, runs: int) -> dict:
    """Compile once, then time ``runs`` calls (each blocked until its outputs are ready)."""
    return _time_alternating({name: call}, runs)[name]


def _time_alternating(calls: dict, runs: int) -> dict:
    """Compile each call, then time them in turns (so load on a shared machine hits all alike)."""
    compile_s, times = {}, {name: [] for name in calls}
    for name, call in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(call())
        compile_s[name] = time.perf_counter() - start
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append((time.perf_counter() - start) * 1000)
    results = {}
    for name, ts in times.items():
        r = {"median_ms": float(np.median(ts)), "p90_ms": float(np.percentile(ts, 90)), "compile_s": compile_s[name],
             "device": str(jax.devices()[0])}
        print(f"{name}: median {r['median_ms']:.1f} ms, p90 {r['p90_ms']:.1f} ms, "
              f"compile {r['compile_s']:.1f} s on {r['device']}")
        results[name] = r
    return results


def _images(config, rng) -> dict:
    return {k: rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8) for k in config.image_keys}


def time_config(name: str, config: Pi0Config, params: dict, runs: int, records: tuple[Record, ...] = ()) -> dict:
    """``name`` (full prefix) and ``name_compact`` (prefix compaction), timed alternately, recording ``records``."""
    rng = np.random.default_rng(0)
    obs = make_observation(_images(config, rng), {k: np.array([k != "right_wrist_0_rgb"]) for k in config.image_keys},
                           np.zeros((1, config.action_dim), np.float32),
                           rng.integers(1, 100, (1, config.max_token_len)), np.arange(config.max_token_len)[None] < 20)
    full, compact = Pi0Model(config, params), Pi0Model(config, params, compact_prefix=True)
    noise = jnp.asarray(rng.standard_normal((1, config.action_horizon, config.action_dim)), jnp.float32)
    return _time_alternating({name: lambda: full.sample_actions(obs, noise, records=records),
                              f"{name}_compact": lambda: compact.sample_actions(obs, noise, records=records)}, runs)


def time_fast_config(name: str, config: Pi0FASTConfig, params: dict, runs: int) -> dict:
    """Greedy Pi0-FAST decoding of ``config.max_decoding_steps`` tokens after a 20-token prompt (all cameras valid,
    as openpi's FAST policies pass them)."""
    rng = np.random.default_rng(0)
    obs = make_fast_observation(_images(config, rng), {k: np.array([True]) for k in config.image_keys},
                                rng.integers(4, 100, (1, config.max_token_len)),
                                np.arange(config.max_token_len)[None] < 20)
    model = Pi0FASTModel(config, params)
    result = _time_calls(name, lambda: model.sample_actions(obs).tokens, runs)
    steps = int(model.sample_actions(obs).num_steps)
    result.update(steps=steps, ms_per_step=result["median_ms"] / steps)
    print(f"{name}: {steps} decoding steps, {result['ms_per_step']:.2f} ms per step")
    return result


def main(args: Args) -> None:
    from openpi.models.param_shapes import init_params
    results = {}
    recorded = parse_records(pipeline.RECORDS)
    for name, cfg in (("pi0_tiny", tiny_config(max_token_len=48)), ("pi05_tiny", tiny_config(pi05=True, max_token_len=64))):
        params = init_params(cfg)
        results.update(time_config(name, cfg, params, args.runs))
        results.update(time_config(f"{name}_recorded", cfg, params, args.runs, recorded))
    fast = tiny_fast_config(max_decoding_steps=args.fast_steps)
    results["pi0_fast_tiny"] = time_fast_config("pi0_fast_tiny", fast, init_params(fast), args.runs)
    if args.full:
        cfg = Pi0Config(pi05=True, action_horizon=10, max_token_len=200, dtype="bfloat16")
        results.update(time_config("pi05_libero_bf16_random", cfg, _random_params(cfg, jnp.bfloat16), args.runs))
        fast = Pi0FASTConfig(action_dim=7, action_horizon=10, max_token_len=180, max_decoding_steps=args.fast_steps)
        results["pi0_fast_libero_bf16_random"] = time_fast_config("pi0_fast_libero (bf16, random)", fast,
                                                                  _random_params(fast, jnp.bfloat16), args.runs)
    results["compaction_speedup"] = {name: results[name]["median_ms"] / results[f"{name}_compact"]["median_ms"]
                                     for name in list(results) if f"{name}_compact" in results}
    print(f"prefix compaction speedup (full / compact median): {results['compaction_speedup']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main(tyro.cli(Args))
