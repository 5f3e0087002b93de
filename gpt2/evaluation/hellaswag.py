"""HellaSwag (Zellers et al. 2019), completion style: the context, then each of the 4 endings; the
prediction is the ending with the highest (normalised) log-likelihood (conventions in the package docstring)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gpt2.evaluation.scoring import Progress, model_config, resolve_rank, score_continuations, sum_over_ranks
from gpt2.evaluation.task_data import HellaSwagExample
from gpt2.tokenizer import EOT_ID, Tokenizer

PROMPTS = ("completion", "lm-eval")
# Deprecated keys, still in the results for now: "bytes" named lm-eval's normaliser wrongly (it is characters).
DEPRECATED_KEYS = {"acc_norm_bytes": "acc_norm_chars", "correct_norm_bytes": "correct_norm_chars"}
DEPRECATED_EXAMPLE_KEYS = {"pred_norm_bytes": "pred_norm_chars"}


def hellaswag_prompt(example: HellaSwagExample, prompt: str = "completion") -> tuple[str, list[str]]:
    """(context text, [4 ending texts with their leading space]) in the given prompt convention."""
    if prompt == "completion":
        return example.ctx, [" " + e for e in example.endings]
    if prompt == "lm-eval":
        if example.ctx_a is not None and example.ctx_b is not None:
            ctx = example.ctx_a + " " + example.ctx_b.capitalize()
        else:  # files without ctx_a/ctx_b (e.g. ../shared's) only have the joined, uncapitalized ctx
            ctx = example.ctx
        return _lm_eval_clean(example.activity_label + ": " + ctx), [" " + _lm_eval_clean(e) for e in example.endings]
    raise ValueError(f"unknown HellaSwag prompt {prompt!r}; choose one of {', '.join(PROMPTS)}")


def _lm_eval_clean(text: str) -> str:
    """lm-eval-harness's HellaSwag text cleanup: WikiHow '[title]' becomes a sentence break, other
    [bracketed] markers go, double spaces collapse."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_requests(
    examples: Sequence[HellaSwagExample], block_size: int, *, prompt: str = "completion", tokenizer=None
) -> tuple[list[tuple[list[int], list[int]]], list[list[int]], int]:
    """(4 (context, ending) token requests per example, in order; ending lengths in characters (lm-eval's
    normaliser); number of examples whose context was truncated from the left to fit block_size)."""
    tok = tokenizer or Tokenizer()
    texts = [hellaswag_prompt(ex, prompt) for ex in examples]
    ctx_ids = tok.encode_batch([c for c, _ in texts], allow_special=False)
    end_ids = tok.encode_batch([e for _, ends in texts for e in ends], allow_special=False)
    requests, lengths, truncated = [], [], 0
    for i, ex in enumerate(examples):
        ctx, ends = ctx_ids[i], end_ids[4 * i : 4 * i + 4]
        longest = max(len(e) for e in ends)
        if longest > block_size:
            raise ValueError(
                f"HellaSwag example ind={ex.ind}: an ending has {longest} tokens but the model's context is "
                f"{block_size}; it cannot be scored (use a model with block_size > {longest})"
            )
        if not ctx:
            raise ValueError(f"HellaSwag example ind={ex.ind}: empty context")
        keep = block_size + 1 - longest  # inputs are context + ending minus its last token
        if len(ctx) > keep:
            ctx, truncated = ctx[-keep:], truncated + 1
        requests += [(ctx, e) for e in ends]
        lengths.append([len(e) - 1 for e in texts[i][1]])  # without the added space
    return requests, lengths, truncated


def evaluate_hellaswag(
    model: nn.Module,
    examples: Sequence[HellaSwagExample],
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    prompt: str = "completion",
    per_example: bool = False,
    pad_id: int = EOT_ID,
    pad_multiple: int = 8,
    progress: Progress | None = None,
) -> dict:
    """HellaSwag accuracy of `model` on `examples`, batch_size examples (4 rows each) per forward pass.

    Returns {"acc", "acc_norm", "acc_norm_chars", "n", "n_truncated", "correct", "correct_norm",
    "correct_norm_chars", "prompt"} over all ranks; with per_example=True also "examples": this rank's
    [{"ind", "label", "pred", "pred_norm", "pred_norm_chars", "logprobs", "num_tokens"}]. The deprecated
    aliases acc_norm_bytes, correct_norm_bytes and pred_norm_bytes repeat the *_chars values.
    rank / world_size default to torch.distributed's when it is initialized, else 0 / 1; counts are
    all-reduced when it is initialized and world_size > 1.
    """
    if not examples:
        raise ValueError("no HellaSwag examples to evaluate")
    rank, world_size = resolve_rank(rank, world_size)
    shard = list(examples[rank::world_size])
    requests, lengths, truncated = hellaswag_requests(shard, model_config(model).block_size, prompt=prompt)
    scores = score_continuations(
        model,
        requests,
        rows_per_batch=4 * batch_size,
        device=device,
        autocast_dtype=autocast_dtype,
        pad_id=pad_id,
        pad_multiple=pad_multiple,
        progress=progress,
    )
    logprob = scores.logprob.view(-1, 4)  # (N, 4)
    num_tokens = scores.num_tokens.view(-1, 4)  # (N, 4)
    preds = _predictions(logprob, num_tokens, lengths)
    labels = torch.tensor([ex.label for ex in shard], dtype=torch.long)  # (N,)
    hits = [(p == labels).sum().item() for p in preds.values()]
    counts = torch.tensor([len(shard), *hits, truncated], dtype=torch.float64)
    n, correct, correct_norm, correct_chars, n_truncated = (int(v) for v in sum_over_ranks(counts, world_size))
    ratio = lambda k: k / n if n else math.nan  # noqa: E731  (n == 0: a rank with an empty shard)
    result = {
        "acc": ratio(correct),
        "acc_norm": ratio(correct_norm),
        "acc_norm_chars": ratio(correct_chars),
        "n": n,
        "n_truncated": n_truncated,
        "correct": correct,
        "correct_norm": correct_norm,
        "correct_norm_chars": correct_chars,
        "prompt": prompt,
    }
    result.update({old: result[new] for old, new in DEPRECATED_KEYS.items()})
    if per_example:
        result["examples"] = _per_example(shard, preds, logprob, num_tokens)
    return result


def _predictions(logprob: Tensor, num_tokens: Tensor, lengths: list[list[int]]) -> dict[str, Tensor]:
    """The ending (N,) each normalisation picks from the (N, 4) scores; ties go to the first ending, as
    numpy.argmax in lm-eval."""
    chars = torch.tensor(lengths, dtype=torch.float64).view(-1, 4)  # (N, 4)
    return {
        "pred": logprob.argmax(dim=1),
        "pred_norm": (logprob / num_tokens).argmax(dim=1),
        "pred_norm_chars": (logprob / chars).argmax(dim=1),
    }


def _per_example(
    shard: list[HellaSwagExample], preds: dict[str, Tensor], logprob: Tensor, num_tokens: Tensor
) -> list[dict]:
    return [
        {
            "ind": ex.ind,
            "label": ex.label,
            **{key: int(pred[i]) for key, pred in preds.items()},
            **{old: int(preds[new][i]) for old, new in DEPRECATED_EXAMPLE_KEYS.items()},
            "logprobs": logprob[i].tolist(),
            "num_tokens": num_tokens[i].tolist(),
        }
        for i, ex in enumerate(shard)
    ]
