#!/usr/bin/env bash
# Create (once) the small virtualenv that holds the official openpi-client package.
#
# Why a separate venv: openpi-client pins numpy<2 while vla-interp needs numpy>=2, so the two cannot share
# .venv. tests/test_openpi_client_compat.py calls this script, then runs openpi-client from this venv against
# our server. Idempotent and safe to run concurrently (flock): a no-op when the pinned version is present.
#
# Usage: scripts/setup_client_env.sh [VENV_DIR]   (default: <repo>/.venv-client)
# Env:   OPENPI_CLIENT_VERSION (default 0.1.2, the newest release on PyPI when this was written)
#        PYTHON (default python3)
#
# openpi-client 0.1.2 imports typing_extensions but does not declare it as a dependency, so it is installed
# explicitly (pinned) next to it; without it `import openpi_client.websocket_client_policy` fails.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${1:-${repo_root}/.venv-client}"
version="${OPENPI_CLIENT_VERSION:-0.1.2}"
typing_extensions_version="4.15.0"
python_bin="${PYTHON:-python3}"
lock_file="${TMPDIR:-/tmp}/vla-interp-setup-client-env.lock"

is_ready() {
    [ -x "${venv_dir}/bin/python" ] && "${venv_dir}/bin/python" - "$version" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
import openpi_client.websocket_client_policy  # noqa: F401  (fails if the install is broken)
sys.exit(0 if version("openpi-client") == sys.argv[1] else 1)
PY
}

exec 9>"${lock_file}"
flock 9

if is_ready; then
    echo "openpi-client ${version} already installed in ${venv_dir}"
    exit 0
fi

if [ ! -x "${venv_dir}/bin/python" ]; then
    "${python_bin}" -m venv "${venv_dir}"
fi
"${venv_dir}/bin/python" -m pip install --disable-pip-version-check --quiet \
    "openpi-client==${version}" "typing-extensions==${typing_extensions_version}"

if ! is_ready; then
    echo "error: openpi-client ${version} did not import from ${venv_dir} after installing" >&2
    exit 1
fi
echo "installed openpi-client ${version} into ${venv_dir}"
