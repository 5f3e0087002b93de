import pytest
import tiktoken
from conftest import shared_path

from gpt2.tokenizer import EOT_ID, Tokenizer, hf_vocab_and_merges

TEXTS = [
    "Hello, world!",
    "",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\n  \n",
    "whitespace runs:          end",
    "Unicode: naïve café, Ελληνικά, русский, 日本語, 한국어, emoji 🤖👍🏽, ZWJ 👨‍👩‍👧",
    "contractions: I'm you're we've they'll she'd it's DON'T",
    "numbers 1234567890 3.14159 1e-5 0x1F",
    "code: def f(x):\n    return x ** 2  # comment",
    "a<|endoftext|>b",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """tiktoken's own gpt2 encoding, from the offline cache in ../shared (skipped when absent)."""
    import os

    cache = shared_path("tiktoken-cache")
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return tiktoken.get_encoding("gpt2")
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_tiktoken(reference, text):
    assert Tokenizer().encode(text) == reference.encode(text, allowed_special="all")
    assert Tokenizer().encode(text, allow_special=False) == reference.encode_ordinary(text)


def test_round_trip_and_batch():
    tok = Tokenizer()
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_endoftext_is_50256():
    tok = Tokenizer()
    assert tok.encode("<|endoftext|>") == [EOT_ID] == [50256]
    assert tok.eot_id == 50256 and tok.vocab_size == 50257
    assert len(tok.encode("<|endoftext|>", allow_special=False)) > 1


def test_out_of_vocab_ids_never_crash_decoding():
    tok = Tokenizer()
    assert tok.decode([15496, 50257, 50303, 99999, -1, 995]) == "Hello world"
    assert tok.decode([33768]) == "\ufffd"  # the first two bytes of "日" alone


def test_hf_files_equal_openais(reference):
    """vocab.json / merges.txt derived from the ranks equal OpenAI's encoder.json / vocab.bpe."""
    import json

    cache = shared_path("tiktoken-cache")
    vocab, merges = hf_vocab_and_merges()
    assert vocab == json.loads((cache / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6").read_text(encoding="utf-8"))
    bpe = (cache / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").read_text(encoding="utf-8").split("\n")
    assert bpe[1:-1] == merges


def test_hf_tokenizer_files_load_in_transformers_and_encode_as_ours(tmp_path):
    """write_hf_tokenizer_files takes a str or a Path, makes the directory, and GPT2TokenizerFast
    reads it back to the same ids as ours (what lm-eval's local-completions is given)."""
    transformers = pytest.importorskip("transformers")
    from gpt2.tokenizer import write_hf_tokenizer_files

    target = tmp_path / "new" / "tok"
    write_hf_tokenizer_files(str(target))
    hf = transformers.GPT2TokenizerFast.from_pretrained(target)
    ours = Tokenizer()
    for text in ("Hello world", " the quick brown fox", "naïve 日本 <|endoftext|>x"):
        assert hf(text)["input_ids"] == ours.encode(text), text
