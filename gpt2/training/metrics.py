"""What a training run reports: FLOPs and MFU, metrics.jsonl, TensorBoard / W&B and the console
(progress bar with ETA on a terminal, plain lines otherwise). Loss-curve plots: gpt2.training.plotting;
the file's name and reading it back: gpt2.checkpoint.layout (METRICS, read_metrics).

Only the process that owns a `RunLogger` with enabled=True (rank 0) prints or writes.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import torch

from gpt2.checkpoint.layout import METRICS
from gpt2.config import GPTConfig
from gpt2.fileio import as_write_error

# Dense (no sparsity) bf16/fp16 tensor-core peak, TFLOP/s per GPU, from NVIDIA's / AMD's datasheets.
# Matched in order against the lower-cased torch.cuda.get_device_name(): the first entry whose
# substrings all occur wins, so the specific variants (PCIe, NVL) come before the generic name.
PEAK_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("h100", "pcie"), 756.0),
    (("h100", "nvl"), 835.5),
    (("h800", "pcie"), 756.0),
    (("h200", "nvl"), 835.5),
    (("gh200",), 989.4),
    (("h200",), 989.4),
    (("h100",), 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (("h800",), 989.4),
    (("gb200",), 2500.0),
    (("b200",), 2250.0),
    (("b100",), 1750.0),
    (("a100",), 312.0),
    (("a800",), 312.0),
    (("l40s",), 362.0),
    (("l40",), 181.0),
    (("l4",), 121.0),
    (("a10g",), 70.0),
    (("a10",), 125.0),
    (("rtx 6000 ada",), 364.2),
    (("rtx a6000",), 154.8),
    (("4090",), 165.2),  # with fp32 accumulation, as autocast uses
    (("3090",), 71.0),
    (("v100",), 125.0),  # fp16 (V100 has no bf16)
    (("t4",), 65.0),  # fp16
    (("mi300x",), 1307.4),
    (("mi250x",), 383.0),
]


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a GPU name from torch.cuda.get_device_name(), or None if unknown."""
    name = device_name.lower()
    for needles, tflops in PEAK_TFLOPS:
        if all(n in name for n in needles):
            return tflops * 1e12
    return None


def flops_per_token(config: GPTConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: 6N + 12·L·H·Q·T (PaLM paper, appendix B).

    N = parameters that take part in matmuls: all of them except the position embeddings (the
    tied token embedding counts once, as the LM-head matmul); L layers, H heads, Q head size,
    T sequence length (the attention score and value matmuls, which N does not count).
    """
    return 6 * num_params + 12 * config.n_layer * config.n_head * config.head_dim * seq_len


def mfu(flops_per_tok: float, tokens_per_sec_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1] (None when the device's peak is unknown)."""
    if peak is None or peak <= 0:
        return None
    return flops_per_tok * tokens_per_sec_per_device / peak


def environment_info(device: torch.device) -> dict[str, Any]:
    """What a run log should say about where it ran: versions, device, git commit of the code."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "host": platform.node(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
    else:
        info["device_name"] = platform.processor() or platform.machine()
        info["cpu_threads"] = torch.get_num_threads()
    info["git_sha"] = _git_sha()
    return info


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            # --no-optional-locks: a query never writes the index (a full disk or the timeout could leave
            # a stale .git/index.lock in the user's checkout)
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def format_duration(seconds: float) -> str:
    """Compact h/m/s, e.g. 3h05m, 4m12s, 9s."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class RunLogger:
    """Rank 0's outlet for everything a run reports. With enabled=False every method is a no-op,
    so other ranks call the same code.

    - metrics.jsonl: one JSON object per line; {"type": "train", "step", "loss", "lr", ...} per
      optimizer step, {"type": "eval", "step", "val_loss", "hellaswag_acc", ...} per evaluation.
    - TensorBoard (RUN_DIR/tensorboard) when `tensorboard` and the package is installed.
    - Weights & Biases when `wandb_project` is given (the package must be installed).
    - Console: a tqdm bar with ETA on a terminal (lines printed above it), plain lines otherwise.

    Created with run_dir=None it writes no file until `attach(run_dir)`: records logged before that
    are kept and written then, so a run that fails while it is still being set up leaves nothing.
    """

    def __init__(
        self,
        run_dir: Path | None,
        *,
        enabled: bool = True,
        stream: IO[str] | None = None,
        tty: bool = False,
        log_interval: int = 1,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        wandb_run_name: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.stream = stream if stream is not None else sys.stdout
        self.tty = tty
        self.log_interval = max(1, log_interval)
        self._file: IO[str] | None = None
        self._write_failed = False  # metrics.jsonl could not be written (reported once, not again on close)
        self._tb = None
        self._wandb = None
        self._bar = None
        self._total = 0
        self._step_times: list[float] = []
        self._last_print_step: int | None = None
        self._tensorboard = tensorboard
        self.last_activity = time.monotonic()  # when a record was last logged (gpt2.training.shell.StallWatch)
        self._pending: list[dict[str, Any]] = []  # records logged before attach()
        if not enabled:
            return
        if run_dir is not None:
            self.attach(Path(run_dir))
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ValueError(
                    "wandb_project is set but wandb is not installed: pip install wandb (or drop --wandb_project)"
                ) from e
            self._wandb = wandb.init(project=wandb_project, name=wandb_run_name, config=config, resume="allow")

    def attach(self, run_dir: Path) -> None:
        """Start writing RUN_DIR/metrics.jsonl (appending, after the records logged so far) and the
        TensorBoard events. A no-op on other ranks; when already attached, the file is reopened (it
        may have been rewritten, e.g. when a resume moved an abandoned timeline's records aside)."""
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
            self._file = open(self.run_dir / METRICS, "a", encoding="utf-8")  # noqa: SIM115
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS, "a", encoding="utf-8")  # noqa: SIM115
        if self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.info("note: TensorBoard is not installed (pip install tensorboard); logging to metrics.jsonl only")
            else:
                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        pending, self._pending = self._pending, []
        for record in pending:
            self._write_files(record)

    # console -------------------------------------------------------------------------------
    def info(self, message: str) -> None:
        """Print a line (above the progress bar when there is one)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def start(self, start_step: int, total_steps: int) -> None:
        """Begin the step loop (opens the progress bar on a terminal)."""
        self._total = total_steps
        if not self.enabled or not self.tty or start_step >= total_steps:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(
            total=total_steps, initial=start_step, unit="step", file=self.stream, dynamic_ncols=True, leave=True
        )

    # records -------------------------------------------------------------------------------
    def log_train(self, record: dict[str, Any]) -> None:
        """One optimizer step's metrics: written every step, printed every log_interval steps."""
        if not self.enabled:
            return
        record = {"type": "train", **record}
        self._write(record)
        step = record["step"]
        if "step_time" in record:
            self._step_times.append(record["step_time"])
        if self._bar is not None:
            self._bar.update(step + 1 - self._bar.n)
            self._bar.set_postfix_str(f"loss {record['loss']:.4f}", refresh=False)
        last = step + 1 == self._total
        if step % self.log_interval == 0 or last:
            self.info(self._format_train(record))

    def log_eval(self, record: dict[str, Any]) -> None:
        """An evaluation's results (val_loss, hellaswag_acc, ...): written and printed."""
        if not self.enabled:
            return
        record = {"type": "eval", **record}
        self._write(record)
        parts = [f"step {record['step']:>{len(str(self._total))}d}"]
        if "val_loss" in record:
            parts.append(f"val loss {record['val_loss']:.4f}")
        if "hellaswag_acc_norm" in record:
            parts.append(f"hellaswag acc_norm {record['hellaswag_acc_norm']:.4f} (acc {record['hellaswag_acc']:.4f})")
        self.info(" | ".join(parts))

    def log_event(self, record: dict[str, Any]) -> None:
        """A one-off record (run start, resume, stop) in metrics.jsonl."""
        if self.enabled:
            self._write({"type": "event", **record})

    def _write(self, record: dict[str, Any]) -> None:
        self.last_activity = time.monotonic()
        record = {"time": round(time.time(), 3), **record}
        if self._file is None:
            self._pending.append(record)
        else:
            self._write_files(record)
        if self._wandb is not None and record.get("step") is not None and record["type"] != "event":
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
            self._wandb.log({f"{record['type']}/{k}": v for k, v in numbers.items()}, step=record["step"])

    def _write_files(self, record: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk: one line naming the file
            self._write_failed = True
            raise as_write_error(self.run_dir / METRICS, e) from e
        step = record.get("step")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self._tb is not None and step is not None:
            prefix = "eval/" if record["type"] == "eval" else "train/"
            for k, v in numbers.items():
                self._tb.add_scalar(prefix + k, v, step)

    def _format_train(self, r: dict[str, Any]) -> str:
        width = len(str(self._total))
        parts = [f"step {r['step']:>{width}d}/{self._total}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
        parts.append(f"norm {r['grad_norm']:.3f}")
        if "step_time" in r:
            parts.append(f"{r['step_time'] * 1000:.0f} ms")
        parts.append(f"{r['tokens_per_sec']:,.0f} tok/s")
        if r.get("mfu") is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        if r.get("peak_memory_gib") is not None:
            parts.append(f"mem {r['peak_memory_gib']:.1f} GiB")
        if self._step_times:
            parts.append(f"eta {format_duration(self.eta(r['step']))}")
        return " | ".join(parts)

    def eta(self, step: int) -> float:
        """Seconds left, from the median of recent step times (the first, compiling, step excluded)."""
        times = self._step_times[1:] or self._step_times
        recent = sorted(times[-50:])
        return recent[len(recent) // 2] * max(0, self._total - step - 1)

    def end_progress(self) -> None:
        """Close the progress bar (later lines print plainly)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.end_progress()
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as e:  # the buffered tail of a write that failed (reported already), or a new failure
                if not self._write_failed:
                    raise as_write_error(self.run_dir / METRICS, e) from e
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
