#!/usr/bin/env bash
# The GPU measurements the open issues wait for, as named stages, each under its own time limit so one that
# hangs cannot take the rest. One device call runs a few stages (a call is at most 10 minutes); logs and
# RESULTS.md sections go to OUT.
#
#   bash benchmarks/gpu_open_issues.sh OUT STAGE[,STAGE...]
#
#   generate  (~120 s) issue 20: gpt2 generate after loading (<= 0.5 s) and decode tok/s, this tree, BASE, PREFIX
#   tests     (~100 s) the GPU tests of the inference path and the fused training kernels
#   autotune  (~330 s) issue 18 lever 1: inductor's max-autotune against today's step, compile time reported
#   steps     (~200 s) issue 18: today's step and the fused one, GPT-2 124M (AdamW) and gpt2-medium
#   loop      (~170 s) issue 18: the real loop (gpt2 train), AdamW and Muon recipes, this tree and LOOPBASE
#   loopfused (~160 s) issue 18: the real loop of both recipes with train_kernels = "fused" (this tree)
#   optimizer (~60 s)  issue 18: the optimizer step alone, AdamW and Muon recipes, with each one's kernel table
#                      (and in HEADTREE first, where it was carried)
#   xl        (~220 s) issue 18: gpt2-xl's FSDP2 step on one GPU (bench_fsdp_xl.py), torch vs fused MLP kernels
#   curves    (~300 s) issue 18: 300-step loss curves, fused vs torch (two seeds), on the proxy's shards
#                      (carry .devcarry/speedrun, made by `python benchmarks/speedrun.py carry --books 700`);
#                      CURVES_ARGS adds flags (e.g. "--seeds 1 --fused-seeds 1": the second seed alone, ~200 s)
#   epilogue  (~120 s) issue 18: today's step against max-autotune over cuBLAS's kernels only (bias epilogues)
#   muonstep  (~180 s) issue 18: optimizer and loop together (the Muon step before and after, then the loop)
#   levers    (~560 s) issue 19: a lever series on muon-short (carry .devcarry/speedrun); a call of its own;
#                      LEVERS names the levers (speedrun_plans.py), TAG the files it writes
#   plan      (PLAN_S, default 570 s) issue 19: `speedrun.py plan $PLAN $PLAN_ARGS` (adamw, regime2, final;
#                      carry .devcarry/speedrun), e.g. PLAN=final (the shipped tomls, baseline included) or
#                      PLAN=regime2 PLAN_ARGS="--changes-from benchmarks/speedrun_best.json";
#                      a series over several calls: copy the last call's $PLAN.json to .devcarry/$PLAN.json, carry
#                      it, and add --resume .devcarry/$PLAN.json (e.g. PLAN=adamw PLAN_ARGS="--baseline-mode full
#                      --resume .devcarry/adamw.json": two full-length runs a call, the finished ones taken)
#
# BASE (default .devcarry/base: `git archive 2c51b2b | tar -x -C .devcarry/base`, carried) is the tree before
# issue 20 (gpt2 generate on the reference decoder); PREFIX (default .devcarry/prefix) another tree to run beside
# it, e.g. `git archive 7093627` (the warm-up that only imports, before the rehearsal); missing ones are skipped.
# LOOPBASE (default .devcarry/loopbase: `git archive e9232ef | tar -x -C .devcarry/loopbase`, carried) is the
# tree before the optimizer step was queued ahead of the loss read; missing, the loop stage runs this tree only.
set -o pipefail
out=$(mkdir -p "${1:?usage: gpu_open_issues.sh OUT STAGES}" && cd "$1" && pwd)
stages=",${2:?usage: gpu_open_issues.sh OUT STAGES},"
base=${BASE:-.devcarry/base}
prefix=${PREFIX:-.devcarry/prefix}
loopbase=${LOOPBASE:-.devcarry/loopbase}
headtree=${HEADTREE:-.devcarry/head}  # e.g. `git archive HEAD`: the committed tree, beside this working tree
site=${PYTHONPATH:+:$PYTHONPATH}  # e.g. carried wheels' /tmp/site
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD$site"
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}  # a read-only site-packages recompiles per process
log="$out/log.txt"
results="$out/RESULTS.md"
run() {
    echo "### $(date -u +%T) $*" | tee -a "$log"
    timeout "$@" 2>&1 | tee -a "$log"
}
want() { [[ $stages == *",$1,"* ]]; }
run 20 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
if want generate; then
    trees=(--repo .)
    [ -d "$base/gpt2" ] && trees+=(--repo "$base")
    [ -d "$prefix/gpt2" ] && trees+=(--repo "$prefix")
    run 170 python benchmarks/bench_generate.py "${trees[@]}" --runs 4 --timeout 30
fi
if want tests; then
    run 100 python -m pytest -q -p no:cacheprovider -m gpu tests/test_serve_generate.py tests/test_train_kernels.py
fi
if want autotune; then
    run 330 python benchmarks/bench_train.py --variants fast,fast-autotune --batch-size 64 --steps 15 --results "$results"
fi
if want steps; then
    run 110 python benchmarks/bench_train.py --variants fast,fused --batch-size 64 --steps 15 --results "$results"
    run 150 python benchmarks/bench_train.py --model gpt2-medium --variants fast,fused --batch-size 64,32 \
        --steps 10 --results "$results"
fi
loop_bench() {  # LIMIT_S BENCH_LOOP_ARGS...: both recipes' real loop, medians of 30 steps
    run "$1" python benchmarks/bench_loop.py "${@:2}" --recipes baseline,muon-full --steps 40 --results "$results"
}
if want loop || want muonstep; then
    loops=(--repo .)
    [ -d "$loopbase/gpt2" ] && loops+=(--repo "$loopbase")
    loop_bench 200 "${loops[@]}"
fi
if want loopfused; then
    loop_bench 200 --repo . --train-args "--train_kernels fused"  # Triton compiles cold: ~80 s a recipe
fi
if want optimizer || want muonstep; then  # HEADTREE first where it was carried: the step before and after
    [ -d "$headtree/gpt2" ] && (cd "$headtree" && run 90 python benchmarks/bench_optimizer.py \
        --recipes baseline,muon-full --results "$out/RESULTS-head.md")
    run 150 python benchmarks/bench_optimizer.py --recipes baseline,muon-full --profile-dir "$out" --results "$results"
fi
if want epilogue; then
    run 150 python benchmarks/bench_train.py --variants fast,fast-autotune-aten --batch-size 64 --steps 15 \
        --results "$results"
fi
if want xl; then
    for kernels in torch fused; do
        run 110 torchrun --standalone --nproc_per_node=1 benchmarks/bench_fsdp_xl.py --batch-size 16 \
            --train-kernels "$kernels" --results "$results"
    done
fi
if want curves; then
    run 120 python benchmarks/speedrun.py prepare
    run "${CURVES_S:-330}" python benchmarks/kernels_loss_curves.py --out runs/kernels ${CURVES_ARGS:-} --results "$results"
fi
if want levers; then  # kept so far (in muon-short): NorMuon, Polar Express, a 70% 1-sqrt cooldown
    run 120 python benchmarks/speedrun.py prepare
    levers=${LEVERS:-embed-lr-0.5x,position-lr-3x,scalar-lr-3x,adamw-lr-0.67x,shorter-1}
    tag=${TAG:-levers}
    run "${LEVERS_S:-570}" python benchmarks/speedrun.py plan levers --budget-s "$(( ${LEVERS_S:-570} - 20 ))" \
        --baseline-mode timing --baseline-val 5.2264 --only "$levers" \
        --pack "$out/$tag.json" --png "$out/$tag.png" --results "$out/$tag.md"
fi
if want plan; then  # the plan prepares its own data (regime2: every carried book) inside its budget
    run "${PLAN_S:-570}" python benchmarks/speedrun.py plan "${PLAN:?PLAN=adamw|regime2|final}" \
        --budget-s "$(( ${PLAN_S:-570} - 20 ))" ${PLAN_ARGS:-} \
        --pack "$out/$PLAN.json" --png "$out/$PLAN.png" --results "$out/$PLAN.md"
fi
