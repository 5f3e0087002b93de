"""TrainingConfig: every setting of a training run, in one frozen dataclass.

It is the single source of truth: TOML files and the command line only fill it
(gpt2.training.settings), the resolved config is printed once at the start of a run and stored with
every checkpoint, and nothing changes it during the run. Fields are grouped by concern (model, data,
batch, optimizer and schedule, periodic work, run); each group is a section of the TOML file and of
`gpt2 train --help`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from gpt2.config import GPTConfig
from gpt2.device import DTYPE_CHOICES, DTYPES

BUILTIN_CORPUS = "builtin:python-docs"
MODEL_OVERRIDES = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a training run needs. Defaults are build-nanogpt's GPT-2 124M recipe on FineWeb-Edu 10B."""

    # model: a preset, optionally reshaped
    model: str = _f("gpt2", "model preset: gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny, mini, small-cpu")
    vocab_size: int | None = _f(None, "override the preset's vocab size (e.g. 50304, a multiple of 128, is faster)")
    block_size: int | None = _f(None, "override the preset's context length")
    n_layer: int | None = _f(None, "override the preset's number of layers")
    n_head: int | None = _f(None, "override the preset's number of heads")
    n_embd: int | None = _f(None, "override the preset's width")
    dropout: float | None = _f(None, "override the preset's dropout (0 for pretraining)")
    # data
    data_root: str = _f("edu_fineweb10B", "directory of token shards (*_train_*.bin, *_val_*.bin) from gpt2 prepare")
    data: str | None = _f(
        None, f"a text/jsonl file to tokenize into OUT_DIR/data first (or {BUILTIN_CORPUS}); replaces data_root"
    )
    shuffle: bool = _f(False, "shuffle shard and chunk order every epoch (the seed reads in order)")
    # batch: total_batch_size tokens per optimizer step = micro_batch_size * seq_len * world_size * accumulation
    total_batch_size: int = _f(524288, "tokens per optimizer step (2**19, about 0.5M, as GPT-3 small)")
    micro_batch_size: int = _f(64, "sequences per forward/backward pass on each process")
    seq_len: int = _f(1024, "tokens per sequence (at most the model's block_size)")
    # optimizer
    optimizer: str = _f("adamw", "adamw (every parameter), or muon (the blocks' matrices; AdamW for the rest)")
    max_lr: float = _f(6e-4, "peak learning rate of AdamW (GPT-3 small)")
    weight_decay: float = _f(0.1, "AdamW weight decay, on 2-D parameters (matmuls, embeddings) only")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: no clipping)")
    muon_lr: float = _f(3.6e-3, "muon: peak learning rate of the blocks' matrices (units set by muon_adjust_lr)")
    muon_momentum: float = _f(0.95, "muon: momentum")
    muon_nesterov: bool = _f(True, "muon: Nesterov momentum")
    muon_weight_decay: float = _f(0.0, "muon: decoupled weight decay of the blocks' matrices")
    muon_adjust_lr: str = _f(
        "match_rms_adamw", "muon: match_rms_adamw (update RMS as AdamW's: AdamW-sized lr), spectral, or none"
    )
    muon_split_qkv: bool = _f(True, "muon: orthogonalize c_attn's query, key and value matrices separately")
    muon_split_heads: bool = _f(False, "muon: orthogonalize each head's query and key on its own (with split_qkv)")
    muon_normuon: bool = _f(False, "muon: NorMuon: divide each neuron's orthogonalized update by its running RMS")
    muon_normuon_beta2: float = _f(0.95, "muon: NorMuon's second-moment decay")
    muon_cautious_wd: bool = _f(False, "muon: decay only where the update and the weight agree in sign (cautious)")
    muon_ns_coefficients: str = _f("quintic", "muon: Newton-Schulz coefficients: quintic (Keller's) or polar_express")
    muon_momentum_warmup_steps: int = _f(0, "muon: ramp the momentum from muon_momentum_start over N steps (0: off)")
    muon_momentum_start: float = _f(0.85, "muon: momentum at step 0 of the momentum warmup")
    embedding_lr: float | None = _f(None, "muon: AdamW lr of the tied token embedding / LM head (unset: max_lr)")
    embedding_weight_decay: float | None = _f(None, "muon: its weight decay (unset: weight_decay)")
    embedding_beta1: float | None = _f(None, "muon: its AdamW beta1 (unset: beta1)")
    position_lr: float | None = _f(None, "muon: AdamW lr of the position embeddings (unset: max_lr)")
    position_weight_decay: float | None = _f(None, "muon: their weight decay (unset: weight_decay)")
    scalar_lr: float | None = _f(None, "muon: AdamW lr of biases and LayerNorm parameters (unset: max_lr)")
    scalar_weight_decay: float = _f(0.0, "muon: their weight decay")
    # schedule
    lr_schedule: str = _f("cosine", "cosine (to min_lr_ratio at max_steps), or wsd (warmup, stable, decay)")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = _f(715, "linear warmup steps (375M tokens, as GPT-3)")
    max_steps: int = _f(19073, "optimizer steps (19073 x 0.5M = 10B tokens, one epoch of FineWeb-Edu 10B)")
    decay_fraction: float = _f(0.2, "wsd: decay over this last fraction of max_steps")
    decay_shape: str = _f("linear", "wsd: linear, or sqrt (1 - sqrt of the decay's progress)")
    batch_warmup_steps: int = _f(0, "grow tokens per step linearly over the first N steps (0: off)")
    batch_warmup_tokens: int = _f(65536, "batch warmup: tokens per step at step 0 (lr scaled by sqrt of the ratio)")
    seq_len_warmup_steps: int = _f(0, "train on shorter sequences first, doubling up to seq_len over N steps (0: off)")
    seq_len_warmup_start: int = _f(256, "sequence-length warmup: tokens per sequence at step 0 (seq_len / 2**k)")
    weight_ema: float = _f(0.0, "final weights = an EMA of the weights from ema_start on, this decay (0: off)")
    ema_start: float = _f(0.5, "weight averaging starts after this fraction of max_steps")
    # periodic work (intervals in optimizer steps; 0 = never; each also runs after the last step)
    eval_interval: int = _f(250, "validation loss every N steps")
    val_steps: int = _f(20, "validation batches (micro_batch_size x seq_len each, per process)")
    hellaswag_interval: int = _f(250, "HellaSwag accuracy every N steps (needs hellaswag_path)")
    hellaswag_path: str | None = _f(None, "HellaSwag validation .jsonl, or 'download' (cached); unset: skipped")
    hellaswag_limit: int | None = _f(None, "evaluate only the first N HellaSwag examples")
    hellaswag_batch_size: int = _f(16, "HellaSwag examples (4 rows each) per forward pass")
    sample_interval: int = _f(250, "print samples every N steps")
    num_samples: int = _f(4, "samples per sampling round")
    sample_tokens: int = _f(32, "new tokens per sample")
    sample_top_k: int = _f(50, "sample from the top-k tokens")
    sample_prompt: str = _f("Hello, I'm a language model,", "the fixed prompt samples continue")
    checkpoint_interval: int = _f(5000, "save a checkpoint every N steps (and after the last)")
    keep_last_k: int = _f(3, "keep only the newest K checkpoints (0: keep all)")
    # run
    out_dir: str = _f("runs/gpt2-124M", "run directory: metrics.jsonl, checkpoints/, plots")
    resume: str | None = _f(None, "continue a run: a run directory, a checkpoint directory, or 'auto' (out_dir)")
    seed: int = _f(1337, "random seed (model init; each process adds its rank for dropout)")
    device: str = _f("auto", "auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N, mps")
    dtype: str = _f(
        "auto",
        "compute precision, as autocast (weights stay fp32): auto (bf16 on GPUs that support it, else fp16; "
        "fp32 on CPU and MPS), fp32, bf16, fp16",
    )
    compile: bool | None = _f(None, "torch.compile the model (default: on for CUDA)")
    train_kernels: str = _f(
        "auto", "auto (the faster step measured: PyTorch today), fused (gpt2.kernels' Triton MLP: less memory), torch"
    )
    parallelism: str = _f("ddp", "ddp (replicate the model) or fsdp (shard it with FSDP2; for models DDP cannot fit)")
    activation_checkpointing: bool = _f(
        False, "fsdp: recompute each block in backward (less memory, ~30% more compute)"
    )
    dist_timeout_s: int = _f(
        600, "seconds a collective waits for a stalled or dead rank before every rank stops with an error"
    )
    log_interval: int = _f(10, "print a line every N steps (metrics.jsonl gets every step)")
    tensorboard: bool = _f(True, "also log to OUT_DIR/tensorboard when tensorboard is installed")
    wandb_project: str | None = _f(None, "log to this Weights & Biases project (needs wandb)")
    wandb_run_name: str | None = _f(None, "W&B run name")
    plot: bool = _f(True, "save OUT_DIR/loss.png at the end (needs matplotlib)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError (one line) for settings that cannot work, whatever the hardware."""
        positive = ("total_batch_size", "micro_batch_size", "seq_len", "max_steps", "val_steps")
        positive += ("hellaswag_batch_size", "num_samples", "sample_tokens", "sample_top_k", "log_interval")
        positive += ("dist_timeout_s",)
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "eval_interval", "hellaswag_interval", "sample_interval")
        non_negative += ("checkpoint_interval", "keep_last_k", "weight_decay", "grad_clip")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self._validate_optimizer()
        self._validate_levers()
        self._validate_runtime()
        block = self.model_config().block_size  # unknown preset or impossible shape -> ValueError
        if self.seq_len > block:
            raise ValueError(
                f"seq_len {self.seq_len} exceeds the model's block_size {block}; "
                f"lower --seq_len to {block} or raise --block_size to {self.seq_len}"
            )

    def _validate_optimizer(self) -> None:
        choose = {
            "optimizer": ("adamw", "muon"),
            "lr_schedule": ("cosine", "wsd"),
            "decay_shape": ("linear", "sqrt"),
            "muon_adjust_lr": ("match_rms_adamw", "spectral", "none"),
            "train_kernels": ("auto", "fused", "torch"),
        }
        for name, allowed in choose.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        for name in ("max_lr", "muon_lr", "embedding_lr", "position_lr", "scalar_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name in ("muon_weight_decay", "embedding_weight_decay", "position_weight_decay", "scalar_weight_decay"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0 and 0 <= self.muon_momentum < 1):
            raise ValueError(
                f"need 0 <= beta1, beta2, muon_momentum < 1 and eps > 0, got {self.beta1}, {self.beta2}, "
                f"{self.muon_momentum}, {self.eps}"
            )
        if self.batch_warmup_steps < 0 or self.batch_warmup_tokens < 1:
            raise ValueError("batch_warmup_steps must be >= 0 and batch_warmup_tokens >= 1")
        if self.optimizer == "muon" and self.parallelism == "fsdp":
            raise ValueError(
                "optimizer muon needs whole weight matrices and does not run under --parallelism fsdp; "
                "use --parallelism ddp, or --optimizer adamw with fsdp"
            )

    def _validate_levers(self) -> None:
        """The options of the faster recipes (docs/training.md, "Faster recipes")."""
        if self.muon_ns_coefficients not in ("quintic", "polar_express"):
            raise ValueError(
                f"unknown muon_ns_coefficients {self.muon_ns_coefficients!r}; choose one of quintic, polar_express"
            )
        for name in ("muon_normuon_beta2", "muon_momentum_start", "embedding_beta1", "weight_ema"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        for name in ("muon_momentum_warmup_steps", "seq_len_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.muon_split_heads and not self.muon_split_qkv:
            raise ValueError("muon_split_heads splits the query and key matrices further; it needs muon_split_qkv true")
        if not 0 <= self.ema_start <= 1:
            raise ValueError(f"ema_start is a fraction of max_steps, in [0, 1]; got {self.ema_start}")
        if self.weight_ema and self.parallelism == "fsdp":
            raise ValueError("weight_ema averages whole weights and does not run under --parallelism fsdp; use ddp")
        start, ratio = self.seq_len_warmup_start, self.seq_len // max(1, self.seq_len_warmup_start)
        if self.seq_len_warmup_steps and not (start * ratio == self.seq_len and ratio in (2, 4, 8, 16)):
            raise ValueError(
                f"seq_len_warmup_start must be seq_len / 2, / 4, / 8 or / 16 ({self.seq_len // 2}, "
                f"{self.seq_len // 4}, ... for seq_len {self.seq_len}), got {start}"
            )

    def _validate_runtime(self) -> None:
        if self.dtype not in DTYPE_CHOICES and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.parallelism not in ("ddp", "fsdp"):
            raise ValueError(f"parallelism must be ddp or fsdp, got {self.parallelism!r}")
        if self.activation_checkpointing and self.parallelism != "fsdp":
            raise ValueError("activation_checkpointing needs --parallelism fsdp")
        if self.parallelism == "fsdp" and self.dtype == "fp16":
            raise ValueError("fsdp trains in bf16 or fp32; use --dtype bf16 or fp32")
        if not 0 <= self.seed < 2**62:  # seed + rank, seed + step: still seeds torch and numpy take
            raise ValueError(f"seed must be in 0..{2**62 - 1}, got {self.seed}")
        if self.hellaswag_limit is not None and self.hellaswag_limit < 1:
            raise ValueError(f"hellaswag_limit must be >= 1 (or unset for all), got {self.hellaswag_limit}")

    def model_config(self) -> GPTConfig:
        """The GPTConfig of the model preset with this config's overrides."""
        overrides = {k: getattr(self, k) for k in MODEL_OVERRIDES if getattr(self, k) is not None}
        return GPTConfig.from_name(self.model, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_toml(self) -> str:
        """The config as TOML (unset values as comments), as printed at the start of a run."""
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            lines.append(f"# {f.name} = (unset)" if value is None else f"{f.name} = {toml_value(value)}")
        return "\n".join(lines)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a TOML basic string is a JSON string for the characters we write


# `gpt2 train --quickstart`: a small GPT on CPython's own documentation, ~3.5 minutes on 2 CPU cores.
# configs/quickstart.toml holds the same values (a test keeps them equal). Tuned on a 2-core EPYC:
# the 50257-row LM head dominates the cost, so the body is small; with ~250k tokens of budget,
# small batches (512 tokens, more updates) and lr 1e-3 gave the lowest validation loss.
QUICKSTART: dict[str, Any] = {
    "model": "mini",
    "data": BUILTIN_CORPUS,
    "out_dir": "runs/quickstart",
    "shuffle": True,
    "total_batch_size": 512,
    "micro_batch_size": 4,
    "seq_len": 128,
    "max_lr": 1e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 30,
    "max_steps": 480,
    "weight_decay": 0.1,
    "eval_interval": 120,
    "val_steps": 8,
    "hellaswag_interval": 0,
    "sample_interval": 120,
    "num_samples": 2,
    "sample_tokens": 40,
    "sample_prompt": "The",
    "checkpoint_interval": 240,
    "keep_last_k": 2,
    "compile": False,
    "log_interval": 20,
    "device": "auto",
}
