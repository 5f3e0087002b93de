"""What a run does every so often besides training: validation loss, HellaSwag, and samples from a
fixed prompt. The loop decides when (`due`); these functions say what."""

from __future__ import annotations

from collections.abc import Callable

import torch

from gpt2.model import GPT
from gpt2.training.config import TrainingConfig


def due(step: int, interval: int, last: bool) -> bool:
    """Whether periodic work with this interval runs at `step` (every interval, and after the last step)."""
    return interval > 0 and (step % interval == 0 or last)


def load_hellaswag_examples(cfg: TrainingConfig, log: Callable[[str], None]) -> list:
    """The HellaSwag examples a run scores (none when it is off or unconfigured, with a note)."""
    if cfg.hellaswag_interval <= 0:
        return []
    if cfg.hellaswag_path is None:
        log("note: HellaSwag skipped (set hellaswag_path to a hellaswag_val.jsonl, or 'download')")
        return []
    from gpt2.evaluation import load_hellaswag
    from gpt2.evaluation.task_data import DownloadError

    try:
        examples = load_hellaswag(None if cfg.hellaswag_path == "download" else cfg.hellaswag_path)
    except DownloadError as e:  # its advice names eval's --data; a run's flag is hellaswag_path
        raise DownloadError(
            f"could not download HellaSwag ({e.reason}); pass a local hellaswag_val.jsonl with --hellaswag_path FILE, "
            "or --hellaswag_interval 0 to train without it"
        ) from None
    if cfg.hellaswag_limit is not None:
        examples = examples[: cfg.hellaswag_limit]
    log(f"HellaSwag: {len(examples):,} examples every {cfg.hellaswag_interval} steps")
    return examples


def sample_prompt(cfg: TrainingConfig, vocab_size: int, log: Callable[[str], None]) -> list[int]:
    """The sample prompt's tokens (an empty prompt: the start of a document, <|endoftext|>), or [] (no
    samples) when they do not fit the model's vocabulary."""
    from gpt2.tokenizer import EOT_TOKEN, Tokenizer

    prompt = Tokenizer().encode(cfg.sample_prompt or EOT_TOKEN)
    if cfg.sample_interval > 0 and (not prompt or max(prompt) >= vocab_size):
        log(f"note: the sample prompt does not fit the model's vocabulary ({vocab_size}); no samples")
        return []
    return prompt


def samples(model: GPT, prompt: list[int], cfg: TrainingConfig, step: int, device: torch.device) -> list[str]:
    """num_samples continuations of the prompt (top-k), from a generator seeded by step alone, so
    sampling never disturbs the training RNG and the same step samples the same text."""
    from gpt2.generation import generate_batch
    from gpt2.tokenizer import Tokenizer

    generator = torch.Generator(device=device).manual_seed(cfg.seed + step)
    was_training = model.training
    model.eval()
    try:
        # the reference's plain decode loop: nothing captured or allocated for long in the middle of training
        new = generate_batch(
            model, [prompt] * cfg.num_samples, cfg.sample_tokens, top_k=cfg.sample_top_k, generator=generator
        )
    finally:
        model.train(was_training)
    tokenizer = Tokenizer()
    return [tokenizer.decode(prompt + row) for row in new]


def oom_message(phase: str, cfg: TrainingConfig) -> str:
    """What to change when CUDA ran out of memory in `phase` of the run."""
    if phase == "hellaswag":
        return (
            f"CUDA out of memory in HellaSwag evaluation; lower --hellaswag_batch_size (now {cfg.hellaswag_batch_size})"
        )
    half = max(1, cfg.micro_batch_size // 2)
    return (
        f"CUDA out of memory during {phase} with micro_batch_size={cfg.micro_batch_size}, seq_len={cfg.seq_len}; "
        f"lower --micro_batch_size (e.g. {half}; gradient accumulation keeps total_batch_size the same)"
    )
