"""The fast paths compute what the plain ones compute: chunked loss == F.cross_entropy (value and
gradients), static / graph-captured decoding == the plain decode loop, token for token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2 import GPT, GPTConfig
from gpt2.attention import KVCache
from gpt2.generation import StaticDecoder, _static_step, generate_tokens, left_pad, prefill
from gpt2.ops import attention_backends, linear_cross_entropy


@pytest.fixture
def small_model() -> GPT:
    """The tiny shape with a 256-token vocabulary and a 32-token context: quick to decode on a CPU."""
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("tiny", vocab_size=256, block_size=32)).eval()


def reference_ce(x, w, t):
    logits = x @ w.t()
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), t, ignore_index=-1)


def grads_of(fn, *tensors):
    for p in tensors:
        p.grad = None
    value = fn()
    value.backward()
    return value.detach(), [p.grad.clone() for p in tensors]


@pytest.mark.parametrize(
    "N, V, chunk, pad",
    [
        (37, 50, 8, 16),  # several chunks and a remainder; V padded 50 -> 64
        (64, 64, 64, 64),  # one chunk, no padding
        (20, 33, 100, 1),  # chunk larger than N; pad_multiple 1 means no padding
    ],
)
def test_chunked_loss_equals_cross_entropy_with_gradients(N, V, chunk, pad):
    torch.manual_seed(0)
    x = torch.randn(N, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[::5] = -1  # ignored positions
    ref, (gx, gw) = grads_of(lambda: reference_ce(x, w, t), x, w)
    out, (fx, fw) = grads_of(lambda: linear_cross_entropy(x, w, t, chunk_size=chunk, pad_multiple=pad), x, w)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fx, gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fw, gw, rtol=1e-10, atol=1e-12)
    assert fw.shape == (V, 16)  # the padding never reaches the weight's gradient


def test_chunked_loss_float32_batched_shapes_and_upstream_gradient():
    torch.manual_seed(1)
    x = torch.randn(3, 7, 24, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)
    t = torch.randint(0, 40, (3, 7))
    ref, (gx, gw) = grads_of(lambda: 2.5 * reference_ce(x.view(-1, 24), w, t.view(-1)), x, w)
    out, (fx, fw) = grads_of(lambda: 2.5 * linear_cross_entropy(x, w, t, chunk_size=5), x, w)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(fx, gx)
    torch.testing.assert_close(fw, gw)


def test_chunked_loss_without_grad_and_all_ignored():
    x, w = torch.randn(10, 8), torch.randn(30, 8)
    t = torch.randint(0, 30, (10,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t, chunk_size=3), reference_ce(x, w, t))
    all_ignored = torch.full((10,), -1)
    assert torch.isnan(linear_cross_entropy(x, w, all_ignored)) and torch.isnan(reference_ce(x, w, all_ignored))


def test_chunked_loss_under_bf16_autocast_matches_plain_autocast_path():
    torch.manual_seed(2)
    x = torch.randn(64, 32, requires_grad=True)
    w = (0.1 * torch.randn(100, 32)).requires_grad_()
    t = torch.randint(0, 100, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, (gx, gw) = grads_of(lambda: F.cross_entropy(F.linear(x, w).float(), t), x, w)
        out, (fx, fw) = grads_of(lambda: linear_cross_entropy(x, w, t, chunk_size=16), x, w)
    assert out.dtype == torch.float32 and fw.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fx, gx, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(fw, gw, rtol=2e-2, atol=1e-4)


def test_chunked_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets shape"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))


def test_model_loss_only_path_equals_logits_path(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    idx = torch.randint(0, 50257, (2, 16))
    targets = torch.randint(0, 50257, (2, 16))
    targets[0, :3] = -1
    params = list(model.parameters())
    (logits, ref) = model(idx, targets)
    ref.backward()
    ref_grads = [p.grad.clone() for p in params]
    model.zero_grad()
    none, loss = model(idx, targets, return_logits=False)
    loss.backward()
    assert none is None and logits.shape == (2, 16, 50257)
    torch.testing.assert_close(loss, ref)
    for p, g in zip(params, ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_chunked_loss_traces_into_one_graph(small_model):
    """torch.compile must see the chunked loss without a graph break (aot_eager: no C++ compiler)."""
    model = small_model.train()
    idx, targets = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
    _, ref = model(idx, targets)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _, loss = compiled(idx, targets, return_logits=False)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    assert model.transformer.wte.weight.grad is not None


def test_padded_vocab_never_reaches_outputs(tiny_model):
    # Padding lives only inside linear_cross_entropy: logits keep V columns, sampling stays < V.
    idx = torch.randint(0, 50257, (4, 6))
    logits, _ = tiny_model(idx)
    assert logits.shape[-1] == 50257
    g = torch.Generator().manual_seed(0)
    out = generate_tokens(tiny_model, idx, torch.ones_like(idx, dtype=torch.bool), 5, generator=g, fast=True)
    assert int(out.max()) < 50257 and int(out.min()) >= 0


def _decode(model, prompts, n, **kwargs):
    tokens, valid = left_pad(prompts, 0)
    return generate_tokens(model, tokens, valid, n, **kwargs)


PROMPTS = [[5, 6, 7], [100, 200, 30, 40, 50, 60, 70, 80], [42]]


@pytest.mark.parametrize("n", [1, 2, 15, 40])  # 8 + 40 passes block_size 32: the sliding window
def test_static_decoder_greedy_equals_plain_loop(small_model, n):
    fast = _decode(small_model, PROMPTS, n, temperature=0, fast=True)
    plain = _decode(small_model, PROMPTS, n, temperature=0, fast=False)
    recompute = _decode(small_model, PROMPTS, n, temperature=0, use_cache=False)
    assert fast.shape == (3, n)
    assert torch.equal(fast, plain) and torch.equal(fast, recompute)


def test_static_decoder_sampling_equals_plain_loop(small_model):
    def run(fast):
        g = torch.Generator().manual_seed(7)
        return _decode(small_model, PROMPTS, 25, temperature=0.8, top_k=100, top_p=0.9, generator=g, fast=fast)

    assert torch.equal(run(True), run(False))


def test_eos_checked_periodically_still_stops_where_the_plain_loop_does(small_model):
    plain = _decode(small_model, PROMPTS, 40, temperature=0, fast=False)
    eos = int(plain[0, 4])  # a token the first sequence produces early
    stopped_plain = _decode(small_model, PROMPTS, 40, temperature=0, eos_id=eos, fast=False)
    stopped_fast = _decode(small_model, PROMPTS, 40, temperature=0, eos_id=eos, fast=True)
    assert torch.equal(stopped_fast, stopped_plain)
    # the same, step by step: a streaming callback sees exactly the returned tokens
    seen = []
    streamed = _decode(small_model, PROMPTS, 40, temperature=0, eos_id=eos, on_tokens=seen.append)
    assert torch.equal(torch.stack(seen, dim=1), streamed) and torch.equal(streamed, stopped_plain)
    # when every sequence stops, the output ends at the step where the last one did
    single = _decode(small_model, [[1, 2, 3]], 40, temperature=0, fast=False)[0].tolist()
    for step in (3, 20):  # before and after the first periodic check
        eos = single[step]
        fast = _decode(small_model, [[1, 2, 3]], 40, temperature=0, eos_id=eos, fast=True)
        assert fast.tolist() == [single[: single.index(eos) + 1]]


def test_static_step_compiles_without_graph_breaks(small_model):
    """The step StaticDecoder compiles (compile=True) traces as one graph, mutating the cache in place."""
    tokens, valid = left_pad(PROMPTS, 0)
    results = []
    for step in (_static_step, torch.compile(_static_step, backend="aot_eager", fullgraph=True)):
        cache = KVCache(small_model.config, 3, 16)
        with torch.no_grad():
            logits = prefill(small_model, tokens, valid, cache)
            decoder = StaticDecoder(small_model, cache, valid)
            decoder.step = step
            outs = []
            for _ in range(4):
                logits = decoder(logits.argmax(-1))
                outs.append(logits.clone())
        results.append(torch.stack(outs))
    torch.testing.assert_close(results[0], results[1])


def test_attention_backends_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown attention backend"):
        with attention_backends("fastest"):
            pass


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_equals_plain_loop_on_gpu(dtype):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("mini")).cuda().to(dtype).eval()
    prompts = [[5, 6, 7], list(range(100, 140)), [42]]
    tokens, valid = left_pad(prompts, 50256)
    tokens, valid = tokens.cuda(), valid.cuda()
    fast = generate_tokens(model, tokens, valid, 300, temperature=0, fast=True)  # 300 > block 256: slides
    plain = generate_tokens(model, tokens, valid, 300, temperature=0, fast=False)
    assert torch.equal(fast, plain)


@requires_cuda
@pytest.mark.gpu
def test_chunked_loss_on_gpu_bf16_matches_plain_path():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("mini")).cuda()
    idx = torch.randint(0, 50257, (4, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, ref = model(idx, idx)
        _, loss = model(idx, idx, return_logits=False)
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=2e-3)


@requires_cuda
@pytest.mark.gpu
def test_triton_cross_entropy_kernel_equals_pytorch_version():
    import gpt2.ops as ops
    from gpt2 import kernels

    if not kernels.HAS_TRITON:
        pytest.skip("no Triton")
    torch.manual_seed(0)
    V, Vp = 50257, 50304
    logits = (3 * torch.randn(300, Vp, device="cuda")).to(torch.bfloat16)
    targets = torch.randint(0, V, (300,), device="cuda")
    targets[::7] = -1
    targets[1] = V - 1  # the last real column
    loss, grad = ops._cross_entropy_sum_and_grad(logits.clone(), targets, -1, V)
    ref_loss, ref_grad = ops.cross_entropy_sum_and_grad_reference(logits.clone(), targets, -1, V)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-3)
    assert grad[:, V:].abs().max() == 0 and grad[::7].abs().max() == 0
