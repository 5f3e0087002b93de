"""GPT-2: token + position embeddings, n_layer pre-norm blocks, final LayerNorm, tied LM head.

Shape key (used in comments throughout the package):
    B  batch size            T  sequence length          C  n_embd (residual width)
    nh number of heads       hs head size (C // nh)      V  vocab_size
    S  KV-cache slots
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2.attention import Cache
from gpt2.block import Block
from gpt2.config import GPTConfig
from gpt2.ops import linear_cross_entropy

if TYPE_CHECKING:
    from gpt2.loading import ModelSource


class GPT(nn.Module):
    """The GPT-2 language model. Parameter names match OpenAI's / HuggingFace's checkpoints."""

    def __init__(self, config: GPTConfig, *, init: bool = True) -> None:
        """init=False: parameters left uninitialized, for weights about to be loaded into them."""
        super().__init__()
        self.config = config

        def embedding(rows: int) -> nn.Embedding:  # given its storage, it skips its own N(0, 1) draw
            return nn.Embedding(rows, config.n_embd, _weight=None if init else torch.empty(rows, config.n_embd))

        self.transformer = nn.ModuleDict(
            dict(
                wte=embedding(config.vocab_size),
                wpe=embedding(config.block_size),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017, as GPT-2): the output projection is the token embedding.
        self.lm_head.weight = self.transformer.wte.weight
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init, chosen by parameter name: N(0, 0.02) for embeddings and Linear weights;
        residual projections (`c_proj`) scaled by 1/sqrt(2 * n_layer) because each block adds
        two of them to the residual stream (GPT-2 paper, section 2.3); zero biases; LayerNorm
        at identity."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name:
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, the tied embedding counted once; optionally without position embeddings."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields tied tensors once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        cache: Cache | None = None,
        return_logits: bool = True,
    ) -> tuple[Tensor | None, Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and, given targets (B, T), the mean
        cross-entropy over all positions (targets == -1 are ignored), else None.

        positions (B, T) or (T,) default to 0..T-1; `cache` (gpt2.attention.Cache) is used by generation.
        return_logits=False with targets returns (None, loss), the loss computed chunk by chunk
        (gpt2.ops.linear_cross_entropy) so the (B, T, V) logits never exist: the training path.
        """
        x = self.hidden_states(idx, positions=positions, cache=cache)  # (B, T, C)
        if targets is not None and not return_logits:
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, ignore_index=-1)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx: Tensor, *, positions: Tensor | None = None, cache: Cache | None = None) -> Tensor:
        """idx (B, T) -> the final hidden states (B, T, C), after ln_f: what lm_head turns into
        logits. Serving uses it to compute logits only at the positions it needs."""
        B, T = idx.size()
        if positions is None:
            if T > self.config.block_size:
                raise ValueError(
                    f"sequence length {T} exceeds the model's context (block_size="
                    f"{self.config.block_size}); crop the input to its last {self.config.block_size} tokens"
                )
            positions = torch.arange(T, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(positions)  # (T, C) or (B, T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache)
        return self.transformer.ln_f(x)  # (B, T, C)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """Continue idx (B, T) by max_new_tokens; see gpt2.generation.generate for the options."""
        from gpt2.generation import generate

        return generate(self, idx, max_new_tokens, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | ModelSource,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **config_overrides,
    ) -> GPT:
        """Load OpenAI's GPT-2 ("gpt2" ... "gpt2-xl"), an HF-format directory, one of our checkpoints
        or a training run's current one (gpt2.loading says what a name means; a ModelSource it
        resolved is read as it is), with optional config overrides (e.g. dropout=0.1). The one place
        a GPT is built from disk."""
        from gpt2.loading import read_model

        config, state_dict, source = read_model(name_or_path)
        if config_overrides:
            config = GPTConfig.from_dict({**config.to_dict(), **config_overrides})
        return cls.from_state_dict(config, state_dict, source=source).to(device=device, dtype=dtype)

    @classmethod
    def from_state_dict(cls, config: GPTConfig, state_dict: dict[str, Tensor], *, source: str = "state dict") -> GPT:
        """GPT(config) holding the tensors of state_dict (GPT's names; the tied lm_head.weight may be
        left out), each checked against the config's shape (a one-line ValueError naming `source`
        otherwise), in the model's default float dtype. Tensors already contiguous and of that dtype
        become the parameters as they are (no copy: a consolidated gpt2-xl is not held twice)."""
        from gpt2.hf import TIED_KEY, load_state_dict_checked

        dtype = torch.get_default_dtype()
        sd = {
            k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
            for k, v in state_dict.items()
            if k != TIED_KEY
        }
        # no memory and no random init for weights about to be replaced (seconds for gpt2-xl); init=False
        # also keeps normal_ off the meta device, whose first call imports torch._dynamo (~1 s on a CPU)
        with torch.device("meta"):
            model = cls(config, init=False)
        load_state_dict_checked(model, sd, source, assign=True)
        model.lm_head.weight = model.transformer.wte.weight  # assign=True made them two Parameters: one again
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        """Write an HF-format directory (config.json, model.safetensors, tokenizer files)."""
        from gpt2.hf import save_pretrained

        save_pretrained(self, directory)


def unwrap_model(module: nn.Module) -> GPT:
    """The GPT inside torch.compile (`_orig_mod`) and DDP (`module`) wrappers (FSDP2 keeps the GPT itself)."""
    while not isinstance(module, GPT):
        inner = getattr(module, "_orig_mod", None)
        inner = inner if inner is not None else getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            raise ValueError(
                f"expected a gpt2.GPT (possibly compiled, DDP-wrapped or sharded), got {type(module).__name__}"
            )
        module = inner
    return module
