"""Loss curves of a run, drawn from its metrics.jsonl: `gpt2 plot RUN_DIR` and the end of `gpt2 train`."""

from __future__ import annotations

from pathlib import Path

from gpt2.checkpoint.layout import METRICS, read_metrics
from gpt2.fileio import atomic_write


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Plot train loss (raw and smoothed), val loss and HellaSwag (if logged) to a PNG; return its path."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {run_dir} a training run directory?")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib (or pip install 'gpt2[viz]')") from e
    records = read_metrics(path)
    train = {r["step"]: r["loss"] for r in records if r.get("type") == "train" and "loss" in r}
    val = {r["step"]: r["val_loss"] for r in records if r.get("type") == "eval" and "val_loss" in r}
    hella = {
        r["step"]: r["hellaswag_acc_norm"] for r in records if r.get("type") == "eval" and "hellaswag_acc_norm" in r
    }
    if not train and not val:
        raise ValueError(f"{path} has no loss records yet; plot again once the run has logged a step")
    ncols = 2 if hella else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 4.5), squeeze=False)
    ax = axes[0][0]
    if train:
        steps = sorted(train)
        losses = [train[s] for s in steps]
        window = min(50, len(losses) // 20)  # smooth over ~5% of the run, at most 50 steps
        if window > 1:
            ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
            ax.plot(steps, _ema(losses, 1 - 1 / window), color="tab:blue", linewidth=1.5, label="train loss (smoothed)")
        else:
            ax.plot(steps, losses, color="tab:blue", linewidth=1.2, label="train loss")
    if val:
        steps = sorted(val)
        ax.plot(steps, [val[s] for s in steps], "o-", color="tab:orange", markersize=3, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    if hella:
        ax = axes[0][1]
        steps = sorted(hella)
        ax.plot(steps, [hella[s] for s in steps], "o-", color="tab:green", markersize=3, label="HellaSwag acc_norm")
        ax.axhline(0.25, color="gray", linestyle=":", label="chance")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "loss.png"
    kind = out.suffix.removeprefix(".").lower() or "png"
    try:  # published whole or not at all (a full disk: one line naming the file)
        atomic_write(out, lambda tmp: fig.savefig(tmp, format=kind, dpi=120))
    finally:
        plt.close(fig)
    return out


def _ema(values: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (Adam-style), so the start is not pulled to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out
