"""Faster recipes with the same architecture: Muon + AdamW parameter groups, WSD and batch-size
warmup schedules, exact resume and DDP with Muon, and every bad setting's one-line error."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2 import GPT, GPTConfig
from gpt2.checkpoint import read_metrics
from gpt2.cli import main as cli_main
from gpt2.training import TrainingConfig, build_config, build_optimizer, lr_at, lr_factor, main, micro_steps
from gpt2.training.muon import Muon

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 128
MUON = dict(optimizer="muon", muon_lr=0.01, embedding_lr=3e-3, scalar_lr=3e-3, position_lr=1e-3)


@pytest.fixture
def data(pattern_data: Path) -> Path:
    return pattern_data  # conftest: 128-token pattern shards


def tiny(data: Path, out: Path, **overrides) -> TrainingConfig:
    values = dict(model="tiny", vocab_size=VOCAB, data_root=str(data), out_dir=str(out), total_batch_size=128)
    values.update(micro_batch_size=2, seq_len=32, max_lr=3e-3, warmup_steps=2, max_steps=8, eval_interval=4)
    values.update(val_steps=2, hellaswag_interval=0, sample_interval=0, checkpoint_interval=4, keep_last_k=0)
    values.update(tensorboard=False, plot=False, log_interval=1, device="cpu")
    values.update(overrides)
    return build_config(None, values)


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if key in r}


# -- parameter groups --------------------------------------------------------------------------------------


def test_muon_groups_cover_every_parameter_once_with_qkv_split():
    model = GPT(GPTConfig.from_name("tiny"))
    cfg = TrainingConfig(model="tiny", seq_len=64, **MUON, weight_decay=0.05, muon_weight_decay=0.02)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: [names[id(p)] for p in g["params"]] for g in opt.param_groups}
    assert sorted(groups) == ["embedding", "muon", "muon_qkv", "position", "scalar"]
    everything = [n for members in groups.values() for n in members]
    assert sorted(everything) == sorted(names.values()) and len(everything) == len(set(everything))
    assert all(n.endswith("attn.c_attn.weight") for n in groups["muon_qkv"])
    assert len(groups["muon_qkv"]) == model.config.n_layer
    assert {n.rsplit(".", 2)[-2] for n in groups["muon"]} == {"c_proj", "c_fc"}  # attn.c_proj, mlp.c_fc/c_proj
    assert groups["embedding"] == ["transformer.wte.weight"] and groups["position"] == ["transformer.wpe.weight"]
    assert all(model.get_parameter(n).dim() == 1 for n in groups["scalar"])
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["muon_qkv"]["splits"] == 3 and by_name["muon"]["splits"] == 1
    assert isinstance(opt.muon, Muon) and all(g["name"].startswith("muon") for g in opt.muon.param_groups)
    settings = {k: (g["lr"], g["weight_decay"]) for k, g in by_name.items()}
    assert settings == {
        "muon_qkv": (0.01, 0.02),
        "muon": (0.01, 0.02),
        "embedding": (3e-3, 0.05),
        "position": (1e-3, 0.05),
        "scalar": (3e-3, 0.0),
    }
    unsplit = build_optimizer(model, TrainingConfig(model="tiny", seq_len=64, optimizer="muon", muon_split_qkv=False),
                              torch.device("cpu"))  # fmt: skip
    assert {g["name"]: g.get("splits") for g in unsplit.param_groups}["muon_qkv"] == 1


# -- schedules -----------------------------------------------------------------------------------------------


def test_wsd_schedule_values_at_key_steps():
    c = TrainingConfig(lr_schedule="wsd", warmup_steps=10, max_steps=100, decay_fraction=0.4, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == 1.0 and lr_factor(59, c) == 1.0  # stable until the last 40%
    assert lr_factor(60, c) == pytest.approx(1.0)  # the decay's first step
    assert lr_factor(80, c) == pytest.approx(1 - 0.5 * 0.9)  # half way: linear
    assert lr_factor(99, c) == pytest.approx(1 - 39 / 40 * 0.9)
    assert lr_factor(100, c) == pytest.approx(0.1) and lr_factor(500, c) == pytest.approx(0.1)
    sq = TrainingConfig(lr_schedule="wsd", decay_shape="sqrt", warmup_steps=0, max_steps=100, decay_fraction=0.5)
    assert lr_factor(75, sq) == pytest.approx(1 - math.sqrt(0.5) * 0.9)  # 1 - sqrt of the progress
    assert lr_at(75, sq) == pytest.approx(6e-4 * lr_factor(75, sq))
    whole = TrainingConfig(lr_schedule="wsd", warmup_steps=0, max_steps=10, decay_fraction=1.0, min_lr_ratio=0.0)
    assert [round(lr_factor(s, whole), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]


def test_batch_warmup_grows_tokens_per_step_and_scales_the_lr():
    c = TrainingConfig(total_batch_size=8192, micro_batch_size=2, seq_len=512, batch_warmup_steps=10)
    c = TrainingConfig(**{**c.to_dict(), "batch_warmup_tokens": 1024, "warmup_steps": 0, "max_steps": 100})
    assert [micro_steps(s, c) for s in (0, 5, 9, 10, 50)] == [1, 4, 7, 8, 8]  # 1024 -> 8192 tokens, 1024 each
    assert lr_at(0, c) == pytest.approx(6e-4 * lr_factor(0, c) * math.sqrt(1024 / 8192))
    assert lr_at(10, c) == pytest.approx(6e-4 * lr_factor(10, c))
    assert micro_steps(0, c, per_micro=2048) == 1  # 2 processes: at least one micro-step each


# -- training with Muon ---------------------------------------------------------------------------------------


def test_muon_training_learns_and_resumes_bit_exactly(data, tmp_path):
    """Stopped after a checkpoint and resumed == uninterrupted, bit for bit, with Muon + WSD + a batch warmup."""
    recipe = dict(**MUON, lr_schedule="wsd", decay_fraction=0.5, batch_warmup_steps=3, batch_warmup_tokens=64)
    full = tiny(data, tmp_path / "full", **recipe, checkpoint_interval=0, dropout=0.1)
    assert main(full, {}, stream=io.StringIO()) == 0
    part = tiny(data, tmp_path / "part", **recipe, max_steps=8, checkpoint_interval=4, dropout=0.1)
    assert main(part, {}, stream=io.StringIO()) == 0
    ckpt = tmp_path / "part" / "checkpoints" / "step_00000004"
    out = io.StringIO()
    assert main(build_config(None, {"resume": str(ckpt)}), {}, stream=out) == 0
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(b) == list(range(8)) and [a[s] for s in range(8)] == [b[s] for s in range(8)]
    assert a[7] < a[0] - 0.3
    records = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["type"] == "train"]
    assert [r["tokens"] for r in records[:4]] == [64, 128, 256, 384]  # 1, 1, 2 micro-steps, then all 2


def test_muon_with_fsdp_and_mismatched_resumes_are_one_line_errors(data, tmp_path, capsys):
    with pytest.raises(ValueError, match="optimizer muon needs whole weight matrices"):
        build_config(None, {"optimizer": "muon", "parallelism": "fsdp"})
    for key, value, match in [
        ("optimizer", "sgd", "unknown optimizer 'sgd'"),
        ("lr_schedule", "linear", "unknown lr_schedule 'linear'"),
        ("decay_shape", "cubic", "unknown decay_shape"),
        ("decay_fraction", "0", r"decay_fraction must be in \(0, 1\]"),
        ("decay_fraction", "1.5", r"decay_fraction must be in \(0, 1\]"),
        ("muon_lr", "-1", "muon_lr must be > 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_config(None, {key: value})
    assert main(tiny(data, tmp_path / "r", max_steps=4), {}, stream=io.StringIO()) == 0
    code = cli_main(["train", "--resume", str(tmp_path / "r"), "--optimizer", "muon"])
    err = capsys.readouterr().err
    assert code == 2 and "it was trained with adamw" in err and "--optimizer adamw" in err


@pytest.mark.slow
def test_two_process_ddp_with_muon_equals_one_process_with_accumulation(data, tmp_path, torchrun_train):
    """Muon under DDP (gloo, 2 processes, Newton-Schulz shared between them) trains like 1 process with
    2x accumulation: the same averaged gradients, the same orthogonalized updates."""
    settings = tiny(data, tmp_path / "x", **MUON, lr_schedule="wsd").to_dict()
    proc = torchrun_train(settings, tmp_path / "ddp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout and "2 x 1 accumulation" in proc.stdout
    one = tiny(data, tmp_path / "one", **MUON, lr_schedule="wsd", val_steps=4)
    assert main(one, {}, stream=io.StringIO()) == 0
    ddp, single = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert sorted(ddp) == sorted(single) == list(range(8))
    np.testing.assert_allclose([ddp[s] for s in range(8)], [single[s] for s in range(8)], rtol=1e-5, atol=1e-6)
    assert single[7] < single[0] - 0.3
