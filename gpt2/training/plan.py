"""Planning a run: every check that needs no writing (run directory, resume point, batch geometry,
data), done before anything is created, so a run that cannot work fails with one line and leaves
no trace."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from gpt2.checkpoint import (
    CHECKPOINTS,
    METRICS,
    checkpoint_model_config,
    checkpoint_step,
    failed_start,
    find_checkpoint,
    holds_run,
    load_train_config,
    verified,
)
from gpt2.config import GPTConfig
from gpt2.fileio import read_json_object
from gpt2.training.config import BUILTIN_CORPUS, TrainingConfig

DATA_DIR = "data"  # RUN_DIR/data: the shards of --data FILE
# Settings that a checkpoint's optimizer state was built with, or that loading it restores over the config (torch's
# load_state_dict keeps each saved group's options): a resume must keep them. Learning rates, weight decays, Muon's
# momentum and the schedules are set from the config at every step, so those may change on a resume.
RESUME_FIXED = ("beta1", "beta2", "eps", "weight_ema", "ema_start")
RESUME_FIXED_MUON = ("embedding_beta1", "muon_nesterov", "muon_adjust_lr", "muon_split_qkv", "muon_split_heads")
RESUME_FIXED_MUON += ("muon_normuon", "muon_normuon_beta2", "muon_cautious_wd", "muon_ns_coefficients")


@dataclass(frozen=True)
class RunPlan:
    """A checked run: its config (out_dir resolved to the run directory), the checkpoint it
    continues (if any), its batch geometry, and where its token shards are (or will be)."""

    config: TrainingConfig
    run_dir: Path
    resume_from: Path | None
    grad_accum_steps: int
    world_size: int
    evaluated: bool = False  # metrics.jsonl already holds the evaluation of the resumed weights

    @property
    def start_step(self) -> int:
        """Optimizer steps already done (the resumed checkpoint's step), else 0."""
        return checkpoint_step(self.resume_from) if self.resume_from is not None else 0

    @property
    def data_root(self) -> Path:
        """The shards the run reads: RUN_DIR/data when it tokenizes --data itself, else data_root."""
        if self.config.data is not None:
            return self.run_dir / DATA_DIR
        return Path(self.config.data_root).expanduser()


def resolve_resume(resume: str, out_dir: str | Path) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to load or None) for --resume auto | RUN_DIR | CHECKPOINT_DIR."""
    if resume == "auto":
        run_dir = Path(out_dir).expanduser()
        return run_dir, find_checkpoint(run_dir) if run_dir.is_dir() else None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such run or checkpoint directory")
    ckpt = find_checkpoint(path)
    if ckpt is None:
        if failed_start(path):
            raise FileNotFoundError(
                f"--resume {resume}: its start failed before the first checkpoint, so there is nothing to resume; "
                "rerun the command that started it (the failed start's files are moved aside)"
            )
        raise FileNotFoundError(
            f"--resume {resume}: no checkpoint in {path / CHECKPOINTS}; nothing to resume "
            "(start a new run with another --out_dir, or --resume auto to start it if empty)"
        )
    run_dir = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else path
    return run_dir, ckpt


def batch_geometry(cfg: TrainingConfig, world_size: int) -> int:
    """Micro-steps per optimizer step; ValueError naming the nearest valid sizes if it does not divide."""
    per_micro = cfg.micro_batch_size * cfg.seq_len * world_size
    if cfg.total_batch_size % per_micro == 0:
        return cfg.total_batch_size // per_micro
    lower = max(per_micro, cfg.total_batch_size // per_micro * per_micro)
    upper = lower + per_micro if lower < cfg.total_batch_size else lower
    raise ValueError(
        f"total_batch_size {cfg.total_batch_size:,} is not divisible by micro_batch_size*seq_len*world_size = "
        f"{cfg.micro_batch_size}*{cfg.seq_len}*{world_size} = {per_micro:,}; "
        f"nearest valid total_batch_size: {lower:,} or {upper:,}"
    )


def plan_run(cfg: TrainingConfig, world_size: int = 1) -> RunPlan:
    """Check a run before anything is written: run directory, resume point, batch geometry, data."""
    accum = batch_geometry(cfg, world_size)
    out_dir = Path(cfg.out_dir).expanduser()
    resume_from = None
    if cfg.resume is None:
        if out_dir.is_file():
            raise FileExistsError(f"out_dir {out_dir} is a file; choose a directory with --out_dir")
        if holds_run(out_dir):
            raise FileExistsError(
                f"{out_dir} already holds a training run; continue it with --resume {out_dir} "
                "(or --resume auto), or start a new one with another --out_dir"
            )
        run_dir = out_dir
    else:
        run_dir, resume_from = resolve_resume(cfg.resume, out_dir)
        if cfg.resume != "auto" and run_dir.resolve() != out_dir.resolve():
            raise ValueError(
                f"--resume {cfg.resume} continues the run in {run_dir}, but out_dir is {out_dir}; drop --out_dir"
            )
        if resume_from is not None:
            verified(resume_from)  # every file against its sha256: never train on a damaged checkpoint
            check_same_model(resume_from, cfg.model_config())
            check_same_run(resume_from, cfg)
    start = checkpoint_step(resume_from) if resume_from is not None else 0
    if cfg.max_steps < start:
        raise ValueError(
            f"{resume_from} is at step {start}, past max_steps {cfg.max_steps}; pass --max_steps {start} or more"
        )
    evaluated = resume_from is not None and evaluated_at(run_dir, start)
    plan = RunPlan(replace(cfg, out_dir=str(run_dir)), run_dir, resume_from, accum, world_size, evaluated)
    check_data(plan)
    check_sample_prompt(plan.config)
    return plan


def evaluated_at(run_dir: Path, step: int) -> bool:
    """Whether the run's metrics.jsonl holds an evaluation of the weights after `step` updates (a
    finished run's last one, say): continuing from that step does not repeat it. Read while planning,
    before any rank can change the file."""
    from gpt2.checkpoint.layout import read_metrics

    path = run_dir / METRICS
    return path.is_file() and any(r.get("type") == "eval" and r.get("step") == step for r in read_metrics(path))


def check_sample_prompt(cfg: TrainingConfig) -> None:
    """A sample prompt longer than the model's context fails at the first sampling, after the run has
    started: refuse it now."""
    if cfg.sample_interval <= 0:
        return
    from gpt2.tokenizer import Tokenizer

    n, context = len(Tokenizer().encode(cfg.sample_prompt)), cfg.model_config().block_size
    if n > context:
        raise ValueError(
            f"sample_prompt has {n} tokens but the model's context is {context}; shorten it "
            "(or --sample_interval 0 for no samples)"
        )


def check_same_model(ckpt: Path, model_config: GPTConfig) -> None:
    """ValueError naming every field in which the checkpoint's model differs from the configured one."""
    differ = checkpoint_model_config(ckpt).diff(model_config)
    if differ:
        raise ValueError(
            f"cannot resume {ckpt}: the model config differs from the checkpoint's "
            f"({'; '.join(d.replace(' != ', ' (checkpoint) != ') + ' (now)' for d in differ)}); "
            "drop the model overrides or start a new run"
        )


def check_same_run(ckpt: Path, cfg: TrainingConfig) -> None:
    """A run continues with its own optimizer (the checkpoint holds that one's state) and on its own
    data: a --data file other than the one it tokenized is refused (its RUN_DIR/data would be used)."""
    saved_config = load_train_config(ckpt)
    optimizer = saved_config.get("optimizer", "adamw")  # checkpoints from before Muon are AdamW's
    if cfg.optimizer != optimizer:
        raise ValueError(
            f"cannot resume {ckpt} with --optimizer {cfg.optimizer}: it was trained with {optimizer}, whose state "
            f"it holds; resume with --optimizer {optimizer}, or start a new run"
        )
    check_same_optimizer_settings(ckpt, cfg, saved_config)
    saved = saved_config.get("data")
    if cfg.data != saved:
        was = f"--data {saved} (tokenized into its {DATA_DIR}/)" if saved else f"the shards in {cfg.data_root}"
        raise ValueError(
            f"cannot resume {ckpt} with --data {cfg.data}: the run trains on {was}; "
            "drop --data to continue it, or start a new run with another --out_dir"
        )


def check_same_optimizer_settings(ckpt: Path, cfg: TrainingConfig, saved_config: dict) -> None:
    """ValueError naming every RESUME_FIXED setting that differs from the checkpoint's (settings a checkpoint
    predates count as their defaults)."""
    names = RESUME_FIXED + (RESUME_FIXED_MUON if cfg.optimizer == "muon" else ())
    defaults = TrainingConfig.__dataclass_fields__
    differ = []
    for name in names:
        saved, now = saved_config.get(name, defaults[name].default), getattr(cfg, name)
        if saved != now:
            differ.append((name, saved, now))
    if differ:
        said = "; ".join(f"{name} = {_cli(saved)} (checkpoint) != {_cli(now)} (now)" for name, saved, now in differ)
        fix = " ".join(f"--{name} {_cli(saved)}" for name, saved, _ in differ)
        raise ValueError(
            f"cannot resume {ckpt}: its optimizer state was built with other settings ({said}); "
            f"resume with {fix}, or start a new run"
        )


def _cli(value: object) -> str:
    """A setting as the command line takes it."""
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_data(plan: RunPlan) -> None:
    """The run's data exists and fits the model: a --data file to tokenize, or shards in data_root
    (checked again once --data is tokenized)."""
    from gpt2.data import MANIFEST

    cfg = plan.config
    # A new run tokenizes its file (whatever an earlier failed start left in RUN_DIR/data); a resumed
    # one reads the shards it was trained on.
    if cfg.data is not None and (plan.resume_from is None or not (plan.data_root / MANIFEST).is_file()):
        if cfg.data != BUILTIN_CORPUS and not Path(cfg.data).expanduser().is_file():
            raise FileNotFoundError(f"--data {cfg.data}: no such file; pass a .txt/.jsonl file or {BUILTIN_CORPUS}")
        return
    check_shards(plan.data_root, cfg.model_config())


def check_shards(root: Path, model_config: GPTConfig) -> None:
    """One-line errors for a missing or empty data_root and for shards of another vocabulary."""
    from gpt2.data import MANIFEST, find_shards, open_shard

    if not root.exists():
        raise FileNotFoundError(
            f"data_root {root} does not exist; create shards with `gpt2 prepare SOURCE --out {root}`, "
            "or train on a text file with --data FILE.txt"
        )
    for path in find_shards(root, "train"):
        _, vocab = open_shard(path)
        if vocab > model_config.vocab_size:
            raise ValueError(
                f"{path} holds token ids up to {vocab - 1} (vocab {vocab}) but the model's vocab_size is "
                f"{model_config.vocab_size}; these shards come from another tokenizer, re-create them with gpt2 prepare"
            )
    manifest = root / MANIFEST
    if manifest.is_file():
        tok = read_json_object(manifest, f"re-create the shards with gpt2 prepare --out {root}").get("tokenizer", {})
        if tok.get("vocab_size", model_config.vocab_size) > model_config.vocab_size:
            raise ValueError(
                f"{root} was tokenized with vocab_size {tok['vocab_size']} but the model has "
                f"{model_config.vocab_size}; re-create the shards with gpt2 prepare"
            )
