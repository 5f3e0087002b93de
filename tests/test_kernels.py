"""gpt2.kernels: the fused decode step against the model's own forward (CUDA + triton only)."""

from __future__ import annotations

import copy

import pytest
import torch

from gpt2 import GPT, GPTConfig, kernels
from gpt2.inference.runner import BatchDecoder, SlotCache, decode_step
from gpt2.inference.sampling import GREEDY
from gpt2.inference.state import DecodeState

needs_kernels = pytest.mark.skipif(not kernels.available("cuda"), reason="needs CUDA and triton")


def test_fused_decode_refuses_a_device_it_cannot_run_on(tiny_model):
    if kernels.available("cpu"):  # never true: the kernels are CUDA kernels
        pytest.fail("kernels.available('cpu')")
    with pytest.raises(ValueError, match="fused decode kernels need a CUDA device"):
        BatchDecoder(tiny_model, 4, fused=True)
    with pytest.raises(ValueError, match="compile applies to the PyTorch decode step"):
        BatchDecoder(tiny_model, 4, fused=True, compile=True)
    assert not BatchDecoder(tiny_model, 4).fused  # auto: the PyTorch step where the kernels cannot run


def test_the_kernels_take_power_of_two_heads():
    assert kernels.supports(GPTConfig.from_name("gpt2")) and kernels.supports(GPTConfig.from_name("gpt2-xl"))
    assert kernels.supports(GPTConfig.from_name("tiny"))  # head size 16
    assert not kernels.supports(GPTConfig(n_embd=96, n_head=2))  # 48
    assert not kernels.supports(GPTConfig(n_embd=64, n_head=8))  # 8


def perturbed(name: str, dtype: torch.dtype, seed: int = 0) -> GPT:
    """A random model whose LayerNorms and biases are not at their init values (so they count)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_name(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to("cuda", dtype)


def step_inputs(model: GPT, positions: list[int], seed: int = 1) -> tuple[SlotCache, DecodeState]:
    """A cache of random keys and values and a state with random tokens at the given positions."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dtype = next(model.parameters()).dtype
    cache = SlotCache(model, len(positions) + 1, torch.device("cuda"), dtype)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g, device="cuda"))
    state = DecodeState(len(positions) + 2, torch.device("cuda"), model.config.vocab_size)
    M = len(positions)
    state.token[:M] = torch.randint(0, model.config.vocab_size, (M,), generator=g, device="cuda")
    state.pos[:M] = torch.tensor(positions, device="cuda")
    return cache, state


def reference(model: GPT, cache: SlotCache, state: DecodeState, M: int) -> tuple[torch.Tensor, SlotCache]:
    """decode_step through GPT.forward (the unfused path), on copies; returns logits and the cache."""
    c = _cast(cache, cache.k[0].dtype)
    s = copy.copy(state)
    vars(s).update({k: v.clone() for k, v in vars(state).items()})
    with torch.no_grad():
        logits = decode_step(model, c, s, torch.zeros_like(s.token), M, model.config.block_size, GREEDY)
    return logits.float(), c


def _cast(cache: SlotCache, dtype: torch.dtype) -> SlotCache:
    """A copy of cache with its keys, values and mask constants in dtype."""
    c = copy.copy(cache)
    c.k, c.v = [t.to(dtype, copy=True) for t in cache.k], [t.to(dtype, copy=True) for t in cache.v]
    c.zero, c.neg_inf = cache.zero.to(dtype), cache.neg_inf.to(dtype)
    return c


@needs_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny", "gpt2"])
def test_fused_step_equals_the_model_forward_within_rounding(name):
    from gpt2.kernels.decode import decode_logits

    positions = [0, 1, 13, 63] if name == "tiny" else [0, 5, 300, 1023]
    exact = perturbed(name, torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        model = exact if dtype == torch.float32 else perturbed(name, dtype)
        cache, state = step_inputs(model, positions)
        M = len(positions)
        truth, truth_cache = reference(exact, _cast(cache, torch.float32), state, M)  # float32 forward
        torch_logits, _ = reference(model, cache, state, M)  # the model's own path at this dtype
        k, v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
        with torch.no_grad():
            fused = decode_logits(model, k, v, state.token[:M], state.pos[:M]).float()
        ours, theirs = (fused - truth).abs().max().item(), (torch_logits - truth).abs().max().item()
        if dtype == torch.float32:
            assert ours < 1e-4, ours
        else:  # bf16: no further from the float32 forward than PyTorch's own bf16 path (plus slack)
            assert ours <= 1.5 * theirs + 1e-2, (ours, theirs)
        rows, cols = torch.arange(M, device="cuda"), state.pos[:M]
        written = torch.zeros(cache.k[0].shape[:3], dtype=torch.bool, device="cuda")  # (slots, nh, S + 1)
        written[rows, :, cols] = True
        for layer in range(model.config.n_layer):  # new keys and values land where the model puts them
            pairs = ((k[layer], cache.k[layer], truth_cache.k[layer]), (v[layer], cache.v[layer], truth_cache.v[layer]))
            for mine, before, want in pairs:
                got, expect = mine[rows, :, cols].float(), want[rows, :, cols]
                assert torch.allclose(got, expect, atol=1e-4 if dtype == torch.float32 else 0.1, rtol=0.02)
                assert torch.equal(mine[~written], before[~written])  # and nowhere else


@needs_kernels
@pytest.mark.gpu
def test_argmax_takes_the_first_of_equal_values_as_torch():
    from gpt2.kernels.ops import argmax

    x = torch.randn(5, 50257, device="cuda").to(torch.bfloat16)
    x[1, 7] = x[1, 9000] = x[1, 40000] = 100.0  # ties within one block and across blocks
    x[2, 4095] = x[2, 4096] = 50.0  # at a block edge
    x[3] = -1.0  # all equal
    x[4, -1] = 1e4  # the last column
    assert torch.equal(argmax(x), x.argmax(dim=-1))


@needs_kernels
@pytest.mark.gpu
def test_the_server_decodes_the_same_tokens_fused_or_not(engine_tokens):
    from gpt2.inference import Sequence

    model = perturbed("tiny", torch.float32)
    requests = [Sequence([3 + i, 7, 11 + i][: 1 + i % 3], 20 + 3 * i) for i in range(10)]
    results = []
    for fused in (False, True):
        dec = BatchDecoder(model, 4, cuda_graph=True, fused=fused, min_length_bucket=16, max_prefill_tokens=64)
        dec.capture_all()
        results.append(engine_tokens(dec, requests, eos_id=model.config.vocab_size - 1))
    assert results[0] == results[1]


@needs_kernels
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 3, 20])
def test_linear_fuses_layer_norm_bias_gelu_and_residual(M):
    import torch.nn.functional as F

    from gpt2.kernels import ops

    torch.manual_seed(M)
    for N, K in ((48, 32), (40, 200), (33, 1500)):  # 1500 > 1024: K walked in blocks
        x, w, b, r = (torch.randn(*s, device="cuda") for s in ((M, K), (N, K), (N,), (M, N)))
        g, beta = torch.randn(K, device="cuda"), torch.randn(K, device="cuda")
        want = F.gelu(F.linear(F.layer_norm(x, (K,), g, beta, 1e-5), w * 0.1, b), approximate="tanh") + r
        bm = ops.linear_blocks(M, N, K)[0]
        for blocks in (None, (bm, 16, 64, 4, 3), (bm, 16, 256, 2, 2)):
            got = ops.linear(x, w * 0.1, b, norm=(g, beta, 1e-5), gelu=True, residual=r, blocks=blocks)
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (N, K, blocks)
        plain = ops.linear(x, w, None)
        assert torch.allclose(plain, x @ w.T, atol=1e-4, rtol=1e-4)
