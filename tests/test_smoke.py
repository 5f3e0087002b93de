import torch

from gpt2 import GPT, GPTConfig


def test_forward_shapes():
    model = GPT(GPTConfig.from_name("tiny"))
    idx = torch.randint(0, 50257, (2, 8))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 8, 50257)
    assert loss is not None and loss.ndim == 0
