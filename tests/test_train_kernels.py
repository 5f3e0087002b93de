"""gpt2.kernels' training kernels: the fused MLP against gpt2.block.MLP (forward and backward), the
model with them against the model without, and the choice `train_kernels` (CPU: its errors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2 import GPT, GPTConfig, kernels
from gpt2.kernels.training import FusedMLP, fuse_mlps, use_training_kernels
from gpt2.training import TrainingConfig

REPO = Path(__file__).resolve().parents[1]
needs_kernels = pytest.mark.skipif(not kernels.available("cuda"), reason="needs CUDA and triton")
gpu = pytest.mark.gpu


def mlp_inputs(M: int, C: int, dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
    """x (M, C), w_fc (4C, C), b_fc (4C,), w_proj (C, 4C), b_proj (C,): fresh random values at
    GPT-2-like scales, so GELU sees both of its regimes."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(M, C), (4 * C, C), (4 * C,), (C, 4 * C), (C,)]
    scales = [1.0, C**-0.5, 0.5, (4 * C) ** -0.5, 0.1]
    return [(torch.randn(s, generator=g, dtype=torch.float64) * k).to(device, dtype) for s, k in zip(shapes, scales)]


def reference_mlp(x, w_fc, b_fc, w_proj, b_proj):
    """gpt2.block.MLP's function, in PyTorch."""
    return F.linear(F.gelu(F.linear(x, w_fc, b_fc), approximate="tanh"), w_proj, b_proj)


def outputs_and_grads(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


@needs_kernels
@gpu
@pytest.mark.parametrize("M,C", [(300, 96), (2048, 768), (1000, 1600)])
def test_fused_mlp_matches_pytorch_in_float32(M, C):
    from gpt2.kernels.mlp import mlp

    inputs = mlp_inputs(M, C, torch.float32, "cuda", seed=M)
    dy = torch.randn(M, C, device="cuda")
    ref = outputs_and_grads(reference_mlp, [t.double() for t in inputs], dy.double())
    got = outputs_and_grads(mlp, inputs, dy)
    for name, a, r in zip(["y", "dx", "dw_fc", "db_fc", "dw_proj", "db_proj"], got, ref):
        assert torch.isfinite(a).all(), name
        assert rel(a, r) < 1e-4, (name, rel(a, r))


@needs_kernels
@gpu
@pytest.mark.parametrize("M,C", [(4096, 768), (777, 1024)])
def test_fused_mlp_in_bf16_is_no_further_from_float32_than_pytorch(M, C):
    """Under bf16 autocast the fused MLP and nn.Linear's bf16 path make rounding errors of the same size."""
    from gpt2.kernels.mlp import mlp

    inputs = mlp_inputs(M, C, torch.float32, "cuda", seed=C)
    dy = torch.randn(M, C, device="cuda").bfloat16().float()
    exact = outputs_and_grads(reference_mlp, [t.double() for t in inputs], dy.double())
    with torch.autocast("cuda", torch.bfloat16):
        ours = outputs_and_grads(mlp, inputs, dy)
        theirs = outputs_and_grads(reference_mlp, inputs, dy)
    for name, a, b, r in zip(["y", "dx", "dw_fc", "db_fc", "dw_proj", "db_proj"], ours, theirs, exact):
        assert rel(a, r) <= 1.5 * rel(b, r) + 1e-3, (name, rel(a, r), rel(b, r))


def twin_models(config: GPTConfig) -> tuple[GPT, GPT]:
    """A random model (biases and LayerNorms away from their init, so they count) and the same
    weights with fused MLPs, on CUDA."""
    torch.manual_seed(0)
    plain = GPT(config).cuda()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = fuse_mlps(GPT(config).cuda())
    fused.load_state_dict(plain.state_dict())
    return plain, fused


@needs_kernels
@gpu
def test_a_model_with_fused_mlps_computes_the_same_loss_and_gradients():
    config = GPTConfig.from_name("tiny")
    plain, fused = twin_models(config)
    assert list(fused.state_dict()) == list(plain.state_dict())  # same keys: checkpoints unchanged
    assert all(isinstance(b.mlp, FusedMLP) for b in fused.transformer.h)
    x = torch.randint(0, config.vocab_size, (4, 64), device="cuda")
    y = torch.randint(0, config.vocab_size, (4, 64), device="cuda")
    losses = []
    for model in (plain, fused):
        _, loss = model(x, y, return_logits=False)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[0])
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert rel(q.grad, p.grad) < 1e-4, name


@needs_kernels
@gpu
def test_compiled_fused_training_step_under_bf16_autocast():
    """torch.compile traces through the custom ops; the loss equals the unfused compiled step's."""
    config = GPTConfig.from_name("tiny")
    plain, fused = twin_models(config)
    x = torch.randint(0, config.vocab_size, (16, config.block_size), device="cuda")  # 16 x 64 rows
    losses = []
    for model in (plain, fused):
        step = torch.compile(model)
        with torch.autocast("cuda", torch.bfloat16):
            _, loss = step(x, x, return_logits=False)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 2e-2


def test_train_kernels_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto_cpu = (False, "training kernels: PyTorch (auto: no fused kernels on cpu; --train_kernels fused saves memory)")
    assert use_training_kernels("auto", cpu) == auto_cpu
    assert use_training_kernels("torch", cuda)[0] is False
    with pytest.raises(ValueError, match="train_kernels fused needs a CUDA device"):
        use_training_kernels("fused", cpu)
    with pytest.raises(ValueError, match="unknown train_kernels 'fast'; choose one of auto, fused, torch"):
        use_training_kernels("fast", cpu)
    monkeypatch.setattr("gpt2.kernels.training.HAS_TRITON", False)
    with pytest.raises(ValueError, match="train_kernels fused needs the triton package"):
        use_training_kernels("fused", cuda)
    assert use_training_kernels("auto", cuda)[0] is False
    monkeypatch.setattr("gpt2.kernels.training.HAS_TRITON", True)
    assert use_training_kernels("auto", cuda)[0] is False  # the fused MLP is slower on an H100 (NOTES.md)
    assert use_training_kernels("fused", cuda)[0] is True


def test_config_refuses_an_unknown_train_kernels():
    with pytest.raises(ValueError, match="unknown train_kernels 'triton'"):
        TrainingConfig(train_kernels="triton")


def test_fused_on_a_cpu_is_one_line_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "gpt2", "train", "--quickstart", "--train_kernels", "fused", "--out_dir", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("train_kernels fused needs a CUDA device (this run is on cpu); use --train_kernels torch or auto")
    )
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(not kernels.HAS_TRITON or torch.cuda.is_available(), reason="needs triton, run on a CPU")
def test_the_mlp_kernels_in_tritons_interpreter():
    """Without a GPU, Triton's interpreter runs the same kernels on the CPU (float32, IEEE dots)."""
    code = (
        "import torch; from tests.test_train_kernels import *; from gpt2.kernels.mlp import mlp\n"
        "inputs = mlp_inputs(80, 32, torch.float32, 'cpu', seed=0); dy = torch.randn(80, 32)\n"
        "ref = outputs_and_grads(reference_mlp, [t.double() for t in inputs], dy.double())\n"
        "got = outputs_and_grads(mlp, inputs, dy)\n"
        "print(max(rel(a, r) for a, r in zip(got, ref)))\n"
    )
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) < 1e-5
