#!/usr/bin/env bash
# GPU check of `gpt2 train` (issue 4, item 7): GPT-2 124M, torch.compile + bf16 autocast, on Project
# Gutenberg shards, for a few hundred steps; prints tokens/s, MFU, peak memory, the loss going down.
#
#   benchmarks/gpu_train_check.sh GUTENBERG_DIR [extra gpt2 train options...]
#
# GUTENBERG_DIR holds train.jsonl.xz and val.jsonl.xz (../shared/data/gutenberg, carried to the GPU box).
# Environment knobs:
#   NPROC=2          run under torchrun with N processes (one per GPU)
#   STEPS=300        optimizer steps (each 524,288 tokens)
#   DATA=data/gutenberg      where the shards go (prepared once; reruns reuse them)
#   RUN=runs/gutenberg-check-<time>   run directory (never an existing one)
#   CONFIG=configs/gutenberg-124M.toml
# CPU smoke run (small):  STEPS=3 benchmarks/gpu_train_check.sh DIR --model tiny --seq_len 64 \
#       --micro_batch_size 4 --total_batch_size 256 --device cpu
set -euo pipefail

GUT=${1:?usage: benchmarks/gpu_train_check.sh GUTENBERG_DIR [gpt2 train options...]}
shift
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
STEPS=${STEPS:-300}
DATA=${DATA:-data/gutenberg}
RUN=${RUN:-runs/gutenberg-check-$(date +%Y%m%d-%H%M%S)}
CONFIG=${CONFIG:-configs/gutenberg-124M.toml}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== environment"
python - <<'PY'
import os, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cores {os.cpu_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== prepare $GUT -> $DATA"
t0=$(date +%s)
python -m gpt2 prepare "$GUT/train.jsonl.xz" --val-source "$GUT/val.jsonl.xz" --out "$DATA" --quiet
echo "prepare: $(( $(date +%s) - t0 )) s"

echo "== train ($NPROC process(es), $STEPS steps) -> $RUN"
if [ "$NPROC" -gt 1 ]; then
    launch=(torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC" -m gpt2 train)
else
    launch=(python -m gpt2 train)
fi
cmd=("${launch[@]}" --config "$CONFIG" --data_root "$DATA" --out_dir "$RUN" --max_steps "$STEPS" "$@")
echo "command: ${cmd[*]}"
t0=$(date +%s)
"${cmd[@]}"
echo "train wall time: $(( $(date +%s) - t0 )) s (includes compilation and evaluations)"

echo "== summary"
python - "$RUN" "$NPROC" <<'PY'
import json, statistics, sys
from pathlib import Path

run, nproc = Path(sys.argv[1]), int(sys.argv[2])
recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
train = [r for r in recs if r.get("type") == "train"]
evals = [r for r in recs if r.get("type") == "eval" and "val_loss" in r]
start = next((r for r in recs if r.get("event") == "start"), {})
steady = train[min(10, len(train) - 1):]  # skip compilation and warm-up steps
med = lambda k: statistics.median(r[k] for r in steady if r.get(k) is not None) if any(r.get(k) is not None for r in steady) else None
tps, mfu, dt = med("tokens_per_sec"), med("mfu"), med("step_time")
mem = max((r.get("peak_memory_gib") or 0) for r in train)
print(f"device: {start.get('device_name')} x {nproc}, torch {start.get('torch')}, git {start.get('git_sha')}")
print(f"steps: {len(train)}; median over steps {steady[0]['step']}..{steady[-1]['step']}:")
print(f"  step time {dt * 1000:.0f} ms, tokens/s {tps:,.0f} total, {tps / nproc:,.0f} per GPU")
print(f"  MFU {100 * mfu:.1f}% (6N + 12LHQT FLOPs/token, dense bf16 peak)" if mfu is not None else "  MFU: n/a")
print(f"  peak memory {mem:.1f} GiB (torch.cuda.max_memory_allocated, rank 0)")
print(f"  first compiled step: {train[0]['step_time']:.1f} s")
print(f"loss: step 0 {train[0]['loss']:.3f} -> step {train[-1]['step']} {train[-1]['loss']:.3f}")
print("val loss: " + ", ".join(f"{r['step']}: {r['val_loss']:.3f}" for r in evals))
PY
