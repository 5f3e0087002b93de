import pytest
import torch

from gpt2 import GPT, GPTConfig
from gpt2.attention import KVCache
from gpt2.generation import (
    filter_logits,
    generate,
    generate_batch,
    generate_tokens,
    left_pad,
    prefill,
    sample_next,
)


def naive_greedy(model, idx, n):
    """Reference: full recomputation every step over the last block_size tokens."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_cached_logits_equal_full_recompute(tiny_model):
    idx = torch.randint(0, 50257, (2, 30))
    full, _ = tiny_model(idx)
    cache = KVCache(tiny_model.config, 2, 30)
    valid = torch.ones_like(idx, dtype=torch.bool)
    prefill(tiny_model, idx[:, :10], valid[:, :10], cache)
    from gpt2.generation import decode_step

    key_valid = torch.zeros(2, 30, dtype=torch.bool)
    key_valid[:, :10] = True
    for t in range(10, 30):
        key_valid[:, t] = True
        step = decode_step(tiny_model, idx[:, t], t, torch.full((2,), t), key_valid, cache)
        torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=1e-5)


def test_greedy_with_cache_equals_naive_including_past_context(tiny_model):
    idx = torch.randint(0, 50257, (2, 12))
    n = 80  # 12 + 80 > block_size 64: exercises the sliding window
    assert torch.equal(generate(tiny_model, idx, n, temperature=0), naive_greedy(tiny_model, idx, n))
    assert torch.equal(generate(tiny_model, idx, n, temperature=0, use_cache=False), naive_greedy(tiny_model, idx, n))


def test_batched_prompts_of_different_lengths_equal_one_at_a_time(tiny_model):
    prompts = [[5, 6, 7], [100, 200, 300, 400, 500, 600, 700, 800], [42]]
    batched = generate_batch(tiny_model, prompts, 15, temperature=0)
    single = [generate(tiny_model, torch.tensor([p]), 15, temperature=0)[0, len(p) :].tolist() for p in prompts]
    assert batched == single


def test_seeded_sampling_is_deterministic(tiny_model):
    idx = torch.randint(0, 50257, (3, 5))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(tiny_model, idx, 20, temperature=1.0, top_k=50, generator=g)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_top_k_keeps_only_the_k_best():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    allowed = logits.topk(5, dim=-1).indices
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        tok = sample_next(logits, temperature=1.5, top_k=5, generator=g)
        assert all(t in allowed[i] for i, t in enumerate(tok.tolist()))


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.75))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))  # 0.5 + 0.3 reaches 0.8: still two
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.81))
    assert kept.tolist() == [[True, True, True, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.01))  # never empty
    assert kept.tolist() == [[True, False, False, False]]
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, top_p=0.75, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}


def test_greedy_is_argmax(tiny_model):
    logits = torch.randn(3, 50257)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))


def test_stop_at_eos(tiny_model):
    idx = torch.randint(0, 50257, (1, 4))
    first = generate(tiny_model, idx, 1, temperature=0)[0, -1].item()
    out = generate_tokens(tiny_model, idx, torch.ones_like(idx, dtype=torch.bool), 10, temperature=0, eos_id=first)
    assert out.tolist() == [[first]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_invalid_sampling_arguments(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_model, torch.zeros((1, 3), dtype=torch.long), 2, **kwargs)


def test_prompt_longer_than_context(tiny_model):
    with pytest.raises(ValueError, match="prompt has 65 tokens but the model's context is 64"):
        generate(tiny_model, torch.zeros((1, 65), dtype=torch.long), 2)


def test_empty_prompt():
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1, 2], []], 0)


def test_generate_on_model_method_matches_function():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny")).eval()
    idx = torch.randint(0, 50257, (1, 5))
    assert torch.equal(model.generate(idx, 5, temperature=0), generate(model, idx, 5, temperature=0))
