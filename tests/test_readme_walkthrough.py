"""README's walkthrough runs as written, in order, from a fresh folder: each command on the output of the ones
before it (a real LIBERO run through the server with recording, then every analysis script)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def walkthrough_block() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- walkthrough -->\n```bash\n(.*?)```\n<!-- /walkthrough -->", text, re.S)
    assert m, "README.md has no walkthrough block between <!-- walkthrough --> markers"
    return m.group(1)


@pytest.mark.libero
@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path):
    for entry in REPO.iterdir():  # a fresh working folder that sees the repository's scripts, not its outputs
        if entry.name not in {"out", ".git", ".venv", ".venv-client"}:
            (tmp_path / entry.name).symlink_to(entry)
    env = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               MPLBACKEND="Agg")
    script = "set -euo pipefail\n" + walkthrough_block()
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    o = tmp_path / "out"
    for produced in ("rollouts/results/walk.json", "export/l3/bridge.json", "sae/metrics.json",
                     "sae/dashboard/index.html", "probes/probe_results.json", "geometry/geometry.json",
                     "iou_base", "attention/summary.json", "pca/action_pca.json"):
        assert (o / produced).exists(), f"{produced} was not written"
