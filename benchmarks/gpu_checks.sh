#!/usr/bin/env bash
# The performance checks that need a GPU, in one short run (a lent GPU machine gives minutes, not hours):
#   1. bench_model.py --full: bf16 pi05_libero / pi0_fast_libero-sized models with random weights, Pi0.5 with and
#      without prefix compaction, next to the tiny configs;
#   2. bench_sae.py at d=2048, 65,536 latents, k=32, batch 1024: ours (jax) next to dictionary_learning and
#      eai-sparsify (torch, on the same GPU, both in TF32).
# Each step has its own time limit, so one that hangs leaves the other's log. Logs go to $OUT (default gpu_out/).
#
# Usage: OUT=dir benchmarks/gpu_checks.sh   (python3 with jax[cuda], flax, torch; the references and tyro importable)
set -uo pipefail

out="${OUT:-gpu_out}"
mkdir -p "${out}"
export PYTHONPATH="${PWD}/src${PYTHONPATH:+:${PYTHONPATH}}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "${out}/gpu.txt" 2>&1
"${python}" -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)" \
  | tee -a "${out}/gpu.txt"

timeout "${MODEL_LIMIT_S:-270}" "${python}" benchmarks/bench_model.py --full --runs 20 2>&1 \
  | grep -v "^W0000\|^I0000" | tee "${out}/bench_model.log"
echo "bench_model exit ${PIPESTATUS[0]}" | tee -a "${out}/bench_model.log"

# Leave torch room beside jax in one process (jax takes 75 % of the GPU by default).
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout "${SAE_LIMIT_S:-230}" "${python}" benchmarks/bench_sae.py \
  --d 2048 --num-latents 65536 --k 32 --batch-size 1024 --steps 200 --rows 60000 \
  --references dictionary_learning sparsify 2>&1 | grep -v "^W0000\|^I0000" | tee "${out}/bench_sae.log"
echo "bench_sae exit ${PIPESTATUS[0]}" | tee -a "${out}/bench_sae.log"
