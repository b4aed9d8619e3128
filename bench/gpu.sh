#!/usr/bin/env bash
# The GPU benchmark run: kernel tests, then the training, evaluation and kernel benchmarks at
# MDLM-small scale (12 layers, width 768, sequence 1024, vocabulary 50,258), within 8 minutes.
# Results (one JSON line per benchmark, the kernel tests' output, the GPU's name) go to $OUT, or to
# bench/results/DATE when OUT is unset.
#
#   bash bench/gpu.sh                    # on a CUDA machine with the project installed
#   SCALE=smoke bash bench/gpu.sh        # the same steps at tiny shapes, on any machine (checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=${OUT:-bench/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
SCALE=${SCALE:-small}

if [ "$SCALE" = small ]; then
  MODEL="--size small --vocab 50258 --seq_len 1024"
  TRAIN="$MODEL --batch_size 8 --steps 5 --warmup 2 --bf16"
  PPL="$MODEL --batch_size 16 --batches 8"
  KERN="--rows 8192 --vocab 50258"
  TESTS="tests/test_kernels.py tests/test_weighted_ce.py"
else  # smoke: tiny shapes, CPU is fine
  MODEL="--size debug --vocab 1000 --seq_len 32"
  TRAIN="$MODEL --batch_size 2 --steps 1 --warmup 1"
  PPL="$MODEL --batch_size 2 --batches 2 --repeats 1"
  KERN="--rows 8 --vocab 1000 --reps 1"
  TESTS="tests/test_weighted_ce.py::test_fused_loss_and_gradients_match_float64_full_logits"
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"; } \
  > "$OUT/device.txt"
echo "device: $(cat "$OUT/device.txt")"

run() {  # name, time limit (s), command...: stdout's last line to $OUT/name.json, everything to name.log
  local name=$1 limit=$2; shift 2
  echo "== $name"
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    local last; last=$(tail -n 1 "$OUT/$name.log")
    echo "$last"
    case "$last" in "{"*) echo "$last" > "$OUT/$name.json" ;; esac
  else
    echo "$name failed or timed out (status $?); see $OUT/$name.log"
  fi
}

run kernel_tests 120 "$PY" -m pytest -q $TESTS
run train 150 "$PY" bench/train.py $TRAIN
run ppl 90 "$PY" bench/ppl.py $PPL
run kernels 60 "$PY" bench/kernels.py $KERN
echo "results in $OUT"
