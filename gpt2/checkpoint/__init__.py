"""Training checkpoints: the run directory's layout, completeness and integrity rules (layout), its
history, branches and single writer (history), HF-format
checkpoints written by one process (full), and reading sharded DCP checkpoints (sharded; writing
them is gpt2.fsdp's)."""

from gpt2.checkpoint.full import (
    STATE_FORMAT,
    checkpoint_model_config,
    load_train_config,
    load_trainer_state,
    load_weights,
    save_checkpoint,
    write_trainer_files,
)
from gpt2.checkpoint.history import (
    RunLock,
    RunLockedError,
    begin_timeline,
    failed_start,
    holds_run,
    read_run_state,
    set_aside_failed_start,
    write_run_state,
)
from gpt2.checkpoint.layout import (
    CHECKPOINTS,
    METRICS,
    STATE_FILE,
    TRAIN_CONFIG,
    DamagedCheckpointError,
    check_checkpoint,
    checkpoint_dirs,
    checkpoint_name,
    checkpoint_step,
    find_checkpoint,
    is_checkpoint,
    is_sharded,
    latest_checkpoint,
    list_checkpoints,
    newest_intact,
    prune_checkpoints,
    seal_checkpoint,
    verified,
)

CONFIG_FILE = TRAIN_CONFIG  # the name gpt2.checkpoint used for train_config.json before the split

__all__ = [
    "DamagedCheckpointError",
    "RunLock",
    "RunLockedError",
    "begin_timeline",
    "check_checkpoint",
    "checkpoint_dirs",
    "failed_start",
    "newest_intact",
    "read_run_state",
    "seal_checkpoint",
    "set_aside_failed_start",
    "verified",
    "write_run_state",
    "CHECKPOINTS",
    "CONFIG_FILE",
    "METRICS",
    "STATE_FILE",
    "STATE_FORMAT",
    "TRAIN_CONFIG",
    "checkpoint_model_config",
    "checkpoint_name",
    "checkpoint_step",
    "find_checkpoint",
    "holds_run",
    "is_checkpoint",
    "is_sharded",
    "latest_checkpoint",
    "list_checkpoints",
    "load_train_config",
    "load_trainer_state",
    "load_weights",
    "prune_checkpoints",
    "save_checkpoint",
    "write_trainer_files",
]
