"""GPT-2 model configuration: one frozen dataclass, validated once, with named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

VOCAB_SIZE = 50257  # GPT-2's BPE vocabulary: 50,000 merges + 256 bytes + <|endoftext|>


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT-2 model. Field names are OpenAI's / HuggingFace's (n_ctx is block_size)."""

    block_size: int = 1024  # maximum sequence length (learned position embeddings)
    vocab_size: int = VOCAB_SIZE  # GPT-2's BPE tokens
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # residual stream width
    dropout: float = 0.0  # embedding, attention and residual dropout (0 for pretraining)
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has
    layer_norm_eps: float = 1e-5  # GPT-2's LayerNorm epsilon

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_head in {_divisors(self.n_embd)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head (hs)."""
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPTConfig:
        """A preset by name ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny", ...)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a dict, rejecting unknown keys with a clear message."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def diff(self, other: GPTConfig) -> list[str]:
        """Names of fields whose values differ, as 'name: a != b' strings."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


PRESETS: dict[str, GPTConfig] = {
    # OpenAI's four GPT-2 sizes (parameter counts with the tied embedding counted once).
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124,439,808
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 354,823,168
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774,030,080
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1,557,611,200
    # Small shapes for tests and CPU quickstarts; same vocabulary so the tokenizer fits.
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32),
    "mini": GPTConfig(block_size=256, n_layer=4, n_head=4, n_embd=128),
    "small-cpu": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=192),
}
