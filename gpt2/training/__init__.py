"""Training GPT-2: `gpt2 train` as a library.

A run, in order: resolve the TrainingConfig (settings: defaults <- a checkpoint's saved config when
resuming <- a TOML file <- command-line fields) -> plan it (plan: every check that needs no writing)
-> the shell sets up the process (signals, process group, logging) -> the Trainer (loop) builds
model, optimizer (optim) and loaders, restores the trainer state (state) through the parallelism
strategy (parallel), and steps: gradient accumulation over micro-batches (step), the learning rate of
each step (schedule), periodic validation, HellaSwag and samples (periodic), and checkpoints.

    config.py    TrainingConfig, the quickstart preset
    settings.py  TOML / command line -> TrainingConfig
    plan.py      RunPlan: run directory, resume point, batch geometry, data checks
    corpus.py    --data FILE and the built-in quickstart corpus
    optim.py     the optimizer (AdamW, or Muon + AdamW) and its parameter groups
    muon.py      the Muon optimizer (Newton-Schulz orthogonalized momentum)
    schedule.py  learning rate (cosine, WSD) and batch size (warmup) of every step
    step.py      one optimizer step: forward/backward over micro-batches, clipping, the update
    state.py     the trainer state every checkpoint stores (loader, scaler, RNG, progress)
    parallel.py  Replicate (one process / DDP) and Shard (FSDP2): wrap, no_sync, save, load
    periodic.py  validation loss, HellaSwag, samples
    loop.py      Trainer: train / train_step / evaluate / checkpoint
    shell.py     main(): signals, process settings, the process group, exit codes
"""

from gpt2.training.config import BUILTIN_CORPUS, QUICKSTART, TrainingConfig
from gpt2.training.corpus import builtin_corpus, prepare_data
from gpt2.training.loop import NonFiniteLossError, Trainer, TrainResult, train
from gpt2.training.optim import MuonAdamW, build_optimizer, parameter_groups
from gpt2.training.plan import RunPlan, batch_geometry, plan_run, resolve_resume
from gpt2.training.schedule import lr_at, lr_factor, micro_steps
from gpt2.training.settings import build_config, convert_value, read_toml
from gpt2.training.shell import GracefulStop, keep_freed_memory, main

__all__ = [
    "BUILTIN_CORPUS",
    "QUICKSTART",
    "GracefulStop",
    "NonFiniteLossError",
    "RunPlan",
    "TrainResult",
    "Trainer",
    "TrainingConfig",
    "batch_geometry",
    "build_config",
    "build_optimizer",
    "builtin_corpus",
    "convert_value",
    "keep_freed_memory",
    "MuonAdamW",
    "lr_at",
    "lr_factor",
    "micro_steps",
    "parameter_groups",
    "main",
    "plan_run",
    "prepare_data",
    "read_toml",
    "resolve_resume",
    "train",
]
