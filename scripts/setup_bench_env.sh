#!/usr/bin/env bash
# Create the virtualenv in which benchmarks/bench_sae.py compares our SAE trainer with the PyTorch references.
#
# Why a separate venv: the references (dictionary_learning, eai-sparsify, sae-lens) bring torch, transformers,
# datasets and transformer-lens (~2 GB) that nothing else here needs; .venv stays small. This venv holds this
# package too (editable), so both trainers run in one process on the same rows.
#
# Usage: scripts/setup_bench_env.sh [VENV_DIR]   (default: <repo>/.venv-bench), then
#        .venv-bench/bin/python benchmarks/bench_sae.py
# Pins (the versions the benchmark was written and measured against):
#   torch 2.13.0        the CPU wheel (an unpinned torch can pull a multi-GB CUDA build)
#   sae-lens 6.54.12    needs transformer-lens < 4 (4.x moved HookedTransformer)
#   eai-sparsify 1.3.3
#   dictionary-learning 0.1.0, --no-deps: its declared deps (nnsight, umap, wandb, ...) serve LLM tracing, not the
#                       trainers; einops is the one its trainers import
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${1:-${repo_root}/.venv-bench}"
python_bin="${PYTHON:-python3}"

test -x "${venv_dir}/bin/python" || "${python_bin}" -m venv "${venv_dir}"
pip=("${venv_dir}/bin/pip" install -q)
"${pip[@]}" --upgrade pip
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e "${repo_root}"
"${pip[@]}" torch==2.13.0 sae-lens==6.54.12 "transformer-lens<4" eai-sparsify==1.3.3 einops
"${pip[@]}" --no-deps dictionary-learning==0.1.0
"${venv_dir}/bin/python" -c "import torch, sae_lens, sparsify.sparse_coder, jax; print('bench env ready:', torch.__version__)"
