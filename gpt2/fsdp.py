"""Deprecated path: FSDP2 moved to the training strategy that uses it (gpt2.training.parallel:
shard_model, mixed_precision_policy, gather_full_model), and sharded checkpoints are written and
read in one place, gpt2.checkpoint.sharded (save_sharded, load_sharded, consolidate, ...). Names
imported from here keep working for one release, with a warning."""

from __future__ import annotations

import warnings
from pathlib import Path

from gpt2._compat import moved

_SHARDED = "gpt2.checkpoint.sharded"
_PARALLEL = "gpt2.training.parallel"
__getattr__ = moved(
    __name__,
    {
        "checkpoint_config": f"{_SHARDED}:checkpoint_config",
        "consolidate": f"{_SHARDED}:consolidate",
        "is_sharded_checkpoint": f"{_SHARDED}:is_sharded_checkpoint",
        "load_sharded": f"{_SHARDED}:load_sharded",
        "read_extra_state": f"{_SHARDED}:read_extra_state",
        "save_sharded": f"{_SHARDED}:save_sharded",
        "gather_full_model": f"{_PARALLEL}:gather_full_model",
        "mixed_precision_policy": f"{_PARALLEL}:mixed_precision_policy",
        "shard_model": f"{_PARALLEL}:shard_model",
    },
)


def load_consolidated(directory: str | Path):
    """Deprecated: GPT.from_pretrained(directory) reads a sharded checkpoint into one plain GPT."""
    from gpt2.checkpoint.sharded import checkpoint_config, consolidate
    from gpt2.model import GPT

    warnings.warn(
        "gpt2.fsdp.load_consolidated goes away in the next release; use GPT.from_pretrained(directory)",
        DeprecationWarning,
        stacklevel=2,
    )
    return GPT.from_state_dict(checkpoint_config(directory), consolidate(directory), source=str(directory))
