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
    acc_norm_chars  argmax of the summed log-likelihood / len(ending), lm-eval-harness's acc_norm. lm-eval
                    divides by `len(choice)` of the Python string (characters, no leading space), which is
                    the byte length only for ASCII (all but 181 of the 10,042 validation endings).
                    `acc_norm_bytes` is a deprecated alias of it, kept in the results for now.
  With prompt="lm-eval" the context is also built the lm-eval way ("<activity_label>: <ctx_a> <Ctx_b>",
  bracket markers removed); the default "completion" uses `ctx` as it is.
- Contexts longer than the model's context are truncated from the left (oldest tokens dropped), the same
  number of tokens for all 4 endings of an example, and counted (`n_truncated`). An ending that alone does
  not fit (more than block_size tokens) is an error.
- LAMBADA (OpenAI version, GPT-2's zero-shot benchmark): the target is the last space-separated word with
  a leading space, whether a file has {"text"} lines or {"context", "continuation"} halves. acc: every
  target token is the argmax given the true prefix (= greedy decoding reproduces the word). ppl:
  exp(-mean over examples of log p(target)), lm-eval-harness's `perplexity`; ppl_token:
  exp(-total log p / total target tokens).
- Loss: mean cross-entropy per predicted token (nats), perplexity = exp(loss). A text file is one
  document after <|endoftext|>, cut into non-overlapping windows of seq_len (each token predicted once,
  the first window's tokens with less context), or with `stride` < seq_len into sliding windows that
  score only their last `stride` targets (each token predicted once, with at least seq_len - stride
  tokens of context).
- Distributed: examples are sharded by index (rank r takes r, r + W, ...), each rank scores its shard,
  and integer counts and sums are all-reduced when torch.distributed is initialized, so every example
  counts exactly once. Pass the raw module (not the DDP wrapper); a torch.compile'd module is fine.

Modules: task_data (loading and checking the benchmark files, the cached download), scoring (the
primitive and what the benchmarks share), hellaswag, lambada, loss. This package re-exports the public names.
"""

from gpt2.evaluation.hellaswag import PROMPTS, evaluate_hellaswag, hellaswag_prompt, hellaswag_requests
from gpt2.evaluation.lambada import evaluate_lambada, lambada_requests
from gpt2.evaluation.loss import (
    LossResult,
    evaluate_loss,
    loss_stats,
    perplexity,
    text_tokens,
    text_windows,
    window_batches,
)
from gpt2.evaluation.scoring import ContinuationScores, Progress, score_continuations
from gpt2.evaluation.task_data import (
    HELLASWAG_URL,
    LAMBADA_URL,
    HellaSwagExample,
    LambadaExample,
    cached_download,
    default_cache_dir,
    load_hellaswag,
    load_lambada,
)

__all__ = [
    "HELLASWAG_URL",
    "LAMBADA_URL",
    "PROMPTS",
    "ContinuationScores",
    "HellaSwagExample",
    "LambadaExample",
    "LossResult",
    "Progress",
    "cached_download",
    "default_cache_dir",
    "evaluate_hellaswag",
    "evaluate_lambada",
    "evaluate_loss",
    "hellaswag_prompt",
    "hellaswag_requests",
    "lambada_requests",
    "load_hellaswag",
    "load_lambada",
    "loss_stats",
    "perplexity",
    "score_continuations",
    "text_tokens",
    "text_windows",
    "window_batches",
]
