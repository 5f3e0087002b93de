"""gpt2.evaluation: HellaSwag / LAMBADA / loss scoring against float64 references, batching, padding,
rank sharding (simulated and real gloo), conventions on constructed examples, bad inputs, and the CLI."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gpt2 import GPT, GPTConfig
from gpt2.evaluation import (
    HellaSwagExample,
    LambadaExample,
    cached_download,
    evaluate_hellaswag,
    evaluate_lambada,
    evaluate_loss,
    hellaswag_prompt,
    hellaswag_requests,
    lambada_requests,
    load_hellaswag,
    load_lambada,
    loss_stats,
    score_continuations,
    text_tokens,
    text_windows,
    window_batches,
)
from gpt2.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
WORDS = "the a man woman dog runs walks into river house slowly quickly and then he she it is was red big".split()
TOK = Tokenizer()


def shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"../shared/data/{rel} not present")
    return path


def make_examples(n: int, seed: int = 0, ctx_words: tuple[int, int] = (2, 9)) -> list[HellaSwagExample]:
    rng = random.Random(seed)
    sentence = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [
        HellaSwagExample(
            ind=100 + i,
            ctx=sentence(*ctx_words).capitalize() + ".",
            endings=tuple(sentence(1, 6) + "." for _ in range(4)),
            label=rng.randrange(4),
            activity_label="Walking",
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("tiny", block_size=64)).eval()


@pytest.fixture(scope="module")
def examples() -> list[HellaSwagExample]:
    return make_examples(8)


# ---------------------------------------------------------------------------------------------------
# Float64 references, written the straightforward way: one sequence at a time, a Python loop over tokens.


def ref_logprob(model64: nn.Module, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    seq = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits, _ = model64(seq[:, :-1])
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    total, greedy = 0.0, True
    for j, token in enumerate(cont):
        row = logp[len(ctx) - 1 + j]
        total += row[token].item()
        greedy = greedy and int(row.argmax()) == token
    return total, greedy


def first_argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def ref_hellaswag(model64: nn.Module, examples: list[HellaSwagExample]) -> list[dict]:
    out = []
    for ex in examples:
        ctx = TOK.encode(ex.ctx)
        ends = [TOK.encode(" " + e) for e in ex.endings]
        lps = [ref_logprob(model64, ctx, e)[0] for e in ends]
        out.append(
            {
                "ind": ex.ind,
                "logprobs": lps,
                "pred": first_argmax(lps),
                "pred_norm": first_argmax([lp / len(e) for lp, e in zip(lps, ends)]),
                "pred_norm_chars": first_argmax([lp / len(s) for lp, s in zip(lps, ex.endings)]),
            }
        )
    return out


def double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def by_ind(result: dict) -> dict[int, dict]:
    return {e["ind"]: e for e in result["examples"]}


# ---------------------------------------------------------------------------------------------------
# HellaSwag scoring


def test_hellaswag_matches_float64_reference(model, examples):
    ref = ref_hellaswag(double(model), examples)
    result = evaluate_hellaswag(model, examples, batch_size=3, per_example=True)
    ours = by_ind(result)
    ours64 = by_ind(evaluate_hellaswag(double(model), examples, batch_size=3, per_example=True))
    for r in ref:
        for got, tol in ((ours[r["ind"]], 1e-4), (ours64[r["ind"]], 1e-9)):
            assert (got["pred"], got["pred_norm"], got["pred_norm_chars"]) == (
                r["pred"],
                r["pred_norm"],
                r["pred_norm_chars"],
            )
            assert got["logprobs"] == pytest.approx(r["logprobs"], rel=tol, abs=tol)
    # the three conventions are not all the same on random endings (else the test would prove little)
    assert any(r["pred"] != r["pred_norm"] or r["pred"] != r["pred_norm_chars"] for r in ref)
    assert result["n"] == len(examples)
    assert result["acc"] == sum(r["pred"] == ex.label for r, ex in zip(ref, examples)) / len(examples)
    assert result["acc_norm"] == sum(r["pred_norm"] == ex.label for r, ex in zip(ref, examples)) / len(examples)
    assert result["acc_norm_chars"] == pytest.approx(
        sum(r["pred_norm_chars"] == ex.label for r, ex in zip(ref, examples)) / len(examples)
    )
    # the deprecated names are aliases of the character-normalised numbers, for now
    assert (result["acc_norm_bytes"], result["correct_norm_bytes"]) == (
        result["acc_norm_chars"],
        result["correct_norm_chars"],
    )
    assert all(e["pred_norm_bytes"] == e["pred_norm_chars"] for e in result["examples"])


def test_batched_equals_one_at_a_time(model, examples):
    single = by_ind(evaluate_hellaswag(model, examples, batch_size=1, per_example=True))
    for batch_size in (4, len(examples)):
        batched = by_ind(evaluate_hellaswag(model, examples, batch_size=batch_size, per_example=True))
        for ind, s in single.items():
            b = batched[ind]
            assert (b["pred"], b["pred_norm"], b["pred_norm_chars"]) == (
                s["pred"],
                s["pred_norm"],
                s["pred_norm_chars"],
            )
            assert b["logprobs"] == pytest.approx(s["logprobs"], abs=1e-5)


def test_padding_never_leaks(model, examples):
    base = by_ind(evaluate_hellaswag(model, examples, batch_size=5, per_example=True, pad_multiple=1))
    for pad_id, pad_multiple in ((0, 8), (12345, 64), (7, 13)):
        other = by_ind(
            evaluate_hellaswag(
                model, examples, batch_size=5, per_example=True, pad_id=pad_id, pad_multiple=pad_multiple
            )
        )
        for ind, b in base.items():
            assert other[ind]["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
            assert other[ind]["pred"] == b["pred"] and other[ind]["pred_norm"] == b["pred_norm"]


def test_score_continuations_reference_and_padding_small_vocab():
    torch.manual_seed(1)
    m = GPT(GPTConfig(block_size=24, vocab_size=97, n_layer=2, n_head=2, n_embd=16)).eval()
    m64 = double(m)
    rng = random.Random(3)
    requests = [
        ([rng.randrange(97) for _ in range(rng.randint(1, 12))], [rng.randrange(97) for _ in range(rng.randint(1, 12))])
        for _ in range(15)
    ]
    # a greedy continuation: follow the model's own argmax, so `greedy` must come out True
    ctx = [5, 6, 7]
    cont = []
    for _ in range(4):
        logits, _ = m64(torch.tensor([ctx + cont]))
        cont.append(int(logits[0, -1].argmax()))
    requests.append((ctx, cont))
    ref = [ref_logprob(m64, c, k) for c, k in requests]
    assert ref[-1][1] is True
    for rows, pad_id, pad_multiple in ((1, 0, 1), (7, 96, 8), (100, 3, 24)):
        got = score_continuations(m64, requests, rows_per_batch=rows, pad_id=pad_id, pad_multiple=pad_multiple)
        assert got.logprob.tolist() == pytest.approx([r[0] for r in ref], abs=1e-10)
        assert got.greedy.tolist() == [r[1] for r in ref]
        assert got.num_tokens.tolist() == [len(k) for _, k in requests]


def test_bf16_autocast_close_to_fp32(model, examples):
    fp32 = evaluate_hellaswag(model, examples, batch_size=4, per_example=True)
    bf16 = evaluate_hellaswag(model, examples, batch_size=4, per_example=True, autocast_dtype=torch.bfloat16)
    a = torch.tensor([e["logprobs"] for e in fp32["examples"]])
    b = torch.tensor([e["logprobs"] for e in bf16["examples"]])
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert bf16["n"] == fp32["n"]


def test_compiled_model_and_training_mode_restored(model, examples):
    compiled = torch.compile(model, backend="eager")  # the OptimizedModule wrapper, no C++ toolchain needed
    model.train()
    try:
        got = evaluate_hellaswag(compiled, examples[:2], batch_size=2, per_example=True)  # one shape
        assert model.training  # evaluation switched to eval() and back
    finally:
        model.eval()
    want = evaluate_hellaswag(model, examples[:2], batch_size=2, per_example=True)
    for g, w in zip(got["examples"], want["examples"]):
        assert g["logprobs"] == pytest.approx(w["logprobs"])


def test_long_context_truncated_from_left_and_counted(model):
    long_ctx = " ".join(["the big red dog runs into the river and then"] * 8)  # ~80 tokens > block_size 64
    ex = [HellaSwagExample(0, long_ctx, ("he runs.", "she walks slowly.", "it is.", "a man."), 1), *make_examples(2)]
    requests, _, truncated = hellaswag_requests(ex, block_size=64)
    assert truncated == 1
    ends = [TOK.encode(" " + e) for e in ex[0].endings]
    keep = 64 + 1 - max(len(e) for e in ends)
    full_ctx = TOK.encode(long_ctx)
    for (ctx, cont), end in zip(requests[:4], ends):
        assert ctx == full_ctx[-keep:] and cont == end  # oldest tokens dropped, same context for all 4
        assert len(ctx) + len(cont) - 1 <= 64
    result = evaluate_hellaswag(model, ex, batch_size=2, per_example=True)
    assert result["n_truncated"] == 1 and result["n"] == 3
    ref = [ref_logprob(double(model), full_ctx[-keep:], e)[0] for e in ends]
    assert result["examples"][0]["logprobs"] == pytest.approx(ref, abs=1e-4)


def test_ending_longer_than_context_is_an_error(model):
    ex = [HellaSwagExample(0, "A man.", ("word " * 70, "b", "c", "d"), 0)]
    with pytest.raises(ValueError, match="ind=0.*block_size"):
        evaluate_hellaswag(model, ex)


# ---------------------------------------------------------------------------------------------------
# Conventions, on a hand-built unigram model whose log-probabilities we choose


class UnigramLM(nn.Module):
    """Predicts the same distribution at every position: log p = log(probs), whatever the context."""

    def __init__(self, probs: dict[int, float], vocab_size: int = 50257, block_size: int = 64) -> None:
        super().__init__()
        self.config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=1, n_head=1, n_embd=1)
        rest = (1.0 - sum(probs.values())) / (vocab_size - len(probs))
        p = torch.full((vocab_size,), rest, dtype=torch.float64)
        for token, prob in probs.items():
            p[token] = prob
        self.logp = nn.Parameter(p.log(), requires_grad=False)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        return self.logp.expand(B, T, -1), None


def test_conventions_differ_where_they_should():
    endings = ("ok", "a a a a", "extraordinarily extraordinarily", "zzzz")
    ids = {e: TOK.encode(" " + e) for e in endings}
    assert [len(ids[e]) for e in endings] == [1, 4, 2, 3]
    probs = {ids["ok"][0]: 0.02, ids["a a a a"][0]: 0.3, ids[endings[2]][0]: 0.01}
    probs.update({t: 1e-4 for t in ids["zzzz"]})
    lm = UnigramLM(probs)
    # sum: ok -3.9 > a*4 -4.8 > extra*2 -9.2; per token: a -1.2 best; per character: extra -0.30 best
    exs = [HellaSwagExample(i, "Some context here.", endings, label=i) for i in range(3)]
    result = evaluate_hellaswag(lm, exs, batch_size=2, per_example=True)
    for e in result["examples"]:
        assert (e["pred"], e["pred_norm"], e["pred_norm_chars"]) == (0, 1, 2)
        assert e["num_tokens"] == [1, 4, 2, 3]
        assert e["logprobs"][1] == pytest.approx(4 * math.log(0.3))
    assert (result["correct"], result["correct_norm"], result["correct_norm_chars"]) == (1, 1, 1)


def test_lm_eval_length_is_characters_without_leading_space():
    ex = HellaSwagExample(0, "x", ("café au lait", "ab", "abc", "abcd"), 0)
    _, lengths, _ = hellaswag_requests([ex], block_size=64)
    assert lengths == [[12, 2, 3, 4]]  # lm-eval: len(choice) of the str, not UTF-8 bytes (13)


def test_lm_eval_prompt():
    ex = HellaSwagExample(
        0,
        "ctx joined",
        ("[step] Put  it down.", "b", "c", "d"),
        0,
        activity_label="Home and Garden",
        ctx_a="[header] How to plant a tree [title] Dig a hole.",
        ctx_b="then you",
    )
    ctx, ends = hellaswag_prompt(ex, "lm-eval")
    assert ctx == "Home and Garden: How to plant a tree. Dig a hole. Then you"
    assert ends[0] == "  Put it down." and ends[1] == " b"
    assert hellaswag_prompt(ex, "completion") == ("ctx joined", [" [step] Put  it down.", " b", " c", " d"])
    with pytest.raises(ValueError, match="prompt"):
        hellaswag_prompt(ex, "chat")


# ---------------------------------------------------------------------------------------------------
# Rank sharding


def test_sharding_simulated_ranks_cover_each_example_once(model, examples):
    full = evaluate_hellaswag(model, examples, batch_size=3, per_example=True)
    for world in (3, 13):  # 13 > len(examples): some ranks get nothing
        parts = [
            evaluate_hellaswag(model, examples, batch_size=3, per_example=True, rank=r, world_size=world)
            for r in range(world)
        ]
        inds = [e["ind"] for p in parts for e in p["examples"]]
        assert sorted(inds) == sorted(ex.ind for ex in examples)  # each exactly once
        assert sum(p["n"] for p in parts) == len(examples)  # no process group: nothing all-reduced
        for key in ("correct", "correct_norm", "correct_norm_chars"):
            assert sum(p[key] for p in parts) == full[key]
    with pytest.raises(ValueError, match="rank"):
        evaluate_hellaswag(model, examples, rank=2, world_size=2)


def _gloo_worker(rank: int, world: int, rdv: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        m = GPT(GPTConfig.from_name("tiny", block_size=64)).eval()
        exs = make_examples(8)
        hs = evaluate_hellaswag(m, exs, batch_size=3, per_example=True)  # rank/world from the process group
        lam = evaluate_lambada(m, LAMBADA_EXAMPLES, batch_size=2, per_example=True)
        windows = text_windows(list(range(1, 300)), 32)
        loss = loss_stats(m, window_batches(windows, 2, rank=rank, world_size=world))
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps({"hellaswag": hs, "lambada": lam, "loss": [loss.loss, loss.tokens]})
        )
    finally:
        dist.destroy_process_group()


LAMBADA_EXAMPLES = [
    LambadaExample("I saw the", " cat"),
    LambadaExample("He went into the", " river"),
    LambadaExample("She said it was", " extraordinarily"),
]


@pytest.mark.slow
def test_sharding_real_two_process_gloo(tmp_path, model, examples):
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    full = evaluate_hellaswag(model, examples, batch_size=3)
    for r in ranks:  # every rank holds the all-reduced totals
        assert r["hellaswag"]["n"] == len(examples)
        for key in ("correct", "correct_norm", "correct_norm_chars"):
            assert r["hellaswag"][key] == full[key]
    inds = [e["ind"] for r in ranks for e in r["hellaswag"]["examples"]]
    assert sorted(inds) == sorted(ex.ind for ex in examples)
    lam_full = evaluate_lambada(model, LAMBADA_EXAMPLES)
    assert ranks[0]["lambada"]["n"] == 3 and ranks[1]["lambada"]["n"] == 3
    assert ranks[0]["lambada"]["logprob_sum"] == pytest.approx(lam_full["logprob_sum"], abs=1e-4)
    assert sorted(e["index"] for r in ranks for e in r["lambada"]["examples"]) == [0, 1, 2]
    loss_full = loss_stats(model, window_batches(text_windows(list(range(1, 300)), 32), 2))
    assert ranks[0]["loss"] == pytest.approx([loss_full.loss, loss_full.tokens], abs=1e-5)
    assert ranks[1]["loss"] == ranks[0]["loss"]


# ---------------------------------------------------------------------------------------------------
# LAMBADA


class BigramLM(nn.Module):
    """Next-token logits depend only on the current token: all 0 except the (prev -> next) rules we set."""

    def __init__(self, vocab_size: int = 50257, block_size: int = 64) -> None:
        super().__init__()
        self.config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=1, n_head=1, n_embd=1)
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the module a device
        self.rules: dict[tuple[int, int], float] = {}

    def prefer(self, prev: int, nxt: int, logit: float = 5.0) -> None:
        self.rules[(prev, nxt)] = logit

    def row(self, prev: int) -> torch.Tensor:
        logits = torch.zeros(self.config.vocab_size, dtype=torch.float64)
        for (p, n), v in self.rules.items():
            if p == prev:
                logits[n] = v
        return logits

    def forward(self, idx, targets=None):
        B, T = idx.size()
        logits = torch.zeros(B, T, self.config.vocab_size)
        for (p, n), v in self.rules.items():
            logits[..., n] += v * (idx == p)
        return logits, None


def test_lambada_constructed_examples():
    lm = BigramLM()
    the, cat, dog = TOK.encode(" the")[0], TOK.encode(" cat")[0], TOK.encode(" dog")[0]
    two = TOK.encode(" zzzz")  # 3 tokens
    lm.prefer(the, cat)
    lm.prefer(the, two[0])
    lm.prefer(two[0], two[1])  # the 2nd token follows, the 3rd does not -> not greedy
    lm.prefer(the, cat, 6.0)  # " cat" is the argmax after " the"
    exs = [
        LambadaExample("I saw the", " cat"),  # greedy
        LambadaExample("I saw the", " dog"),  # not the argmax
        LambadaExample("I saw the", " zzzz"),  # first tokens not argmax
    ]
    result = evaluate_lambada(lm, exs, batch_size=2, per_example=True)
    row = torch.log_softmax(lm.row(the), -1)
    lp_cat, lp_dog = row[cat].item(), row[dog].item()
    assert [e["greedy"] for e in result["examples"]] == [True, False, False]
    assert result["acc"] == pytest.approx(1 / 3) and result["correct"] == 1
    assert result["examples"][0]["logprob"] == pytest.approx(lp_cat, abs=1e-4)
    assert result["examples"][1]["logprob"] == pytest.approx(lp_dog, abs=1e-4)
    total = sum(e["logprob"] for e in result["examples"])
    assert result["ppl"] == pytest.approx(math.exp(-total / 3))
    assert result["ppl_token"] == pytest.approx(math.exp(-total / (1 + 1 + 3)))
    assert result["target_tokens"] == 5

    # every target token the argmax given the true prefix == greedy decoding produces the word
    lm.prefer(the, two[0], 9.0)
    lm.prefer(two[0], two[1], 9.0)
    lm.prefer(two[1], two[2], 9.0)
    assert evaluate_lambada(lm, exs[2:])["acc"] == 1.0
    ids = torch.tensor([TOK.encode("I saw the")])
    for _ in range(3):
        ids = torch.cat([ids, lm(ids)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert TOK.decode(ids[0, -3:].tolist()) == " zzzz"


def test_lambada_matches_reference_on_tiny_model(model):
    exs = LAMBADA_EXAMPLES + [LambadaExample("word " * 100, " end")]  # last one truncated to fit
    result = evaluate_lambada(model, exs, batch_size=3, per_example=True)
    requests, truncated = lambada_requests(exs, 64)
    assert truncated == 1 == result["n_truncated"]
    m64 = double(model)
    for (ctx, tgt), got in zip(requests, result["examples"]):
        lp, greedy = ref_logprob(m64, ctx, tgt)
        assert got["logprob"] == pytest.approx(lp, abs=1e-4) and got["greedy"] == greedy


def test_load_lambada_formats(tmp_path):
    shared_style = tmp_path / "a.jsonl"
    shared_style.write_text(
        '{"context": "He said", "continuation": "hello"}\n\n{"context": "x ", "continuation": "y"}\n'
    )
    assert load_lambada(shared_style) == [LambadaExample("He said", " hello"), LambadaExample("x", " y")]
    openai_style = tmp_path / "b.jsonl"
    openai_style.write_text('{"text": "one two three four"}\n')
    assert load_lambada(openai_style) == [LambadaExample("one two three", " four")]


def test_lambada_context_continuation_scores_the_joining_space(tmp_path):
    # ../shared's line 4463 (passage 4462): OpenAI's text was cut at its last space, and the word after it
    # begins with newlines. lm-eval-harness scores " " + the last word, as our {"text"} path does.
    context = "She raised her brows when she returned and saw the"
    text = context + " \n\nrecorder"
    split = write_lines(tmp_path / "split.jsonl", [{"context": context, "continuation": "\n\nrecorder"}])
    whole = write_lines(tmp_path / "whole.jsonl", [{"text": text}])
    expected = LambadaExample(context, " \n\nrecorder")
    assert load_lambada(split) == load_lambada(whole) == [expected]
    [(ctx, tgt)], _ = lambada_requests([expected], 64)
    assert tgt == TOK.encode(" \n\nrecorder") and ctx + tgt == TOK.encode(text)


def test_shared_lambada_loads():
    path = shared("lambada/lambada_openai.jsonl")
    exs = load_lambada(path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(exs) == len(rows) == 5153
    # every passage is context + " " + its last word, exactly as the file splits it
    assert [(e.context, e.target) for e in exs] == [(r["context"], " " + r["continuation"]) for r in rows]
    assert exs[4462].target == " \n\nrecorder"


# ---------------------------------------------------------------------------------------------------
# Loss / perplexity


@pytest.mark.parametrize("stride", [None, 32, 20, 1])
def test_text_windows_predict_each_token_once(stride):
    N, T = 203, 32
    windows = text_windows(list(range(N)), T, stride=stride)
    scored = []
    for x, y in windows:
        assert x.numel() == y.numel() <= T
        assert torch.equal(y[y != -1], x[y != -1] + 1)  # stream is 0..N-1, so y = x + 1 where scored
        start = int(x[0])
        for j in (y != -1).nonzero().flatten().tolist():
            scored.append(start + j + 1)
            if stride is not None and start > 0:
                assert j >= T - stride  # at least T - stride tokens of context
    assert sorted(scored) == list(range(1, N))


def test_loss_matches_reference_and_padding(model):
    tokens = [random.Random(5).randrange(50257) for _ in range(150)]
    windows = text_windows(tokens, 64, stride=40)
    m64 = double(model)
    nll, count = 0.0, 0
    for x, y in windows:
        with torch.no_grad():
            logp = torch.log_softmax(m64(x[None])[0][0], -1)
        for t in range(y.numel()):
            if y[t] != -1:
                nll -= logp[t, y[t]].item()
                count += 1
    assert count == 149
    for batch_size in (1, 2, 5):  # batches of uneven windows are right-padded
        got = loss_stats(model, window_batches(windows, batch_size))
        assert got.tokens == 149
        assert got.loss == pytest.approx(nll / count, abs=1e-5)
        assert got.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


class FixedLoader:
    """A next_batch()/reset() loader over fixed batches, as gpt2.data.DataLoaderLite behaves."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        return x, y

    def reset(self):
        self.i = 0


def test_evaluate_loss_with_next_batch_loader(model):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50257, (2, 16), generator=g), torch.randint(0, 50257, (2, 16), generator=g))]
    batches.append((batches[0][0].flip(0), batches[0][1].flip(0)))
    loader = FixedLoader(batches)
    with torch.no_grad():
        want = sum(model(x, y)[1].item() for x, y in batches) / 2
    assert evaluate_loss(model, loader, 2) == pytest.approx(want, abs=1e-5)
    loader.next_batch()  # a reset() at the start makes repeated evaluations see the same batches
    assert evaluate_loss(model, loader, 2) == pytest.approx(want, abs=1e-5)
    assert evaluate_loss(model, iter(batches), None) == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="steps"):
        evaluate_loss(model, loader, None)


def test_evaluate_loss_with_data_loader_lite(tmp_path, model):
    import numpy as np

    from gpt2.data import DataLoaderLite, LoaderConfig, write_shard

    tokens = np.random.default_rng(0).integers(0, 50257, 4 * 16 * 3 + 1)
    write_shard(tmp_path / "d_val_000000.bin", tokens)
    loader = DataLoaderLite(LoaderConfig(str(tmp_path), batch_size=4, seq_len=16, split="val"))
    first = [loader.next_batch() for _ in range(3)]
    with torch.no_grad():
        want = sum(model(x, y)[1].item() for x, y in first) / 3
    assert evaluate_loss(model, loader, 3) == pytest.approx(want, abs=1e-5)  # reset() first: the same 3 batches
    assert evaluate_loss(model, loader, 3) == pytest.approx(want, abs=1e-5)
    assert torch.equal(first[0][0], torch.from_numpy(tokens[:64]).view(4, 16))


def test_text_tokens(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Hello world <|endoftext|>", encoding="utf-8")
    assert text_tokens(path) == [50256] + TOK.encode("Hello world <|endoftext|>", allow_special=False)
    with pytest.raises(FileNotFoundError):
        text_tokens(tmp_path / "missing.txt")
    (tmp_path / "c.jsonl.xz").write_bytes(b"x")
    with pytest.raises(ValueError, match="gpt2 prepare"):
        text_tokens(tmp_path / "c.jsonl.xz")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="UTF-8"):
        text_tokens(tmp_path / "bad.txt")


# ---------------------------------------------------------------------------------------------------
# Data loading and bad input


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


GOOD = {"ind": 7, "activity_label": "A", "ctx": "c", "label": 2, "endings": ["a", "b", "c", "d"]}


def test_load_hellaswag_good_and_hf_style_label(tmp_path):
    path = write_lines(tmp_path / "h.jsonl", [GOOD, "", {**GOOD, "ind": 8, "label": "3", "ctx_a": "x", "ctx_b": "y"}])
    exs = load_hellaswag(path)
    assert [(e.ind, e.label) for e in exs] == [(7, 2), (8, 3)]
    assert exs[1].ctx_a == "x" and exs[0].endings == ("a", "b", "c", "d")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", r":2: not valid JSON"),
        ([1, 2], r":2: expected a JSON object"),
        ({k: v for k, v in GOOD.items() if k != "endings"}, r":2: missing field 'endings'"),
        ({k: v for k, v in GOOD.items() if k != "ctx"}, r":2: missing field 'ctx'"),
        ({**GOOD, "ctx": 5}, r":2: field 'ctx' has the wrong type"),
        ({**GOOD, "endings": ["a", "b", "c"]}, r":2: field 'endings' must be a list of 4"),
        ({**GOOD, "label": 4}, r":2: field 'label' is 4"),
        ({**GOOD, "label": -1}, r":2: field 'label' is -1"),
        ({**GOOD, "label": ""}, r":2: field 'label' is ''"),
        ({**GOOD, "label": True}, r":2: field 'label' has the wrong type"),
    ],
)
def test_load_hellaswag_bad_lines(tmp_path, bad, message):
    path = write_lines(tmp_path / "h.jsonl", [GOOD, bad])
    with pytest.raises(ValueError, match=message) as info:
        load_hellaswag(path)
    assert "\n" not in str(info.value)


def test_missing_files_and_empty_inputs(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_hellaswag(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="directory"):
        load_lambada(tmp_path)
    with pytest.raises(ValueError, match=":1: missing field 'continuation'"):
        load_lambada(write_lines(tmp_path / "l.jsonl", [{"context": "a"}]))
    with pytest.raises(ValueError, match="no HellaSwag examples"):
        evaluate_hellaswag(model, [])
    with pytest.raises(ValueError, match="no LAMBADA examples"):
        evaluate_lambada(model, [])
    with pytest.raises(ValueError, match="no tokens"):
        loss_stats(model, [])


def test_download_is_cached_and_failure_is_one_line(tmp_path):
    src = write_lines(tmp_path / "src.jsonl", [GOOD])
    cache = tmp_path / "cache"
    exs = load_hellaswag(None, cache_dir=cache, url=src.as_uri())
    assert len(exs) == 1 and (cache / "hellaswag" / "src.jsonl").is_file()
    src.unlink()  # a second load reads the cache, not the URL
    assert load_hellaswag(None, cache_dir=cache, url=src.as_uri()) == exs
    with pytest.raises(RuntimeError, match="could not download") as info:
        cached_download((tmp_path / "missing.jsonl").as_uri(), tmp_path / "out" / "x.jsonl")
    assert "\n" not in str(info.value) and not list((tmp_path / "out").iterdir())  # no partial file left


def test_shared_hellaswag_loads():
    exs = load_hellaswag(shared("hellaswag/hellaswag_val.jsonl"))
    assert len(exs) == 10042 and exs[0].ind == 0 and exs[0].label == 3
    assert {e.label for e in exs} == {0, 1, 2, 3}


# ---------------------------------------------------------------------------------------------------
# CLI (tiny checkpoints; the 124M and torchrun runs are in the report)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, model) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(d)
    return d


def run_cli(*argv: str) -> int:
    from gpt2.cli import main

    return main(list(argv))


def test_cli_hellaswag_and_json(tmp_path, tiny_dir, capsys):
    data = write_lines(
        tmp_path / "h.jsonl",
        [{"ind": e.ind, "ctx": e.ctx, "label": e.label, "endings": list(e.endings)} for e in make_examples(6)],
    )
    out = tmp_path / "r.json"
    argv = ["eval", "hellaswag", "--model", str(tiny_dir), "--data", str(data), "--limit", "5", "--json", str(out)]
    assert run_cli(*argv) == 0
    record = json.loads(out.read_text())
    assert record["n"] == 5 and record["task"] == "hellaswag" and record["dtype"] == "fp32"
    text = capsys.readouterr().out
    assert "acc_norm_chars" in text and "lm-eval" in text
    assert run_cli(*argv) == 2  # refuses to overwrite
    assert "pass --force" in capsys.readouterr().err
    assert run_cli(*argv, "--force", "--dtype", "bf16", "--batch-size", "2") == 0
    assert json.loads(out.read_text())["dtype"] == "bf16"


def test_cli_lambada_and_loss(tmp_path, tiny_dir, capsys):
    lam = write_lines(
        tmp_path / "l.jsonl", [{"context": e.context, "continuation": e.target[1:]} for e in LAMBADA_EXAMPLES]
    )
    assert run_cli("eval", "lambada", "--model", str(tiny_dir), "--data", str(lam)) == 0
    assert "ppl_token" in capsys.readouterr().out
    txt = tmp_path / "t.txt"
    txt.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "loss.json"
    assert (
        run_cli("eval", "loss", "--model", str(tiny_dir), "--data", str(txt), "--stride", "32", "--json", str(out)) == 0
    )
    record = json.loads(out.read_text())
    assert record["tokens"] == len(text_tokens(txt)) - 1 and record["ppl"] == pytest.approx(math.exp(record["loss"]))


def test_cli_loss_on_shards(tmp_path, tiny_dir, capsys):
    import numpy as np

    from gpt2.data import write_shard

    write_shard(tmp_path / "d_val_000000.bin", np.random.default_rng(0).integers(0, 50257, 2 * 16 * 5 + 7))
    out = tmp_path / "r.json"
    argv = ["eval", "loss", "--model", str(tiny_dir), "--data", str(tmp_path), "--batch-size", "2", "--seq-len", "16"]
    assert run_cli(*argv, "--json", str(out)) == 0
    record = json.loads(out.read_text())
    assert record["source"] == "shards" and record["steps"] == 5 and record["tokens"] == 5 * 2 * 16
    assert math.log(50257) - 1 < record["loss"] < math.log(50257) + 1  # a random model is near uniform


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "loss"], "needs --data"),
        (["eval", "hellaswag", "--limit", "0"], "--limit must be >= 1"),
        (["eval", "hellaswag", "--data", "/nonexistent/h.jsonl"], "not found"),
        (["eval", "loss", "--data", "x.txt", "--seq-len", "999"], "exceeds the model's context"),
    ],
)
def test_cli_bad_input_one_line(tiny_dir, capsys, argv, message, tmp_path):
    if "x.txt" in argv:
        (tmp_path / "x.txt").write_text("hello")
        argv = [str(tmp_path / "x.txt") if a == "x.txt" else a for a in argv]
    assert run_cli(*argv, "--model", str(tiny_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_cli_under_torchrun_two_cpu_processes(tmp_path, tiny_dir):
    data = shared("hellaswag/hellaswag_val.jsonl")
    out = tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2"]
    cmd += ["eval", "hellaswag", "--model", str(tiny_dir), "--data", str(data), "--limit", "7", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("acc_norm_chars") == 1  # only rank 0 prints
    record = json.loads(out.read_text())
    assert record["world_size"] == 2 and record["n"] == 7
    single = evaluate_hellaswag(GPT.from_pretrained(tiny_dir), load_hellaswag(data)[:7], batch_size=4)
    assert record["correct"] == single["correct"] and record["correct_norm_chars"] == single["correct_norm_chars"]
