#!/usr/bin/env bash
# The GPU measurements the open issues wait for, in one device call (~10 minutes), most needed first, each
# under its own time limit so one that hangs cannot take the rest. Logs and RESULTS.md sections go to $1.
#
#   git archive 8603e01 | tar -x -C .devcarry/prefix    # here: generate before the load-time warm-up (carry it)
#   git archive e9232ef | tar -x -C .devcarry/loopbase  # here: the training loop before the update was queued
#   bash benchmarks/gpu_open_issues.sh $OUT             # there
#
# PREFIX and LOOPBASE (defaults .devcarry/prefix, .devcarry/loopbase) name those trees; a missing one is skipped. Issue 19's lever series is a
# call of its own (~9 minutes, carry .devcarry/speedrun from `speedrun.py carry --books 700`):
#   python3 benchmarks/speedrun.py plan levers --budget-s 550 --baseline-mode timing --baseline-val 5.2264 \
#     --only polar-express,cooldown-0.7,warmup-2,ema,split-heads,cooldown-sqrt,muon-lr-3e-3,shorter-1 \
#     --pack $OUT/levers2.json --png $OUT/levers2.png --results $OUT/levers2.md
set -o pipefail
out=$(mkdir -p "${1:-benchmarks/out}" && cd "${1:-benchmarks/out}" && pwd)
prefix=${PREFIX:-.devcarry/prefix}
loopbase=${LOOPBASE:-.devcarry/loopbase}
site=${PYTHONPATH:+:$PYTHONPATH}  # e.g. carried wheels' /tmp/site
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD$site"
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}  # a read-only site-packages recompiles per process
log="$out/log.txt"
run() {
    echo "### $*" | tee -a "$log"
    timeout "$@" 2>&1 | tee -a "$log"
}
trees=(--repo .)
[ -d "$prefix/gpt2" ] && trees+=(--repo "$prefix")
run 20 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
# issue 20: gpt2 generate after loading (<= 0.5 s) with the model-shaped warm-up, beside the tree before it
run 150 python benchmarks/bench_generate.py "${trees[@]}" --runs 4 --timeout 30
run 90 python -m pytest -q -p no:cacheprovider -m gpu tests/test_serve_generate.py tests/test_train_kernels.py
# issue 18: the real loop (gpt2 train), AdamW and Muon recipes, this tree and the one before the queued update
loops=(--repo .)
[ -d "$loopbase/gpt2" ] && loops+=(--repo "$loopbase")
run 240 python benchmarks/bench_loop.py "${loops[@]}" --recipes baseline,muon-full --steps 40 --results "$out/RESULTS.md"
# issue 18: inductor's max-autotune (compile time reported) against today's step, in one process
run 300 python benchmarks/bench_train.py --variants fast,fast-autotune,fast-autotune-tma --batch-size 64 \
    --results "$out/RESULTS.md"
