"""The faster recipes' levers (issue 19): NorMuon, cautious weight decay, Polar Express, per-head query/key
blocks, Muon momentum warmup, a head-like beta1 for the tied embedding, sequence-length warmup and tail
weight averaging: wired from the config, learning, resuming bit for bit, equal under DDP, and every bad
value (or a resume that changes one) a one-line error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2 import GPT, GPTConfig
from gpt2.checkpoint import read_metrics
from gpt2.cli import main as cli_main
from gpt2.training import TrainingConfig, build_config, build_optimizer, main
from gpt2.training.averaging import WeightAverage
from gpt2.training.schedule import muon_momentum_at, seq_len_at

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
MUON = dict(optimizer="muon", muon_lr=0.01, embedding_lr=3e-3, scalar_lr=3e-3, position_lr=1e-3, lr_schedule="wsd")
# Every lever at once (the weight average starts at step 2, before the resume tests' checkpoint at step 4).
LEVERS = dict(
    MUON,
    muon_normuon=True,
    muon_normuon_beta2=0.9,
    muon_cautious_wd=True,
    muon_weight_decay=0.1,
    muon_ns_coefficients="polar_express",
    muon_split_heads=True,
    muon_momentum_warmup_steps=3,
    embedding_beta1=0.8,
    grad_clip=0.0,
    seq_len_warmup_steps=4,
    seq_len_warmup_start=8,
    weight_ema=0.5,
    ema_start=0.25,
)


def tiny(data: Path, out: Path, **overrides) -> TrainingConfig:
    values = dict(model="tiny", vocab_size=128, data_root=str(data), out_dir=str(out), total_batch_size=128)
    values.update(micro_batch_size=2, seq_len=32, max_lr=3e-3, warmup_steps=2, max_steps=8, eval_interval=4)
    values.update(val_steps=2, hellaswag_interval=0, sample_interval=0, checkpoint_interval=4, keep_last_k=0)
    values.update(tensorboard=False, plot=False, log_interval=1, device="cpu")
    values.update(overrides)
    return build_config(None, values)


def records(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["type"] == kind]


def test_levers_reach_the_optimizer_groups():
    model = GPT(GPTConfig.from_name("tiny"))  # n_embd 32, 2 heads of 16
    cfg = TrainingConfig(model="tiny", seq_len=64, **LEVERS)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["muon_qkv"]["splits"] == (16, 16, 16, 16, 32)  # q and k of each head, then v
    assert by_name["muon"]["splits"] == 1
    for name in ("muon_qkv", "muon"):
        group = by_name[name]
        assert group["normuon"] and group["beta2"] == 0.9 and group["cautious_wd"]
        assert group["ns_coefficients"] == "polar_express" and group["weight_decay"] == 0.1
    assert by_name["embedding"]["betas"] == (0.8, 0.95)
    assert by_name["position"]["betas"] == by_name["scalar"]["betas"] == (0.9, 0.95)
    plain = build_optimizer(model, TrainingConfig(model="tiny", seq_len=64, **MUON), torch.device("cpu"))
    group = {g["name"]: g for g in plain.param_groups}["muon_qkv"]
    assert group["splits"] == 3 and not group["normuon"] and not group["cautious_wd"]
    assert group["ns_coefficients"] == "quintic"


def test_momentum_and_sequence_length_warmups():
    cfg = TrainingConfig(muon_momentum_warmup_steps=10, muon_momentum_start=0.85, muon_momentum=0.95)
    assert [round(muon_momentum_at(s, cfg), 6) for s in (0, 5, 10, 99)] == [0.85, 0.9, 0.95, 0.95]
    assert muon_momentum_at(0, TrainingConfig()) == 0.95  # off by default
    cfg = TrainingConfig(seq_len=1024, seq_len_warmup_steps=90, seq_len_warmup_start=128)  # 3 stages
    assert [seq_len_at(s, cfg) for s in (0, 29, 30, 59, 60, 89, 90, 500)] == [128, 128, 256, 256, 512, 512, 1024, 1024]
    assert seq_len_at(0, TrainingConfig(seq_len=1024)) == 1024


def test_weight_average_is_an_ema_from_its_start():
    model = torch.nn.Linear(2, 1, bias=False)
    avg = WeightAverage(model, beta=0.5, start=2)
    for updates, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        avg.update(updates)
    # updates 1 is before the start; 2 begins it at 2.0; then 0.5 * 2 + 0.5 * 4 = 3; 0.5 * 3 + 0.5 * 8 = 5.5
    assert avg.copy_to() and torch.equal(model.weight, torch.full((1, 2), 5.5))
    again = WeightAverage(model, beta=0.5, start=2)
    assert not again.copy_to()  # nothing averaged yet: the weights stay
    again.load_state_dict(avg.state_dict())
    assert torch.equal(again.average[0], avg.average[0])


def test_every_lever_learns_and_resumes_bit_exactly(pattern_data, tmp_path):
    """All levers together: stopped after the checkpoint at step 4 (inside the sequence-length warmup, with a
    weight average under way) and resumed == uninterrupted, bit for bit, down to the final (averaged) weights."""
    full = tiny(pattern_data, tmp_path / "full", **LEVERS, checkpoint_interval=0)
    out = io.StringIO()
    assert main(full, {}, stream=out) == 0
    assert "final weights: the average of the weights since step 2" in out.getvalue()
    part = tiny(pattern_data, tmp_path / "part", **LEVERS)
    assert main(part, {}, stream=io.StringIO()) == 0
    ckpt = tmp_path / "part" / "checkpoints" / "step_00000004"
    assert main(build_config(None, {"resume": str(ckpt)}), {}, stream=io.StringIO()) == 0
    a, b = records(tmp_path / "full"), records(tmp_path / "part")
    loss = {r["step"]: r["loss"] for r in b}
    assert [r["loss"] for r in a] == [loss[s] for s in range(8)]
    assert a[-1]["loss"] < a[0]["loss"] - 0.3
    assert [r["seq_len"] for r in a] == [8, 8, 16, 16, 32, 32, 32, 32]
    assert [r["tokens"] for r in a] == [128 * (s + 1) for s in range(8)]  # the same tokens per step throughout
    final = [r["val_loss"] for r in records(tmp_path / "full", "eval")][-1]
    assert final == [r["val_loss"] for r in records(tmp_path / "part", "eval")][-1]
    weights = [torch.load(run / "checkpoints" / "step_00000008" / "trainer_state.pt", weights_only=True) for run in (
        tmp_path / "full", tmp_path / "part")]  # fmt: skip
    for x, y in zip(weights[0]["average"]["average"], weights[1]["average"]["average"]):
        assert torch.equal(x, y)


def test_sequence_length_warmup_reads_the_same_tokens_as_shorter_rows(pattern_data, tmp_path):
    """A (2, 32) micro-batch trained as (8, 8) rows: the same tokens and data position, another loss (each
    row starts a new context), then the full length once the warmup is over."""
    steps = dict(max_steps=3, warmup_steps=1, eval_interval=0, checkpoint_interval=0, lr_schedule="wsd")
    warm = tiny(pattern_data, tmp_path / "warm", seq_len_warmup_steps=1, seq_len_warmup_start=8, **steps)
    plain = tiny(pattern_data, tmp_path / "plain", **steps)
    for cfg in (warm, plain):
        assert main(cfg, {}, stream=io.StringIO()) == 0
    w, p = records(tmp_path / "warm"), records(tmp_path / "plain")
    assert [r["seq_len"] for r in w] == [8, 32, 32] and "seq_len" not in p[0]
    assert w[0]["tokens"] == p[0]["tokens"] == 128 and w[0]["loss"] != p[0]["loss"]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("muon_ns_coefficients", "cubic", "unknown muon_ns_coefficients 'cubic'; choose one of quintic"),
        ("muon_normuon_beta2", "1.0", r"muon_normuon_beta2 must be in \[0, 1\), got 1.0"),
        ("muon_momentum_start", "-0.1", r"muon_momentum_start must be in \[0, 1\)"),
        ("embedding_beta1", "1", r"embedding_beta1 must be in \[0, 1\), got 1.0"),
        ("weight_ema", "1", r"weight_ema must be in \[0, 1\)"),
        ("ema_start", "1.5", r"ema_start is a fraction of max_steps, in \[0, 1\]; got 1.5"),
        ("muon_momentum_warmup_steps", "-1", "muon_momentum_warmup_steps must be >= 0"),
        ("seq_len_warmup_steps", "-5", "seq_len_warmup_steps must be >= 0"),
        ("muon_normuon", "maybe", "muon_normuon in the command line must be true or false"),
    ],
)
def test_bad_lever_values_are_one_line_errors(key, value, message):
    with pytest.raises(ValueError, match=message) as error:
        build_config(None, {key: value})
    assert "\n" not in str(error.value)


def test_bad_lever_combinations_are_one_line_errors():
    cases = [
        ({"seq_len_warmup_steps": "10", "seq_len_warmup_start": "300"}, "seq_len_warmup_start must be seq_len / 2"),
        ({"seq_len_warmup_steps": "10", "seq_len_warmup_start": "32"}, r"512, 256, \.\.\. for seq_len 1024\), got 32"),
        ({"seq_len_warmup_steps": "10", "seq_len_warmup_start": "1024"}, "got 1024"),
        ({"muon_split_heads": "true", "muon_split_qkv": "false"}, "it needs muon_split_qkv true"),
        ({"weight_ema": "0.9", "parallelism": "fsdp"}, "weight_ema averages whole weights"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            build_config(None, overrides)
        assert "\n" not in str(error.value)
    build_config(None, {"seq_len_warmup_start": "300"})  # ignored (and fine) while the warmup is off


def test_resume_that_changes_an_optimizer_setting_names_the_field(pattern_data, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(tiny(pattern_data, run, **MUON, max_steps=4), {}, stream=io.StringIO()) == 0
    code = cli_main(["train", "--resume", str(run), "--muon_normuon", "true", "--beta2", "0.99"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "beta2 = 0.95 (checkpoint) != 0.99 (now)" in err and "muon_normuon = false (checkpoint) != true" in err
    assert "resume with --beta2 0.95 --muon_normuon false" in err
    # what the config sets at every step may change: the lr, the decay, the momentum (and its warmup)
    assert cli_main(["train", "--resume", str(run), "--max_steps", "5", "--muon_lr", "0.005"]) == 0


@pytest.mark.slow
def test_two_process_ddp_with_every_lever_equals_one_process_with_accumulation(pattern_data, tmp_path, torchrun_train):
    """NorMuon's state and the per-head blocks with Newton-Schulz shared between 2 gloo processes, cautious
    decay, the warmups and the weight average: the same losses as 1 process with 2x accumulation."""
    settings = tiny(pattern_data, tmp_path / "x", **LEVERS).to_dict()
    proc = torchrun_train(settings, tmp_path / "ddp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout and "2 x 1 accumulation" in proc.stdout
    one = tiny(pattern_data, tmp_path / "one", **LEVERS, val_steps=4)
    assert main(one, {}, stream=io.StringIO()) == 0
    ddp, single = records(tmp_path / "ddp"), records(tmp_path / "one")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == list(range(8))
    np.testing.assert_allclose([r["loss"] for r in ddp], [r["loss"] for r in single], rtol=1e-5, atol=1e-6)
    val = [[r["val_loss"] for r in records(run, "eval")][-1] for run in (tmp_path / "ddp", tmp_path / "one")]
    np.testing.assert_allclose(val[0], val[1], rtol=1e-5)  # the final, averaged weights


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_lever_runs_compiled_in_bf16_on_cuda(pattern_data, tmp_path):
    """The GPU path: torch.compile (static shapes: each warmup length its own graph), bf16 autocast, Newton-Schulz
    and NorMuon in bf16, the fused AdamW with the embedding's own betas, the weight average on the device."""
    cfg = tiny(pattern_data, tmp_path / "gpu", **LEVERS, device="cuda", compile=True, checkpoint_interval=0)
    out = io.StringIO()
    assert main(cfg, {}, stream=out) == 0
    train = records(tmp_path / "gpu")
    assert [r["seq_len"] for r in train] == [8, 8, 16, 16, 32, 32, 32, 32]
    assert all(np.isfinite(r["loss"]) for r in train) and train[-1]["loss"] < train[0]["loss"] - 0.3
    assert "compile on" in out.getvalue() and "bf16 autocast" in out.getvalue()
    assert "final weights: the average of the weights since step 2" in out.getvalue()
