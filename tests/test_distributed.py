"""DDP on CPU: `torchrun --nproc_per_node=2` (gloo) trains exactly like one process with 2x accumulation."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gpt2.checkpoint import latest_checkpoint, read_metrics
from gpt2.distributed import DistInfo, all_gather_objects, init_distributed
from gpt2.training import build_config, main

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128  # conftest's pattern shards
SETTINGS = {
    "model": "tiny",
    "vocab_size": VOCAB,
    "total_batch_size": 128,  # = 2 sequences x 32 tokens x 2 (processes or micro-steps)
    "micro_batch_size": 2,
    "seq_len": 32,
    "max_lr": 3e-3,
    "warmup_steps": 2,
    "max_steps": 8,
    "eval_interval": 4,
    "val_steps": 2,
    "hellaswag_interval": 0,
    "sample_interval": 0,
    "checkpoint_interval": 4,
    "keep_last_k": 0,
    "tensorboard": False,
    "plot": False,
    "log_interval": 1,
    "device": "cpu",
}


def records(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir / "metrics.jsonl") if key in r}


def test_single_process_setup_needs_no_process_group():
    info = init_distributed({}, "cpu")
    assert info == DistInfo(device=torch.device("cpu")) and not info.distributed and info.is_main
    assert all_gather_objects({"loss": 2.5}) == [{"loss": 2.5}]  # collectives are identities on one process


@pytest.mark.slow
def test_two_process_gloo_ddp_equals_one_process_with_accumulation(tmp_path, pattern_data):
    data = pattern_data
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    args += ["-m", "gpt2", "train", "--data_root", str(data), "--out_dir", str(tmp_path / "ddp")]
    for k, v in SETTINGS.items():
        args += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout and "2 x 1 accumulation" in proc.stdout
    assert proc.stdout.count("step 7/8") == 1  # only rank 0 prints

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # val_steps counts batches per process: 2 processes x 2 batches read the same val chunks as 1 x 4
        one_cfg = {**SETTINGS, "val_steps": 4, "data_root": str(data), "out_dir": str(tmp_path / "one")}
        cfg = build_config(None, one_cfg)
        out = io.StringIO()
        assert main(cfg, {}, stream=out) == 0
        assert "1 x 2 accumulation" in out.getvalue()

        ddp, one = records(tmp_path / "ddp", "loss"), records(tmp_path / "one", "loss")
        assert sorted(ddp) == sorted(one) == list(range(8))  # rank 0 alone wrote metrics.jsonl
        np.testing.assert_allclose([ddp[s] for s in range(8)], [one[s] for s in range(8)], rtol=1e-5, atol=1e-6)
        ddp_val, one_val = records(tmp_path / "ddp", "val_loss"), records(tmp_path / "one", "val_loss")
        assert sorted(ddp_val) == [0, 4, 8]
        np.testing.assert_allclose([ddp_val[s] for s in ddp_val], [one_val[s] for s in ddp_val], rtol=1e-5)
        assert one[7] < one[0] - 0.3
        a = load_file(latest_checkpoint(tmp_path / "ddp") / "model.safetensors")
        b = load_file(latest_checkpoint(tmp_path / "one") / "model.safetensors")
        assert set(a) == set(b)  # no "module." prefixes from the DDP wrapper
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)

        # The 2-process checkpoint at step 4 resumes on 1 process (the loader position is global).
        ckpt = tmp_path / "ddp" / "checkpoints" / "step_00000004"
        out = io.StringIO()
        assert main(build_config(None, {"resume": str(ckpt)}), {}, stream=out) == 0
        assert "checkpoint from 2 process(es), now 1" in out.getvalue()
        resumed = records(tmp_path / "ddp", "loss")
        assert sorted(resumed) == list(range(8))
        np.testing.assert_allclose([resumed[s] for s in range(4, 8)], [one[s] for s in range(4, 8)], rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


# Run under torchrun by the test below: one DDP or FSDP step, then destroy_distributed, then a
# look at the threads left in this process.
TEARDOWN_SCRIPT = """
import os, sys, torch
from gpt2 import GPT, GPTConfig
from gpt2.distributed import all_reduce_sum, destroy_distributed, init_distributed

def gloo_threads():
    names = (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    return sorted(n for n in names if "gloo" in n)

def train_step(parallelism):  # its model, optimizer and graph are gone when it returns, as with train()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    if parallelism == "fsdp":
        from gpt2.training.parallel import shard_model
        wrapped = model = shard_model(model, mixed_precision=False, activation_checkpointing=False)
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, 64, (2, 16))
    loss = wrapped(x, x)[1]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)  # under FSDP: DTensor ops, DTensor's caches
    optimizer.step()
    all_reduce_sum(loss.detach())

init_distributed(os.environ, "cpu")
train_step(sys.argv[1])
if not gloo_threads():
    print("gloo threads are not named here")
    sys.exit(0)
destroy_distributed()
left = gloo_threads()
sys.exit(f"gloo threads still running after destroy_distributed: {left}" if left else 0)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc (Linux)")
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_destroy_distributed_frees_the_gloo_group(tmp_path, parallelism):
    """destroy_distributed leaves no gloo thread behind, after DDP or FSDP: one left running while
    the interpreter exits can abort it, SIGABRT after a finished run (see destroy_distributed)."""
    script = tmp_path / "teardown.py"
    script.write_text(textwrap.dedent(TEARDOWN_SCRIPT))
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*args, str(script), parallelism], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if "gloo threads are not named here" in proc.stdout:
        pytest.skip("this torch does not name gloo's threads")


@pytest.mark.slow
def test_two_process_fsdp_training_equals_ddp_and_resumes(tmp_path, pattern_data):
    """`gpt2 train --parallelism fsdp` under torchrun: same losses as DDP; its sharded checkpoint
    resumes (same later losses) and loads as a plain model."""
    data = pattern_data
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(out: str, *extra: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
        args += ["-m", "gpt2", "train", "--data_root", str(data), "--out_dir", str(tmp_path / out)]
        for k, v in SETTINGS.items():
            args += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
        proc = subprocess.run([*args, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    run("ddp")
    run("fsdp", "--parallelism", "fsdp")
    ddp, fsdp = records(tmp_path / "ddp", "loss"), records(tmp_path / "fsdp", "loss")
    assert sorted(fsdp) == list(range(8))
    for step in ddp:
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-5, abs=1e-6)
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step_00000004"
    assert (ckpt / ".metadata").is_file()

    run("fsdp", "--parallelism", "fsdp", "--resume", str(ckpt))
    resumed = records(tmp_path / "fsdp", "loss")
    for step in range(4, 8):
        assert resumed[step] == pytest.approx(fsdp[step], rel=1e-6, abs=1e-7)

    from gpt2 import GPT

    model = GPT.from_pretrained(tmp_path / "fsdp")  # the sharded checkpoint, consolidated
    assert model.config.vocab_size == VOCAB
