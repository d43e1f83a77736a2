"""The main job on the embedded default: serve the tiny policy with recording, evaluate 15 LIBERO episodes (three
tasks, held-out initial states), run the analyses on what was recorded, and write one report folder with an
index.html.

    python scripts/quickstart.py [--out report] [--task-ids 0 2 6] [--trials 5] [--max-steps 220] [--num-workers 2]
    python scripts/quickstart.py --fast --out /tmp/qs   # CI: 1 trial of tasks 0-2, 15 steps, shorter SAE training
    python scripts/quickstart.py --config pi05_libero --checkpoint-dir /ckpt/pi05_libero --trials 10  # GPU machine
    python scripts/quickstart.py --policy dp --out report_dp --compare-with report   # the tiny Diffusion Policy,
                                                                  # with a comparison section against report/

The stages, their commands, what each needs and which report section each feeds are defined once in
``openpi.pipeline.STAGES`` (the report reads the same list). Each stage is a separate command (the same ones the
README lists), so a stage that fails is reported with its log and the others still run; a stage whose needs
failed is skipped; the exit code is non-zero when any stage failed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Literal

import tyro

from openpi import pipeline, report
from openpi.policies.policy_config import DEFAULT_CONFIG, DIFFUSION_CONFIGS, DIFFUSION_DEFAULT_DIRS, get_config
from openpi.shared.io import write_json_atomic

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclasses.dataclass
class Args:
    out: pathlib.Path = ROOT / "report"
    policy: Literal["pi0", "dp"] = "pi0"
    """Policy family: pi0 (Pi0 / Pi0.5, default config pi0_tiny_spatial10) or dp (Diffusion Policy, default config
    dp_tiny_spatial10, trained here on the same demos). The same stages and report; sites differ (HOOKS.md)."""
    config: str | None = None
    """Policy config served (default: the --policy family's embedded tiny policy); a Diffusion Policy config
    (dp_lerobot, dp_tiny_spatial10) implies --policy dp."""
    checkpoint_dir: str | None = None
    """Checkpoint of --config (default: its embedded checkpoint; pi0_tiny/pi05_tiny: random weights)."""
    compare_with: pathlib.Path | None = None
    """A finished quickstart report folder of another policy on the same episodes: adds a comparison section
    (success, where each looks, how linearly the action is decodable by layer)."""
    suite: str = "libero_spatial"
    task_ids: tuple[int, ...] = (0, 2, 6)
    """Three tasks the embedded policy solves often but not always (7/10, 6/10 and 5/10 held out), so that every
    analysis sees successes and failures of more than one scene."""
    first_trial: int = 40
    """First initial state (40-49 were held out of the embedded policy's training)."""
    trials: int = 5
    """Episodes per task: 15 in all, enough for episode-held-out splits with intervals."""
    max_steps: int = 220
    """libero_spatial's budget: the embedded policy solves these tasks in ~100-220 steps when it succeeds."""
    num_workers: int = 2
    """LIBERO environment processes (rendering dominates a CPU step; cameras render only at query steps)."""
    layer: int = -1
    """action-expert layer for SAE/probes (-1 = last)"""
    fast: bool = False
    """CI mode: overrides to 1 trial of tasks 0, 1, 2 (probes need >= 3 episodes), 15 steps, 200 SAE steps"""


FAST = {"task_ids": (0, 1, 2), "trials": 1, "max_steps": 15}
DEFAULT_DP_CONFIG = "dp_tiny_spatial10"
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

    def fail(self, name: str, reason: str) -> bool:
        """Record a stage that could not start, with the reason as its log."""
        log = self.out / "logs" / f"{name}.log"
        log.write_text(reason + "\n")
        self.results.append({"stage": name, "ok": False, "seconds": 0.0, "log": str(log.relative_to(self.out))})
        print(f"[quickstart] {name}: FAILED ({reason})", flush=True)
        return False

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


@contextlib.contextmanager
def policy_server(args: Args, plan: pipeline.Plan, out: pathlib.Path):
    """Serve the policy with recording on a free local port for the stages that need it; yields the port."""
    port = _free_port()
    serve = [PY, "scripts/serve_policy.py", "--port", str(port), "--record-dir", str(out / "store"), "--record",
             *plan.records, "policy:checkpoint", "--policy.config", plan.config]
    if args.checkpoint_dir:
        serve += ["--policy.dir", args.checkpoint_dir]
    log = open(out / "logs" / "serve.log", "w")
    server = subprocess.Popen(serve, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"policy server exited early; see {out / 'logs' / 'serve.log'}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        yield port
    finally:
        server.send_signal(signal.SIGINT)  # the server flushes the activation store on shutdown
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def make_plan(args: Args) -> pipeline.Plan:
    config = args.config or (DEFAULT_DP_CONFIG if args.policy == "dp" else DEFAULT_CONFIG)
    common = dict(out=args.out, config=config, checkpoint_dir=args.checkpoint_dir, suite=args.suite,
                  task_ids=args.task_ids, first_trial=args.first_trial, trials=args.trials,
                  max_steps=args.max_steps, num_workers=args.num_workers,
                  sae_steps=FAST_SAE_STEPS if args.fast else None)
    if config in DIFFUSION_CONFIGS:
        from openpi.models.diffusion import unet
        from openpi.models.diffusion.config import load_config

        folder = args.checkpoint_dir or DIFFUSION_DEFAULT_DIRS.get(config)
        if folder is None:
            raise SystemExit(f"--config {config} needs --checkpoint-dir (a LeRobot Diffusion Policy folder)")
        dp_cfg = load_config(pathlib.Path(folder) / "config.json")
        sites = pipeline.dp_probe_sites([name for name, _, _ in unet.block_names(dp_cfg)])
        return pipeline.Plan(**common, layer=0, num_steps=dp_cfg.inference_steps, family="diffusion",
                             dp_probe_sites=sites)
    if args.policy == "dp":
        raise SystemExit(f"--policy dp serves a Diffusion Policy config ({sorted(DIFFUSION_CONFIGS)}); "
                         f"--config {config} is a Pi0-family config")
    depth = get_config(config).model.expert.depth
    return pipeline.Plan(**common, layer=args.layer % depth)


def run_stages(args: Args, plan: pipeline.Plan, stages: Stages) -> None:
    """Every stage of ``pipeline.STAGES`` in order; one whose needs did not succeed is skipped (and said so)."""
    done: set[str] = set()
    for st in pipeline.STAGES:
        missing = [n for n in st.needs if n not in done]
        if missing:
            print(f"[quickstart] {st.name}: skipped (needs {', '.join(missing)})", flush=True)
            continue
        if st.inline is not None:
            ok = stages.run_inline(st.name, st.inline, plan)
        elif st.server:
            try:
                with policy_server(args, plan, plan.out) as port:
                    ok = stages.run(st.name, st.argv(dataclasses.replace(plan, port=port)))
            except RuntimeError as exc:  # the server never came up: the stage fails with the reason in its log
                ok = stages.fail(st.name, str(exc))
        else:
            ok = stages.run(st.name, st.argv(plan))
        if ok:
            done.add(st.name)


def main(args: Args) -> int:
    if args.fast:
        args = dataclasses.replace(args, **FAST)
    if args.compare_with is not None and not (args.compare_with / "rollouts" / "results").is_dir():
        raise SystemExit(f"--compare-with {args.compare_with}: not a quickstart report folder (no rollouts/results/); "
                         "run the other policy's quickstart first")
    args.out.mkdir(parents=True, exist_ok=True)
    stages = Stages(args.out)
    os.environ.setdefault("MPLBACKEND", "Agg")
    plan = make_plan(args)
    run_stages(args, plan, stages)
    write_json_atomic(args.out / "stages.json", stages.results)
    index = report.write_report(args.out, compare_with=args.compare_with)
    report.print_summary(args.out)
    failed = [r["stage"] for r in stages.results if not r["ok"]]
    print(f"[quickstart] report: {index}" + (f"; FAILED stages: {failed}" if failed else "; all stages ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
