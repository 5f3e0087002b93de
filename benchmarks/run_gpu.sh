#!/usr/bin/env bash
# Every GPU benchmark of issue 6 in one go, most important first, each under its own time limit
# (seconds) so one that hangs cannot take the rest with it. Logs and RESULTS.md sections go to $1.
#   bash benchmarks/run_gpu.sh out/bench      # then append out/bench/RESULTS.md to benchmarks/RESULTS.md
set -o pipefail
out=${1:-benchmarks/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/log.txt"
run() {
    echo "### $*" | tee -a "$log"
    timeout "$@" 2>&1 | tee -a "$log"
}
run 20 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
run 300 python benchmarks/bench_train.py --variants fast,eager,compile-logits,fast-torchce,fast-flash \
    --batch-size 64,32 --profile-dir "$out" --results "$out/RESULTS.md"
run 120 python benchmarks/bench_decode.py --paths engine,engine-torch,plain --results "$out/RESULTS.md"
run 60 python benchmarks/bench_prefill.py --results "$out/RESULTS.md"
run 120 python benchmarks/bench_train.py --model gpt2-xl --variants fast-blocks --batch-size 20,16,12,8 \
    --memory-limit-gib 79 --steps 5 --warmup 2 --results "$out/RESULTS.md"
run 90 python -m pytest -q -m gpu tests/test_speed_paths.py
