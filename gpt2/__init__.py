"""gpt2: a modular, fast, tested GPT-2 in PyTorch."""

from gpt2.config import GPTConfig
from gpt2.model import GPT
from gpt2.tokenizer import Tokenizer

__all__ = ["GPT", "GPTConfig", "Tokenizer"]
__version__ = "0.1.0"
