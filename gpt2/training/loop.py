"""The training loop: `train(plan, info, log)` builds a Trainer and runs it.

    Trainer.__init__   model, optimizer, loaders, trainer state (restored when resuming), strategy
    Trainer.train      the loop: periodic evaluation, one optimizer step, periodic checkpoints
    Trainer.train_step one optimizer step (gradient accumulation, clipping, the update)
    Trainer.evaluate   validation loss, HellaSwag and samples of the weights after `step` updates

The same code runs on one CPU, one GPU, or N processes under torchrun (gpt2.distributed). On CPU in
float32 a resumed run reproduces the uninterrupted run's losses bit for bit: the checkpoint holds the
weights (safetensors keep every bit), the optimizer state, the data loader's position and every
rank's RNG state.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any

import torch

from gpt2.checkpoint import (
    TRAIN_CONFIG,
    begin_timeline,
    checkpoint_name,
    failed_start,
    prune_checkpoints,
    set_aside_failed_start,
    write_run_state,
)
from gpt2.data import DataLoaderLite, LoaderConfig
from gpt2.device import autocast_dtype, synchronize
from gpt2.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, on_main_rank
from gpt2.fileio import WriteError, as_write_error, atomic_write_json
from gpt2.kernels.training import fuse_mlps, use_training_kernels
from gpt2.model import GPT
from gpt2.training.averaging import WeightAverage
from gpt2.training.metrics import RunLogger, environment_info, flops_per_token, mfu, peak_flops
from gpt2.training.optim import apply_schedule, build_optimizer
from gpt2.training.parallel import Snapshot, make_strategy
from gpt2.training.periodic import due, load_hellaswag_examples, oom_message, sample_prompt, samples
from gpt2.training.plan import RunPlan, check_shards
from gpt2.training.plotting import plot_run
from gpt2.training.schedule import (
    batch_lr_scale,
    batches_at,
    lr_factor,
    micro_steps,
    muon_momentum_at,
    seq_len_at,
    tokens_through,
)
from gpt2.training.state import NeverStop, RngState, StopFlag, TrainerState, TrainResult
from gpt2.training.step import StepKernels, apply_gradients, clip_gradients, forward_backward

PRECISION = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (the run stops; the last good checkpoint is kept)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a lost mount); earlier ones are intact."""


def train(plan: RunPlan, info: DistInfo, log: RunLogger, stop: StopFlag | None = None) -> TrainResult:
    """Run (or continue) the training described by `plan` on this process; every rank calls it."""
    return Trainer(plan, info, log, stop or NeverStop()).train()


class Trainer:
    """One rank's share of a training run: everything the loop needs, built once."""

    def __init__(self, plan: RunPlan, info: DistInfo, log: RunLogger, stop: StopFlag) -> None:
        self.plan, self.cfg, self.info, self.log, self.stop = plan, plan.config, info, log, stop
        cfg, device = self.cfg, info.device
        self.phase = "setup"
        self.fused, self.kernels_line = use_training_kernels(cfg.train_kernels, device)  # before any write
        data_root = self._prepare_data()
        model_config = cfg.model_config()
        self.env = environment_info(device) if info.is_main else {}
        log.info("config:\n" + cfg.to_toml())
        log.info("run: " + ", ".join(f"{k}={v}" for k, v in self.env.items() if v is not None))
        self.amp_dtype = autocast_dtype(cfg.dtype, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
        self.strategy = make_strategy(cfg.parallelism, info, activation_checkpointing=cfg.activation_checkpointing)
        self.model = self._build_model(model_config)
        self.optimizer = build_optimizer(self.model, cfg, device)
        self.train_loader, self.val_loader = self._build_loaders(data_root)
        self.per_micro = cfg.micro_batch_size * cfg.seq_len * info.world_size  # tokens of one micro-step
        self.average = WeightAverage.from_config(self.model, cfg)
        self.state = TrainerState(
            loader=self.train_loader,
            scaler=self.scaler,
            rng=RngState(info, cfg.seed),
            info=info,
            parallelism=self.strategy.name,
            tokens_seen=lambda step: tokens_through(step - 1, cfg, self.per_micro) if step else 0,
            average=self.average,
        )
        self.hellaswag = load_hellaswag_examples(cfg, log.info)
        self.prompt = sample_prompt(cfg, model_config.vocab_size, log.info)
        self.flops_per_token = flops_per_token(model_config, self.model.num_params(non_embedding=True), cfg.seq_len)
        self.peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.start_step = self._restore()
        self.evaluated = bool(broadcast_object(plan.evaluated))  # rank 0's metrics.jsonl decides, for all
        # Every check has passed: only now is the run directory written (by rank 0).
        on_main_rank(self._begin, f"record the run's start in {plan.run_dir}")
        self.train_model = self.strategy.wrap(self.model, compile=self.compile)
        self.kernels = StepKernels.for_device(device)
        self._describe()
        self.last_loss: float | None = None
        self.last_val: float | None = None
        self.last_ckpt: Path | None = None

    # -- setup -------------------------------------------------------------------------------------

    def _prepare_data(self) -> Path:
        """The shards to read; tokenizes --data into RUN_DIR/data first (rank 0; the others wait)."""
        root = self.plan.data_root
        if self.cfg.data is not None:
            if self.info.is_main:
                from gpt2.training.corpus import prepare_data

                prepare_data(
                    self.cfg.data, root, self.plan.run_dir, self.log.info, new_run=self.plan.resume_from is None
                )
            barrier()
            check_shards(root, self.cfg.model_config())
        return root

    def _build_model(self, model_config) -> GPT:
        """Same initial weights on every rank (DDP also broadcasts rank 0's), then a different random
        stream per rank (dropout)."""
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.seed)
        model = GPT(model_config).to(info.device)
        if self.fused:
            fuse_mlps(model)  # the same parameters, computed by gpt2.kernels (state_dict unchanged)
        torch.manual_seed(cfg.seed + info.rank)
        if info.device.type == "cuda":
            torch.cuda.manual_seed(cfg.seed + info.rank)
        return self.strategy.prepare(model, compile=self.compile, amp_dtype=self.amp_dtype)

    def _build_loaders(self, data_root: Path) -> tuple[DataLoaderLite, DataLoaderLite | None]:
        cfg, info = self.cfg, self.info
        common = dict(
            batch_size=cfg.micro_batch_size,
            seq_len=cfg.seq_len,
            process_rank=info.rank,
            world_size=info.world_size,
            master_process=info.is_main,
        )
        train_config = LoaderConfig(data_root, split="train", shuffle=cfg.shuffle, seed=cfg.seed, **common)
        train_loader = DataLoaderLite(train_config, device=info.device, log=self.log.info)
        val_loader = None
        if cfg.eval_interval > 0:
            try:
                val_loader = DataLoaderLite(LoaderConfig(data_root, split="val", **common), device=info.device)
            except FileNotFoundError:
                self.log.info(f"note: no val shards in {data_root}; validation loss is skipped")
        return train_loader, val_loader

    def _restore(self) -> int:
        """Load the resumed checkpoint into every component; the step to start from."""
        ckpt = self.plan.resume_from
        if ckpt is None:
            self.log.log_event({"event": "start", "world_size": self.info.world_size, **self.env})
            return 0
        state = self.strategy.load(ckpt, self.model, self.optimizer)
        step, note = self.state.load_state_dict(state)
        if note:
            self.log.info(f"note: {note}")
        self.log.info(f"resumed from {ckpt} at step {step}")
        self.log.log_event({"event": "resume", "step": step, "checkpoint": str(ckpt)})
        return step

    def _begin(self) -> None:
        """Make the run directory's history this run's: a failed earlier start set aside, newer
        checkpoints and later metrics of an abandoned timeline moved aside, the config and the current
        checkpoint recorded; then metrics.jsonl and TensorBoard are written from here on."""
        run_dir = self.plan.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.plan.resume_from is None and failed_start(run_dir):
            side = set_aside_failed_start(run_dir)
            self.log.info(f"an earlier start of this run failed before its first checkpoint; its files are in {side}")
        begin_timeline(run_dir, self.start_step, self.log.info)
        atomic_write_json(run_dir / TRAIN_CONFIG, self.cfg.to_dict())
        write_run_state(run_dir, self.plan.resume_from)
        self.log.attach(run_dir)

    def _describe(self) -> None:
        cfg, info = self.cfg, self.info
        self.log.info(
            f"model: {cfg.model} {self.model.num_params():,} parameters | {info.world_size} process(es) on "
            f"{info.device.type} | {PRECISION[self.amp_dtype]} | compile {'on' if self.compile else 'off'} | "
            f"{cfg.total_batch_size:,} tokens/step = {cfg.micro_batch_size} x {cfg.seq_len} x {info.world_size} "
            f"x {self.plan.grad_accum_steps} accumulation"
        )
        self.log.info(self.kernels_line)
        if info.device.type == "cuda" and self.peak is None:
            name = torch.cuda.get_device_name(info.device)
            self.log.info(f"note: unknown peak FLOP/s for {name}; MFU is not reported")

    # -- the loop ----------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        cfg = self.cfg
        if self.start_step == cfg.max_steps:
            self.log.info(f"the run is at max_steps {cfg.max_steps} already; pass a larger --max_steps to train on")
        self.log.start(self.start_step, cfg.max_steps)
        try:
            for step in range(self.start_step, cfg.max_steps):
                if not self._evaluated(step):
                    self.evaluate(step, last=False)
                stopping = self.train_step(step)
                done = step + 1
                if done == cfg.max_steps and self.average is not None and self.average.copy_to():
                    self.log.info(f"final weights: the average of the weights since step {self.average.start}")
                interval = cfg.checkpoint_interval
                if stopping or done == cfg.max_steps or (interval and done % interval == 0):
                    self.checkpoint(done)
                if stopping:
                    return self._stopped(done)
            if not self._evaluated(cfg.max_steps):
                self.evaluate(cfg.max_steps, last=True)
        except torch.cuda.OutOfMemoryError as e:
            raise RuntimeError(oom_message(self.phase, cfg)) from e
        except WriteError as e:  # between saves (metrics.jsonl, a plot)
            raise CheckpointWriteError(self._write_failure(str(e.path), e)) from e
        finally:
            self.log.end_progress()
        self._plot()
        return TrainResult(cfg.max_steps, self.last_loss, self.last_ckpt, val_loss=self.last_val)

    def _evaluated(self, step: int) -> bool:
        """Whether the weights after `step` updates were evaluated already: those of the resumed
        checkpoint, when metrics.jsonl holds their evaluation (e.g. the last one of a finished run)."""
        return step == self.start_step and self.evaluated

    def train_step(self, step: int) -> bool:
        """One optimizer step (the weights after `step` updates -> `step + 1`), logged; returns
        whether any rank was asked to stop (all ranks agree)."""
        cfg, info, device = self.cfg, self.info, self.info.device
        self.phase = "training"
        t0 = time.perf_counter()
        factor = lr_factor(step, cfg) * batch_lr_scale(step, cfg, self.per_micro)
        apply_schedule(self.optimizer, cfg, factor, momentum=muon_momentum_at(step, cfg))
        self.optimizer.zero_grad(set_to_none=True)
        accum = micro_steps(step, cfg, self.per_micro)
        loss = forward_backward(
            self.train_model,
            batches_at(step, cfg, self.train_loader.next_batch),
            accum,
            amp_dtype=self.amp_dtype,
            scaler=self.scaler,
            kernels=self.kernels,
            no_sync=self.strategy.no_sync,
        )
        grad_norm = clip_gradients(self.optimizer, cfg.grad_clip, self.scaler)
        # One collective for the logged loss and the stop request, so every rank agrees on both.
        shared = torch.stack([loss.float(), torch.tensor(float(self.stop.requested), device=device)])
        shared = all_reduce_sum(shared) / torch.tensor([info.world_size, 1], device=device)
        # The update is queued before the loss is read (reading waits for the GPU), so its launches never
        # wait on the read; on an H100 this measured the same as reading first (the backward's queued work
        # already hid them: benchmarks/NOTES.md). A non-finite loss still stops the run before anything is
        # saved: the weights in memory that the update spoiled are never written.
        apply_gradients(self.optimizer, self.scaler)
        if self.average is not None:
            self.average.update(step + 1)
        loss_value, stop_votes = shared.tolist()  # waits for the update too: it was queued before the read
        norm = float(grad_norm)
        self._check_finite(step, loss_value, norm)
        synchronize(device)  # other streams' work, for the step's time
        self.last_loss = loss_value
        self._log_step(step, loss_value, cfg.max_lr * factor, norm, time.perf_counter() - t0)
        return stop_votes > 0

    def _check_finite(self, step: int, loss: float, norm: float) -> None:
        if math.isfinite(loss) and (self.scaler is not None or math.isfinite(norm)):
            return
        from gpt2.checkpoint import newest_intact

        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
        good = self.last_ckpt or newest_intact(self.plan.run_dir)
        raise NonFiniteLossError(
            f"{what} at step {step}: training stopped; the last good checkpoint is {good or '(none yet)'}; "
            "lower --max_lr or raise --warmup_steps and resume from it"
        )

    def _log_step(self, step: int, loss: float, lr: float, norm: float, seconds: float) -> None:
        tokens_per_sec = micro_steps(step, self.cfg, self.per_micro) * self.per_micro / seconds
        record: dict[str, Any] = {
            "step": step,
            "loss": loss,
            "lr": lr,  # AdamW's peak times the schedule (Muon's groups follow the same factor)
            "grad_norm": norm,
            "step_time": seconds,
            "tokens_per_sec": tokens_per_sec,
            "tokens": tokens_through(step, self.cfg, self.per_micro),
        }
        if self.cfg.seq_len_warmup_steps:
            record["seq_len"] = seq_len_at(step, self.cfg)
        peak = self.peak if self.amp_dtype is not None else None
        utilization = mfu(self.flops_per_token, tokens_per_sec / self.info.world_size, peak)
        if utilization is not None:
            record["mfu"] = utilization
        if self.info.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.info.device) / 2**30
        self.log.log_train(record)

    def evaluate(self, step: int, last: bool) -> None:
        """Periodic evaluation of the weights after `step` updates (every rank calls it)."""
        cfg, info = self.cfg, self.info
        record: dict[str, Any] = {}
        if self.val_loader is not None and due(step, cfg.eval_interval, last):
            from gpt2.evaluation import evaluate_loss

            self.phase = "validation"
            self.last_val = evaluate_loss(self.model, self.val_loader, cfg.val_steps, autocast_dtype=self.amp_dtype)
            record["val_loss"] = self.last_val
        if self.hellaswag and due(step, cfg.hellaswag_interval, last):
            from gpt2.evaluation import evaluate_hellaswag

            self.phase = "hellaswag"
            shared = self.strategy.shares_evaluation
            result = evaluate_hellaswag(
                self.model,
                self.hellaswag,
                batch_size=cfg.hellaswag_batch_size,
                device=info.device,
                autocast_dtype=self.amp_dtype,
                rank=info.rank if shared else 0,
                world_size=info.world_size if shared else 1,
            )
            record.update(hellaswag_acc=result["acc"], hellaswag_acc_norm=result["acc_norm"])
        if record:
            self.log.log_eval({"step": step, **record})
        if self.prompt and due(step, cfg.sample_interval, last):
            self.phase = "sampling"
            sampler = self.strategy.sampling_model(self.model)
            if sampler is not None:
                for i, text in enumerate(samples(sampler, self.prompt, cfg, step, info.device)):
                    self.log.info(f"sample {i}: {text!r}")

    def checkpoint(self, step: int) -> None:
        """Save the state after `step` updates, then keep only the newest keep_last_k (every rank calls it)."""
        self.phase = "checkpoint"
        snap = Snapshot(step, self.model, self.optimizer, self.state.state_dict(step), self.cfg.to_dict())
        try:
            path = self.strategy.save(self.plan.run_dir, snap)
        except (OSError, RuntimeError) as e:  # a full disk: OSError from Python, RuntimeError from torch.save
            where = f"checkpoint {checkpoint_name(step)} in {self.plan.run_dir}"
            raise CheckpointWriteError(self._write_failure(where, e)) from e
        if self.info.is_main:
            write_run_state(self.plan.run_dir, path)
            if self.cfg.keep_last_k:
                prune_checkpoints(self.plan.run_dir, self.cfg.keep_last_k)
            self.last_ckpt = path
            self.log.info(f"saved checkpoint {path}")

    def _write_failure(self, what: str, error: BaseException) -> str:
        """One line: what could not be written and why, what is intact, the command that continues."""
        failure = as_write_error(self.plan.run_dir, error)
        reason = failure.reason if failure is not None else (str(error).strip() or type(error).__name__)
        previous = self.last_ckpt or self.plan.resume_from
        advice = (  # with nothing to resume, a rerun of the same command sets this start's files aside
            f"the previous checkpoint {previous} is intact: free space and continue with gpt2 train --resume "
            f"{self.plan.run_dir}"
            if previous is not None
            else "no earlier checkpoint exists: free space and run the same command again"
        )
        return f"could not write {what} ({reason.splitlines()[-1][:120]}; is the disk full?); {advice}"

    def _stopped(self, step: int) -> TrainResult:
        self.log.info(
            f"stopped at step {step}/{self.cfg.max_steps}; continue with: gpt2 train --resume {self.plan.run_dir}"
        )
        self.log.log_event({"event": "stop", "step": step})
        return TrainResult(step, self.last_loss, self.last_ckpt, stopped_by=self.stop.signum or signal.SIGTERM)

    def _plot(self) -> None:
        if not (self.info.is_main and self.cfg.plot):
            return
        try:
            self.log.info(f"loss curve: {plot_run(self.plan.run_dir)}")
        except (RuntimeError, OSError) as e:  # matplotlib missing, a full disk: say so, the run itself succeeded
            self.log.info(f"note: {e}")
