"""Where the time of one LIBERO evaluation step goes on this machine: simulation, rendering, preprocessing.

One env (libero_spatial task 0, 256x256 cameras, element segmentation) is stepped with a fixed small action in
three observation modes, switched by enabling/disabling robosuite observables on the same env:
  sim        no camera observables: physics + controller only
  rgb        agent-view and wrist RGB (what a plain evaluation renders)
  rgb+seg    RGB plus element segmentation of both cameras (what --save-frames renders)
Separately timed on the same states: one RGB render and one segmentation render per camera, our LUT mask vs
robosuite's per-pixel Python instance mapping, and the client preprocessing (rotate, resize-with-pad to 224,
state; masks with nearest resize).

Run: python benchmarks/bench_libero_step.py [--steps 20]. Last printed line: one JSON object (milliseconds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time

import numpy as np
import tyro

from openpi.envs import libero_env as le


@dataclasses.dataclass
class Args:
    suite: str = "libero_spatial"
    task_id: int = 0
    steps: int = 20
    """Timed steps per mode (after 2 warm-up steps)."""


def _ms(samples: list[float]) -> dict[str, float]:
    return {"median_ms": round(1e3 * statistics.median(samples), 2), "mean_ms": round(1e3 * statistics.fmean(samples), 2)}


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(args: Args) -> dict:
    t0 = time.perf_counter()
    env = le.LiberoTaskEnv(args.suite, args.task_id, segmentation=True)
    create_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    obs = env.reset(0)
    reset_s = time.perf_counter() - t0
    inner = env.raw.env
    cams = {cam: [f"{cam}_image", f"{cam}_segmentation_element"] for cam in le.CAMERAS}
    action = np.array([0.0, 0.0, 0.05, 0.0, 0.0, 0.0, -1.0])
    obs_holder = {"obs": obs}

    def step() -> None:
        obs_holder["obs"] = env.step(action)[0]

    def set_modes(rgb: bool, seg: bool) -> None:
        for rgb_name, seg_name in cams.values():
            inner.modify_observable(rgb_name, "enabled", rgb)
            inner.modify_observable(seg_name, "enabled", seg)

    results: dict[str, dict[str, float]] = {}
    for mode, (rgb, seg) in {"step_sim": (False, False), "step_rgb": (True, False), "step_rgb_seg": (True, True)}.items():
        set_modes(rgb, seg)
        _timed(step, 2)
        results[mode] = _ms(_timed(step, args.steps))
        print(f"{mode:<14} {results[mode]}")
    obs = obs_holder["obs"]  # last rgb+seg observation

    sim = inner.sim
    n = max(5, args.steps // 2)
    for cam in le.CAMERAS:
        results[f"render_rgb_{cam}"] = _ms(_timed(lambda: sim.render(camera_name=cam, width=256, height=256), n))
        results[f"render_seg_{cam}"] = _ms(
            _timed(lambda: sim.render(camera_name=cam, width=256, height=256, segmentation=True), n)
        )
    results["preprocess_images_state"] = _ms(_timed(lambda: env.policy_frame(obs, 224, with_masks=False), n))
    results["preprocess_images_state_masks"] = _ms(_timed(lambda: env.policy_frame(obs, 224, with_masks=True), n))
    results["mask_lut_one_camera"] = _ms(_timed(lambda: env.instance_mask(obs, "agentview"), n))
    sensor, _ = inner._create_segementation_sensor("agentview", 256, 256, "instance", "agentview_segmentation")
    seg_render = results["render_seg_agentview"]["median_ms"]
    slow = _timed(lambda: sensor({}), n)  # render + robosuite's per-pixel Python mapping
    results["mask_robosuite_mapping_one_camera"] = {
        "median_ms": round(1e3 * statistics.median(slow) - seg_render, 2),
        "note": "robosuite instance sensor minus one segmentation render",
    }
    for k, v in results.items():
        if k.startswith(("render", "preprocess", "mask")):
            print(f"{k:<36} {v}")

    step_rgb = results["step_rgb"]["median_ms"]
    sim_ms = results["step_sim"]["median_ms"]
    pre_ms = results["preprocess_images_state"]["median_ms"]
    total = step_rgb + pre_ms
    env.close()
    summary = {
        "benchmark": "libero_step",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "mujoco_gl": os.environ.get("MUJOCO_GL"),
        "suite": args.suite,
        "task_id": args.task_id,
        "env_create_s": round(create_s, 2),
        "reset_s": round(reset_s, 2),
        **{k: v for k, v in results.items()},
        "split_eval_step": {
            "simulation_ms": sim_ms,
            "rendering_ms": round(step_rgb - sim_ms, 2),
            "preprocessing_ms": pre_ms,
            "simulation_frac": round(sim_ms / total, 3),
            "rendering_frac": round((step_rgb - sim_ms) / total, 3),
            "preprocessing_frac": round(pre_ms / total, 3),
        },
        "save_frames_overhead_ratio": round(
            (results["step_rgb_seg"]["median_ms"] + results["preprocess_images_state_masks"]["median_ms"]) / total, 3
        ),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
