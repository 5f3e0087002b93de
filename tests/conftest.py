"""Shared fixtures: tiny random models, HF checkpoints made locally, paths to ../shared data."""

from __future__ import annotations

from pathlib import Path

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
def tiny_config() -> GPTConfig:
    return GPTConfig.from_name("tiny")


@pytest.fixture
def tiny_model(tiny_config) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config).eval()
