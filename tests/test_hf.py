"""Parity with HuggingFace transformers on random-init models, both directions, and bad checkpoints."""

import json

import pytest
import torch

from gpt2 import GPT, GPTConfig

load_model = GPT.from_pretrained  # the one model loader (gpt2.hf holds only the format conversion)

transformers = pytest.importorskip("transformers")

TINY_HF = dict(n_layer=2, n_head=2, n_embd=64, n_positions=128)


def make_hf(tmp_path, seed=0, **kwargs):
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()
    hf.save_pretrained(tmp_path)
    return hf


def max_diff(ours, hf, idx):
    with torch.no_grad():
        a, _ = ours(idx)
        b = hf(idx).logits
    return (a - b).abs().max().item()


def test_hf_to_ours_tiny(tmp_path):
    hf = make_hf(tmp_path, **TINY_HF)
    ours = load_model(tmp_path).eval()
    assert ours.config == GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64, dropout=0.1)
    idx = torch.randint(0, 50257, (3, 40))
    assert max_diff(ours, hf, idx) <= 1e-4


def test_ours_to_hf_tiny(tmp_path):
    torch.manual_seed(1)
    ours = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64)).eval()
    ours.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (2, 50))
    assert max_diff(ours, hf, idx) <= 1e-4
    # and back again: ours -> HF dir -> ours is lossless
    again = GPT.from_pretrained(tmp_path).eval()
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_saved_tokenizer_loads_in_transformers_and_matches_ours(tmp_path):
    from gpt2.tokenizer import Tokenizer

    GPT(GPTConfig.from_name("tiny")).save_pretrained(tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world! It's 2026:\n\n  naïve café 日本 <|endoftext|> done"
    assert hf_tok(text)["input_ids"] == Tokenizer().encode(text)
    assert hf_tok.eos_token_id == 50256


def test_training_checkpoints_carry_the_tokenizer_files(tmp_path):
    """AutoTokenizer reads a training checkpoint directory as it is; a model whose vocabulary is not
    GPT-2's (a small test vocabulary) gets no tokenizer files that would not fit it."""
    from gpt2.checkpoint.full import save_checkpoint
    from gpt2.checkpoint.layout import verified
    from gpt2.tokenizer import Tokenizer

    ckpt = save_checkpoint(tmp_path / "run", 3, GPT(GPTConfig.from_name("tiny")), {"x": 1}, {"model": "tiny"})
    verified(ckpt)  # the tokenizer files are in the checkpoint's manifest like every other file
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert hf_tok("Hello, checkpoint!")["input_ids"] == Tokenizer().encode("Hello, checkpoint!")
    assert hf_tok.model_max_length == 64
    small = save_checkpoint(
        tmp_path / "small", 1, GPT(GPTConfig(block_size=32, vocab_size=128, n_layer=1, n_head=1, n_embd=8)), {}, {}
    )
    assert not (small / "vocab.json").exists()


@pytest.mark.slow
def test_parity_at_124M_shape_both_ways(tmp_path):
    hf = make_hf(tmp_path / "hf")  # GPT2Config() defaults are the 124M shape
    ours = load_model(tmp_path / "hf").eval()
    assert ours.num_params() == 124_439_808
    idx = torch.randint(0, 50257, (1, 64))
    assert max_diff(ours, hf, idx) <= 1e-4
    ours.save_pretrained(tmp_path / "ours")
    del hf
    hf2 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    assert max_diff(ours, hf2, idx) <= 1e-4


def test_greedy_tokens_equal_hf_generate(tmp_path):
    hf = make_hf(tmp_path, **TINY_HF)
    ours = load_model(tmp_path).eval()
    idx = torch.randint(0, 50257, (1, 7))
    theirs = hf.generate(
        idx, attention_mask=torch.ones_like(idx), max_new_tokens=25, min_new_tokens=25, do_sample=False, pad_token_id=0
    )
    assert torch.equal(ours.generate(idx, 25, temperature=0.0), theirs)


def test_hub_checkpoint_without_transformer_prefix_loads(tmp_path):
    """OpenAI's hub files hold GPT2Model keys (`h.0...`, no `transformer.`) plus attn.bias buffers."""
    from safetensors.torch import load_file, save_file

    hf = make_hf(tmp_path, **TINY_HF)
    sd = load_file(tmp_path / "model.safetensors")
    renamed = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    renamed["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = load_model(tmp_path).eval()
    assert max_diff(ours, hf, torch.randint(0, 50257, (1, 10))) <= 1e-4


def test_pytorch_model_bin_is_read_without_unpickling_code(tmp_path):
    hf = make_hf(tmp_path, **TINY_HF)
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ours = load_model(tmp_path).eval()
    assert max_diff(ours, hf, torch.randint(0, 50257, (1, 10))) <= 1e-4


# ---- bad input -----------------------------------------------------------------------------


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        load_model("gpt5")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_directory_without_weights(tmp_path):
    make_hf(tmp_path, **TINY_HF)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path)


def test_mismatched_shapes_name_the_key(tmp_path):
    make_hf(tmp_path, **TINY_HF)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_embd"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="weight 'transformer.*' has shape"):
        load_model(tmp_path)


def test_missing_key_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf(tmp_path, **TINY_HF)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["transformer.h.1.mlp.c_fc.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing weight 'transformer.h.1.mlp.c_fc.weight'"):
        load_model(tmp_path)


def test_corrupt_weights_file(tmp_path):
    make_hf(tmp_path, **TINY_HF)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_model(tmp_path)


def test_unsupported_variant_is_refused(tmp_path):
    make_hf(tmp_path, **TINY_HF, activation_function="relu")
    with pytest.raises(ValueError, match="activation_function='relu'"):
        load_model(tmp_path)


def test_no_bias_model_cannot_be_exported(tmp_path):
    with pytest.raises(ValueError, match="bias=False"):
        GPT(GPTConfig.from_name("tiny", bias=False)).save_pretrained(tmp_path)


def test_loading_draws_no_random_init_and_imports_no_compiler(tmp_path):
    """from_pretrained builds the model without initializing it (init=False on the meta device): the
    first normal_ on a meta tensor imports torch._dynamo, ~1 s of every CPU load (checked in a fresh
    process, where nothing else has imported it); the default init is untouched."""
    import subprocess
    import sys

    torch.manual_seed(0)
    GPT(GPTConfig.from_name("tiny")).save_pretrained(tmp_path)
    code = (
        "import sys; from gpt2 import GPT; "
        f"m = GPT.from_pretrained({str(tmp_path)!r}); "
        "print('torch._dynamo' in sys.modules, m.lm_head.weight is m.transformer.wte.weight)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "True"], r.stderr[-500:]
    torch.manual_seed(0)
    again = GPT(GPTConfig.from_name("tiny"))
    loaded = GPT.from_pretrained(tmp_path)
    for (name, a), b in zip(again.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_known_config_reads_no_weights_and_downloads_nothing(tmp_path, make_tiny):
    from gpt2.loading import known_config

    tiny = make_tiny(vocab_size=128)
    tiny.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not read")  # only config.json is
    assert known_config(tmp_path) == tiny.config
    assert known_config("gpt2-medium") == GPTConfig.from_name("gpt2-medium")  # OpenAI's, without the hub
    assert known_config("someone/their-gpt2") is None
