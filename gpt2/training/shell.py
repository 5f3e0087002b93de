"""The application shell of `gpt2 train`: what a training process does around the library's loop.
Process-global effects live here and nowhere else: signal handlers (Ctrl-C / SIGTERM save a
checkpoint, then stop), malloc tuning on CPUs, TF32 matmuls on GPUs, the process group, and the
exit code."""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from gpt2.checkpoint.history import LOCK_FILE, RunLock
from gpt2.device import fp32_matmul_precision
from gpt2.distributed import DistInfo, destroy_distributed, init_distributed, on_main_rank
from gpt2.training.config import TrainingConfig
from gpt2.training.loop import Trainer, TrainResult
from gpt2.training.metrics import RunLogger
from gpt2.training.plan import RunPlan, plan_run


class GracefulStop:
    """While active, SIGINT/SIGTERM ask the loop to stop after the current step (it saves a
    checkpoint first). A second Ctrl-C aborts at once; further SIGTERMs (torchrun forwards one
    after a Ctrl-C) are ignored while the save runs."""

    def __init__(self, notify: Callable[[str], None] | None = None) -> None:
        self.signum: int | None = None
        self.notify = notify
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as a signal would (also used by tests and callers without signals)."""
        if self.signum is None:
            self.signum = signum

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT and self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self.notify is not None:
            name = signal.Signals(signum).name
            self.notify(f"{name}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class StallWatch:
    """Says so (once per stall) when no step has finished for much longer than steps take: a stalled
    or dead rank otherwise leaves every other rank waiting in a collective, silently, until the
    collective timeout (dist_timeout_s) fails them all."""

    def __init__(self, log: RunLogger, timeout_s: float, *, min_idle_s: float = 120.0, poll_s: float = 5.0) -> None:
        self.log, self.timeout_s, self.min_idle_s, self.poll_s = log, timeout_s, min_idle_s, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gpt2-stall-watch", daemon=True)

    def _idle_limit(self) -> float:
        times = sorted(self.log._step_times[-50:])
        return max(self.min_idle_s, 10 * times[len(times) // 2]) if times else self.min_idle_s

    def _watch(self) -> None:
        warned_at = None
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self.log.last_activity
            if idle < self._idle_limit():
                warned_at = None
            elif warned_at != self.log.last_activity:
                warned_at = self.log.last_activity
                self.log.info(
                    f"note: nothing finished for {idle:.0f} s; a rank may have stalled or died (every rank "
                    f"stops with an error {self.timeout_s:.0f} s into a collective it waits in: --dist_timeout_s)"
                )

    def __enter__(self) -> StallWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def keep_freed_memory(device: torch.device) -> bool:
    """On a Linux (glibc) CPU, make malloc keep freed blocks instead of unmapping them.

    A CPU training step allocates and frees the same large tensors every step (the (B*T, V)
    logits alone are 200 MB at B*T = 1024). glibc serves blocks over 32 MB with mmap and unmaps
    them on free, so every step page-faults them in again: a third of the quickstart's time went
    to the kernel. With mmap off and trimming raised, freed blocks are reused: ~1.6x faster steps,
    at the price of keeping the peak memory mapped. Returns whether it applied.
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, ...): leave malloc alone
        return False


def configure_process(device: torch.device) -> None:
    """The process-wide settings a training process wants on its device."""
    keep_freed_memory(device)
    torch.set_float32_matmul_precision(fp32_matmul_precision(device))  # TF32 on CUDA for any fp32 matmul left


def main(cfg: TrainingConfig, env: Mapping[str, str], *, stream: Any = None) -> int:
    """Plan, set up distribution and logging, train; return the process exit code (0, or 128+signal
    when stopped by SIGINT/SIGTERM after saving). `env` is os.environ (torchrun's variables).

    Nothing is written before the plan and the whole setup have passed: the lock, and rank 0's
    files (metrics.jsonl, train_config.json, run.json) come after; a failure before that leaves
    the run directory as it was (one created just for the lock is removed again)."""
    stream = stream if stream is not None else sys.stdout
    plan = plan_run(cfg, int(env.get("WORLD_SIZE", "1")))
    info = init_distributed(env, cfg.device, timeout_s=cfg.dist_timeout_s)
    configure_process(info.device)
    cfg = plan.config
    created = not plan.run_dir.exists()
    lock, log, finished = RunLock(plan.run_dir), None, False
    try:
        on_main_rank(lock.acquire, f"lock {plan.run_dir}")
        log = RunLogger(
            None,  # attached to the run directory once the run has been set up
            enabled=info.is_main,
            stream=stream,
            tty=bool(getattr(stream, "isatty", lambda: False)()),
            log_interval=cfg.log_interval,
            tensorboard=cfg.tensorboard,
            wandb_project=cfg.wandb_project,
            wandb_run_name=cfg.wandb_run_name,
            config=cfg.to_dict(),
        )
        with GracefulStop(notify=log.info) as stop:
            result = _train(plan, info, log, stop)
        finished = True
        if result.stopped_by is not None:
            return 128 + int(result.stopped_by)
        if info.is_main:
            _report(log, result, plan.run_dir, cfg)
        return 0
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)  # the failed Trainer's locals, so the group can be freed
        raise
    finally:
        if log is not None:
            log.close()
        lock.release()
        if info.is_main and created and not finished:
            _remove_if_only_lock(plan.run_dir)
        # After _train returned: nothing holds the model, DDP or the optimizer any more, so the
        # process group (and gloo's threads) is really freed here (see destroy_distributed).
        destroy_distributed()


def _train(plan: RunPlan, info: DistInfo, log: RunLogger, stop: GracefulStop) -> TrainResult:
    """Build the Trainer and run it; the Trainer (model, optimizer, DDP wrapper) dies with this frame."""
    trainer = Trainer(plan, info, log, stop)
    watch = StallWatch(log, plan.config.dist_timeout_s) if info.world_size > 1 else contextlib.nullcontext()
    with watch:
        return trainer.train()


def _remove_if_only_lock(run_dir: Path) -> None:
    """Undo creating run_dir for the lock when the run failed before writing anything else."""
    with contextlib.suppress(OSError):
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        run_dir.rmdir()  # fails (and is left) if anything else is in it


def _report(log: RunLogger, result: Any, run_dir: Any, cfg: TrainingConfig) -> None:
    from gpt2.checkpoint import latest_checkpoint

    ckpt = result.checkpoint or latest_checkpoint(run_dir)
    losses = [f"final loss {result.last_loss:.4f}"] if result.last_loss is not None else []
    losses += [f"val loss {result.val_loss:.4f}"] if result.val_loss is not None else []
    log.info(f"done: {result.step} steps, {', '.join(losses + [f'checkpoint {ckpt}'])}")
    prompt = f" --prompt {_shell_quoted(cfg.sample_prompt)}" if cfg.sample_prompt else ""  # generate refuses ""
    log.info(f"generate from it: gpt2 generate --model {_shell_quoted(str(run_dir))}{prompt} --top-k 50")


def _shell_quoted(text: str) -> str:
    """`text` as one shell word: in double quotes where the shell leaves it as it is, else shlex's quoting."""
    if set(text) & set('$`\\"!\n'):
        return shlex.quote(text)
    return f'"{text}"' if set(text) & set(" '#&;|<>()*?[]{}~") else text
