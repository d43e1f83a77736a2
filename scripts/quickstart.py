"""The main job on the embedded default: serve the tiny policy with recording, evaluate a few short LIBERO
episodes, run the analyses on what was recorded, and write one report folder with an index.html.

    python scripts/quickstart.py [--out report] [--trials 3] [--max-steps 220]
    python scripts/quickstart.py --fast --out /tmp/qs   # CI: 1 trial of tasks 0-2, 15 steps, shorter SAE training
    python scripts/quickstart.py --config pi05_libero --checkpoint-dir /ckpt/pi05_libero --trials 10  # GPU machine

Each stage is a separate command (the same ones the README lists), so a stage that fails is reported with its
log and the others still run; the exit code is non-zero when any stage failed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import tyro

from openpi import report
from openpi.interp.export import trajectories_from_export
from openpi.policies.policy_config import DEFAULT_CONFIG

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclasses.dataclass
class Args:
    out: pathlib.Path = ROOT / "report"
    config: str = DEFAULT_CONFIG
    """Policy config served (default: the embedded tiny Pi0 trained in LIBERO)."""
    checkpoint_dir: str | None = None
    """Checkpoint of --config (default: its embedded checkpoint; pi0_tiny/pi05_tiny: random weights)."""
    suite: str = "libero_spatial"
    task_ids: tuple[int, ...] = (0,)
    first_trial: int = 40
    """First initial state (40-49 were held out of the embedded policy's training)."""
    trials: int = 3
    max_steps: int = 220
    """libero_spatial's budget: the embedded policy solves task 0 in ~120-160 steps when it succeeds."""
    layer: int = -1
    """action-expert layer for SAE/probes (-1 = last)"""
    fast: bool = False
    """CI mode: overrides to 1 trial of tasks 0, 1, 2 (probes need >= 3 episodes), 15 steps, 200 SAE steps"""


FAST = {"task_ids": (0, 1, 2), "trials": 1, "max_steps": 15}
FAST_SAE_STEPS = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stages:
    def __init__(self, out: pathlib.Path) -> None:
        self.out = out
        self.results: list[dict] = []
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def run(self, name: str, cmd: list[str], timeout: int = 1800) -> bool:
        log = self.out / "logs" / f"{name}.log"
        print(f"[quickstart] {name}: {' '.join(cmd)}", flush=True)
        start = time.monotonic()
        with open(log, "w") as f:
            try:
                proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
                ok = proc.returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
        secs = time.monotonic() - start
        self.results.append({"stage": name, "ok": ok, "seconds": round(secs, 1), "log": str(log.relative_to(self.out))})
        print(f"[quickstart] {name}: {'ok' if ok else 'FAILED (see ' + str(log) + ')'} in {secs:.0f} s", flush=True)
        return ok

    def run_inline(self, name: str, fn, *fn_args) -> bool:
        """Run a small in-process step like a stage: its prints and traceback go to logs/<name>.log."""
        import traceback

        log = self.out / "logs" / f"{name}.log"
        print(f"[quickstart] {name}: {getattr(fn, '__name__', fn)}", flush=True)
        start = time.monotonic()
        with open(log, "w") as f, contextlib.redirect_stdout(f):
            try:
                fn(*fn_args)
                ok = True
            except Exception:  # noqa: BLE001 - a failed step is reported with its log, the others still run
                traceback.print_exc(file=f)
                ok = False
        secs = time.monotonic() - start
        self.results.append({"stage": name, "ok": ok, "seconds": round(secs, 1), "log": str(log.relative_to(self.out))})
        print(f"[quickstart] {name}: {'ok' if ok else 'FAILED (see ' + str(log) + ')'} in {secs:.0f} s", flush=True)
        return ok


def serve_and_evaluate(args: Args, stages: Stages, records: list[str]) -> None:
    port = _free_port()
    serve = [PY, "scripts/serve_policy.py", "--port", str(port), "--record-dir", str(args.out / "store"), "--record",
             *records]
    serve += ["policy:checkpoint", "--policy.config", args.config]
    if args.checkpoint_dir:
        serve += ["--policy.dir", args.checkpoint_dir]
    log = open(args.out / "logs" / "serve.log", "w")
    server = subprocess.Popen(serve, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"policy server exited early; see {args.out / 'logs' / 'serve.log'}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        stages.run("libero_eval", [PY, "examples/libero/main.py", "--host", "127.0.0.1", "--port", str(port),
                                   "--task-suite-name", args.suite, "--task-ids", *map(str, args.task_ids),
                                   "--num-trials-per-task", str(args.trials), "--max-steps", str(args.max_steps),
                                   "--first-trial", str(args.first_trial),
                                   "--save-frames", "--out-dir", str(args.out / "rollouts"),
                                   "--video-out-path", str(args.out / "videos"), "--run-id", "quickstart"])
    finally:
        server.send_signal(signal.SIGINT)  # the server flushes the activation store on shutdown
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def main(args: Args) -> int:
    if args.fast:
        args = dataclasses.replace(args, **FAST)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = Stages(args.out)
    os.environ.setdefault("MPLBACKEND", "Agg")
    records = ["llm.layer.*.attn.probs?tokens=actions&reduce=heads",
               "llm.expert1.layer.*.resid_post?tokens=actions"]
    serve_and_evaluate(args, stages, records)
    store, rollouts = args.out / "store", args.out / "rollouts"
    if (ROOT / "evaluate_attention_iou.py").exists():
        stages.run("attention_iou", [PY, "evaluate_attention_iou.py", "--store", str(store), "--rollouts",
                                     str(rollouts), "--out", str(args.out / "attention"), "--overlays"])
    from openpi.policies.policy_config import get_config
    depth = get_config(args.config).model.expert.depth
    layer = args.layer % depth
    site = f"llm.expert1.layer.{layer}.resid_post"
    # SAE on the action tokens of every denoising step; probes on the last step (the one that produces actions)
    all_steps, last_step = args.out / "export" / f"expert1_layer{layer}_all", args.out / "export" / f"expert1_layer{layer}"
    if stages.run("export_all_steps", [PY, "export_activations.py", "--store", str(store), "--site", site,
                                       "--out", str(all_steps)]):
        if stages.run("sae", [PY, "train_save.py", "--activations", str(all_steps / "X.npy"), "--arch", "topk",
                              "--k", "8", "--num-latents", "128", "--holdout-block", "32",
                              "--out", str(args.out / "sae"), "--overwrite",
                              *(["--steps", str(FAST_SAE_STEPS)] if args.fast else [])]):
            policy_args = ["--config", args.config] + (["--checkpoint-dir", args.checkpoint_dir]
                                                       if args.checkpoint_dir else [])
            stages.run("sae_splice", [PY, "sae/splice_score.py", "--sae", str(args.out / "sae"), "--site", site,
                                      "--rollouts", str(rollouts), "--out", str(args.out / "sae" / "splice.json"),
                                      "--max-obs", "12", *policy_args])
            stages.run("sae_dashboard", [PY, "sae/dashboard.py", "--sae", str(args.out / "sae"),
                                         "--activations", str(all_steps / "X.npy"), "--keys",
                                         str(all_steps / "keys.npz"), "--episodes-dir", str(rollouts / "episodes"),
                                         "--frames-dir", str(rollouts / "frames"), "--num-features", "16",
                                         "--out", str(args.out / "sae" / "dashboard")])
    if stages.run("export_last_step", [PY, "export_activations.py", "--store", str(store), "--site", site,
                                       "--denoise-step", "9", "--episodes-dir", str(rollouts), "--out", str(last_step)]):
        stages.run("probes", [PY, "linear_probe.py", "--features", str(last_step / "X.npy"), "--targets",
                              str(last_step / "actions.npy"), "--groups", str(last_step / "groups.npy"),
                              "--n-folds", "2", "--out", str(args.out / "probes")])
        geo_in = args.out / "export" / "geometry_input"
        if stages.run_inline("geometry_input", trajectories_from_export, last_step, geo_in):
            stages.run("geometry", [PY, "geometry.py", "--trajectories", str(geo_in / "T.npy"), "--success",
                                    str(geo_in / "success.npy"), "--axes", "query", "--n-boot", "200",
                                    "--out", str(args.out / "geometry"), "--no-progress"])
    stages.run("action_pca", [PY, "action_pca.py", "--episodes-dir", str(rollouts), "--out", str(args.out / "pca")])
    (args.out / "stages.json").write_text(json.dumps(stages.results, indent=1))
    index = report.write_report(args.out)
    report.print_summary(args.out)
    failed = [r["stage"] for r in stages.results if not r["ok"]]
    print(f"[quickstart] report: {index}" + (f"; FAILED stages: {failed}" if failed else "; all stages ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
