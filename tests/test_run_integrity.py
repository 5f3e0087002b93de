"""A run directory's history stays linear and nothing is lost: branches, failed starts, a failing
resume, one writer at a time, damaged checkpoints, hub names, file modes, and the small rough edges
of the command line. Every run goes through `gpt2 train` as a user types it (the tiny model on a
128-token vocabulary: a step takes milliseconds)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2 import GPT, GPTConfig
from gpt2.checkpoint import (
    DamagedCheckpointError,
    RunLock,
    checkpoint_dirs,
    find_checkpoint,
    latest_checkpoint,
    read_metrics,
    read_run_state,
)
from gpt2.cli import main as cli_main
from gpt2.training import build_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 128
TINY = ["--model", "tiny", "--vocab_size", str(VOCAB), "--device", "cpu", "--tensorboard", "false", "--plot", "false"]
TINY += ["--micro_batch_size", "2", "--seq_len", "16", "--total_batch_size", "64", "--max_lr", "3e-3"]
TINY += ["--warmup_steps", "2", "--eval_interval", "2", "--val_steps", "1", "--sample_interval", "0"]
TINY += ["--hellaswag_interval", "0", "--keep_last_k", "0", "--log_interval", "1"]


@pytest.fixture
def data(pattern_data: Path) -> Path:
    return pattern_data  # conftest: 128-token pattern shards


def train(*args: str, capsys) -> tuple[int, str, str]:
    code = cli_main(["train", *args])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def steps(run: Path, kind: str = "loss") -> dict[int, float]:
    return {r["step"]: r[kind] for r in read_metrics(run / "metrics.jsonl") if kind in r}


def first_run(data: Path, run: Path, capsys, max_steps: int = 6, every: int = 2) -> None:
    args = [*TINY, "--data_root", str(data), "--out_dir", str(run), "--max_steps", str(max_steps)]
    code, _, err = train(*args, "--checkpoint_interval", str(every), capsys=capsys)
    assert code == 0, err


# -- 1. a branch from an older checkpoint is the live timeline ------------------------------------------


def test_resuming_an_older_checkpoint_starts_a_branch_that_every_tool_follows(data, tmp_path, capsys):
    run = tmp_path / "run"
    first_run(data, run, capsys)
    old = {step: loss for step, loss in steps(run).items()}
    old_6 = load_file(run / "checkpoints" / "step_00000006" / "model.safetensors")
    ckpt2 = run / "checkpoints" / "step_00000002"
    code, out, err = train("--resume", str(ckpt2), "--max_steps", "4", "--max_lr", "5e-4", capsys=capsys)
    assert code == 0, err
    assert "new branch from step 2: moved 2 newer checkpoint(s) (step_00000004 .. step_00000006)" in out
    live = [p.name for p in checkpoint_dirs(run)]
    assert live == ["step_00000002", "step_00000004"]
    (abandoned,) = (run / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in abandoned.glob("step_*")) == ["step_00000004", "step_00000006"]
    moved = load_file(abandoned / "step_00000006" / "model.safetensors")
    assert torch.equal(moved["transformer.wte.weight"], old_6["transformer.wte.weight"])
    # metrics.jsonl: one timeline (steps 0-1 of the first run, 2-3 of the branch); the rest moved aside
    now = steps(run)
    assert sorted(now) == [0, 1, 2, 3] and now[2] == old[2] and now[3] != old[3]  # same weights at 2, then lr 5e-4
    assert sorted(steps(abandoned)) == [2, 3, 4, 5]
    assert json.loads((abandoned / "train_config.json").read_text())["max_lr"] == 3e-3
    assert json.loads((run / "train_config.json").read_text())["max_lr"] == 5e-4
    assert read_run_state(run)["current"] == "step_00000004"
    # every tool means the branch's newest checkpoint, with the branch's settings
    assert find_checkpoint(run) == run / "checkpoints" / "step_00000004"
    new_4 = load_file(run / "checkpoints" / "step_00000004" / "model.safetensors")
    model = GPT.from_pretrained(run)
    assert torch.equal(model.transformer.wte.weight, new_4["transformer.wte.weight"])
    assert build_config(None, {"resume": str(run)}).max_lr == 5e-4
    assert cli_main(["export", str(run), str(tmp_path / "hf")]) == 0
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(exported["transformer.wte.weight"], new_4["transformer.wte.weight"])


# -- 2. failed starts leave a directory the corrected command accepts --------------------------------------


def test_failed_starts_leave_nothing_a_rerun_trips_over(data, tmp_path, capsys):
    run = tmp_path / "run"
    base = [*TINY, "--out_dir", str(run), "--max_steps", "2", "--checkpoint_interval", "2"]
    code, _, err = train(*base, "--data_root", str(tmp_path / "nowhere"), capsys=capsys)
    assert code == 2 and "does not exist" in err and not run.exists()
    (tmp_path / "empty").mkdir()
    code, _, err = train(*base, "--data_root", str(tmp_path / "empty"), capsys=capsys)
    assert code == 2 and "no 'train' shards" in err and not run.exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x_train_000001.bin").write_bytes(b"not a shard at all")
    code, _, err = train(*base, "--data_root", str(bad), capsys=capsys)
    assert code == 2 and "not a gpt2 token shard" in err and not run.exists()
    code, _, err = train(*base, "--data", str(tmp_path / "missing.txt"), capsys=capsys)
    assert code == 2 and "no such file" in err and not run.exists()
    code, _, err = train(*base, "--data_root", str(data), capsys=capsys)  # the corrected command
    assert code == 0, err


def test_a_run_that_dies_before_its_first_checkpoint_can_be_started_again(data, tmp_path, capsys):
    run = tmp_path / "run"
    base = [*TINY, "--data_root", str(data), "--out_dir", str(run), "--max_steps", "3", "--eval_interval", "0"]
    code, _, err = train(*base, "--max_lr", "1e4", "--warmup_steps", "0", "--grad_clip", "0", capsys=capsys)
    assert code == 2 and "training stopped; the last good checkpoint is (none yet)" in err
    assert (run / "metrics.jsonl").is_file() and read_run_state(run)["current"] is None
    code, out, err = train(*base, capsys=capsys)  # the same command with a sane learning rate
    assert code == 0, err
    assert "an earlier start of this run failed before its first checkpoint" in out
    (failed,) = run.glob("failed-start-*")
    assert (failed / "metrics.jsonl").is_file() and sorted(steps(run)) == [0, 1, 2]


# -- 3. a failing resume changes nothing -----------------------------------------------------------------


def test_a_resume_that_fails_validation_leaves_the_run_byte_identical(data, tmp_path, capsys):
    run = tmp_path / "run"
    first_run(data, run, capsys, max_steps=4)
    files = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "train_config.json", "run.json")}
    ckpt2 = run / "checkpoints" / "step_00000002"
    code, _, err = train("--resume", str(ckpt2), "--micro_batch_size", "1", capsys=capsys)
    assert code == 2 and "batch_size" in err
    code, _, err = train("--resume", str(ckpt2), "--data", str(tmp_path / "other.txt"), capsys=capsys)
    assert code == 2 and "cannot resume" in err and "drop --data" in err
    assert {name: (run / name).read_bytes() for name in files} == files
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000002", "step_00000004"]
    assert not list((run / "checkpoints").glob("abandoned-*"))


# -- 4. one writer -----------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holder_named(data, tmp_path, capsys):
    run = tmp_path / "run"
    first_run(data, run, capsys, max_steps=2)
    before = (run / "metrics.jsonl").read_bytes()
    with RunLock(run):  # another `gpt2 train` writing this run
        code, _, err = train("--resume", "auto", "--out_dir", str(run), "--max_steps", "4", capsys=capsys)
    assert code == 2 and "is being written by another gpt2 train" in err and f"pid {os.getpid()}" in err
    assert (run / "metrics.jsonl").read_bytes() == before
    code, _, err = train("--resume", "auto", "--out_dir", str(run), "--max_steps", "4", capsys=capsys)
    assert code == 0, err  # released: the next one runs


# -- 5. damaged checkpoints are named, with the newest intact one -----------------------------------------


def test_a_flipped_byte_is_detected_and_the_intact_checkpoint_named(data, tmp_path, capsys):
    run = tmp_path / "run"
    first_run(data, run, capsys, max_steps=4)
    weights = run / "checkpoints" / "step_00000004" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0x01  # inside the tensor data: still a readable safetensors file
    weights.write_bytes(bytes(raw))
    intact = run / "checkpoints" / "step_00000002"
    code, _, err = train("--resume", str(run), capsys=capsys)
    assert code == 2 and "model.safetensors does not match its sha256" in err and f"--resume {intact}" in err
    with pytest.raises(DamagedCheckpointError, match="newest intact checkpoint is .*step_00000002"):
        GPT.from_pretrained(run)
    assert cli_main(["generate", "--model", str(run), "--max-new-tokens", "2"]) == 2
    # branching from the intact one moves the damaged one aside (never deleted, never overwritten)
    code, _, err = train("--resume", str(intact), "--max_steps", "4", capsys=capsys)
    assert code == 0, err
    (abandoned,) = (run / "checkpoints").glob("abandoned-*")
    assert (abandoned / "step_00000004" / "model.safetensors").read_bytes() == bytes(raw)
    GPT.from_pretrained(run)  # the new step 4 is intact


def test_a_checkpoint_missing_a_file_is_an_error_not_skipped(data, tmp_path, capsys):
    run = tmp_path / "run"
    first_run(data, run, capsys, max_steps=4)
    (run / "checkpoints" / "step_00000004" / "config.json").unlink()
    with pytest.raises(DamagedCheckpointError, match=r"step_00000004 lacks config.json; the newest intact .*0002"):
        latest_checkpoint(run)
    code, _, err = train("--resume", "auto", "--out_dir", str(run), capsys=capsys)
    assert code == 2 and "lacks config.json" in err
    assert cli_main(["export", str(run), str(tmp_path / "hf")]) == 2
    assert (run / "checkpoints" / "step_00000004" / "model.safetensors").is_file()  # untouched


# -- 6. hub names ------------------------------------------------------------------------------------------


def test_hub_names_are_hub_names_unless_a_path_says_otherwise(tmp_path, monkeypatch):
    from gpt2.loading import resolve_model

    monkeypatch.chdir(REPO)  # where `pip install -e .` leaves a user: ./gpt2 is the package's source
    assert resolve_model("gpt2").kind == "hub"
    assert resolve_model("gpt2-medium").kind == "hub" and resolve_model("user/model").kind == "hub"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()  # a folder of that name that holds no model
    assert resolve_model("gpt2").kind == "hub"
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model("./gpt2")
    GPT(GPTConfig.from_name("tiny")).save_pretrained(tmp_path / "gpt2")
    assert resolve_model("gpt2").kind == "hf"  # a directory that holds a model is that model
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("./nothing-here")


# -- 7. files get the process's normal permissions ---------------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_published_files_follow_the_umask(data, tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        first_run(data, run, capsys, max_steps=2)
        assert cli_main(["export", str(run), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    files = [*(run / "checkpoints" / "step_00000002").iterdir(), *(tmp_path / "hf").iterdir()]
    files += [run / "train_config.json", run / "run.json", run / "metrics.jsonl"]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(expected)}, modes


# -- 8. the smaller edges -----------------------------------------------------------------------------------


def test_numbers_are_parsed_never_evaluated():
    assert build_config(None, {"total_batch_size": "2**10", "micro_batch_size": "2"}).total_batch_size == 1024
    for text in ("9**9**9", "2**100", "__import__('os')", "1e400"):
        with pytest.raises(ValueError, match="must be a whole number"):
            build_config(None, {"max_steps": text})
    with pytest.raises(ValueError, match="finite"):
        build_config(None, {"max_lr": "nan"})


def test_typos_and_unknown_flags_are_named_with_the_closest_option(capsys):
    assert cli_main(["train", "--max_step", "10"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized argument(s) --max_step 10; did you mean --max_steps?" in err and "usage:" not in err
    assert cli_main(["generate", "--model", "gpt2", "--temprature", "0.5"]) == 2
    assert "did you mean --temperature?" in capsys.readouterr().err


def test_data_settings_that_would_be_ignored_are_refused(tmp_path):
    with pytest.raises(ValueError, match="data_root .* would be ignored: --data sets data"):
        build_config(None, {"data": "my.txt", "data_root": "shards"})
    with pytest.raises(ValueError, match="the quickstart sets data"):
        build_config(None, {"data_root": "shards"}, quickstart=True)
    assert build_config(None, {"data": "none", "data_root": "shards"}, quickstart=True).data_root == "shards"


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_non_finite_sampling_settings_are_one_line_errors(value, capsys, tmp_path):
    GPT(GPTConfig.from_name("tiny")).save_pretrained(tmp_path / "m")
    assert cli_main(["generate", "--model", str(tmp_path / "m"), "--temperature", value]) == 2
    assert "temperature must be >= 0 and finite" in capsys.readouterr().err


def test_resume_with_another_thread_count_says_it_is_not_bit_exact(data, tmp_path, capsys):
    run = tmp_path / "run"
    first_run(data, run, capsys, max_steps=2)
    torch.set_num_threads(2)
    code, out, err = train("--resume", str(run), "--max_steps", "3", capsys=capsys)
    assert code == 0, err
    assert "written with 1 CPU threads, now 2" in out and "OMP_NUM_THREADS=1" in out


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(data, tmp_path):
    """The checkpoint at step 4 cannot be written (files are capped at 200 kB, as a full disk would
    stop them): one line naming the intact step 2 checkpoint, exit 2, no traceback."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "gpt2", "train", *TINY, "--data_root", str(data), "--out_dir", str(run)]
    args += ["--max_steps", "2", "--checkpoint_interval", "2", "--n_layer", "4", "--n_embd", "64"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def cap_files() -> None:  # in the child: writes past the cap fail with EFBIG instead of a signal
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_200_000, 1_200_000))

    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    size = (run / "checkpoints" / "step_00000002" / "trainer_state.pt").stat().st_size
    assert size > 1_200_000, size  # the cap lets metrics through but not a checkpoint's optimizer state
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2", "train", "--resume", str(run), "--max_steps", "6"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=cap_files,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "could not write checkpoint step_00000004" in err and "is the disk full?" in err
    assert f"the previous checkpoint {run / 'checkpoints' / 'step_00000002'} is intact" in err
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000002"]
    GPT.from_pretrained(run)


def test_a_stalled_run_is_announced_before_the_collective_timeout():
    """No step for longer than the idle limit: one note on rank 0 naming the timeout (not silence)."""
    import io
    import time

    from gpt2.training.metrics import RunLogger
    from gpt2.training.shell import StallWatch

    out = io.StringIO()
    log = RunLogger(None, stream=out)
    with StallWatch(log, timeout_s=600, min_idle_s=0.2, poll_s=0.02):
        time.sleep(0.6)
    text = out.getvalue()
    assert text.count("a rank may have stalled or died") == 1 and "600 s into a collective" in text


def test_bad_json_files_are_named_in_one_line(tmp_path, capsys):
    GPT(GPTConfig.from_name("tiny")).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"n_layer": ')
    assert cli_main(["generate", "--model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path / 'm' / 'config.json'} is not valid JSON" in err and "\n" not in err
    GPT(GPTConfig.from_name("tiny")).save_pretrained(tmp_path / "good")
    (tmp_path / "h.jsonl").write_text('{"ctx": "a", "endings": ["b"] "label": 0}\n')
    assert cli_main(["eval", "hellaswag", "--model", str(tmp_path / "good"), "--data", str(tmp_path / "h.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "h.jsonl:1: not valid JSON: Expecting ',' delimiter (column" in err and "at at" not in err
