"""The main job on the embedded default: serve the tiny policy with recording, evaluate a few short LIBERO
episodes, run the analyses on what was recorded, and write one report folder with an index.html.

    python scripts/quickstart.py [--out report] [--trials 2] [--max-steps 40]
    python scripts/quickstart.py --config pi05_libero --checkpoint-dir /ckpt/pi05_libero --trials 10  # GPU machine

Each stage is a separate command (the same ones the README lists), so a stage that fails is reported with its
log and the others still run; the exit code is non-zero when any stage failed.
"""
from __future__ import annotations

import dataclasses
import html
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclasses.dataclass
class Args:
    out: pathlib.Path = ROOT / "report"
    config: str = "pi0_tiny"
    checkpoint_dir: str | None = None
    suite: str = "libero_spatial"
    task_ids: tuple[int, ...] = (0,)
    trials: int = 3
    max_steps: int = 40
    layer: int = -1
    """action-expert layer for SAE/probes (-1 = last)"""


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


def serve_and_evaluate(args: Args, stages: Stages, records: list[str]) -> None:
    port = _free_port()
    serve = [PY, "scripts/serve_policy.py", "--port", str(port), "--record-dir", str(args.out / "store"), "--record",
             *records]
    if args.checkpoint_dir:
        serve += ["policy:checkpoint", "--policy.config", args.config, "--policy.dir", args.checkpoint_dir]
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
                                   "--save-frames", "--out-dir", str(args.out / "rollouts"),
                                   "--video-out-path", str(args.out / "videos"), "--run-id", "quickstart"])
    finally:
        server.send_signal(signal.SIGINT)  # the server flushes the activation store on shutdown
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def write_index(args: Args, stages: Stages) -> pathlib.Path:
    out = args.out
    sections = {"Evaluation": ["rollouts/results", "videos"], "Attention": ["attention"], "SAE": ["sae"],
                "Probes": ["probes"], "Action PCA": ["pca"], "Recording": ["store/store.json"], "Logs": ["logs"]}
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>vla-interp report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:480px;margin:4px}"
             "td,th{padding:2px 8px}</style></head><body><h1>vla-interp report</h1>",
             f"<p>Policy <b>{html.escape(args.config)}</b>"
             f"{' (embedded default: UNTRAINED random weights, structure only)' if not args.checkpoint_dir else ''}; "
             f"suite {html.escape(args.suite)}, tasks {list(args.task_ids)}, {args.trials} trial(s), "
             f"max {args.max_steps} steps.</p><h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>s</th></tr>"]
    for r in stages.results:
        parts.append(f"<tr><td>{r['stage']}</td><td>{'ok' if r['ok'] else 'FAILED'}</td><td>{r['seconds']}</td>"
                     f"<td><a href='{r['log']}'>log</a></td></tr>")
    parts.append("</table>")
    for title, roots in sections.items():
        files = []
        for root in roots:
            p = out / root
            files += sorted(p.rglob("*")) if p.is_dir() else ([p] if p.exists() else [])
        files = [f for f in files if f.is_file() and f.suffix in (".png", ".json", ".csv", ".mp4", ".html", ".log")]
        if not files:
            continue
        parts.append(f"<h2>{title}</h2>")
        for f in files[:60]:
            rel = html.escape(str(f.relative_to(out)))
            parts.append(f"<div><a href='{rel}'><img src='{rel}' alt='{rel}'></a><br>{rel}</div>" if f.suffix == ".png"
                         else f"<div><a href='{rel}'>{rel}</a></div>")
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts))
    return index


def main(args: Args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    stages = Stages(args.out)
    os.environ.setdefault("MPLBACKEND", "Agg")
    records = ["llm.layer.*.attn.probs?tokens=actions&reduce=heads",
               "llm.expert1.layer.*.resid_post?tokens=actions"]
    serve_and_evaluate(args, stages, records)
    store, rollouts = args.out / "store", args.out / "rollouts"
    if (ROOT / "evaluate_attention_iou.py").exists():
        stages.run("attention_iou", [PY, "evaluate_attention_iou.py", "--store", str(store), "--rollouts",
                                     str(rollouts), "--out", str(args.out / "attention")])
    from openpi.policies.policy_config import get_config
    depth = get_config(args.config).model.expert.depth
    layer = args.layer % depth
    site = f"llm.expert1.layer.{layer}.resid_post"
    # SAE on the action tokens of every denoising step; probes on the last step (the one that produces actions)
    all_steps, last_step = args.out / "export" / f"expert1_layer{layer}_all", args.out / "export" / f"expert1_layer{layer}"
    if stages.run("export_all_steps", [PY, "export_activations.py", "--store", str(store), "--site", site,
                                       "--out", str(all_steps)]):
        stages.run("sae", [PY, "train_save.py", "--activations", str(all_steps / "X.npy"), "--arch", "topk",
                           "--k", "8", "--num-latents", "128", "--holdout-block", "32", "--out", str(args.out / "sae"),
                           "--overwrite"])
    if stages.run("export_last_step", [PY, "export_activations.py", "--store", str(store), "--site", site,
                                       "--denoise-step", "9", "--episodes-dir", str(rollouts), "--out", str(last_step)]):
        stages.run("probes", [PY, "linear_probe.py", "--features", str(last_step / "X.npy"), "--targets",
                              str(last_step / "actions.npy"), "--groups", str(last_step / "groups.npy"),
                              "--n-folds", "2", "--out", str(args.out / "probes")])
    stages.run("action_pca", [PY, "action_pca.py", "--episodes-dir", str(rollouts), "--out", str(args.out / "pca")])
    index = write_index(args, stages)
    (args.out / "stages.json").write_text(json.dumps(stages.results, indent=1))
    failed = [r["stage"] for r in stages.results if not r["ok"]]
    print(f"[quickstart] report: {index}" + (f"; FAILED stages: {failed}" if failed else "; all stages ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
