"""`gpt2 eval hellaswag|loss|lambada`: score a model, print a small table, optionally write JSON.

Runs as one process or under torchrun (`torchrun --nproc_per_node=N -m gpt2 eval ...`): the process group
is set up here from torchrun's environment (nccl on CUDA, gloo on CPU); gpt2.evaluation shards the
examples by rank and all-reduces the counts; only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gpt2.commands.common import DEVICE_HELP, add_model_arguments

TASKS = ("hellaswag", "loss", "lambada")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=TASKS, help="hellaswag, loss (validation loss/perplexity) or lambada")
    add_model_arguments(parser, device_help=DEVICE_HELP + " (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument(
        "--data",
        default=None,
        help="hellaswag/lambada: a local .jsonl (default: download once into ~/.cache/gpt2); "
        "loss (required): a directory of token shards or a UTF-8 .txt file",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="only the first N examples (loss: about the first N tokens, in whole batches on shards)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="examples per forward pass (hellaswag: x4 rows; loss: sequences); default 32 on GPU, 4 on CPU",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first (GPU runs)")
    group = parser.add_argument_group("hellaswag")
    group.add_argument(
        "--prompt",
        default="completion",
        choices=["completion", "lm-eval"],
        help="context as in the file (GPT-2 paper / build-nanogpt), or lm-eval-harness's "
        "'<activity>: <ctx>' with its text cleanup",
    )
    group = parser.add_argument_group("loss")
    group.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's context)")
    group.add_argument("--stride", type=int, default=None, help="text file: sliding windows every N tokens")
    group.add_argument("--steps", type=int, default=None, help="token shards: batches per rank (default: all)")
    group.add_argument("--split", default="val", help="token shards: which split (default: val)")


def run(args: argparse.Namespace) -> int:
    import torch

    _check_args(args)
    json_path = _json_path(args)
    from gpt2.distributed import destroy_distributed, init_distributed

    info = init_distributed(os.environ, args.device)  # a process group only under torchrun
    rank, world_size, device = info.rank, info.world_size, info.device
    try:
        from gpt2.commands.common import load_for_inference, model_spec
        from gpt2.device import autocast_dtype as autocast_dtype_for

        autocast_dtype = autocast_dtype_for(args.dtype, device)
        # fp32 weights, --dtype as autocast: scores stay comparable with fp32 runs (gpt2.device)
        raw, _ = load_for_inference(model_spec(args, str(device)), cast_weights=False)
        model = torch.compile(raw) if args.compile else raw
        batch_size = args.batch_size or (32 if device.type == "cuda" else 4)
        is_main = rank == 0
        t0 = time.perf_counter()
        if args.task in ("hellaswag", "lambada"):
            metrics = _choice_task(args, model, batch_size, device, autocast_dtype, rank, world_size, is_main)
        else:
            metrics = _loss(args, model, raw.config.block_size, batch_size, autocast_dtype, rank, world_size, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if is_main:
            from gpt2.device import DTYPE_NAMES

            dtype_name = DTYPE_NAMES[autocast_dtype or torch.float32]
            record = {
                "task": args.task,
                "model": str(args.model),
                "data": args.data,
                "limit": args.limit,
                "dtype": dtype_name,
                "device": str(device),
                "world_size": world_size,
                "batch_size": batch_size,
                "seconds": round(seconds, 3),
                "torch": torch.__version__,
                **metrics,
            }
            _print_table(record)
            if json_path is not None:
                from gpt2.fileio import atomic_write_json

                atomic_write_json(json_path, record)
                print(f"wrote {json_path}")
    finally:
        destroy_distributed()
    return 0


def _check_args(args: argparse.Namespace) -> None:
    for name in ("limit", "batch_size", "seq_len", "stride", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.task == "loss" and args.data is None:
        raise ValueError("gpt2 eval loss needs --data: a directory of token shards or a UTF-8 .txt file")


def _json_path(args: argparse.Namespace) -> Path | None:
    """--json, checked before the evaluation (which may take hours): not an existing file without
    --force, not a directory, and in a directory that exists (created now) and can be written."""
    if not args.json:
        return None
    path = Path(args.json).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"--json {path} is a directory; pass a file name, e.g. {path / 'results.json'}")
    if path.exists() and not args.force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it or choose another --json path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"--json {path}: cannot create its directory {path.parent} ({e.strerror or e})") from None
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"--json {path}: its directory {path.parent} is not writable; choose another path")
    return path


def _progress(is_main: bool, desc: str):
    """A (done, total) callback drawing a tqdm bar on rank 0, and the bar (to close)."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="row", disable=not is_main, leave=False, file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return update, bar


def _choice_task(args, model, batch_size, device, autocast_dtype, rank, world_size, is_main) -> dict:
    """HellaSwag or LAMBADA: load the examples, score them with a progress bar on rank 0."""
    from gpt2 import evaluation

    load, evaluate = {
        "hellaswag": (evaluation.load_hellaswag, evaluation.evaluate_hellaswag),
        "lambada": (evaluation.load_lambada, evaluation.evaluate_lambada),
    }[args.task]
    extra = {"prompt": args.prompt} if args.task == "hellaswag" else {}
    examples = load(args.data)[: args.limit]
    update, bar = _progress(is_main, args.task)
    try:
        return evaluate(
            model,
            examples,
            batch_size=batch_size,
            device=device,
            autocast_dtype=autocast_dtype,
            rank=rank,
            world_size=world_size,
            progress=update,
            **extra,
        )
    finally:
        bar.close()


def _loss(args, model, block_size, batch_size, autocast_dtype, rank, world_size, device) -> dict:
    from gpt2.evaluation import loss_stats, text_tokens, text_windows, window_batches

    seq_len = args.seq_len or block_size
    if seq_len > block_size:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context ({block_size}); pass <= {block_size}")
    data = Path(args.data).expanduser()
    if data.is_dir():
        from gpt2.data import DataLoaderLite, LoaderConfig

        config = LoaderConfig(
            data_root=str(data),
            batch_size=batch_size,
            seq_len=seq_len,
            split=args.split,
            process_rank=rank,
            world_size=world_size,
            master_process=rank == 0,
        )
        loader = DataLoaderLite(config, device=device)
        steps = _shard_steps(args, loader.steps_per_epoch, batch_size * seq_len * world_size)
        result = loss_stats(model, loader, steps, autocast_dtype=autocast_dtype)
        source = {"source": "shards", "split": args.split, "steps": steps}
    else:
        if args.steps is not None:
            raise ValueError("--steps applies to token shards; a text file is always evaluated whole (use --limit)")
        tokens = text_tokens(data)
        if args.limit is not None:
            tokens = tokens[: args.limit]
        windows = text_windows(tokens, seq_len, stride=args.stride)
        batches = window_batches(windows, batch_size, rank=rank, world_size=world_size)
        result = loss_stats(model, batches, None, autocast_dtype=autocast_dtype)
        source = {"source": "text", "windows": len(windows), "stride": args.stride or seq_len}
    return {"loss": result.loss, "ppl": result.ppl, "tokens": result.tokens, "seq_len": seq_len, **source}


def _shard_steps(args: argparse.Namespace, per_epoch: int, tokens_per_step: int) -> int:
    """Batches per rank over token shards: the whole split once (default), --steps N of it, or the
    fewest whole batches that hold --limit tokens. Never more than one pass: a second one would
    count the same tokens twice."""
    if args.steps is not None and args.limit is not None:
        raise ValueError("give --steps (batches per rank) or --limit (tokens), not both")
    if args.steps is not None and args.steps > per_epoch:
        raise ValueError(
            f"--steps {args.steps} is more than one pass over the {args.split} split ({per_epoch} batches per rank); "
            f"pass at most {per_epoch}, or leave it out for the whole split"
        )
    if args.limit is not None:
        return min(per_epoch, -(-args.limit // tokens_per_step))
    return args.steps or per_epoch


ROWS = {
    "hellaswag": [
        ("acc", "argmax of summed log-prob (GPT-2/GPT-3 papers)"),
        ("acc_norm", "argmax of mean log-prob per token (build-nanogpt)"),
        ("acc_norm_chars", "argmax of log-prob / ending length in characters (lm-eval-harness acc_norm)"),
        ("n_truncated", "contexts cut from the left to fit the model"),
    ],
    "lambada": [
        ("acc", "greedy continuation is the target word"),
        ("ppl", "exp(-mean log p(target word)) (lm-eval-harness)"),
        ("ppl_token", "exp(-mean log p(target token))"),
        ("n_truncated", "contexts cut from the left to fit the model"),
    ],
    "loss": [
        ("loss", "mean cross-entropy per token (nats)"),
        ("ppl", "exp(loss)"),
        ("tokens", "predicted tokens"),
    ],
}


def _print_table(record: dict) -> None:
    n = record.get("n", record.get("tokens"))
    unit = "tokens" if record["task"] == "loss" else "examples"
    print(
        f"{record['task']}: {record['model']} | {n} {unit} | {record['dtype']} on {record['device']} x "
        f"{record['world_size']} | {record['seconds']:.1f} s"
    )
    for key, meaning in ROWS[record["task"]]:
        value = record[key]
        shown = f"{value:>12d}" if isinstance(value, int) else f"{value:>12.4f}"
        print(f"  {key:<15}{shown}   {meaning}")
