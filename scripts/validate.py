"""Compare a checkpoint with HuggingFace transformers: `python scripts/validate.py ARGS` is
`gpt2 validate ARGS` (same options; needs `pip install -e '.[hf]'`).

python scripts/validate.py --model gpt2
python scripts/validate.py --model runs/quickstart --atol 1e-4
"""

import sys

from gpt2.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["validate", *sys.argv[1:]]))
