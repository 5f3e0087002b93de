"""HellaSwag for a GPT-2: a thin wrapper around `gpt2 eval hellaswag` (same options).

python scripts/eval_hellaswag.py --model gpt2 [--data hellaswag_val.jsonl] [--limit N] [--dtype bf16]
torchrun --nproc_per_node=8 scripts/eval_hellaswag.py --model runs/my_run
"""

import sys

from gpt2.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["eval", "hellaswag", *sys.argv[1:]]))
