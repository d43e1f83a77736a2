#!/usr/bin/env bash
# Install what the report check needs: Debian's headless-capable Chromium (idempotent).
#
# Why: tests/test_report.py renders report/index.html in headless Chromium and checks the screenshot, so a
# report that only "exists" but does not display (broken layout, missing images) is caught. Chromium is a
# Debian package, not a Python one, hence a separate script that the Makefile can call once.
#
# Usage: bash scripts/install_report_deps.sh
# Env:   SKIP_APT=1 does nothing (e.g. chromium already present / no root).
set -euo pipefail

if [[ "${SKIP_APT:-0}" == "1" ]]; then
    echo "install_report_deps.sh: SKIP_APT=1, not installing chromium"
    exit 0
fi
if command -v chromium >/dev/null 2>&1; then
    echo "install_report_deps.sh: chromium already installed ($(command -v chromium))"
    exit 0
fi
SUDO=""
if [[ "$(id -u)" != "0" ]]; then SUDO="sudo"; fi
echo "install_report_deps.sh: apt-get install chromium (large; takes a few minutes)"
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
command -v chromium >/dev/null 2>&1 || { echo "install_report_deps.sh: chromium still not on PATH" >&2; exit 1; }
echo "install_report_deps.sh: $(chromium --version 2>/dev/null || echo chromium installed)"
