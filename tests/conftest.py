"""Shared fixtures: tiny random models, token shards, the engine's answers, paths to ../shared data.

Fixtures that return a function (make_tiny, make_pattern_shards, engine_tokens) serve fixtures of
any scope and tests that need several of a kind."""

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


def _pattern_shards(root: Path) -> Path:
    """Token shards of a repeating random pattern over a 128-token vocabulary (learnable, so a loss
    falls within a few steps): 3,000 val tokens and 26,100 train tokens in root."""
    from gpt2.data import write_shard

    root.mkdir(parents=True, exist_ok=True)
    stream = np.tile(np.random.default_rng(0).integers(0, 128, size=97), 300)
    write_shard(root / "t_val_000000.bin", stream[:3000], vocab_size=128)
    write_shard(root / "t_train_000001.bin", stream[3000:], vocab_size=128)
    return root


@pytest.fixture(scope="session")
def make_pattern_shards():
    """make_pattern_shards(root) -> root: the pattern shards (see pattern_data) in a directory of your choice."""
    return _pattern_shards


@pytest.fixture
def pattern_data(tmp_path) -> Path:
    """The pattern shards (128-token vocabulary) in tmp_path/data."""
    return _pattern_shards(tmp_path / "data")


def _tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_name("tiny", **overrides)).eval()


@pytest.fixture(scope="session")
def make_tiny():
    """make_tiny(seed=0, **overrides) -> a random tiny GPT in eval mode (overrides: vocab_size=512, ...)."""
    return _tiny


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig.from_name("tiny")


@pytest.fixture
def tiny_model() -> GPT:
    return _tiny()


def _engine_tokens(decoder, seqs: list, eos_id: int) -> list[list[int]]:
    from gpt2.inference import Engine

    outputs = []
    engine = Engine(decoder, outputs.extend, eos_id=eos_id)
    engine.submit(seqs)
    while not engine.idle:
        engine.iterate()
    tokens = {id(s): [] for s in seqs}
    for o in outputs:
        tokens[id(o.request)] += o.tokens
    return [tokens[id(s)] for s in seqs]


@pytest.fixture(scope="session")
def engine_tokens():
    """engine_tokens(decoder, seqs, eos_id) -> each sequence's new tokens from an Engine over the
    decoder (a gpt2.inference.BatchDecoder), stepped in this thread until idle."""
    return _engine_tokens


def _torchrun_train(settings: dict, out_dir: Path, nproc: int = 2):
    """`gpt2 train` under torchrun on `nproc` CPU processes (gloo) with a TrainingConfig's settings
    (as its to_dict(); the ones a command line cannot or need not say are left out)."""
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}"]
    args += ["-m", "gpt2", "train", "--out_dir", str(out_dir)]
    skip = ("resume", "out_dir", "embedding_weight_decay", "position_weight_decay", "block_size")
    for k, v in settings.items():
        if v is not None and k not in skip:
            args += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def torchrun_train():
    """_torchrun_train: a training run under torchrun on CPU processes, for the DDP equality tests."""
    return _torchrun_train
