"""The reliability defects a hostile new user found (issue 22), each as the user met it: a run trains on
exactly the data its command names, a run directory always means its current checkpoint, a full disk
is one line, extending a run is not a branch, a checkpoint without its manifest is refused, every
mistake is one line whose advice is a command that works, and nothing surprises silently."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gpt2 import GPT, GPTConfig, Tokenizer
from gpt2.checkpoint import read_metrics
from gpt2.cli import main as cli_main
from gpt2.data import find_shards, read_shard
from gpt2.fileio import sha256_file

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--device", "cpu", "--tensorboard", "false", "--plot", "false", "--hellaswag_interval", "0"]
QUIET += ["--sample_interval", "0", "--log_interval", "1", "--val_steps", "1", "--eval_interval", "2"]
SMALL = ["--micro_batch_size", "2", "--seq_len", "16", "--total_batch_size", "32", "--keep_last_k", "0"]
# the tiny model on GPT-2's vocabulary (for --data files, which GPT-2's tokenizer encodes)
TEXT_RUN = ["--model", "tiny", *QUIET, *SMALL, "--max_lr", "1e-3", "--warmup_steps", "1"]
# the tiny model on a 128-token vocabulary (for the conftest's pattern shards)
SHARD_RUN = ["--model", "tiny", "--vocab_size", "128", *QUIET, *SMALL, "--max_lr", "3e-3", "--warmup_steps", "2"]


def train(*args: str, capsys) -> tuple[int, str, str]:
    code = cli_main(["train", *args])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def words(n: int, vocabulary: list[str], seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(vocabulary, size=n))


def run_tokens(run: Path) -> list[int]:
    """Every token in RUN_DIR/data (val shards first, as prepare numbers them)."""
    shards = find_shards(run / "data", "val") + find_shards(run / "data", "train")
    return [int(t) for s in shards for t in read_shard(s)]


# -- 1. a run trains on exactly the data its command names ------------------------------------------------


def test_a_failed_start_then_another_data_file_trains_on_the_new_file(tmp_path, capsys):
    run, first, second = tmp_path / "run", tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("too short")
    second.write_text(words(3000, ["red", "green", "blue", "cyan"], seed=0))
    base = [*TEXT_RUN, "--out_dir", str(run), "--max_steps", "2", "--checkpoint_interval", "2"]
    code, _, err = train(*base, "--data", str(first), capsys=capsys)
    assert code == 2 and "has 3 tokens" in err  # tokenized into RUN_DIR/data, then too small
    code, out, err = train(*base, "--data", str(second), capsys=capsys)  # the corrected command
    assert code == 0, err
    assert "tokenizing" in out and "afresh" in out
    assert run_tokens(run) == [50256, *Tokenizer().encode(second.read_text())]
    assert json.loads((run / "train_config.json").read_text())["data"] == str(second)
    assert json.loads((run / "data" / "source.json").read_text())["sha256"] == sha256_file(second)


def test_a_start_that_died_then_an_edited_file_is_tokenized_again(tmp_path, capsys):
    """Same path, new content: a NaN kills the first start before its first checkpoint; the rerun
    trains on the file as it is now, not on the shards the dead start left."""
    run, text = tmp_path / "run", tmp_path / "corpus.txt"
    text.write_text(words(3000, ["alpha", "beta", "gamma"], seed=1))
    base = [*TEXT_RUN, "--out_dir", str(run), "--max_steps", "2", "--data", str(text), "--eval_interval", "0"]
    code, _, err = train(*base, "--max_lr", "1e4", "--warmup_steps", "0", "--grad_clip", "0", capsys=capsys)
    assert code == 2 and "(none yet)" in err and (run / "data" / "manifest.json").is_file()
    text.write_text(words(3000, ["delta", "epsilon", "zeta"], seed=2))  # the user fixes the corpus
    code, _, err = train(*base, capsys=capsys)
    assert code == 0, err
    assert run_tokens(run) == [50256, *Tokenizer().encode(text.read_text())]


def test_a_resumed_run_keeps_the_tokens_it_was_trained_on(tmp_path, capsys):
    run, text = tmp_path / "run", tmp_path / "corpus.txt"
    text.write_text(words(3000, ["one", "two", "three"], seed=3))
    base = [*TEXT_RUN, "--out_dir", str(run), "--data", str(text), "--checkpoint_interval", "2"]
    assert train(*base, "--max_steps", "2", capsys=capsys)[0] == 0
    tokens = run_tokens(run)
    text.write_text("edited after the run started")  # the checkpoint's data position is in the old shards
    code, _, err = train("--resume", str(run), "--max_steps", "3", capsys=capsys)
    assert code == 0, err
    assert run_tokens(run) == tokens


# -- 2. a run directory always resolves to its current checkpoint -----------------------------------------


def first_run(data: Path, run: Path, capsys, max_steps: int = 4) -> None:
    args = [*SHARD_RUN, "--data_root", str(data), "--out_dir", str(run), "--max_steps", str(max_steps)]
    code, _, err = train(*args, "--checkpoint_interval", "2", capsys=capsys)
    assert code == 0, err


def test_export_into_a_run_or_a_checkpoint_is_refused(pattern_data, tmp_path, capsys):
    run = tmp_path / "run"
    first_run(pattern_data, run, capsys)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    ckpt = run / "checkpoints" / "step_00000002"
    targets = {
        str(run): "is a training run directory",
        str(ckpt): "is inside the checkpoints of the run",
        str(run / "checkpoints" / "step_00000099"): "is inside the checkpoints of the run",
    }
    for target, reason in targets.items():
        assert cli_main(["export", str(run), target, "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert reason in err and "\n" not in err, err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert cli_main(["export", str(run), str(tmp_path / "hf")]) == 0  # outside the run: fine


def test_a_run_directory_loads_its_newest_checkpoint_whatever_else_is_in_it(pattern_data, tmp_path, capsys):
    """An older version let `gpt2 export RUN RUN --overwrite` put a config.json and weights into the run."""
    run = tmp_path / "run"
    first_run(pattern_data, run, capsys)
    stale = GPT(GPTConfig.from_name("tiny", vocab_size=128))
    stale.save_pretrained(run)
    code, _, err = train("--resume", str(run), "--max_steps", "6", capsys=capsys)
    assert code == 0, err
    newest = load_file(run / "checkpoints" / "step_00000006" / "model.safetensors")
    loaded = GPT.from_pretrained(run)
    assert torch.equal(loaded.transformer.wte.weight, newest["transformer.wte.weight"])
    assert not torch.equal(loaded.transformer.wte.weight, stale.transformer.wte.weight)


# -- 3. a full disk during the weights' write is one line -----------------------------------------------


def capped(cap: int):
    def limit() -> None:  # in the child: writes past the cap fail with EFBIG instead of a signal
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))

    return limit


def gpt2_process(*args: str, cap: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    preexec = capped(cap) if cap is not None else None
    cmd = [sys.executable, "-m", "gpt2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, preexec_fn=preexec)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_a_full_disk_while_the_weights_are_written_is_one_line(pattern_data, tmp_path):
    """model.safetensors (850 kB here) is the first file of a checkpoint and of an export; files are
    capped at 400 kB as a full disk would stop them."""
    run = tmp_path / "run"
    wide = [*SHARD_RUN, "--n_layer", "4", "--n_embd", "64", "--data_root", str(pattern_data), "--out_dir", str(run)]
    # before the first checkpoint: nothing to resume, so the advice is to run the same command again
    first = gpt2_process("train", *wide, "--max_steps", "2", "--checkpoint_interval", "2", cap=400_000)
    err = first.stderr.strip()
    assert first.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "could not write checkpoint step_00000002" in err and "File too large; is the disk full?" in err
    assert "no earlier checkpoint exists: free space and run the same command again" in err
    again = gpt2_process("train", *wide, "--max_steps", "2", "--checkpoint_interval", "2")
    assert again.returncode == 0, again.stderr[-2000:]  # the advice works
    # a resume whose next checkpoint fails: the previous one is named and intact
    proc = gpt2_process("train", "--resume", str(run), "--max_steps", "4", cap=400_000)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    intact = run / "checkpoints" / "step_00000002"
    assert f"the previous checkpoint {intact} is intact" in err and f"gpt2 train --resume {run}" in err
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002"]
    GPT.from_pretrained(run)
    # gpt2 export
    proc = gpt2_process("export", str(run), str(tmp_path / "hf"), cap=400_000)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"could not write {tmp_path / 'hf' / 'model.safetensors'} (File too large; is the disk full?)" in err
    assert not (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_a_full_disk_between_saves_is_one_line_too(pattern_data, tmp_path):
    """metrics.jsonl outgrows a 4 kB cap after a few steps, long before any checkpoint."""
    run = tmp_path / "run"
    args = [*SHARD_RUN, "--data_root", str(pattern_data), "--out_dir", str(run), "--eval_interval", "0"]
    proc = gpt2_process("train", *args, "--max_steps", "200", "--checkpoint_interval", "0", cap=4000)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"could not write {run / 'metrics.jsonl'} (File too large; is the disk full?)" in err
    assert "run the same command again" in err


def test_write_failures_are_named_and_other_errors_pass_through(tmp_path):
    from gpt2.fileio import WriteError, atomic_write

    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    for text in ("Error while serializing: I/O error: No space left on device (os error 28)",
                 "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"):  # fmt: skip

        def fail(tmp: Path, text: str = text) -> None:
            tmp.write_bytes(b"half")
            raise RuntimeError(text)

        with pytest.raises(WriteError, match=r"could not write .*f\.bin \(.*; is the disk full\?\)"):
            atomic_write(path, fail)
    with pytest.raises(TypeError):  # a bug is not a full disk

        def bug(tmp: Path) -> None:
            raise TypeError("not a tensor")

        atomic_write(path, bug)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# -- 4. extending a finished run is not a branch --------------------------------------------------------


def test_extending_a_finished_run_moves_nothing_and_keeps_every_record(pattern_data, tmp_path, capsys):
    run = tmp_path / "run"
    first_run(pattern_data, run, capsys, max_steps=4)
    before = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in before if r["type"] == "eval"] == [0, 2, 4]
    code, out, err = train("--resume", str(run), "--max_steps", "6", capsys=capsys)
    assert code == 0, err
    assert "branch" not in out and not list((run / "checkpoints").glob("abandoned-*"))
    after = read_metrics(run / "metrics.jsonl")
    assert after[: len(before)] == before  # the final val loss of the first part stays
    assert [r["step"] for r in after if r["type"] == "eval"] == [0, 2, 4, 6]  # step 4 not evaluated twice
    assert [r["step"] for r in after if r["type"] == "train"] == list(range(6))
    # a rerun of the finished run (a requeued `--resume auto` job): nothing to do, nothing moved
    code, out, err = train("--resume", "auto", "--out_dir", str(run), capsys=capsys)
    assert code == 0, err
    assert "at max_steps 6 already" in out and not list((run / "checkpoints").glob("abandoned-*"))
    assert [r for r in read_metrics(run / "metrics.jsonl") if r["type"] != "event"] == [
        r for r in after if r["type"] != "event"
    ]
    code, _, err = train("--resume", str(run), "--max_steps", "3", capsys=capsys)
    assert code == 2 and "is at step 6, past max_steps 3; pass --max_steps 6 or more" in err


def test_a_killed_run_redoes_its_last_steps_without_calling_it_a_branch(pattern_data, tmp_path, capsys):
    run = tmp_path / "run"
    first_run(pattern_data, run, capsys, max_steps=4)
    with open(run / "metrics.jsonl", "a") as f:  # what a run killed during step 4 leaves
        f.write(json.dumps({"type": "train", "step": 4, "loss": 1.0}) + "\n")
    code, out, err = train("--resume", str(run), "--max_steps", "6", capsys=capsys)
    assert code == 0, err
    assert "new branch" not in out and "continuing from step 4: 1 metrics record(s) of later steps" in out
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["type"] == "train"] == list(range(6))


# -- 5. a checkpoint without its manifest is incomplete, not old -----------------------------------------


def test_a_checkpoint_whose_manifest_was_deleted_is_refused(pattern_data, tmp_path, capsys):
    run = tmp_path / "run"
    first_run(pattern_data, run, capsys, max_steps=4)
    newest = run / "checkpoints" / "step_00000004"
    (newest / "checkpoint.json").unlink()
    weights = newest / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0x01  # and a corrupted weight, which the manifest would have caught
    weights.write_bytes(bytes(raw))
    code, _, err = train("--resume", str(run), "--max_steps", "6", capsys=capsys)
    assert code == 2 and "\n" not in err and f"checkpoint {newest} lacks checkpoint.json" in err, err
    assert cli_main(["generate", "--model", str(run), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "lacks checkpoint.json" in err and f"--model {run / 'checkpoints' / 'step_00000002'}" in err


def test_a_checkpoint_from_before_manifests_still_loads(pattern_data, tmp_path, capsys):
    run = tmp_path / "run"
    first_run(pattern_data, run, capsys, max_steps=2)
    ckpt = run / "checkpoints" / "step_00000002"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    del state["sealed"]  # as versions before checkpoint.json wrote it
    torch.save(state, ckpt / "trainer_state.pt")
    (ckpt / "checkpoint.json").unlink()
    code, _, err = train("--resume", str(run), "--max_steps", "4", capsys=capsys)
    assert code == 0, err


# -- 6. one line, naming the file, for every mistake ----------------------------------------------------


def one_line_error(argv: list[str], capsys) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_serve_checks_its_flags_and_address_before_loading(capsys, tmp_path):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    missing = str(tmp_path / "no-model")  # the model would fail to load: the flags are checked first
    assert "--port must be in 1..65535, got 99999" in one_line_error(
        ["serve", "--model", missing, "--port", "99999"], capsys
    )
    assert "--port must be in 1..65535, got -1" in one_line_error(["serve", "--model", missing, "--port", "-1"], capsys)
    assert "--max-queue must be >= 1, got 0" in one_line_error(
        ["serve", "--model", missing, "--max-queue", "0"], capsys
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        err = one_line_error(["serve", "--model", missing, "--port", port], capsys)
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err


def test_metrics_lines_that_are_not_records_break_nothing(pattern_data, tmp_path, capsys):
    run = tmp_path / "run"
    first_run(pattern_data, run, capsys, max_steps=4)
    junk = [b"[1, 2]\n", b'"a string"\n', b"\xff\xfe not utf-8\n"]
    with open(run / "metrics.jsonl", "ab") as f:
        f.writelines(junk)
    if _has("matplotlib"):
        assert cli_main(["plot", str(run)]) == 0
    code, out, err = train("--resume", str(run / "checkpoints" / "step_00000002"), "--max_steps", "4", capsys=capsys)
    assert code == 0 and "new branch from step 2" in out, err
    assert all(line in (run / "metrics.jsonl").read_bytes() for line in junk)  # kept, byte for byte


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_files_that_are_not_utf8_are_named(tmp_path, capsys):
    model = tmp_path / "m"
    GPT(GPTConfig.from_name("tiny")).save_pretrained(model)
    (model / "config.json").write_bytes(b'{"n_layer": "\xff"}')
    err = one_line_error(["generate", "--model", str(model)], capsys)
    assert f"{model / 'config.json'} is not UTF-8 text" in err
    GPT(GPTConfig.from_name("tiny")).save_pretrained(model)
    bad = tmp_path / "h.jsonl"
    bad.write_bytes(b'{"ctx": "caf\xe9"}\n')
    err = one_line_error(["eval", "hellaswag", "--model", str(model), "--data", str(bad)], capsys)
    assert f"{bad}:1: not UTF-8 text" in err
    (model / "config.json").write_text("[1, 2]")
    assert "holds a JSON list, not an object" in one_line_error(["generate", "--model", str(model)], capsys)


def test_train_config_that_is_not_utf8_is_named_on_resume(pattern_data, tmp_path, capsys):
    run = tmp_path / "run"
    first_run(pattern_data, run, capsys, max_steps=2)
    saved = run / "checkpoints" / "step_00000002" / "train_config.json"
    saved.write_bytes(b"\xff" + saved.read_bytes())
    err = one_line_error(["train", "--resume", str(run)], capsys)
    assert f"{saved} is not UTF-8 text" in err


def test_numbers_out_of_range_are_one_line_errors(tmp_path, capsys):
    model = tmp_path / "m"
    GPT(GPTConfig.from_name("tiny")).save_pretrained(model)
    (tmp_path / "t.txt").write_text("some text")
    err = one_line_error(
        ["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "s"), "--shard-tokens", "1e20", "-q"], capsys
    )
    assert "shard_tokens must be in 1..2,147,483,648" in err
    huge = "99999999999999999999999"
    assert "--seed must be in 0.." in one_line_error(["generate", "--model", str(model), "--seed", huge], capsys)
    assert "seed in the command line must be a whole number between" in one_line_error(
        ["train", "--seed", huge], capsys
    )
    assert "seed must be in 0.." in one_line_error(["train", "--seed", "-1"], capsys)
    assert "--atol must be a finite number >= 0, got nan" in one_line_error(
        ["validate", "--model", str(model), "--atol", "nan"], capsys
    )
    assert "--greedy-tokens must be >= 1, got 0" in one_line_error(
        ["validate", "--model", str(model), "--greedy-tokens", "0"], capsys
    )


def test_a_prompt_outside_the_models_vocabulary_is_one_line(tmp_path, capsys):
    model = tmp_path / "m"
    GPT(GPTConfig.from_name("tiny", vocab_size=128)).save_pretrained(model)
    err = one_line_error(["generate", "--model", str(model), "--max-new-tokens", "2"], capsys)
    assert "token id 50256, outside the model's vocabulary of 128" in err


# -- 7. every piece of advice is a command that works ---------------------------------------------------


def test_an_empty_sample_prompt_suggests_a_generate_command_that_runs(tmp_path, capsys):
    run, text = tmp_path / "run", tmp_path / "corpus.txt"
    text.write_text(words(2000, ["sun", "moon", "star"], seed=4))
    args = [*TEXT_RUN, "--out_dir", str(run), "--data", str(text), "--max_steps", "1", "--sample_prompt", ""]
    code, out, err = train(*args, "--sample_interval", "1", "--sample_tokens", "2", capsys=capsys)
    assert code == 0, err
    suggested = next(line for line in out.splitlines() if line.startswith("generate from it: "))
    command = suggested.removeprefix("generate from it: gpt2 ").split()
    assert "--prompt" not in command
    assert cli_main([*command, "--max-new-tokens", "2", "--device", "cpu"]) == 0


def test_an_over_long_sample_prompt_is_refused_before_the_run_starts(pattern_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = [*SHARD_RUN, "--data_root", str(pattern_data), "--out_dir", str(run), "--sample_interval", "5"]
    code, _, err = train(*args, "--sample_prompt", "word " * 100, capsys=capsys)
    assert code == 2 and "sample_prompt has 101 tokens but the model's context is 64" in err
    assert not run.exists()


def test_an_offline_hellaswag_download_names_the_training_flag(tmp_path, monkeypatch):
    import urllib.request

    from gpt2.training.config import TrainingConfig
    from gpt2.training.periodic import load_hellaswag_examples

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr("gpt2.evaluation.task_data.default_cache_dir", lambda: tmp_path)
    cfg = TrainingConfig(hellaswag_path="download", hellaswag_interval=10)
    with pytest.raises(RuntimeError, match="--hellaswag_path FILE, or --hellaswag_interval 0") as info:
        load_hellaswag_examples(cfg, print)
    assert "--data" not in str(info.value)


# -- 8. no silent surprises ---------------------------------------------------------------------------


def test_eval_loss_limits_shards_and_refuses_a_second_pass(pattern_data, tmp_path, capsys):
    model = tmp_path / "m"
    GPT(GPTConfig.from_name("tiny", vocab_size=128)).save_pretrained(model)
    base = ["eval", "loss", "--model", str(model), "--data", str(pattern_data), "--device", "cpu"]
    base += ["--seq-len", "16", "--batch-size", "2"]
    assert cli_main([*base, "--limit", "100", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tokens"] == 128 and result["steps"] == 4  # whole batches of 32 tokens holding 100
    capsys.readouterr()
    err = one_line_error([*base, "--steps", "1000"], capsys)
    assert "--steps 1000 is more than one pass over the val split (93 batches per rank)" in err


def test_eval_checks_json_before_evaluating(tmp_path, capsys):
    missing_model = str(tmp_path / "no-model")  # would fail only after the --json checks
    (tmp_path / "file").write_text("x")
    err = one_line_error(["eval", "hellaswag", "--model", missing_model, "--json", str(tmp_path)], capsys)
    assert "is a directory; pass a file name" in err
    err = one_line_error(
        ["eval", "hellaswag", "--model", missing_model, "--json", str(tmp_path / "file" / "r.json")], capsys
    )
    assert "cannot create its directory" in err
    nested = tmp_path / "new" / "dir" / "r.json"
    err = one_line_error(["eval", "hellaswag", "--model", missing_model, "--json", str(nested)], capsys)
    assert "does not exist" in err and nested.parent.is_dir()  # made before the evaluation


@pytest.mark.parametrize("top_p", ["1e-46", "1e-300"])
def test_a_top_p_below_float32s_range_keeps_the_top_token(tmp_path, capsys, top_p):
    from gpt2.inference.sampling import filter_rows

    model = tmp_path / "m"
    GPT(GPTConfig.from_name("tiny")).save_pretrained(model)
    args = ["generate", "--model", str(model), "--prompt", "Hi", "--max-new-tokens", "4", "--device", "cpu"]
    assert cli_main([*args, "--top-p", top_p, "--no-stop"]) == 0
    sampled = capsys.readouterr().out
    assert cli_main([*args, "--temperature", "0", "--no-stop"]) == 0
    assert sampled == capsys.readouterr().out  # only the top token is left: the greedy answer
    logits = torch.randn(3, 50)
    kept = filter_rows(logits, torch.full((3,), 50), torch.full((3,), float(top_p)))
    assert torch.equal(kept.argmax(-1), logits.argmax(-1)) and (kept.isfinite().sum(-1) == 1).all()


# -- 9. install and packaging -------------------------------------------------------------------------


def test_the_dev_extra_installs_every_other_extra():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    dev = set(extras["dev"])
    for name, packages in extras.items():
        assert set(packages) <= dev, f"{name}: {set(packages) - dev} missing from .[dev]"
    assert "tensorboard>=2.14" in dev and any(p.startswith("accelerate") for p in extras["hf"])
    assert isinstance(project["license"], str)  # PEP 639; the table form is deprecated


def test_version_and_the_script_wrappers(capsys):
    from gpt2 import __version__

    with pytest.raises(SystemExit) as info:
        cli_main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith(f"gpt2 {__version__} (torch ")
    for name, command in {
        "train": "train",
        "eval_hellaswag": "eval",
        "generate": "generate",
        "validate": "validate",
    }.items():
        text = (REPO / "scripts" / f"{name}.py").read_text()
        assert f'main(["{command}"' in text, name


def test_the_busy_cpu_note(monkeypatch):
    from gpt2.commands.generate import busy_cpu_note

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    torch.set_num_threads(2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    assert "OMP_NUM_THREADS=1 may be much faster" in busy_cpu_note(torch.device("cpu"))
    for idle in (0.0, 0.6):
        monkeypatch.setattr(os, "getloadavg", lambda idle=idle: (idle, idle, idle))
        assert busy_cpu_note(torch.device("cpu")) == ""  # nothing else keeps a core busy: no note
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    assert busy_cpu_note(torch.device("cpu")) == ""  # the user chose
