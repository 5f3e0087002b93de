"""The proxy speedrun's numbers: a run's curve (val loss against tokens and training wall-clock), the
comparison against the baseline, the lever table of a series, and the plot. Pure functions of metrics
records, so a report can be made from run directories or from the one JSON file a series packs them into.

Training wall-clock is the sum of the logged step times (what an optimizer step costs: forward, backward,
update). Steps that compiled are not training: step 0, and with a sequence-length warmup the first step at
each new length (a new shape, compiled again); their time is replaced by the median of the ten steps after
them at the same length. Evaluation, checkpoints and start-up are not counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import table

TRAIN_KEYS = ("step", "loss", "lr", "grad_norm", "step_time", "tokens_per_sec", "tokens", "seq_len")


@dataclass
class Curve:
    """One run's evaluations: val loss at tokens and at training wall-clock (seconds)."""

    name: str
    steps: list[int]
    tokens: list[int]
    seconds: list[float]
    val: list[float]
    step_time: float  # median seconds per optimizer step
    tokens_per_sec: float  # median
    train_seconds: float  # every step's time, compilation replaced (= seconds[-1] when the run finished)
    env: dict

    @property
    def final(self) -> float:
        return self.val[-1]

    def time_to(self, target: float) -> float | None:
        """The wall-clock at which the val loss first reaches `target` (linear between evaluations)."""
        for i, v in enumerate(self.val):
            if v <= target:
                if i == 0:
                    return self.seconds[0]
                t0, t1, v0 = self.seconds[i - 1], self.seconds[i], self.val[i - 1]
                return t0 + (t1 - t0) * (v0 - target) / (v0 - v)
        return None

    def val_at(self, seconds: float) -> float | None:
        """Val loss at a wall-clock: interpolated; the final one if the run ended before it."""
        if seconds >= self.seconds[-1]:
            return self.final
        for i in range(1, len(self.seconds)):
            if self.seconds[i] >= seconds:
                t0, t1 = self.seconds[i - 1], self.seconds[i]
                return self.val[i - 1] + (self.val[i] - self.val[i - 1]) * (seconds - t0) / (t1 - t0)
        return None


def slim(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records a report needs, train records cut to TRAIN_KEYS (a series packs these)."""
    out = []
    for r in records:
        if r.get("type") == "train":
            out.append({"type": "train", **{k: r[k] for k in TRAIN_KEYS if k in r}})
        elif r.get("type") == "eval" or r.get("event") == "start":
            out.append(r)
    return out


def training_times(train: list[dict[str, Any]]) -> list[float]:
    """Each step's time with the compiling steps' replaced (see the module docstring)."""
    times = [r["step_time"] for r in train]
    lengths = [r.get("seq_len") for r in train]
    for i in range(len(train)):
        if i == 0 or lengths[i] != lengths[i - 1]:
            later = sorted(t for t, n in zip(times[i + 1 : i + 11], lengths[i + 1 : i + 11]) if n == lengths[i])
            if later:
                times[i] = later[len(later) // 2]
    return times


def curve_from_records(name: str, records: list[dict[str, Any]]) -> Curve | None:
    """The curve of one run's metrics records (None when it has no evaluation yet). A run cut short
    gives the curve up to its last evaluation."""
    train = sorted((r for r in records if r["type"] == "train"), key=lambda r: r["step"])
    by_step = {r["step"]: r for r in train}
    train = [by_step[s] for s in sorted(by_step)]  # a resumed run logs some steps twice: keep the last
    evals = sorted((r for r in records if r["type"] == "eval" and "val_loss" in r), key=lambda r: r["step"])
    evals = [r for r in evals if r["step"] <= len(train)]
    if not evals or not train:
        return None
    elapsed = [0.0]
    for t in training_times(train):
        elapsed.append(elapsed[-1] + t)
    tokens = [0] + [r["tokens"] for r in train]
    env = next((r for r in records if r.get("event") == "start"), {})
    rates = sorted(r["tokens_per_sec"] for r in train[1:]) or [0.0]
    times = sorted(training_times(train))
    return Curve(
        name=name,
        steps=[r["step"] for r in evals],
        tokens=[tokens[r["step"]] for r in evals],
        seconds=[elapsed[r["step"]] for r in evals],
        val=[r["val_loss"] for r in evals],
        step_time=times[len(times) // 2],
        tokens_per_sec=rates[len(rates) // 2],
        train_seconds=elapsed[-1],
        env=env,
    )


def load_curve(run_dir: Path) -> Curve:
    """The curve of a run directory's metrics.jsonl."""
    from gpt2.checkpoint import read_metrics

    curve = curve_from_records(run_dir.name, read_metrics(run_dir / "metrics.jsonl"))
    if curve is None:
        raise SystemExit(f"{run_dir} has no evaluation in its metrics.jsonl")
    return curve


def reach(c: Curve, target: float | None, budget: float | None) -> str:
    """'12.3 s = 0.052x' (time to the target and its ratio to the baseline's time), or '-'."""
    t = c.time_to(target) if target is not None else None
    if t is None:
        return "-"
    return f"{t:.1f} s" + (f" = {t / budget:.3f}x" if budget else "")


def report(curves: list[Curve], target: float | None, budget: float | None, note: str) -> str:
    """The comparison table (markdown) against the baseline's final val loss and full wall-clock."""
    rows = []
    for c in curves:
        at_budget = c.val_at(budget) if budget and target is not None and c.seconds[-1] >= 0.95 * budget else None
        rows.append(
            [
                c.name,
                c.steps[-1],
                f"{c.tokens[-1] / 1e6:.1f}M",
                f"{c.seconds[-1]:.1f}",
                f"{c.tokens_per_sec / 1e3:.0f}K",
                f"{c.final:.4f}",
                reach(c, target, budget),
                "-" if at_budget is None else f"{at_budget:.4f} ({at_budget - target:+.3f})",
            ]
        )
    headers = ["recipe", "steps", "tokens", "train s", "tok/s", "final val", "reaches baseline final"]
    headers.append("val at baseline's wall-clock (vs baseline)")
    return note + "\n\n" + table(headers, rows)


def lever_table(
    entries: list[dict[str, Any]], curves: dict[str, Curve], target: float | None, budget: float | None
) -> str:
    """One row per lever run of a series: what it changed, against which run, the outcome, kept or not."""
    rows = []
    for e in entries:
        c, ref = curves.get(e["label"]), curves.get(e.get("compared_to") or "")
        changes = ", ".join(f"{k}={v}" for k, v in e.get("lever", {}).items()) or "(as shipped)"
        if c is None:
            rows.append([e["label"], changes, e.get("compared_to") or "-", "-", "-", "-", "-", e.get("decision", "")])
            continue
        delta = f"{c.final - ref.final:+.4f}" if ref is not None else "-"
        finished = "" if not e.get("cut") else " (cut)"
        rows.append(
            [
                e["label"],
                changes,
                e.get("compared_to") or "-",
                f"{c.final:.4f}{finished}",
                delta,
                f"{c.train_seconds:.1f}",
                reach(c, target, budget),
                e.get("decision", ""),
            ]
        )
    headers = ["run", "lever (changes on top of the best so far)", "vs", "final val", "delta", "train s"]
    headers += ["reaches baseline final", "kept?"]
    return table(headers, rows)


def plot(curves: list[Curve], target: float | None, budget: float | None, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(13, 4.8))
    for c in curves:
        style = dict(marker="o", markersize=3, linewidth=1.4, label=c.name)
        by_tokens.plot([t / 1e6 for t in c.tokens], c.val, **style)
        by_time.plot(c.seconds, c.val, **style)
    axes = ((by_tokens, "training tokens (millions)"), (by_time, "training wall-clock (s, compile excluded)"))
    for ax, xlabel in axes:
        if target is not None:
            ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"baseline final {target:.3f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if budget:
        by_time.axvline(budget, color="gray", linestyle="--", linewidth=0.8)
    low = min(min(c.val) for c in curves)
    for ax in (by_tokens, by_time):  # the first evaluation (~11 nats) would flatten the rest
        ax.set_ylim(low - 0.2, max(7.0, (target or low) + 1.0))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def describe(baseline: dict[str, Any]) -> str:
    """'final val 5.2264 after 219.8 s of training' (either part '?' when unknown)."""
    val, seconds = baseline.get("val"), baseline.get("seconds")
    val_text = "?" if val is None else f"{val:.4f}"
    return f"final val {val_text} after {'?' if seconds is None else f'{seconds:.1f}'} s of training"


def pack_curves(pack: dict[str, Any]) -> dict[str, Curve]:
    """The curve of every run in a series' pack that has an evaluation."""
    curves = {}
    for entry in pack["runs"]:
        curve = curve_from_records(entry["label"], entry.get("records", []))
        if curve is not None:
            curves[entry["label"]] = curve
    return curves


def report_pack(pack: dict[str, Any]) -> tuple[str, list[Curve], float | None, float | None]:
    """A series' report (markdown: the lever table of a greedy plan, then each baseline's comparison),
    the curves worth plotting, and the main baseline's (target, budget)."""
    curves = pack_curves(pack)
    baselines = pack.get("baselines", {})
    main = baselines.get("baseline") or next(iter(baselines.values()), {})
    target, budget = main.get("val"), main.get("seconds")
    env = next((r for e in pack["runs"] for r in e.get("records", []) if r.get("event") == "start"), {})
    lines = [", ".join(f"{k} {env.get(k)}" for k in ("device_name", "torch", "cuda", "git_sha"))]
    for label, b in baselines.items():
        lines.append(f"{label} ({b.get('mode')}): {describe(b)}")
    levers = [e for e in pack["runs"] if e.get("role") in ("reference", "lever")]
    shown = [c for label, c in curves.items() if label == "baseline"]
    if levers:
        rule = (
            f"kept if its final val is lower by more than {pack.get('min_gain')} nats (speed levers: no worse, faster)"
        )
        lines += ["", f"Levers, one at a time on top of the best run so far; {rule}:", ""]
        lines.append(lever_table(levers, curves, target, budget))
        best = pack.get("best", {})
        lines += ["", f"best: {best.get('label')} = {best.get('recipe')} with {best.get('changes')}"]
        shown += [
            curves[e["label"]] for e in levers if e["label"] in curves and (e.get("kept") or e["role"] == "reference")
        ]
    groups: dict[str, list[Curve]] = {}
    for e in pack["runs"]:
        if e["label"] in curves and e.get("baseline"):
            groups.setdefault(e["baseline"], []).append(curves[e["label"]])
    for label, group in groups.items():
        note = f"against {label}: {describe(baselines.get(label, {}))}"
        b = baselines.get(label, {})
        lines += ["", report(group, b.get("val"), b.get("seconds"), note)]
    if not levers:
        shown = list(curves.values())
    return "\n".join(lines), shown, target, budget
