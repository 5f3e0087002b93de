#!/usr/bin/env bash
# The GPU measurements the open issues wait for, in one device call (~9 minutes), most needed first, each
# under its own time limit so one that hangs cannot take the rest. Logs and RESULTS.md sections go to $1.
#
#   git archive 2c51b2b | tar -x -C .devcarry/base     # here: the tree before issues 20-21 (carry it)
#   git archive 8603e01 | tar -x -C .devcarry/prefix   # here: generate before the load-time warm-up
#   bash benchmarks/gpu_open_issues.sh $OUT            # there (starlette + uvicorn wheels installed first)
#
# BASE and PREFIX (default .devcarry/base, .devcarry/prefix) name those trees; a missing one is skipped.
set -o pipefail
out=$(mkdir -p "${1:-benchmarks/out}" && cd "${1:-benchmarks/out}" && pwd)
base=${BASE:-.devcarry/base}
prefix=${PREFIX:-.devcarry/prefix}
site=${PYTHONPATH:+:$PYTHONPATH}  # e.g. the carried wheels' /tmp/site
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD$site"
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}  # a read-only site-packages recompiles per process
log="$out/log.txt"
run() {
    echo "### $*" | tee -a "$log"
    timeout "$@" 2>&1 | tee -a "$log"
}
trees=(--repo .)
for t in "$prefix" "$base"; do [ -d "$t/gpt2" ] && trees+=(--repo "$t"); done
run 20 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
# issue 20: gpt2 generate after loading (<= 0.5 s), beside the trees before it
run 200 python benchmarks/bench_generate.py "${trees[@]}" --runs 3 --timeout 40
# issue 21: 1 and 32 clients, two 256-token requests each, this tree and the one before the server work
serve=(--concurrency 1,32 --requests-per-client 2 --new-tokens 256 --step-batches 1,32 --hf-batches "" --generate-lengths "")
run 130 python benchmarks/bench_serve.py "${serve[@]}" --results "$out/RESULTS.md"
if [ -d "$base/gpt2" ]; then
    (cd "$base" && PYTHONPATH="$PWD$site" run 130 python benchmarks/bench_serve.py "${serve[@]}" \
        --results "$out/RESULTS-before.md")
fi
run 90 python -m pytest -q -p no:cacheprovider -m gpu tests/test_serve_generate.py tests/test_train_kernels.py
