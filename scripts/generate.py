"""Generate text from a GPT-2: `python scripts/generate.py ARGS` is `gpt2 generate ARGS` (same options).

python scripts/generate.py --model gpt2 --prompt "Hello, I'm a language model," --max-new-tokens 50 --top-k 50
python scripts/generate.py --model runs/quickstart --num-samples 4 --temperature 0.8
"""

import sys

from gpt2.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["generate", *sys.argv[1:]]))
