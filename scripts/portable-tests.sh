#!/usr/bin/env bash
# Run the numeric tests as other CPUs would round: AVX2 and SSE-only kernels (ATen, oneDNN and MKL) instead of this
# machine's best, and 1 or 2 threads. The tolerances come from tests/_tol.py; a failure here means
# a bound that only held for one machine's arithmetic (or a real bug).
#
#   scripts/portable-tests.sh [extra pytest arguments]
#
# Runs the combinations one after another (each takes minutes on 2 cores) and exits non-zero if
# any failed.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
FILES=(tests/test_adapters_*.py tests/test_speed_*.py tests/test_train_*.py tests/test_data_packing*.py tests/test_architectures.py
       tests/test_dist_train.py tests/test_dist_cli.py tests/test_cli_train.py tests/test_cli_recipes.py
       tests/test_infer_multi.py tests/test_infer_commands.py tests/test_infer_metrics.py)
COMBINATIONS=(
  "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"
  "ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2"
  "OMP_NUM_THREADS=1 LORAKIT_TEST_THREADS=1"
  "OMP_NUM_THREADS=2 LORAKIT_TEST_THREADS=2"
)
failed=()
for combination in "${COMBINATIONS[@]}"; do
  echo "== $combination"
  start=$SECONDS
  # a fresh inductor cache: its key ignores ATEN_CPU_CAPABILITY, so a kernel built for this CPU's
  # best instruction set would be reused under another and fail
  cache=$(mktemp -d)
  if env TORCHINDUCTOR_CACHE_DIR="$cache" $combination "$PYTHON" -m pytest -q -p no:cacheprovider "${FILES[@]}" "$@"; then
    echo "== passed in $((SECONDS - start)) s: $combination"
  else
    echo "== FAILED in $((SECONDS - start)) s: $combination"
    failed+=("$combination")
  fi
  rm -rf "$cache"
done
if ((${#failed[@]})); then
  printf 'failed under: %s\n' "${failed[@]}"
  exit 1
fi
echo "all ${#COMBINATIONS[@]} combinations passed"
