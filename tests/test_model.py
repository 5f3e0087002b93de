import math

import pytest
import torch

from gpt2 import GPT, GPTConfig

EXPECTED_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_preset_parameter_counts_match_huggingface(name):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name(name))
    assert model.num_params() == EXPECTED_PARAMS[name]


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=100, n_head=12)
    with pytest.raises(ValueError, match="unknown model preset 'gpt3'"):
        GPTConfig.from_name("gpt3")
    with pytest.raises(ValueError, match="n_layer must be a positive integer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.5)
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({"n_layers": 3})
    assert GPTConfig.from_name("gpt2").head_dim == 64
    assert GPTConfig().diff(GPTConfig(n_layer=3)) == ["n_layer: 12 != 3"]


def test_shapes_and_loss(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (3, 17))
    logits, loss = tiny_model(idx)
    assert logits.shape == (3, 17, tiny_config.vocab_size)
    assert loss is None
    _, loss = tiny_model(idx, idx)
    assert loss.shape == ()


def test_tied_embeddings(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.transformer.wte.weight


def test_sequence_longer_than_context_is_a_clear_error(tiny_model, tiny_config):
    idx = torch.zeros((1, tiny_config.block_size + 1), dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tiny_model(idx)


def test_causality(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (2, 20))
    changed = idx.clone()
    t = 11
    changed[:, t] = (changed[:, t] + 1) % tiny_config.vocab_size
    with torch.no_grad():
        a, _ = tiny_model(idx)
        b, _ = tiny_model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_init_statistics():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=128)
    model = GPT(config)
    sd = dict(model.named_parameters())
    assert sd["transformer.wte.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    assert sd["transformer.h.0.mlp.c_fc.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    scaled = 0.02 / math.sqrt(2 * config.n_layer)
    assert sd["transformer.h.3.attn.c_proj.weight"].std().item() == pytest.approx(scaled, rel=0.03)
    assert sd["transformer.h.3.mlp.c_proj.weight"].std().item() == pytest.approx(scaled, rel=0.03)
    assert torch.all(sd["transformer.h.0.attn.c_attn.bias"] == 0)
    assert torch.all(sd["transformer.h.0.ln_1.weight"] == 1)
    assert torch.all(sd["transformer.ln_f.bias"] == 0)


def test_initial_loss_is_about_ln_vocab(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    idx = torch.randint(0, tiny_config.vocab_size, (4, 64))
    targets = torch.randint(0, tiny_config.vocab_size, (4, 64))
    _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(tiny_config.vocab_size), abs=0.1)


def test_ignore_index_and_no_bias():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", bias=False))
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters())
    idx = torch.randint(0, 100, (2, 8))
    targets = idx.clone()
    targets[:, :4] = -1
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, logits.size(-1)), idx[:, 4:].reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", vocab_size=512))
    idx = torch.randint(0, 512, (2, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", dropout=0.5))
    idx = torch.randint(0, 1000, (1, 16))
    model.train()
    a, _ = model(idx)
    b, _ = model(idx)
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        c, _ = model(idx)
        d, _ = model(idx)
    assert torch.equal(c, d)
