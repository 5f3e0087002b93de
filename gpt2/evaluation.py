"""Evaluation, the one home of every scoring formula: HellaSwag, LAMBADA, validation loss / perplexity.

All three reduce to one primitive, `score_continuations`: the log-likelihood of continuation tokens
given context tokens, computed for many (context, continuation) pairs at once. Pairs are sorted by
length, right-padded into (rows, T) batches and scored in one forward pass per batch; only the logits
at continuation positions are read, and attention is causal, so right padding can never change a score.

Conventions (docs/evaluation.md has the long version):
- HellaSwag (Zellers et al. 2019), completion style as in the GPT-2/GPT-3 papers and build-nanogpt:
  the context, then each of the 4 endings with a leading space; the score of an ending is
  sum_t log p(ending_t | context, ending_<t).
    acc             argmax of the summed log-likelihood
    acc_norm        argmax of the mean log-likelihood per ending token (build-nanogpt's acc_norm)
    acc_norm_bytes  argmax of the summed log-likelihood / len(ending), lm-eval-harness's acc_norm. lm-eval
                    divides by `len(choice)` of the Python string (characters, no leading space); that is
                    the byte length for ASCII, which is all but 181 of the 10,042 validation endings.
  With prompt="lm-eval" the context is also built the lm-eval way ("<activity_label>: <ctx_a> <Ctx_b>",
  bracket markers removed); the default "completion" uses `ctx` as it is.
- Contexts longer than the model's context are truncated from the left (oldest tokens dropped), the same
  number of tokens for all 4 endings of an example, and counted (`n_truncated`). An ending that alone does
  not fit (more than block_size tokens) is an error.
- LAMBADA (OpenAI version, GPT-2's zero-shot benchmark): the target is the last word with its leading
  space. acc: every target token is the argmax given the true prefix (= greedy decoding reproduces the
  word). ppl: exp(-mean over examples of log p(target)), lm-eval-harness's `perplexity`; ppl_token:
  exp(-total log p / total target tokens).
- Loss: mean cross-entropy per predicted token (nats), perplexity = exp(loss). A text file is one
  document after <|endoftext|>, cut into non-overlapping windows of seq_len (each token predicted once,
  the first window's tokens with less context), or with `stride` < seq_len into sliding windows that
  score only their last `stride` targets (each token predicted once, with at least seq_len - stride
  tokens of context).
- Distributed: examples are sharded by index (rank r takes r, r + W, ...), each rank scores its shard,
  and integer counts and sums are all-reduced when torch.distributed is initialized, so every example
  counts exactly once. Pass the raw module (not the DDP wrapper); a torch.compile'd module is fine.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2.tokenizer import EOT_ID, Tokenizer

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"
PROMPTS = ("completion", "lm-eval")

Progress = Callable[[int, int], None]  # (done, total) in rows or examples; the CLI passes a progress bar


def default_cache_dir() -> Path:
    """Where downloaded evaluation data is kept: ~/.cache/gpt2."""
    return Path.home() / ".cache" / "gpt2"


# ----------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class HellaSwagExample:
    """One HellaSwag item: a context, 4 candidate endings and the index of the right one."""

    ind: int
    ctx: str
    endings: tuple[str, str, str, str]
    label: int
    activity_label: str = ""
    ctx_a: str | None = None  # present in the original jsonl and the HF dataset; used by prompt="lm-eval"
    ctx_b: str | None = None


@dataclass(frozen=True)
class LambadaExample:
    """One LAMBADA item: the passage without its last word, and that word with its leading space."""

    context: str
    target: str


def load_hellaswag(
    path: str | Path | None = None, *, cache_dir: str | Path | None = None, url: str = HELLASWAG_URL
) -> list[HellaSwagExample]:
    """HellaSwag validation examples from a local jsonl (one {"ind", "activity_label", "ctx", "label",
    "endings"} object a line, as in the original file or ../shared), or, with path=None, from the cached
    download of the original validation file (fetched from `url` into cache_dir on first use)."""
    if path is None:
        path = cached_download(url, Path(cache_dir or default_cache_dir()) / "hellaswag" / Path(url).name)
    return [_hellaswag_example(obj, where, i) for i, (where, obj) in enumerate(_jsonl(path, "HellaSwag"))]


def load_lambada(
    path: str | Path | None = None, *, cache_dir: str | Path | None = None, url: str = LAMBADA_URL
) -> list[LambadaExample]:
    """LAMBADA (OpenAI version) from a local jsonl of {"context", "continuation"} (../shared's format) or
    of {"text"} (OpenAI's lambada_test.jsonl: the last space-separated word is the target), or, with
    path=None, from the cached download of OpenAI's file."""
    if path is None:
        path = cached_download(url, Path(cache_dir or default_cache_dir()) / "lambada" / Path(url).name)
    return [_lambada_example(obj, where) for where, obj in _jsonl(path, "LAMBADA")]


def cached_download(url: str, dest: Path) -> Path:
    """dest, downloading url to it first (atomically: temporary file, then rename) if it is missing."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    except OSError as e:  # URLError, HTTPError, timeouts and disk errors are all OSErrors
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download {url} ({type(e).__name__}: {e}); pass a local file with --data PATH"
        ) from e
    return dest


def _jsonl(path: str | Path, what: str) -> Iterator[tuple[str, dict]]:
    """(where = 'path:line', object) for each non-blank line, with one-line errors for bad input."""
    path = Path(path).expanduser()
    if not path.is_file():
        hint = "it is a directory" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{what} data {path} not found ({hint}); pass the path of its .jsonl file")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def _field(obj: dict, name: str, where: str, kind: type | tuple[type, ...]):
    if name not in obj:
        raise ValueError(f"{where}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _hellaswag_example(obj: dict, where: str, position: int) -> HellaSwagExample:
    ctx = _field(obj, "ctx", where, str)
    endings = _field(obj, "endings", where, list)
    if len(endings) != 4 or not all(isinstance(e, str) and e.strip() for e in endings):
        raise ValueError(f"{where}: field 'endings' must be a list of 4 non-empty strings")
    label = _field(obj, "label", where, (int, str))  # the HF dataset stores it as a string
    if isinstance(label, str):
        if not label.strip().isdigit():
            raise ValueError(f"{where}: field 'label' is {label!r}; expected 0, 1, 2 or 3 (test data has no labels)")
        label = int(label)
    if not 0 <= label <= 3:
        raise ValueError(f"{where}: field 'label' is {label}; expected 0, 1, 2 or 3")
    ind = obj.get("ind", position)
    if not isinstance(ind, int) or isinstance(ind, bool):
        raise ValueError(f"{where}: field 'ind' has the wrong type ({type(ind).__name__})")
    activity = obj.get("activity_label", "")
    ctx_a, ctx_b = obj.get("ctx_a"), obj.get("ctx_b")
    if not isinstance(activity, str) or not all(v is None or isinstance(v, str) for v in (ctx_a, ctx_b)):
        raise ValueError(f"{where}: fields 'activity_label', 'ctx_a', 'ctx_b' must be strings")
    return HellaSwagExample(ind, ctx, tuple(endings), label, activity, ctx_a, ctx_b)


def _lambada_example(obj: dict, where: str) -> LambadaExample:
    if "text" in obj and "context" not in obj:
        text = _field(obj, "text", where, str).rstrip()
        if " " not in text:
            raise ValueError(f"{where}: field 'text' has no space to split off the last word")
        context, word = text.rsplit(" ", 1)
        return LambadaExample(context, " " + word)
    context = _field(obj, "context", where, str)
    continuation = _field(obj, "continuation", where, str)
    if not context.strip() or not continuation.strip():
        raise ValueError(f"{where}: fields 'context' and 'continuation' must be non-empty")
    # The word belongs with its separator (GPT-2's BPE encodes " word" as one piece); move trailing
    # whitespace of the context onto the target, or add the single space the two fields are split at.
    stripped = context.rstrip()
    sep = context[len(stripped) :]
    if not sep and not continuation[0].isspace():
        sep = " "
    return LambadaExample(stripped, sep + continuation)


# ----------------------------------------------------------------------------------------------------
# The scoring primitive


@dataclass
class ContinuationScores:
    """Per-request results of score_continuations, on the CPU, in request order."""

    logprob: Tensor  # (R,) float64: sum of log p(continuation token | everything before it)
    num_tokens: Tensor  # (R,) int64: continuation tokens scored
    greedy: Tensor  # (R,) bool: every continuation token was the argmax of its prediction


def score_continuations(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    rows_per_batch: int,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    pad_id: int = EOT_ID,
    pad_multiple: int = 8,
    progress: Progress | None = None,
) -> ContinuationScores:
    """Log-likelihood of each continuation given its context, for (context, continuation) token lists.

    Every context and continuation must be non-empty and len(context) + len(continuation) - 1 must fit the
    model's block_size (the last token is only a target). Rows are sorted by length (longest first, so an
    out-of-memory shows at once) and right-padded with pad_id to a multiple of pad_multiple (fewer distinct
    shapes for torch.compile); padding sits after every scored position, so causal attention keeps it out.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    block_size = _model_config(model).block_size
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation must both have at least one token")
        if len(ctx) + len(cont) - 1 > block_size:
            raise ValueError(f"request {i}: {len(ctx) + len(cont) - 1} input tokens exceed block_size={block_size}")
    if rows_per_batch < 1:
        raise ValueError(f"batch size must be >= 1, got {rows_per_batch}")
    R = len(requests)
    order = sorted(range(R), key=lambda r: -(len(requests[r][0]) + len(requests[r][1])))
    sums, greedies = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(device, autocast_dtype):
            for start in range(0, R, rows_per_batch):
                rows = [requests[r] for r in order[start : start + rows_per_batch]]
                s, g = _score_batch(model, rows, device, block_size, pad_id, pad_multiple)
                sums.append(s)
                greedies.append(g)
                if progress is not None:
                    progress(min(start + rows_per_batch, R), R)
    finally:
        model.train(was_training)
    logprob = torch.empty(R, dtype=torch.float64)
    greedy = torch.empty(R, dtype=torch.bool)
    if R:  # one device -> host copy for the whole run, not one sync per batch
        index = torch.tensor(order)
        logprob[index] = torch.cat(sums).cpu()
        greedy[index] = torch.cat(greedies).cpu()
    num_tokens = torch.tensor([len(cont) for _, cont in requests], dtype=torch.long)
    return ContinuationScores(logprob, num_tokens, greedy)


def _score_batch(
    model: nn.Module,
    rows: list[tuple[Sequence[int], Sequence[int]]],
    device: torch.device,
    block_size: int,
    pad_id: int,
    pad_multiple: int,
) -> tuple[Tensor, Tensor]:
    """(summed log-prob (B,) float64, all-greedy (B,) bool) for one batch of requests, left on device."""
    B = len(rows)
    longest = max(len(c) + len(k) - 1 for c, k in rows)
    T = min(-(-longest // pad_multiple) * pad_multiple, block_size)
    x = torch.full((B, T), pad_id, dtype=torch.long)
    row_idx, pos_idx, targets = [], [], []
    for b, (ctx, cont) in enumerate(rows):
        seq = list(ctx) + list(cont)
        x[b, : len(seq) - 1] = torch.tensor(seq[:-1])
        # position p predicts token p + 1: the continuation is predicted at len(ctx)-1 .. len(seq)-2
        row_idx += [b] * len(cont)
        pos_idx += range(len(ctx) - 1, len(seq) - 1)
        targets += cont
    non_blocking = device.type == "cuda"
    x = x.to(device, non_blocking=non_blocking)
    row_idx_t = torch.tensor(row_idx).to(device, non_blocking=non_blocking)
    pos_idx_t = torch.tensor(pos_idx).to(device, non_blocking=non_blocking)
    targets_t = torch.tensor(targets).to(device, non_blocking=non_blocking)
    logits, _ = model(x)  # (B, T, V)
    picked = logits[row_idx_t, pos_idx_t]  # (N, V): only the scored positions
    picked = picked.float() if picked.dtype in (torch.bfloat16, torch.float16) else picked  # upcast, never down
    logprob = -F.cross_entropy(picked, targets_t, reduction="none")  # (N,) log p(target)
    hit = picked.argmax(dim=-1) == targets_t  # (N,)
    sums = torch.zeros(B, dtype=torch.float64, device=device).index_add_(0, row_idx_t, logprob.double())
    misses = torch.zeros(B, dtype=torch.long, device=device).index_add_(0, row_idx_t, (~hit).long())
    return sums, misses == 0


# ----------------------------------------------------------------------------------------------------
# HellaSwag


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

    Returns {"acc", "acc_norm", "acc_norm_bytes", "n", "n_truncated", "correct", "correct_norm",
    "correct_norm_bytes", "prompt"} over all ranks; with per_example=True also "examples": this rank's
    [{"ind", "label", "pred", "pred_norm", "pred_norm_bytes", "logprobs", "num_tokens"}].
    rank / world_size default to torch.distributed's when it is initialized, else 0 / 1; counts are
    all-reduced when it is initialized and world_size > 1.
    """
    if not examples:
        raise ValueError("no HellaSwag examples to evaluate")
    rank, world_size = _rank_and_world(rank, world_size)
    device = torch.device(device) if device is not None else _model_device(model)
    shard = list(examples[rank::world_size])
    requests, lengths, truncated = hellaswag_requests(shard, _model_config(model).block_size, prompt=prompt)
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
    chars = torch.tensor(lengths, dtype=torch.float64).view(-1, 4)  # (N, 4)
    labels = torch.tensor([ex.label for ex in shard], dtype=torch.long)  # (N,)
    pred = logprob.argmax(dim=1)  # ties -> the first ending, as numpy.argmax in lm-eval
    pred_norm = (logprob / num_tokens).argmax(dim=1)
    pred_bytes = (logprob / chars).argmax(dim=1)
    counts = torch.tensor(
        [
            len(shard),
            (pred == labels).sum().item(),
            (pred_norm == labels).sum().item(),
            (pred_bytes == labels).sum().item(),
            truncated,
        ],
        dtype=torch.float64,
    )
    n, correct, correct_norm, correct_bytes, n_truncated = (int(v) for v in _all_reduce_sum(counts, device, world_size))
    ratio = lambda k: k / n if n else math.nan  # noqa: E731  (n == 0: a rank with an empty shard)
    result = {
        "acc": ratio(correct),
        "acc_norm": ratio(correct_norm),
        "acc_norm_bytes": ratio(correct_bytes),
        "n": n,
        "n_truncated": n_truncated,
        "correct": correct,
        "correct_norm": correct_norm,
        "correct_norm_bytes": correct_bytes,
        "prompt": prompt,
    }
    if per_example:
        result["examples"] = [
            {
                "ind": ex.ind,
                "label": ex.label,
                "pred": int(pred[i]),
                "pred_norm": int(pred_norm[i]),
                "pred_norm_bytes": int(pred_bytes[i]),
                "logprobs": logprob[i].tolist(),
                "num_tokens": num_tokens[i].tolist(),
            }
            for i, ex in enumerate(shard)
        ]
    return result


# ----------------------------------------------------------------------------------------------------
# LAMBADA


def lambada_requests(
    examples: Sequence[LambadaExample], block_size: int, *, tokenizer=None
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """((context, target) token requests; number of contexts truncated from the left to fit block_size)."""
    tok = tokenizer or Tokenizer()
    ctx_ids = tok.encode_batch([ex.context for ex in examples], allow_special=False)
    tgt_ids = tok.encode_batch([ex.target for ex in examples], allow_special=False)
    requests, truncated = [], 0
    for ex, ctx, tgt in zip(examples, ctx_ids, tgt_ids):
        if len(tgt) > block_size:
            raise ValueError(f"LAMBADA target {ex.target!r} has {len(tgt)} tokens; the model's context is {block_size}")
        keep = block_size + 1 - len(tgt)
        if len(ctx) > keep:
            ctx, truncated = ctx[-keep:], truncated + 1
        requests.append((ctx, tgt))
    return requests, truncated


def evaluate_lambada(
    model: nn.Module,
    examples: Sequence[LambadaExample],
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    per_example: bool = False,
    pad_id: int = EOT_ID,
    pad_multiple: int = 8,
    progress: Progress | None = None,
) -> dict:
    """LAMBADA last-word accuracy and target perplexity: {"acc", "ppl", "ppl_token", "n", "n_truncated",
    "correct", "target_tokens", "logprob_sum"} over all ranks (sharding and reduction as evaluate_hellaswag);
    per_example=True adds this rank's [{"index", "logprob", "num_tokens", "greedy"}] under "examples"."""
    if not examples:
        raise ValueError("no LAMBADA examples to evaluate")
    rank, world_size = _rank_and_world(rank, world_size)
    device = torch.device(device) if device is not None else _model_device(model)
    indices = list(range(rank, len(examples), world_size))
    requests, truncated = lambada_requests([examples[i] for i in indices], _model_config(model).block_size)
    scores = score_continuations(
        model,
        requests,
        rows_per_batch=batch_size,
        device=device,
        autocast_dtype=autocast_dtype,
        pad_id=pad_id,
        pad_multiple=pad_multiple,
        progress=progress,
    )
    sums = torch.tensor(
        [
            len(indices),
            scores.greedy.sum().item(),
            scores.logprob.sum().item(),
            scores.num_tokens.sum().item(),
            truncated,
        ],
        dtype=torch.float64,
    )
    n, correct, logprob_sum, target_tokens, n_truncated = _all_reduce_sum(sums, device, world_size).tolist()
    result = {
        "acc": correct / n if n else math.nan,  # n == 0: a rank with an empty shard
        "ppl": perplexity(-logprob_sum / n) if n else math.nan,
        "ppl_token": perplexity(-logprob_sum / target_tokens) if n else math.nan,
        "n": int(n),
        "n_truncated": int(n_truncated),
        "correct": int(correct),
        "target_tokens": int(target_tokens),
        "logprob_sum": logprob_sum,
    }
    if per_example:
        result["examples"] = [
            {
                "index": idx,
                "logprob": float(scores.logprob[j]),
                "num_tokens": int(scores.num_tokens[j]),
                "greedy": bool(scores.greedy[j]),
            }
            for j, idx in enumerate(indices)
        ]
    return result


# ----------------------------------------------------------------------------------------------------
# Validation loss / perplexity


@dataclass(frozen=True)
class LossResult:
    """Mean cross-entropy per predicted token (nats), its perplexity, and how many tokens it covers."""

    loss: float
    ppl: float
    tokens: int


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy in nats); inf instead of an OverflowError for a diverged model."""
    return math.exp(loss) if loss < 700 else math.inf


def loss_stats(
    model: nn.Module,
    batches,
    steps: int | None = None,
    *,
    autocast_dtype: torch.dtype | None = None,
    reset: bool = True,
) -> LossResult:
    """Token-weighted mean cross-entropy of model over `steps` (x, y) batches (B, T) (targets == -1 are not
    counted), all-reduced over ranks when torch.distributed is initialized.

    `batches` is a loader with next_batch() (e.g. gpt2.data.DataLoaderLite; reset() first when reset=True,
    so every evaluation sees the same batches; steps is required) or any iterable of (x, y) (steps=None:
    all of it). Every rank must call this, even with no batches of its own.
    """
    device = _model_device(model)
    if hasattr(batches, "next_batch"):
        if steps is None:
            raise ValueError("steps is required for a loader with next_batch() (it never runs out)")
        if reset and hasattr(batches, "reset"):
            batches.reset()
        source: Iterable = (batches.next_batch() for _ in range(steps))
    else:
        source = batches if steps is None else (b for _, b in zip(range(steps), batches))
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(device, autocast_dtype):
            for x, y in source:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                n_valid = (y != -1).sum()
                # mean over the valid targets (nan if none), chunked so the (B, T, V) logits never exist
                _, loss = model(x, y, return_logits=False)
                # where(), not an `if`: reading n_valid on the host would sync the GPU every batch
                nll_sum += torch.where(n_valid > 0, loss.double() * n_valid, 0.0)
                count += n_valid
    finally:
        model.train(was_training)
    nll_sum, count = _all_reduce_sum(torch.stack([nll_sum, count]), device, world_size=None).tolist()
    if count == 0:
        raise ValueError("no tokens to evaluate the loss on; the data is empty or shorter than 2 tokens")
    loss = nll_sum / count
    return LossResult(loss=loss, ppl=perplexity(loss), tokens=int(count))


def evaluate_loss(
    model: nn.Module,
    loader,
    steps: int | None,
    *,
    autocast_dtype: torch.dtype | None = None,
    reset: bool = True,
) -> float:
    """Mean cross-entropy per token over `steps` batches of `loader`; see loss_stats."""
    return loss_stats(model, loader, steps, autocast_dtype=autocast_dtype, reset=reset).loss


def text_tokens(path: str | Path, *, tokenizer=None) -> list[int]:
    """A UTF-8 text file as one document: <|endoftext|> then its tokens (as training shards start documents)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found; pass a .txt file or a directory of token shards")
    if path.name.endswith((".jsonl", ".xz", ".gz", ".zst", ".bin", ".json")):
        raise ValueError(f"{path} is not plain text; tokenize it with `gpt2 prepare` and pass the shard directory")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); pass a UTF-8 .txt file") from None
    tok = tokenizer or Tokenizer()
    return [EOT_ID] + tok.encode(text, allow_special=False)


def text_windows(tokens: Sequence[int], seq_len: int, *, stride: int | None = None) -> list[tuple[Tensor, Tensor]]:
    """Cut a token stream into (x (T,), y (T,)) windows, T <= seq_len, so each token after the first is a
    target exactly once (unscored targets are -1).

    stride=None (or seq_len): non-overlapping windows. stride < seq_len: a window every `stride` tokens that
    scores only targets no earlier window scored, so each gets >= seq_len - stride tokens of context.
    """
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    data = torch.as_tensor(list(tokens) if not isinstance(tokens, Tensor) else tokens, dtype=torch.long)
    N = data.numel()
    windows, scored_upto, start = [], 0, 0  # targets are token indices 1..N-1; scored_upto = last one done
    while scored_upto < N - 1:
        end = min(start + seq_len, N - 1)  # last target index of this window
        x = data[start:end]
        y = data[start + 1 : end + 1].clone()
        y[: max(0, scored_upto - start)] = -1  # targets start+1 .. scored_upto were scored before
        windows.append((x, y))
        scored_upto = end
        start += stride
    return windows


def window_batches(
    windows: Sequence[tuple[Tensor, Tensor]],
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    pad_id: int = EOT_ID,
) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's windows (rank, rank + world_size, ...) as right-padded (x, y) batches (B, T); padded
    targets are -1 so they are never scored, and causal attention keeps padded inputs out of the rest."""
    mine = windows[rank::world_size]
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        T = max(x.numel() for x, _ in chunk)
        x = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        y = torch.full((len(chunk), T), -1, dtype=torch.long)
        for b, (xs, ys) in enumerate(chunk):
            x[b, : xs.numel()] = xs
            y[b, : ys.numel()] = ys
        yield x, y


# ----------------------------------------------------------------------------------------------------
# Helpers


def _model_config(model: nn.Module):
    """The GPTConfig behind a GPT, a torch.compile'd GPT (._orig_mod) or a DDP-wrapped one (.module)."""
    while not hasattr(model, "config"):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise ValueError(f"{type(model).__name__} has no .config; pass a gpt2.GPT (compiled or not)")
        model = inner
    return model.config


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    distributed = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if distributed else 1
    if rank is None:
        rank = dist.get_rank() if distributed and world_size > 1 else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if distributed and world_size > 1 and world_size != dist.get_world_size():
        raise ValueError(f"world_size={world_size} but the process group has {dist.get_world_size()} ranks")
    return rank, world_size


def _all_reduce_sum(values: Tensor, device: torch.device, world_size: int | None) -> Tensor:
    """values summed over ranks when torch.distributed is initialized (and world_size, if given, > 1)."""
    if not (dist.is_available() and dist.is_initialized()) or (world_size is not None and world_size == 1):
        return values.cpu()
    # NCCL reduces only CUDA tensors; gloo is happiest with CPU ones.
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    values = values.to(on)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()
