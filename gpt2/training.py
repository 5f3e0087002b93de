"""Training GPT-2: the configuration, the learning-rate schedule and the loop.

A run, in order: resolve the TrainingConfig (defaults <- a checkpoint's saved config when resuming
<- a TOML file <- command-line fields) -> plan it (checks that need no writing: run directory,
resume point, batch geometry) -> build model, optimizer and loaders on this rank's device -> step:
gradient accumulation over micro-batches (DDP synchronizes only on the last one), clip, AdamW ->
periodically validation loss, HellaSwag, samples and checkpoints.

The same code runs on one CPU, one GPU, or N processes under torchrun (gpt2.distributed).
On CPU in float32 a resumed run reproduces the uninterrupted run's losses bit for bit: the
checkpoint holds the weights (safetensors keep every bit), the optimizer state, the data loader's
position and every rank's RNG state.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import signal
import sys
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt2.checkpoint import (
    CHECKPOINTS,
    CONFIG_FILE,
    STATE_FORMAT,
    checkpoint_model_config,
    checkpoint_name,
    find_checkpoint,
    load_train_config,
    load_trainer_state,
    load_weights,
    prune_checkpoints,
    save_checkpoint,
)
from gpt2.config import GPTConfig
from gpt2.distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier
from gpt2.metrics import (
    METRICS_FILE,
    RunLogger,
    environment_info,
    flops_per_token,
    mfu,
    peak_flops,
    plot_run,
    truncate_metrics,
)
from gpt2.model import GPT
from gpt2.ops import attention_backends

BUILTIN_CORPUS = "builtin:python-docs"


# ---------------------------------------------------------------------------------------------
# Configuration


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
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
    # optimizer and schedule
    max_lr: float = _f(6e-4, "peak learning rate (GPT-3 small)")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of max_lr")
    warmup_steps: int = _f(715, "linear warmup steps (375M tokens, as GPT-3)")
    max_steps: int = _f(19073, "optimizer steps (19073 x 0.5M = 10B tokens, one epoch of FineWeb-Edu 10B)")
    weight_decay: float = _f(0.1, "AdamW weight decay, on 2-D parameters (matmuls, embeddings) only")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: no clipping)")
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
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps")
    dtype: str = _f(
        "auto", "autocast dtype: auto (bf16 on GPUs that support it, else fp16; fp32 on CPU), fp32, bf16, fp16"
    )
    compile: bool | None = _f(None, "torch.compile the model (default: on for CUDA)")
    parallelism: str = _f("ddp", "ddp (replicate the model) or fsdp (shard it with FSDP2; for models DDP cannot fit)")
    activation_checkpointing: bool = _f(
        False, "fsdp: recompute each block in backward (less memory, ~30% more compute)"
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
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "eval_interval", "hellaswag_interval", "sample_interval")
        non_negative += ("checkpoint_interval", "keep_last_k", "weight_decay", "grad_clip")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.max_lr > 0:
            raise ValueError(f"max_lr must be > 0, got {self.max_lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise ValueError(f"need 0 <= beta1, beta2 < 1 and eps > 0, got {self.beta1}, {self.beta2}, {self.eps}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.parallelism not in ("ddp", "fsdp"):
            raise ValueError(f"parallelism must be ddp or fsdp, got {self.parallelism!r}")
        if self.activation_checkpointing and self.parallelism != "fsdp":
            raise ValueError("activation_checkpointing needs --parallelism fsdp")
        if self.parallelism == "fsdp" and self.dtype == "fp16":
            raise ValueError("fsdp trains in bf16 or fp32; use --dtype bf16 or fp32")
        if self.hellaswag_limit is not None and self.hellaswag_limit < 1:
            raise ValueError(f"hellaswag_limit must be >= 1 (or unset for all), got {self.hellaswag_limit}")
        self.model_config()  # unknown preset or impossible shape -> ValueError
        block = self.model_config().block_size
        if self.seq_len > block:
            raise ValueError(
                f"seq_len {self.seq_len} exceeds the model's block_size {block}; "
                f"lower --seq_len to {block} or raise --block_size to {self.seq_len}"
            )

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
            lines.append(f"# {f.name} = (unset)" if value is None else f"{f.name} = {_toml_value(value)}")
        return "\n".join(lines)


MODEL_OVERRIDES = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout")
DTYPE_NAMES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES |= {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a TOML basic string is a JSON string for the characters we write


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainingConfig)


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(the non-None type, whether None is allowed) of a field annotation like `int | None`."""
    args = typing.get_args(annotation)
    if args:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return annotation, False


def convert_value(name: str, value: Any, source: str) -> Any:
    """A config value of the field's type, from TOML (typed) or the command line (a string)."""
    types = _field_types()
    if name not in types:
        raise ValueError(unknown_field_message(name, source))
    kind, optional = _base_type(types[name])
    where = f"{name} in {source}"
    if value is None:  # JSON null (a saved config); TOML has no null
        if optional:
            return None
        raise ValueError(f"{where} must be set, got null")
    unset_words = ("none", "null", "auto") if kind is bool else ("none", "null")  # compile = "auto"
    if isinstance(value, str) and optional and value.strip().lower() in unset_words:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                return int(text)
            except ValueError:
                pass
            try:  # 5e5, 2**19
                number = float(eval(text, {"__builtins__": {}}, {})) if "**" in text else float(text)
            except Exception:
                number = math.nan
            if math.isfinite(number) and number == int(number):
                return int(number)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{where} must be a whole number, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise ValueError(f"{where} must be a number, got {value!r}")
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}")
    return value


def unknown_field_message(name: str, source: str) -> str:
    names = [f.name for f in fields(TrainingConfig)]
    close = difflib.get_close_matches(name.replace("-", "_"), names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown training setting {name!r} in {source}; {hint}(`gpt2 train --help` lists them all)"


def read_toml(path: str | Path) -> dict[str, Any]:
    """A flat TOML file of TrainingConfig fields (tables are flattened: [model] n_layer = 12 works too)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            if isinstance(v, dict):
                raise ValueError(f"{path}: nested table {key}.{k} is not supported; settings are flat")
            flat[k.replace("-", "_")] = v
    return flat


def build_config(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    quickstart: bool = False,
) -> TrainingConfig:
    """The resolved config: defaults <- quickstart preset <- the resumed checkpoint's saved config
    <- config_file <- overrides (command-line strings or typed values). Unknown names are errors."""
    values: dict[str, Any] = dict(QUICKSTART) if quickstart else {}
    from_file = {}
    if config_file is not None:
        source = str(config_file)
        from_file = {k: convert_value(k, v, source) for k, v in read_toml(config_file).items()}
    from_cli = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    from_cli = {k: convert_value(k, v, "the command line") for k, v in from_cli.items()}
    resume = from_cli.get("resume", from_file.get("resume", values.get("resume")))
    explicit_out = from_cli.get("out_dir", from_file.get("out_dir"))
    if resume is not None:
        out_dir = explicit_out or values.get("out_dir", TrainingConfig.out_dir)
        run_dir, ckpt = resolve_resume(resume, out_dir)
        if ckpt is not None:
            saved = load_train_config(ckpt)
            # settings of older versions that no longer exist are dropped; where the run lives is decided here
            saved = {k: v for k, v in saved.items() if k in _field_types() and k not in ("resume", "out_dir")}
            values.update({k: convert_value(k, v, str(ckpt / CONFIG_FILE)) for k, v in saved.items()})
        if resume != "auto":
            if explicit_out is not None and Path(explicit_out).expanduser().resolve() != run_dir.resolve():
                raise ValueError(f"--resume {resume} continues the run in {run_dir}; drop --out_dir {explicit_out}")
            values["out_dir"] = str(run_dir)
    values.update(from_file)
    values.update(from_cli)
    return TrainingConfig(**values)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule (its one home)


def lr_at(step: int, cfg: TrainingConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup from max_lr/warmup_steps to
    max_lr over warmup_steps, then cosine decay to min_lr_ratio * max_lr at max_steps (held after)."""
    max_lr, min_lr = cfg.max_lr, cfg.max_lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps or cfg.max_steps == cfg.warmup_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


# ---------------------------------------------------------------------------------------------
# Planning: every check that needs no writing


@dataclass
class RunPlan:
    """A checked run: its config, directory, the checkpoint it continues (if any) and its geometry."""

    config: TrainingConfig
    run_dir: Path
    resume_from: Path | None
    grad_accum_steps: int
    world_size: int

    @property
    def start_step(self) -> int:
        """Optimizer steps already done (the resumed checkpoint's step), else 0."""
        return int(self.resume_from.name.removeprefix("step_")) if self.resume_from is not None else 0


def run_exists(run_dir: Path) -> bool:
    """Whether run_dir already holds a training run (we never overwrite one)."""
    return any((run_dir / name).exists() for name in (CHECKPOINTS, METRICS_FILE, CONFIG_FILE))


def resolve_resume(resume: str, out_dir: str | Path) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to load or None) for --resume auto | RUN_DIR | CHECKPOINT_DIR."""
    if resume == "auto":
        run_dir = Path(out_dir).expanduser()
        return run_dir, find_checkpoint(run_dir) if run_dir.is_dir() else None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such run or checkpoint directory")
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(
            f"--resume {resume}: no checkpoint in {path / CHECKPOINTS}; nothing to resume "
            "(start a new run with another --out_dir, or --resume auto to start it if empty)"
        )
    run_dir = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else path
    return run_dir, ckpt


def batch_geometry(cfg: TrainingConfig, world_size: int) -> int:
    """Micro-steps per optimizer step; ValueError naming the nearest valid sizes if it does not divide."""
    per_micro = cfg.micro_batch_size * cfg.seq_len * world_size
    if cfg.total_batch_size % per_micro == 0:
        return cfg.total_batch_size // per_micro
    lower = max(per_micro, cfg.total_batch_size // per_micro * per_micro)
    upper = lower + per_micro if lower < cfg.total_batch_size else lower
    raise ValueError(
        f"total_batch_size {cfg.total_batch_size:,} is not divisible by micro_batch_size*seq_len*world_size = "
        f"{cfg.micro_batch_size}*{cfg.seq_len}*{world_size} = {per_micro:,}; "
        f"nearest valid total_batch_size: {lower:,} or {upper:,}"
    )


def plan_run(cfg: TrainingConfig, world_size: int = 1) -> RunPlan:
    """Check a run before anything is written: run directory, resume point, batch geometry."""
    accum = batch_geometry(cfg, world_size)
    out_dir = Path(cfg.out_dir).expanduser()
    resume_from = None
    if cfg.resume is None:
        if out_dir.is_file():
            raise FileExistsError(f"out_dir {out_dir} is a file; choose a directory with --out_dir")
        if run_exists(out_dir):
            raise FileExistsError(
                f"{out_dir} already holds a training run; continue it with --resume {out_dir} "
                "(or --resume auto), or start a new one with another --out_dir"
            )
        run_dir = out_dir
    else:
        run_dir, resume_from = resolve_resume(cfg.resume, out_dir)
        if cfg.resume != "auto" and run_dir.resolve() != out_dir.resolve():
            raise ValueError(
                f"--resume {cfg.resume} continues the run in {run_dir}, but out_dir is {out_dir}; drop --out_dir"
            )
        if resume_from is not None:
            saved = checkpoint_model_config(resume_from)
            differ = saved.diff(cfg.model_config())
            if differ:
                raise ValueError(
                    f"cannot resume {resume_from}: the model config differs from the checkpoint's "
                    f"({'; '.join(d.replace(' != ', ' (checkpoint) != ') + ' (now)' for d in differ)}); "
                    "drop the model overrides or start a new run"
                )
    cfg.out_dir = str(run_dir)
    return RunPlan(config=cfg, run_dir=run_dir, resume_from=resume_from, grad_accum_steps=accum, world_size=world_size)


# ---------------------------------------------------------------------------------------------
# Stopping on SIGINT / SIGTERM


class GracefulStop:
    """While active, SIGINT/SIGTERM ask the loop to stop after the current step (it saves a
    checkpoint first). A second Ctrl-C aborts at once; further SIGTERMs (torchrun forwards one
    after a Ctrl-C) are ignored while the save runs."""

    def __init__(self, notify: Callable[[str], None] | None = None) -> None:
        self.signum: int | None = None
        self.notify = notify
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as a signal would (also used by tests and callers without signals)."""
        if self.signum is None:
            self.signum = signum

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT and self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self.notify is not None:
            name = signal.Signals(signum).name
            self.notify(f"{name}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ---------------------------------------------------------------------------------------------
# Building blocks


def autocast_dtype_for(device: torch.device, name: str) -> torch.dtype | None:
    """The autocast dtype: bf16 on GPUs that support it, else fp16; none (fp32) on CPU and MPS."""
    dtype = DTYPE_NAMES[name]
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None if dtype == torch.float32 else dtype


def build_optimizer(model: nn.Module, cfg: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D parameters (matmul weights, embeddings) and none on biases and
    LayerNorm gains; fused kernels on CUDA, the multi-tensor (foreach) path elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def builtin_corpus() -> str:
    """The quickstart corpus: CPython's documentation topics (`pydoc_data.topics`, about 465 kB of
    English about Python, ~139k GPT-2 tokens), which ships with every Python install, as JSON lines."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise FileNotFoundError(
            "this Python has no pydoc_data (its documentation topics were stripped); pass --data FILE.txt"
        ) from e
    return "".join(json.dumps({"text": topics[k].strip()}) + "\n" for k in sorted(topics))


def prepare_data(spec: str, run_dir: Path, log: Callable[[str], None]) -> Path:
    """Tokenize --data (a file, or the built-in corpus) into run_dir/data once; return that directory."""
    from gpt2.prepare import MANIFEST, prepare

    out = run_dir / "data"
    if (out / MANIFEST).is_file() and json.loads((out / MANIFEST).read_text()).get("complete"):
        return out  # prepared by an earlier start of this run
    if spec == BUILTIN_CORPUS:
        source = run_dir / "corpus" / "python-docs.jsonl"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(builtin_corpus(), encoding="utf-8")
        log(f"data: {BUILTIN_CORPUS} = CPython's documentation topics (pydoc_data), written to {source}")
    else:
        source = Path(spec).expanduser()
        if not source.is_file():
            raise FileNotFoundError(f"--data {spec}: no such file; pass a .txt/.jsonl file or {BUILTIN_CORPUS}")
    small = source.stat().st_size < (64 << 20)
    result = prepare([str(source)], out, workers=1 if small else None, log=log)
    log(f"data: tokenized {source} into {out}: {result.train_tokens:,} train + {result.val_tokens:,} val tokens")
    return out


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    """How a run ended."""

    step: int  # optimizer steps done
    last_loss: float | None
    checkpoint: Path | None  # the newest checkpoint written
    stopped_by: int | None = None  # the signal that stopped it early, if any
    val_loss: float | None = None


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (the run stops; the last good checkpoint is kept)."""


def _due(step: int, interval: int, last: bool) -> bool:
    return interval > 0 and (step % interval == 0 or last)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(plan: RunPlan, info: DistInfo, log: RunLogger, stop: GracefulStop | None = None) -> TrainResult:
    """Run (or continue) the training described by `plan` on this process; every rank calls it."""
    cfg, run_dir = plan.config, plan.run_dir
    device = info.device
    is_main = info.is_main
    stop = stop or GracefulStop()

    # Data first: preparing it may take a while, and every check below needs it.
    if cfg.data is not None:
        if is_main:
            cfg.data_root = str(prepare_data(cfg.data, run_dir, log.info))
        barrier()
        cfg.data_root = str(run_dir / "data")
    model_config = cfg.model_config()
    _check_data(cfg, model_config)

    env = environment_info(device) if is_main else {}
    if is_main:
        log.info("config:\n" + cfg.to_toml())
        log.info("run: " + ", ".join(f"{k}={v}" for k, v in env.items() if v is not None))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")

    from gpt2.data import DataLoaderLite, LoaderConfig

    # Same initial weights everywhere (DDP also broadcasts rank 0's), then a different stream per rank.
    torch.manual_seed(cfg.seed)
    raw_model = GPT(model_config).to(device)
    torch.manual_seed(cfg.seed + info.rank)
    if device.type == "cuda":
        torch.cuda.manual_seed(cfg.seed + info.rank)
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left

    amp_dtype = autocast_dtype_for(device, cfg.dtype)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    fsdp = cfg.parallelism == "fsdp"
    if fsdp:  # shard before building the optimizer, so it holds the sharded parameters
        if not info.distributed:
            raise ValueError("parallelism fsdp needs torchrun (even --nproc_per_node=1)")
        from gpt2.fsdp import shard_model

        if use_compile:  # per block, before sharding, so FSDP's hooks stay outside the graphs
            for block in raw_model.transformer.h:
                block.compile()
        shard_model(
            raw_model,
            mixed_precision=amp_dtype == torch.bfloat16,
            activation_checkpointing=cfg.activation_checkpointing,
        )
    optimizer = build_optimizer(raw_model, cfg, device)

    loader_kwargs = dict(
        batch_size=cfg.micro_batch_size,
        seq_len=cfg.seq_len,
        process_rank=info.rank,
        world_size=info.world_size,
        master_process=is_main,
    )
    train_loader = DataLoaderLite(
        LoaderConfig(cfg.data_root, split="train", shuffle=cfg.shuffle, seed=cfg.seed, **loader_kwargs),
        device=device,
        log=log.info,
    )
    val_loader = None
    if cfg.eval_interval > 0:
        try:
            val_loader = DataLoaderLite(LoaderConfig(cfg.data_root, split="val", **loader_kwargs), device=device)
        except FileNotFoundError:
            log.info(f"note: no val shards in {cfg.data_root}; validation loss is skipped")

    start_step = 0
    if plan.resume_from is not None:
        from gpt2.fsdp import is_sharded_checkpoint, load_sharded

        if is_sharded_checkpoint(plan.resume_from):  # FSDP's DCP checkpoint: reshards to this world size
            state = load_sharded(plan.resume_from, raw_model, optimizer)
        elif fsdp:
            raise ValueError(f"{plan.resume_from} was saved by a ddp run; resume it with --parallelism ddp")
        else:
            state = load_trainer_state(plan.resume_from)
            load_weights(raw_model, plan.resume_from)
            optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        train_loader.load_state_dict(state["loader"])
        rng = state.get("rng", [])
        if len(rng) == info.world_size:
            _set_rng_state(rng[info.rank], device)
        else:
            torch.manual_seed(cfg.seed + info.rank + 1_000_003 * state["step"])
            log.info(f"note: checkpoint from {len(rng)} process(es), now {info.world_size}: RNG streams re-seeded")
        start_step = int(state["step"])
        log.info(f"resumed from {plan.resume_from} at step {start_step}")
        log.log_event({"event": "resume", "step": start_step, "checkpoint": str(plan.resume_from)})
    else:
        log.log_event({"event": "start", "world_size": info.world_size, **env})

    # Compile first, then wrap in DDP (nanoGPT's order). Evaluation, HellaSwag and sampling run the
    # plain module: no second compilation for no-grad/eval mode or for their many shapes, and no
    # DDP hooks. Checkpoints always come from raw_model, so they carry no _orig_mod./module. prefixes.
    model: nn.Module = torch.compile(raw_model) if use_compile and not fsdp else raw_model
    ddp = None
    if info.distributed and info.world_size > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids)
        model = ddp

    hellaswag = _load_hellaswag(cfg, log)
    from gpt2.tokenizer import Tokenizer

    tokenizer = Tokenizer()
    prompt = tokenizer.encode(cfg.sample_prompt)
    if cfg.sample_interval > 0 and (not prompt or max(prompt) >= model_config.vocab_size):
        log.info(f"note: the sample prompt does not fit the model's vocabulary ({model_config.vocab_size}); no samples")
        prompt = []

    n_params = raw_model.num_params()
    fpt = flops_per_token(model_config, raw_model.num_params(non_embedding=True), cfg.seq_len)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if is_main:
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}
        log.info(
            f"model: {cfg.model} {n_params:,} parameters | {info.world_size} process(es) on {device.type} | "
            f"{precision[amp_dtype]} | compile {'on' if use_compile else 'off'} | "
            f"{cfg.total_batch_size:,} tokens/step = {cfg.micro_batch_size} x {cfg.seq_len} x {info.world_size} "
            f"x {plan.grad_accum_steps} accumulation"
        )
        if device.type == "cuda" and peak is None:
            log.info(f"note: unknown peak FLOP/s for {torch.cuda.get_device_name(device)}; MFU is not reported")

    accum = plan.grad_accum_steps
    last_loss: float | None = None
    last_val: float | None = None
    last_ckpt: Path | None = None
    phase = "setup"

    def checkpoint(step: int) -> Path | None:
        rng = all_gather_objects(_rng_state(device))
        path = None
        if fsdp:  # every rank writes its shard; rank 0 the metadata and the rename
            from gpt2.fsdp import save_sharded

            extra = {"step": step, "scaler": None, "loader": train_loader.state_dict(), "rng": rng}
            extra.update(world_size=info.world_size, tokens_seen=step * cfg.total_batch_size, parallelism="fsdp")
            path = save_sharded(
                run_dir / "checkpoints" / checkpoint_name(step),
                raw_model,
                optimizer,
                {"format": STATE_FORMAT, **extra},
                json_files={CONFIG_FILE: cfg.to_dict()},
            )
            if is_main:
                if cfg.keep_last_k:
                    prune_checkpoints(run_dir, cfg.keep_last_k)
                log.info(f"saved sharded checkpoint {path}")
        elif is_main:
            trainer_state = {
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "loader": train_loader.state_dict(),
                "rng": rng,
                "world_size": info.world_size,
                "tokens_seen": step * cfg.total_batch_size,
            }
            path = save_checkpoint(run_dir, step, raw_model, trainer_state, cfg.to_dict(), keep_last_k=cfg.keep_last_k)
            log.info(f"saved checkpoint {path}")
        barrier()  # no rank leaves (and lets torchrun tear down the group) before the save is done
        return path

    log.start(start_step, cfg.max_steps)
    try:
        for step in range(start_step, cfg.max_steps + 1):
            last = step == cfg.max_steps
            # -- evaluation of the weights after `step` updates ------------------------------------
            record: dict[str, Any] = {}
            if val_loader is not None and _due(step, cfg.eval_interval, last):
                phase = "validation"
                from gpt2.evaluation import evaluate_loss

                last_val = evaluate_loss(raw_model, val_loader, cfg.val_steps, autocast_dtype=amp_dtype)
                record["val_loss"] = last_val
            if hellaswag and _due(step, cfg.hellaswag_interval, last):
                phase = "hellaswag"
                from gpt2.evaluation import evaluate_hellaswag

                # Under fsdp every rank must run the same forwards (they gather parameters together),
                # so each scores all examples instead of its share.
                result = evaluate_hellaswag(
                    raw_model,
                    hellaswag,
                    batch_size=cfg.hellaswag_batch_size,
                    device=device,
                    autocast_dtype=amp_dtype,
                    rank=0 if fsdp else info.rank,
                    world_size=1 if fsdp else info.world_size,
                )
                record.update(hellaswag_acc=result["acc"], hellaswag_acc_norm=result["acc_norm"])
            if record:
                log.log_eval({"step": step, **record})
            if prompt and _due(step, cfg.sample_interval, last):
                phase = "sampling"
                sampler = raw_model
                if fsdp:  # a collective: every rank gathers, rank 0 gets a plain copy
                    from gpt2.fsdp import gather_full_model

                    sampler = gather_full_model(raw_model)
                    sampler = sampler.to(device) if sampler is not None else None
                if is_main:
                    for i, text in enumerate(_samples(sampler, tokenizer, prompt, cfg, step, device)):
                        log.info(f"sample {i}: {text!r}")
            if last:
                break

            # -- one optimizer step -----------------------------------------------------------------
            phase = "training"
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, grad_norm = _forward_backward(model, ddp, optimizer, scaler, train_loader, accum, amp_dtype, cfg)
            # One collective for the logged loss and the stop request, so every rank agrees on both.
            shared = torch.stack([loss_sum.float(), torch.tensor(float(stop.requested), device=device)])
            loss_value, stop_votes = (
                all_reduce_sum(shared) / torch.tensor([info.world_size, 1], device=device)
            ).tolist()
            norm_value = float(grad_norm)
            if not math.isfinite(loss_value) or (scaler is None and not math.isfinite(norm_value)):
                what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {norm_value}"
                raise NonFiniteLossError(
                    f"{what} at step {step}: training stopped; the last good checkpoint is "
                    f"{last_ckpt or _newest_checkpoint(run_dir) or '(none yet)'}; lower --max_lr or raise "
                    "--warmup_steps and resume from it"
                )
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            last_loss = loss_value
            tokens_per_sec = cfg.total_batch_size / dt
            rec: dict[str, Any] = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": norm_value,
                "step_time": dt,
                "tokens_per_sec": tokens_per_sec,
                "tokens": (step + 1) * cfg.total_batch_size,
            }
            utilization = mfu(fpt, tokens_per_sec / info.world_size, peak if amp_dtype is not None else None)
            if utilization is not None:
                rec["mfu"] = utilization
            if device.type == "cuda":
                rec["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            log.log_train(rec)

            # -- checkpoint after step + 1 updates --------------------------------------------------
            done = step + 1
            stopping = stop_votes > 0
            if stopping or done == cfg.max_steps or (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0):
                phase = "checkpoint"
                last_ckpt = checkpoint(done) or last_ckpt
            if stopping:
                log.info(f"stopped at step {done}/{cfg.max_steps}; continue with: gpt2 train --resume {run_dir}")
                log.log_event({"event": "stop", "step": done})
                return TrainResult(done, last_loss, last_ckpt, stopped_by=stop.signum or signal.SIGTERM)
    except torch.cuda.OutOfMemoryError as e:
        raise RuntimeError(_oom_message(phase, cfg)) from e
    finally:
        log.end_progress()

    if is_main and cfg.plot:
        try:
            png = plot_run(run_dir)
            log.info(f"loss curve: {png}")
        except RuntimeError as e:  # matplotlib missing: say so, the run itself succeeded
            log.info(f"note: {e}")
    return TrainResult(cfg.max_steps, last_loss, last_ckpt, val_loss=last_val)


def _forward_backward(
    model: nn.Module,
    ddp: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    loader: Any,
    accum: int,
    amp_dtype: torch.dtype | None,
    cfg: TrainingConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one optimizer step's batch, accumulated over `accum` micro-batches and clipped;
    returns (this rank's mean loss, global gradient norm before clipping), both on the device."""
    device = next(model.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        x, y = loader.next_batch()  # (B, T), (B, T); already on CUDA, moved here for other devices (MPS)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # DDP all-reduces gradients in backward; only the last micro-step needs that.
        sync = ddp is None or micro == accum - 1
        with contextlib.nullcontext() if sync else ddp.no_sync():
            # The fast path on CUDA (benchmarks/NOTES.md): the loss chunk by chunk without (B, T, V)
            # logits, and cuDNN attention first. Same mathematics as model(x, y); on a CPU the chunked
            # loss measured ~30% slower, so it keeps the plain one.
            with (
                torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
                attention_backends("cudnn" if device.type == "cuda" else "default"),
            ):
                _, loss = model(x, y, return_logits=device.type != "cuda")
            loss = loss / accum  # the mean over the whole batch, not the sum of micro-batch means
            loss_sum += loss.detach()
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    return loss_sum, grad_norm


def _newest_checkpoint(run_dir: Path) -> Path | None:
    return find_checkpoint(run_dir) if run_dir.is_dir() else None


def _oom_message(phase: str, cfg: TrainingConfig) -> str:
    if phase == "hellaswag":
        return (
            f"CUDA out of memory in HellaSwag evaluation; lower --hellaswag_batch_size (now {cfg.hellaswag_batch_size})"
        )
    half = max(1, cfg.micro_batch_size // 2)
    return (
        f"CUDA out of memory during {phase} with micro_batch_size={cfg.micro_batch_size}, seq_len={cfg.seq_len}; "
        f"lower --micro_batch_size (e.g. {half}; gradient accumulation keeps total_batch_size the same)"
    )


def _check_data(cfg: TrainingConfig, model_config: GPTConfig) -> None:
    """One-line errors for a missing or empty data_root and for shards of another vocabulary."""
    from gpt2.data import find_shards, open_shard

    root = Path(cfg.data_root).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"data_root {root} does not exist; create shards with `gpt2 prepare SOURCE --out {root}`, "
            "or train on a text file with --data FILE.txt"
        )
    shards = find_shards(root, "train")
    for path in shards:
        _, vocab = open_shard(path)
        if vocab > model_config.vocab_size:
            raise ValueError(
                f"{path} holds token ids up to {vocab - 1} (vocab {vocab}) but the model's vocab_size is "
                f"{model_config.vocab_size}; these shards come from another tokenizer, re-create them with gpt2 prepare"
            )
    manifest = root / "manifest.json"
    if manifest.is_file():
        tok = json.loads(manifest.read_text(encoding="utf-8")).get("tokenizer", {})
        if tok.get("vocab_size", model_config.vocab_size) > model_config.vocab_size:
            raise ValueError(
                f"{root} was tokenized with vocab_size {tok['vocab_size']} but the model has "
                f"{model_config.vocab_size}; re-create the shards with gpt2 prepare"
            )


def _load_hellaswag(cfg: TrainingConfig, log: RunLogger) -> list:
    if cfg.hellaswag_interval <= 0:
        return []
    if cfg.hellaswag_path is None:
        log.info("note: HellaSwag skipped (set hellaswag_path to a hellaswag_val.jsonl, or 'download')")
        return []
    from gpt2.evaluation import load_hellaswag

    examples = load_hellaswag(None if cfg.hellaswag_path == "download" else cfg.hellaswag_path)
    if cfg.hellaswag_limit is not None:
        examples = examples[: cfg.hellaswag_limit]
    log.info(f"HellaSwag: {len(examples):,} examples every {cfg.hellaswag_interval} steps")
    return examples


def _samples(
    model: GPT, tokenizer, prompt: list[int], cfg: TrainingConfig, step: int, device: torch.device
) -> list[str]:
    """num_samples continuations of the prompt (top-k), from a generator seeded by step alone, so
    sampling never disturbs the training RNG and the same step samples the same text."""
    from gpt2.generation import generate_batch

    generator = torch.Generator(device=device).manual_seed(cfg.seed + step)
    was_training = model.training
    model.eval()
    try:
        # fast=False: the plain decode loop (no CUDA-graph capture in the middle of a training run)
        new = generate_batch(
            model,
            [prompt] * cfg.num_samples,
            cfg.sample_tokens,
            top_k=cfg.sample_top_k,
            generator=generator,
            fast=False,
        )
    finally:
        model.train(was_training)
    return [tokenizer.decode(prompt + row) for row in new]


def keep_freed_memory(device: torch.device) -> bool:
    """On a Linux (glibc) CPU, make malloc keep freed blocks instead of unmapping them.

    A CPU training step allocates and frees the same large tensors every step (the (B*T, V)
    logits alone are 200 MB at B*T = 1024). glibc serves blocks over 32 MB with mmap and unmaps
    them on free, so every step page-faults them in again: a third of the quickstart's time went
    to the kernel. With mmap off and trimming raised, freed blocks are reused: ~1.6x faster steps,
    at the price of keeping the peak memory mapped. Returns whether it applied.
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, ...): leave malloc alone
        return False


# ---------------------------------------------------------------------------------------------
# Entry point for the CLI and scripts


def main(cfg: TrainingConfig, env: Mapping[str, str], *, stream: Any = None) -> int:
    """Plan, set up distribution and logging, train; return the process exit code (0, or 128+signal
    when stopped by SIGINT/SIGTERM after saving). `env` is os.environ (torchrun's variables)."""
    from gpt2.distributed import destroy_distributed, init_distributed

    stream = stream if stream is not None else sys.stdout
    world_size = int(env.get("WORLD_SIZE", "1"))
    plan = plan_run(cfg, world_size)
    info = init_distributed(env, cfg.device)
    keep_freed_memory(info.device)
    log = None
    try:
        if info.is_main and cfg.resume is not None:  # (--resume auto without a checkpoint restarts at 0)
            truncate_metrics(plan.run_dir / METRICS_FILE, plan.start_step)  # before the logger appends to it
        log = RunLogger(
            plan.run_dir,
            enabled=info.is_main,
            stream=stream,
            tty=bool(getattr(stream, "isatty", lambda: False)()),
            log_interval=cfg.log_interval,
            tensorboard=cfg.tensorboard,
            wandb_project=cfg.wandb_project,
            wandb_run_name=cfg.wandb_run_name,
            config=cfg.to_dict(),
        )
        with GracefulStop(notify=log.info) as stop:
            result = train(plan, info, log, stop)
        if result.stopped_by is not None:
            return 128 + int(result.stopped_by)
        if info.is_main:
            ckpt = result.checkpoint or _newest_checkpoint(plan.run_dir)
            losses = [f"final loss {result.last_loss:.4f}"] if result.last_loss is not None else []
            losses += [f"val loss {result.val_loss:.4f}"] if result.val_loss is not None else []
            log.info(f"done: {result.step} steps, {', '.join(losses + [f'checkpoint {ckpt}'])}")
            prompt = json.dumps(cfg.sample_prompt)
            log.info(f"generate from it: gpt2 generate --model {plan.run_dir} --prompt {prompt} --top-k 50")
        return 0
    finally:
        if log is not None:
            log.close()
        destroy_distributed()


__all__ = [
    "GracefulStop",
    "QUICKSTART",
    "RunPlan",
    "TrainResult",
    "TrainingConfig",
    "build_config",
    "lr_at",
    "main",
    "plan_run",
    "train",
]
