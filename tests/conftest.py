"""Shared fixtures: tiny random models, HF checkpoints made locally, paths to ../shared data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2 import GPT, GPTConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(rel: str) -> Path:
    """A file under ../shared/data, or skip the test when it is absent (users' machines)."""
    path = SHARED / "data" / rel
    if not path.exists():
        pytest.skip(f"../shared/data/{rel} not present")
    return path


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a busy 2-core machine cannot stall an OpenMP barrier.
    Use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def pattern_data(tmp_path) -> Path:
    """Token shards of a repeating random pattern over a 128-token vocabulary (learnable, so a loss
    falls within a few steps): 3,000 val tokens and 26,100 train tokens in tmp_path/data."""
    from gpt2.data import write_shard

    root = tmp_path / "data"
    root.mkdir()
    stream = np.tile(np.random.default_rng(0).integers(0, 128, size=97), 300)
    write_shard(root / "t_val_000000.bin", stream[:3000], vocab_size=128)
    write_shard(root / "t_train_000001.bin", stream[3000:], vocab_size=128)
    return root


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig.from_name("tiny")


@pytest.fixture
def tiny_model(tiny_config) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config).eval()
