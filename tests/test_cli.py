"""The `gpt2` command as a user runs it: exit codes and one-line errors. The commands run in this
process through gpt2.cli.main (a subprocess costs seconds of imports each); one smoke test runs
`python -m gpt2` for real."""

import contextlib
import io
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")


def gpt2(*args, cwd=None) -> subprocess.CompletedProcess:
    """`gpt2 ARGS` through gpt2.cli.main in this process: its exit code, stdout and stderr (the
    torch settings a command changes for its process are put back)."""
    from gpt2.cli import main

    out, err = io.StringIO(), io.StringIO()
    grad, precision, here = torch.is_grad_enabled(), torch.get_float32_matmul_precision(), os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse: --help, usage errors
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    finally:
        os.chdir(here)
        torch.set_grad_enabled(grad)
        torch.set_float32_matmul_precision(precision)
    return subprocess.CompletedProcess(["gpt2", *args], code, out.getvalue(), err.getvalue())


def gpt2_process(*args, cwd=None) -> subprocess.CompletedProcess:
    """`python -m gpt2 ARGS` in a fresh process, as a user runs it."""
    argv = [sys.executable, "-m", "gpt2", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128)
    ).save_pretrained(path)
    return path


def test_help_lists_commands():
    r = gpt2("--help")
    assert r.returncode == 0
    for cmd in ("train", "prepare", "generate", "eval", "validate", "export", "plot"):
        assert cmd in r.stdout


GENERATE = ("generate", "--prompt", "Once upon a time", "--max-new-tokens", "8", "--no-stop")


def test_generate_streams_and_reports_speed(hf_dir):
    r = gpt2(*GENERATE, "--model", hf_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time")
    assert "tokens/s" in r.stderr


@pytest.mark.slow
def test_the_command_runs_as_a_process(hf_dir):
    """The one smoke test of the real entry point (python -m gpt2: imports, exit code, streams)."""
    r = gpt2_process(*GENERATE, "--model", hf_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time")
    assert "tokens/s" in r.stderr
    bad = gpt2_process(*GENERATE, "--model", hf_dir, "--top-k", "0")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "gpt2 generate: error: top_k must be >= 1 (or unset for no limit), got 0"
    ]


def test_generate_several_samples(hf_dir):
    r = gpt2("generate", "--model", str(hf_dir), "--num-samples", "2", "--max-new-tokens", "5", "--top-k", "5")
    assert r.returncode == 0, r.stderr
    assert "--- sample 2 ---" in r.stdout


def test_validate_passes_on_a_faithful_checkpoint(hf_dir):
    r = gpt2("validate", "--model", str(hf_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--prompt", "", "--model", "HF"], "empty prompt"),
        (["--top-p", "2", "--model", "HF"], "top_p must be in (0, 1]"),
        (["--temperature", "-1", "--model", "HF"], "temperature must be >= 0"),
        (["--top-k", "0", "--model", "HF"], "top_k must be >= 1"),
        (["--prompt", "word " * 200, "--model", "HF"], "prompt has 201 tokens but the model's context is 128"),
    ],
)
def test_generate_bad_input_is_one_line(hf_dir, args, message):
    args = [str(hf_dir) if a == "HF" else a for a in args]
    r = gpt2("generate", *args, "--max-new-tokens", "2")
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--decode-kernels", "fused", "--device", "cpu"], "fused decode kernels need a CUDA device"),
        (["--decode-kernels", "fused", "--compile"], "compile applies to the PyTorch decode step"),
    ],
)
def test_serve_refuses_decode_kernels_it_cannot_run_before_loading(args, message):
    pytest.importorskip("uvicorn")
    r = gpt2("serve", "--model", "no-such-dir-so-loading-would-fail", *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--allowed-origins", "localhost:3000"], "'localhost:3000' is not an origin"),
        (["--allowed-origins", '["http://a.example"'], "is not a valid JSON list"),
        (["--max-body-bytes", "10"], "--max-body-bytes must be at least 1024"),
        (["--chat-template", "no-such-template.jinja"], "no such file"),
        (["--chat-template", "{% for %}"], "not a valid Jinja template"),
        (["--api-key", ""], "--api-key must not be empty"),
        (["--stall-timeout", "0"], "--stall-timeout must be a positive number of seconds"),
        (["--stall-timeout", "nan"], "--stall-timeout must be a positive number of seconds"),
    ],
)
def test_serve_refuses_bad_http_flags_before_loading(args, message):
    pytest.importorskip("uvicorn")
    r = gpt2("serve", "--model", "no-such-dir-so-loading-would-fail", *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_serve_origins_flag_forms():
    from gpt2.commands.serve import parse_origins

    assert parse_origins("http://a.example, https://b.example:8443") == ("http://a.example", "https://b.example:8443")
    assert parse_origins('["http://a.example"]') == ("http://a.example",) and parse_origins("*") == ("*",)
    assert parse_origins(None) == () and parse_origins(" ") == ()


def test_serve_http_flags_reach_the_http_config():
    """--stall-timeout and the other HTTP flags become HTTPConfig fields; defaults are HTTPConfig's own."""
    import argparse

    from gpt2.commands.serve import add_http_arguments, http_config
    from gpt2.serve.config import HTTPConfig

    parser = argparse.ArgumentParser()
    add_http_arguments(parser)
    assert http_config(parser.parse_args([])).stall_timeout_s == HTTPConfig().stall_timeout_s
    config = http_config(parser.parse_args(["--stall-timeout", "120", "--max-body-bytes", "4096"]))
    assert (config.stall_timeout_s, config.max_body_bytes) == (120.0, 4096)
