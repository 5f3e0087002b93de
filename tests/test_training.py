"""Training: config, LR schedule, accumulation, exact resume, checkpoints, signals, metrics, bad input.

Runs use the `tiny` model with a 128-token vocabulary on shards of a repeating random pattern, so
a step takes milliseconds and the loss visibly falls.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gpt2 import GPT
from gpt2.checkpoint import latest_checkpoint, list_checkpoints, load_trainer_state, read_metrics, save_checkpoint
from gpt2.cli import main as cli_main
from gpt2.data import write_shard
from gpt2.training import (
    QUICKSTART,
    GracefulStop,
    TrainingConfig,
    build_config,
    lr_at,
    main,
    plan_run,
    read_toml,
    train,
)
from gpt2.training.metrics import flops_per_token, peak_flops

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128


def make_shards(root: Path, train_tokens: int = 20_000, val_tokens: int = 3_000, vocab: int = VOCAB) -> Path:
    """A train and a val shard of a repeating random pattern (learnable, so the loss falls)."""
    root.mkdir(parents=True, exist_ok=True)
    pattern = np.random.default_rng(0).integers(0, vocab, size=97)
    stream = np.tile(pattern, (train_tokens + val_tokens) // 97 + 1)
    write_shard(root / "t_val_000000.bin", stream[:val_tokens], vocab_size=vocab)
    write_shard(root / "t_train_000001.bin", stream[val_tokens : val_tokens + train_tokens], vocab_size=vocab)
    return root


@pytest.fixture
def data_root(tmp_path) -> Path:
    return make_shards(tmp_path / "data")


def tiny(data_root: Path, out_dir: Path, **overrides) -> TrainingConfig:
    values = dict(
        model="tiny",
        vocab_size=VOCAB,
        data_root=str(data_root),
        out_dir=str(out_dir),
        total_batch_size=64,
        micro_batch_size=2,
        seq_len=16,
        max_lr=3e-3,
        warmup_steps=2,
        max_steps=8,
        eval_interval=4,
        val_steps=2,
        hellaswag_interval=0,
        sample_interval=0,
        checkpoint_interval=4,
        keep_last_k=0,
        tensorboard=False,
        plot=False,
        log_interval=1,
        device="cpu",
    )
    values.update(overrides)
    return build_config(None, values)


def run(cfg: TrainingConfig, env: dict | None = None) -> tuple[int, str]:
    out = io.StringIO()
    code = main(cfg, env or {}, stream=out)
    return code, out.getvalue()


def losses(run_dir: Path, kind: str = "loss") -> dict[int, float]:
    recs = read_metrics(Path(run_dir) / "metrics.jsonl")
    return {r["step"]: r[kind] for r in recs if kind in r}


# -- config ----------------------------------------------------------------------------------------


def test_defaults_are_the_seed_recipe():
    c = TrainingConfig()
    assert (c.data_root, c.total_batch_size, c.micro_batch_size, c.seq_len) == ("edu_fineweb10B", 524288, 64, 1024)
    assert (c.max_lr, c.min_lr_ratio, c.warmup_steps, c.max_steps, c.weight_decay) == (6e-4, 0.1, 715, 19073, 0.1)
    assert (c.eval_interval, c.hellaswag_interval, c.sample_interval, c.val_steps) == (250, 250, 250, 20)
    assert (c.checkpoint_interval, c.beta1, c.beta2, c.eps, c.grad_clip) == (5000, 0.9, 0.95, 1e-8, 1.0)


def test_config_files_parse_and_quickstart_matches():
    for path in sorted((REPO / "configs").glob("*.toml")):
        build_config(path)  # every shipped config is valid
    assert read_toml(REPO / "configs" / "quickstart.toml") == QUICKSTART
    seed = build_config(REPO / "configs" / "gpt2-124M-fineweb-edu.toml")
    assert seed.model_config().n_layer == 12 and seed.total_batch_size == 524288 and seed.max_steps == 19073


def test_command_line_fills_the_dataclass(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('model = "tiny"\nseq_len = 32\nmax_steps = 7\nmax_lr = 1\n[optim]\nweight_decay = 0.05\n')
    cfg = build_config(
        toml, {"max-steps": "9", "micro_batch_size": "4", "compile": "false", "total_batch_size": "2**10"}
    )
    assert (cfg.model, cfg.max_steps, cfg.max_lr, cfg.weight_decay) == ("tiny", 9, 1.0, 0.05)
    assert (cfg.micro_batch_size, cfg.compile, cfg.total_batch_size) == (4, False, 1024)
    assert build_config(None, {"compile": "auto", "hellaswag_path": "none"}).compile is None
    with pytest.raises(ValueError, match="did you mean 'max_lr'"):
        build_config(None, {"max_lrr": "1"})
    toml.write_text("lerning_rate = 1\n")
    with pytest.raises(ValueError, match=r"unknown training setting 'lerning_rate' in .*c\.toml"):
        build_config(toml)
    with pytest.raises(ValueError, match="max_steps in the command line must be a whole number"):
        build_config(None, {"max_steps": "lots"})
    with pytest.raises(ValueError, match="must be true or false"):
        build_config(None, {"shuffle": "maybe"})


def test_cli_flags_with_dashes_and_unknown_flag(tmp_path, capsys):
    from gpt2.cli import build_parser

    args = build_parser().parse_args(["train", "--max-steps", "5", "--micro_batch_size", "3", "--shuffle"])
    assert (args.cfg_max_steps, args.cfg_micro_batch_size, args.cfg_shuffle) == ("5", "3", "true")
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--no-such-setting", "1"])
    assert e.value.code == 2 and "--no-such-setting" in capsys.readouterr().err


# -- learning rate and optimizer ---------------------------------------------------------------------


def test_lr_schedule_key_steps():
    c = TrainingConfig()  # 6e-4, warmup 715, 19073 steps, min 6e-5
    assert lr_at(0, c) == pytest.approx(6e-4 / 715)
    assert lr_at(357, c) == pytest.approx(6e-4 * 358 / 715)
    assert lr_at(714, c) == pytest.approx(6e-4)
    assert lr_at(715, c) == pytest.approx(6e-4)  # cosine starts at the peak
    mid = 715 + (19073 - 715) // 2
    assert lr_at(mid, c) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-4)
    assert lr_at(19072, c) == pytest.approx(6e-5, rel=1e-3)
    assert lr_at(19073, c) == pytest.approx(6e-5) and lr_at(30000, c) == pytest.approx(6e-5)
    steps = [lr_at(s, c) for s in range(715, 19073, 100)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # monotone decay
    no_warmup = TrainingConfig(warmup_steps=0, max_steps=10, min_lr_ratio=0.0)
    assert lr_at(0, no_warmup) == pytest.approx(6e-4) and lr_at(10, no_warmup) == 0.0


def test_optimizer_decays_only_2d_parameters():
    from gpt2.training import build_optimizer

    model = GPT(TrainingConfig(model="tiny", seq_len=64).model_config())
    opt = build_optimizer(model, TrainingConfig(), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()  # tied once
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-8


def test_mfu_formula_and_peaks():
    cfg = TrainingConfig().model_config()  # GPT-2 124M
    n = 124_439_808 - 1024 * 768  # without position embeddings
    assert flops_per_token(cfg, n, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989.4e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Future GPU") is None


# -- the loop --------------------------------------------------------------------------------------


def test_grad_accumulation_equals_one_big_batch(data_root, tmp_path):
    """4 sequences in one micro-batch vs. 2 micro-batches of 2: same data, same losses."""
    code, _ = run(tiny(data_root, tmp_path / "big", micro_batch_size=4, val_steps=1))  # same val tokens too
    assert code == 0
    code, _ = run(tiny(data_root, tmp_path / "acc", micro_batch_size=2))
    assert code == 0
    big, acc = losses(tmp_path / "big"), losses(tmp_path / "acc")
    assert sorted(big) == list(range(8))
    np.testing.assert_allclose([acc[s] for s in big], [big[s] for s in big], rtol=1e-5)
    np.testing.assert_allclose(
        list(losses(tmp_path / "acc", "val_loss").values()),
        list(losses(tmp_path / "big", "val_loss").values()),
        rtol=1e-5,
    )
    assert big[7] < big[0] - 0.3  # it learns


def test_resume_is_bit_exact_and_metrics_are_complete(data_root, tmp_path):
    """Stopped after step 3 and resumed == uninterrupted, bit for bit (dropout on, so RNG state matters)."""
    cfg = dict(dropout=0.1, checkpoint_interval=0)
    code, _ = run(tiny(data_root, tmp_path / "full", **cfg))
    assert code == 0

    from gpt2.distributed import DistInfo
    from gpt2.training.metrics import RunLogger

    part = tiny(data_root, tmp_path / "part", **cfg)
    stop = GracefulStop()

    class StopLogger(RunLogger):
        def log_train(self, record):
            super().log_train(record)
            if record["step"] == 2:
                stop.request(signal.SIGTERM)

    plan = plan_run(part)
    log = StopLogger(tmp_path / "part", stream=io.StringIO())
    result = train(plan, DistInfo(), log, stop)
    log.close()
    assert result.stopped_by == signal.SIGTERM and result.step == 4  # seen after step 3's update
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == ["step_00000004"]
    with pytest.raises(FileExistsError, match="already holds a training run"):
        plan_run(tiny(data_root, tmp_path / "part", **cfg))

    code, out = run(build_config(None, {"resume": str(tmp_path / "part"), "tensorboard": "false"}))
    assert code == 0 and "resumed from" in out
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(resumed) == list(range(8))
    assert [resumed[s] for s in range(8)] == [full[s] for s in range(8)]  # exact, not approx
    assert losses(tmp_path / "part", "val_loss") == losses(tmp_path / "full", "val_loss")
    a = load_file(latest_checkpoint(tmp_path / "full") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "part") / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # metrics.jsonl: one train record per step with the documented fields, eval records, events
    recs = read_metrics(tmp_path / "part" / "metrics.jsonl")
    train_recs = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(8))
    for r in train_recs:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "step_time", "tokens"} <= set(r)
        assert r["tokens_per_sec"] > 0 and math.isfinite(r["grad_norm"])
    assert [r["step"] for r in recs if r["type"] == "eval"] == [0, 4, 8]
    assert [r["event"] for r in recs if r["type"] == "event"] == ["start", "stop", "resume"]
    ckpt = latest_checkpoint(tmp_path / "part")
    state = load_trainer_state(ckpt)
    assert state["step"] == 8 and state["loader"]["position"] > 0 and len(state["rng"]) == 1
    saved = json.loads((ckpt / "train_config.json").read_text())
    assert saved["max_steps"] == 8 and saved["dropout"] == 0.1
    assert GPT.from_pretrained(tmp_path / "part").config.vocab_size == VOCAB  # loads as a model


def test_checkpoint_save_is_atomic(data_root, tmp_path, monkeypatch):
    code, _ = run(tiny(data_root, tmp_path / "r", max_steps=2, eval_interval=0, checkpoint_interval=2))
    assert code == 0
    good = latest_checkpoint(tmp_path / "r")
    model = GPT.from_pretrained(good)
    state = load_trainer_state(good)

    def dies(obj, path, *a, **k):  # the process "dies" half way through writing the trainer state
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("gpt2.checkpoint.full.torch.save", dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "r", 3, model, state, {})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "r") == good
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == [good.name]
    # a save killed outright leaves a .tmp directory: it is ignored, then replaced by the next save
    (tmp_path / "r" / "checkpoints" / ".step_00000003.tmp").mkdir()
    (tmp_path / "r" / "checkpoints" / ".step_00000003.tmp" / "config.json").write_text("{")
    assert latest_checkpoint(tmp_path / "r") == good
    GPT.from_pretrained(tmp_path / "r")
    path = save_checkpoint(tmp_path / "r", 3, model, state, {}, keep_last_k=1)
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step_00000003"] == [path.name]
    keys = load_file(path / "model.safetensors").keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) or "._orig_mod." in k for k in keys)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(data_root, tmp_path):
    out_dir = tmp_path / "sig"
    args = [sys.executable, "-m", "gpt2", "train", "--model", "tiny", "--vocab_size", str(VOCAB)]
    args += ["--data_root", str(data_root), "--out_dir", str(out_dir), "--total_batch_size", "64"]
    args += ["--micro_batch_size", "2", "--seq_len", "16", "--max_steps", "100000", "--eval_interval", "0"]
    args += ["--sample_interval", "0", "--hellaswag_interval", "0", "--tensorboard", "false", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (out_dir / "metrics.jsonl").is_file() and len(read_metrics(out_dir / "metrics.jsonl")) >= 3:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped at step" in out and f"--resume {out_dir}" in out and "Traceback" not in out
    ckpt = latest_checkpoint(out_dir)
    assert ckpt is not None and load_trainer_state(ckpt)["step"] >= 1


def test_non_finite_loss_stops_with_a_clear_message(data_root, tmp_path, capsys):
    cfg = tiny(data_root, tmp_path / "nan", max_lr=1e4, warmup_steps=0, grad_clip=0.0, eval_interval=0)
    from gpt2.training import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"at step \d+: training stopped; the last good checkpoint"):
        run(cfg)
    assert latest_checkpoint(tmp_path / "nan") is None  # nothing non-finite was saved


# -- bad input ---------------------------------------------------------------------------------------


def cli(*args: str, capsys) -> tuple[int, str]:
    code = cli_main(["train", *args])
    return code, capsys.readouterr().err.strip()


def test_bad_inputs_are_one_line_errors(data_root, tmp_path, capsys):
    base = ["--model", "tiny", "--vocab_size", str(VOCAB), "--device", "cpu", "--tensorboard", "false"]
    base += ["--micro_batch_size", "2", "--seq_len", "16", "--total_batch_size", "64", "--max_steps", "2"]

    code, err = cli(*base, "--data_root", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "a"), capsys=capsys)
    assert code == 2 and "data_root" in err and "does not exist" in err and "gpt2 prepare" in err
    (tmp_path / "empty").mkdir()
    code, err = cli(*base, "--data_root", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "b"), capsys=capsys)
    assert code == 2 and "no 'train' shards" in err

    code, err = cli(*base, "--data_root", str(data_root), "--total_batch_size", "100", capsys=capsys)
    assert code == 2 and "not divisible" in err and "nearest valid total_batch_size: 96 or 128" in err
    code, err = cli(*base, "--data_root", str(data_root), "--seq_len", "128", capsys=capsys)
    assert code == 2 and "seq_len 128 exceeds the model's block_size 64" in err

    big_vocab = make_shards(tmp_path / "gpt2vocab", vocab=50257)
    code, err = cli(*base, "--data_root", str(big_vocab), "--out_dir", str(tmp_path / "c"), capsys=capsys)
    assert code == 2 and "another tokenizer" in err

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    code, err = cli(*base, "--data_root", str(data_root), "--out_dir", str(tmp_path / "run"), capsys=capsys)
    assert code == 2 and "already holds a training run" in err and "--resume" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"  # untouched

    code, err = cli("--resume", str(tmp_path / "nothing"), capsys=capsys)
    assert code == 2 and "no such run" in err
    for line in (err,):
        assert "\n" not in line


def test_resume_with_another_model_config_names_the_fields(data_root, tmp_path, capsys):
    code, _ = run(tiny(data_root, tmp_path / "r", max_steps=2, eval_interval=0, checkpoint_interval=2))
    assert code == 0
    code, err = cli("--resume", str(tmp_path / "r"), "--n_layer", "3", "--n_embd", "64", capsys=capsys)
    assert code == 2 and "model config differs" in err
    assert "n_layer: 2 (checkpoint) != 3 (now)" in err and "n_embd: 32 (checkpoint) != 64 (now)" in err
    # --resume auto on an empty out_dir starts a new run; on this one it continues
    cfg = build_config(None, {"resume": "auto", "out_dir": str(tmp_path / "r"), "max_steps": "3"})
    assert plan_run(cfg).resume_from == latest_checkpoint(tmp_path / "r")


# -- commands ----------------------------------------------------------------------------------------


def test_export_and_plot_commands(data_root, tmp_path, capsys):
    code, _ = run(tiny(data_root, tmp_path / "r", max_steps=2, eval_interval=1))
    assert code == 0
    assert cli_main(["export", str(tmp_path / "r"), str(tmp_path / "hf")]) == 0
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"} <= files
    exported, trained = GPT.from_pretrained(tmp_path / "hf"), GPT.from_pretrained(tmp_path / "r")
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), trained.state_dict().values()))
    capsys.readouterr()
    assert cli_main(["export", str(tmp_path / "r"), str(tmp_path / "hf")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "r"), str(tmp_path / "hf"), "--overwrite"]) == 0
    assert cli_main(["plot", str(tmp_path / "r"), "--out", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_quickstart_smoke(tmp_path, capsys):
    pytest.importorskip("pydoc_data.topics")
    args = ["train", "--quickstart", "--out_dir", str(tmp_path / "qs"), "--max_steps", "2", "--eval_interval", "1"]
    args += ["--val_steps", "1", "--sample_interval", "2", "--micro_batch_size", "4", "--total_batch_size", "512"]
    args += ["--sample_tokens", "8", "--tensorboard", "false", "--device", "cpu"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "CPython's documentation" in out and "sample 0:" in out and "val loss" in out
    assert f"gpt2 generate --model {tmp_path / 'qs'}" in out
    assert latest_checkpoint(tmp_path / "qs").name == "step_00000002"
    assert (tmp_path / "qs" / "loss.png").is_file()
    assert list((tmp_path / "qs" / "data").glob("*_val_*.bin")) and list((tmp_path / "qs" / "data").glob("*_train_*"))
