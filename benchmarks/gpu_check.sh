#!/usr/bin/env bash
# lorakit on one CUDA GPU in under 8 minutes: the GPU checks and the speed benchmark, into one results file.
#
#   benchmarks/gpu_check.sh [--dry-run] [--out FILE] [--wheels DIR] [--budget SECONDS] [--skip STEP]...
#
# Steps (STEP names for --skip); a failed step does not stop the others:
#   env, bf16, varlen, nf4   one Python process, benchmarks/gpu_check.py check ...:
#     env     versions, the GPU, unmet requirements and the pinned wheels that meet them
#     bf16    a LoRA step in bf16 against fp32, then 12 steps of lorakit.train in bf16: the loss falls
#     varlen  packed rows through flash varlen attention against the dense block mask: loss, gradients
#     nf4     QLoRA through bitsandbytes: 4-bit storage, logits against the dequantised base, training
#   ddp       torchrun --nproc-per-node 1: lorakit's DDP step over nccl against one process
#   speed     benchmarks/bench_sft.py --device cuda: Trainer + peft against lorakit (benchmarks/README.md)
#
# --dry-run: on the CPU, each step in a tiny form (gloo for nccl, per-example SDPA for flash, the speed
#   benchmark at size tiny), or skipped with a reason; writes benchmarks/results/latest-gpu-check-dry-run.json.
# --out FILE: the results file (default benchmarks/results/gpu-check.json). --budget: seconds for all
#   steps (default 450); a step gets what is left of it, up to its own cap, and is skipped below 30 s.
# --wheels DIR: install DIR/*.whl first (no index, no deps) into a temporary folder put on PYTHONPATH;
#   benchmarks/gpu_wheels.txt lists what a machine without network needs. Nothing is downloaded.
# Exit status: 0 when no step failed, 1 when one did, 2 for bad arguments or no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DRY_RUN="" OUT="" WHEELS="" BUDGET=450 SKIP=" "
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --skip) SKIP="$SKIP$2 "; shift ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "$DRY_RUN" ]; then
  MODE=dry-run DEVICE=cpu OUT=${OUT:-benchmarks/results/latest-gpu-check-dry-run.json}
  SPEED_ARGS=(--device cpu --size tiny --steps 3 --warmup 1 --repeats 1 --threads 1)
else
  MODE=gpu DEVICE=cuda OUT=${OUT:-benchmarks/results/gpu-check.json}
  SPEED_ARGS=(--device cuda --size smollm --steps 12 --warmup 2 --repeats 2)
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$WHEELS"/*.whl \
    || exit 2
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
if [ -z "$DRY_RUN" ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: torch sees no CUDA device here; on a CPU machine use --dry-run" >&2
  exit 2
fi

wanted() { [[ "$SKIP" != *" $1 "* ]]; }
# one line per step in WORK/steps.tsv: names, exit code (or 'skip'), seconds, reason for a skip
skip() { echo "== $1: skipped ($2)"; printf '%s\tskip\t0\t%s\n' "$1" "$2" >> "$WORK/steps.tsv"; }
# step NAMES CAP COMMAND...: COMMAND under a timeout of CAP seconds or the budget left, logged to WORK/FIRST.log
step() {
  local names=$1 cap=$2 left=$((BUDGET - SECONDS - 15)) start=$SECONDS
  shift 2
  if [ "$left" -lt 30 ]; then skip "$names" "not started: ${left} s of the ${BUDGET} s budget left"; return; fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $names (at most $cap s): $*"
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$WORK/${names%%,*}.log"
  printf '%s\t%s\t%s\t\n' "$names" "${PIPESTATUS[0]}" "$((SECONDS - start))" >> "$WORK/steps.tsv"
}

CHECKS=()
for name in env bf16 varlen nf4; do wanted "$name" && CHECKS+=("$name"); done
CHECK_CMD=("$PY" benchmarks/gpu_check.py check "${CHECKS[@]}" --device "$DEVICE" --work "$WORK")
DDP_CMD=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1
         benchmarks/gpu_check.py check ddp --device "$DEVICE" --work "$WORK")
SPEED_CMD=("$PY" benchmarks/bench_sft.py "${SPEED_ARGS[@]}" --out "$WORK/speed.json")

echo "gpu_check.sh: $MODE on $DEVICE, budget $BUDGET s, results to $OUT; plan:"
: > "$WORK/plan.tsv"
plan() {
  printf '%s\t%s\t%s\n' "$1" "$2" "${*:3}" >> "$WORK/plan.tsv"
  printf '  %-20s %3s s  %s\n' "$1" "$2" "${*:3}"
}
plan "$(IFS=,; echo "${CHECKS[*]:-none}")" 240 "${CHECK_CMD[@]}"
plan ddp 120 "${DDP_CMD[@]}"
plan speed 300 "${SPEED_CMD[@]}"

for name in env bf16 varlen nf4; do wanted "$name" || skip "$name" "--skip $name"; done
if [ ${#CHECKS[@]} -gt 0 ]; then step "$(IFS=,; echo "${CHECKS[*]}")" 240 "${CHECK_CMD[@]}"; fi
if ! wanted ddp; then skip ddp "--skip ddp"; else step ddp 120 "${DDP_CMD[@]}"; fi
if ! wanted speed; then
  skip speed "--skip speed"
elif ! "$PY" -c "import sys, importlib.util as u; sys.exit(u.find_spec('peft') is None)"; then
  skip speed "peft is not installed: the Trainer + peft side cannot run"
else
  step speed 300 "${SPEED_CMD[@]}"
fi

"$PY" benchmarks/gpu_check.py report --work "$WORK" --out "$OUT" --mode "$MODE"
