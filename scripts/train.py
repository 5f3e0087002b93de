"""Train a GPT-2: `python scripts/train.py ARGS` is `gpt2 train ARGS` (also under torchrun:
`torchrun --nproc_per_node=8 scripts/train.py --config configs/gpt2-124M-fineweb-edu.toml`)."""

import sys

from gpt2.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
