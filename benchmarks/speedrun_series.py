"""Running the proxy speedrun's recipes: one fresh `gpt2 train` process per run (all sharing one inductor
cache, so only the first compiles from scratch), and a plan's series of runs under a time budget, packed
after every run into one JSON file (what a GPU call brings back, even when it is cut off).

A greedy plan (speedrun_plans) starts from its recipe as shipped, then runs each lever on top of the best
run so far. `decide` keeps a lever when its final val loss is lower by more than `min_gain` nats (the
noise of one run), a speed lever when it is no worse than that and at least 1% faster, a shorter schedule
when it still reaches the baseline's final loss, sooner. A run that would not finish before the deadline
is skipped (the next, cheaper ones may still fit); one that overruns is killed, and its evaluations so
far still count, marked cut. A run killed after its final evaluation (while writing its last checkpoint)
is complete: its measurement is all there, so it counts as finished, here and when a later call resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.speedrun_plans import RECIPE_SECONDS, STARTUP_S, STEP_SETTINGS, Lever, Plan
from benchmarks.speedrun_report import Curve, curve_from_records, slim

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "speedrun"
PACK_FORMAT = 1
# A CPU smoke run keeps each recipe's batch geometry (accumulation steps) on a tiny model.
SMOKE = ["--model", "tiny", "--seq_len", "32", "--micro_batch_size", "2", "--device", "cpu", "--compile", "false"]
SMOKE_STEPS = 6
SMOKE += ["--max_steps", str(SMOKE_STEPS), "--warmup_steps", "1", "--eval_interval", "2", "--val_steps", "1"]


def run_name(name: str) -> str:
    """The run directory of a recipe or variant, in letters, digits, '.', '_' and '-' only (the device
    tool brings back no other names): muon-short@muon_lr=6e-3,max_steps=150 becomes
    muon-short__muon_lr-6e-3_max_steps-150."""
    return name.replace("@", "__").replace("=", "-").replace(",", "_")


def parse_recipe(name: str) -> tuple[str, dict[str, str]]:
    """RECIPE or RECIPE@key=value,key=value (a variant: the config with some settings changed)."""
    base, _, changes = name.partition("@")
    return base, dict(change.partition("=")[::2] for change in filter(None, changes.split(",")))


def recipe_path(recipe: str) -> Path:
    path = CONFIGS / f"{recipe}.toml"
    if not path.is_file():
        raise SystemExit(
            f"no recipe {path}; the recipes are {', '.join(p.stem for p in sorted(CONFIGS.glob('*.toml')))}"
        )
    return path


def smoke_overrides(recipe: str, changes: dict[str, str]) -> list[str]:
    """Settings that shrink a variant to a tiny CPU run with the same number of micro-steps (they come last)."""
    from gpt2.training import build_config

    cfg = build_config(recipe_path(recipe), changes)
    accum = cfg.total_batch_size // (cfg.micro_batch_size * cfg.seq_len)
    extra = ["--batch_warmup_tokens", "64", "--batch_warmup_steps", "2"] if cfg.batch_warmup_steps else []
    extra += ["--seq_len_warmup_steps", "2", "--seq_len_warmup_start", "8"] if cfg.seq_len_warmup_steps else []
    extra += ["--muon_momentum_warmup_steps", "2"] if cfg.muon_momentum_warmup_steps else []
    return [*SMOKE, "--total_batch_size", str(accum * 64), *extra]


def train_command(recipe: str, changes: dict[str, str], data: Path, run_dir: Path, smoke: bool) -> list[str]:
    args = [sys.executable, "-m", "gpt2", "train", "--config", str(recipe_path(recipe)), "--data_root", str(data)]
    args += ["--out_dir", str(run_dir)]
    for key, value in changes.items():
        args += [f"--{key}", value]
    return args + (smoke_overrides(recipe, changes) if smoke else [])


def train_process(args: list[str], log_path: Path, timeout: float | None, cache: Path) -> tuple[int | None, float]:
    """Run a `gpt2 train` command in its own process group, output to log_path; killed (with every process
    it started) after `timeout` seconds. Returns (exit code, or None when killed; wall seconds)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))  # one cache for every run: later compiles are hits
    env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    env.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    # bytecode in one writable place: where site-packages is read-only (the GPU machine's), every run
    # compiled torch's sources again (7.3 s of a profiled gpt2 generate process there); elsewhere a one-time cost
    env.setdefault("PYTHONPYCACHEPREFIX", str(cache.parent / "pycache"))
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=timeout)
        except BaseException:  # the deadline, or Ctrl-C: take the run and its compile workers down
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
            if not isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
                raise
    return code, time.perf_counter() - t0


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    from gpt2.checkpoint import read_metrics

    path = run_dir / "metrics.jsonl"
    return slim(read_metrics(path)) if path.is_file() else []


# -- a plan's series -----------------------------------------------------------------------------------


def recipe_values(recipe: str) -> dict[str, Any]:
    from gpt2.training import read_toml

    return read_toml(recipe_path(recipe))


def variant(recipe: str, best: dict[str, str], lever: Lever) -> dict[str, str]:
    """The settings of a lever's run: the best run's changes, then the lever's (a value "xF" multiplies the
    best run's setting, or the recipe's), step counts scaled."""
    base = recipe_values(recipe)
    changes = dict(best)
    for key, value in lever.changes.items():
        if value.startswith("x"):
            scaled = float(changes.get(key, base[key])) * float(value[1:])
            value = str(max(1, round(scaled))) if key in STEP_SETTINGS else f"{scaled:g}"
        changes[key] = value
    if lever.scale_steps != 1:
        for key in STEP_SETTINGS:
            value = int(float(changes.get(key, base.get(key, 0))))
            if value > 0:
                changes[key] = str(max(1, round(value * lever.scale_steps)))
    return changes


def transfer(changes: dict[str, str], source: str, target: str) -> dict[str, str]:
    """A recipe's changes carried to another recipe: step counts scaled by the ratio of their max_steps,
    the target's own max_steps, evaluation and log intervals kept (to the same recipe: all of them)."""
    if source == target:
        return dict(changes)
    ratio = recipe_values(target)["max_steps"] / recipe_values(source)["max_steps"]
    out = {}
    for key, value in changes.items():
        if key in ("max_steps", "eval_interval", "log_interval"):
            continue
        out[key] = str(max(1, round(int(float(value)) * ratio))) if key in STEP_SETTINGS else value
    return out


def holds(best: dict[str, str], condition: str) -> bool:
    """Whether the best run's changes meet a lever's condition: "key" (sets it) or "key=value" (to exactly that)."""
    key, is_value, value = condition.partition("=")
    return key in best and (not is_value or same_value(best[key], value))


def same_value(a: str, b: str) -> bool:
    """Settings as the command line gives them: 9e-4 and 0.0009 are the same number."""
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def wanted(lever: Lever, best: dict[str, str]) -> str | None:
    """None when the lever runs on top of these changes, else why it is skipped."""
    if not all(holds(best, c) for c in lever.needs):
        return f"skipped: the best run does not set {', '.join(lever.needs)}"
    if any(holds(best, c) for c in lever.unless):
        return f"skipped: the best run sets {', '.join(lever.unless)}"
    return None


def same_settings(a: str, b: str) -> bool:
    """Whether two recipes train the same run (their resolved configs are equal)."""
    from gpt2.training import build_config

    return a == b or build_config(recipe_path(a), {}) == build_config(recipe_path(b), {})


def decide(
    lever: Lever, run: Curve | None, cut: bool, best: Curve, target: float | None, min_gain: float
) -> tuple[bool, str]:
    """Whether a lever's run beats the best run so far (the module docstring's rule), and why, in words."""
    if run is None or cut:
        return False, "no: " + ("cut before its end" if cut else "no evaluation (the run failed)")
    if lever.reach:
        if target is None:
            return False, "no: no baseline loss to reach"
        t, t_best = run.time_to(target), best.time_to(target)
        if t is None:
            return False, f"no: ends at {run.final:.4f}, above {target:.4f}"
        if t_best is not None and t >= t_best:
            return False, f"no: reaches {target:.4f} at {t:.1f} s, not before {t_best:.1f} s"
        return True, f"yes: reaches {target:.4f} at {t:.1f} s"
    delta, speedup = run.final - best.final, run.train_seconds / best.train_seconds - 1
    said = f"{delta:+.4f} nats, {speedup:+.1%} time"
    if delta < -min_gain:
        return True, f"yes: {said}"
    if lever.speed and delta <= min_gain and speedup < -0.01:
        return True, f"yes (speed): {said}"
    return False, f"no: {said}"


class Series:
    """A plan run under a deadline, packed after every run into one JSON file."""

    def __init__(
        self, plan: Plan, data: dict[str, Path], out: Path, pack_path: Path, deadline: float, **options: Any
    ) -> None:
        self.plan, self.data, self.out, self.pack_path, self.deadline = plan, data, out, pack_path, deadline
        self.smoke: bool = options.get("smoke", False)
        self.min_gain: float = options.get("min_gain", 0.005)
        self.cache = out.parent / "inductor-cache"
        self.pack: dict[str, Any] = {"format": PACK_FORMAT, "plan": plan.name, "what": plan.what, "runs": []}
        self.pack.update(options.get("meta", {}))
        self.startup = STARTUP_S["first"]
        self.recipe_seconds = dict(RECIPE_SECONDS)
        self.curves: dict[str, Curve] = {}  # every finished run of this series, by label
        # --resume: an earlier call's pack of the same plan; its finished runs are taken, not trained again
        prior = options.get("prior") or {}
        self.done = {e["label"]: e for e in prior.get("runs", []) if e.get("records") and self.complete(e)}

    def complete(self, entry: dict[str, Any]) -> bool:
        """Whether a run's measurement is whole: it exited cleanly, or its records hold the evaluation at its
        last step (then only the final checkpoint write was lost to the deadline)."""
        if entry.get("exit") == 0:
            return True
        steps = entry["changes"].get("max_steps") or recipe_values(entry["recipe"])["max_steps"]
        last = SMOKE_STEPS if self.smoke else int(float(steps))
        return any(r["type"] == "eval" and r["step"] == last for r in entry.get("records", []))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def estimate(self, recipe: str, lever: Lever | None) -> float:
        factor, extra = (lever.time_factor, lever.extra_s) if lever else (1.0, 0.0)
        return self.startup + extra + factor * self.recipe_seconds.get(recipe, 60.0)

    def run(
        self,
        label: str,
        recipe: str,
        changes: dict[str, str],
        entry: dict[str, Any],
        lever: Lever | None = None,
        reserve: float = 0.0,
    ) -> Curve | None:
        """Train one run (or skip it when it cannot finish in time with `reserve` seconds kept for a later
        one); its entry joins the pack."""
        entry.update(label=label, recipe=recipe, changes=changes, estimate_s=round(self.estimate(recipe, lever), 1))
        earlier = self.done.get(label)
        if earlier is not None and earlier["recipe"] == recipe and earlier["changes"] == changes:
            return self._taken(entry, earlier)
        if self.estimate(recipe, lever) + reserve > self.left():
            entry.update(decision=f"skipped: needs ~{entry['estimate_s']:.0f} s, {max(0, self.left()):.0f} s left")
            self._save(entry)
            return None
        run_dir = self.out / label
        data = self.data[lever.data if lever else "proxy"]
        args = train_command(recipe, changes, data, run_dir, self.smoke)
        print(f"[{label}] {recipe} {changes} (~{entry['estimate_s']:.0f} s, {self.left():.0f} s left)", flush=True)
        code, wall = train_process(args, self.out / f"{label}.log", max(1.0, self.left()), self.cache)
        records = read_records(run_dir)
        curve = curve_from_records(label, records)
        entry.update(exit=code, wall_s=round(wall, 1), records=records)
        complete = self.complete(entry)
        entry["cut"] = code is None and not complete
        if code not in (0, None):
            entry["log_tail"] = (self.out / f"{label}.log").read_text(errors="replace")[-3000:]
        if curve is not None and code == 0:
            self.startup = max(5.0, wall - curve.train_seconds)  # later runs' start-up: measured
        if curve is not None and complete:
            self.curves[label] = curve
        print(
            f"[{label}] exit {code} in {wall:.0f} s" + (f", final val {curve.final:.4f}" if curve else ""), flush=True
        )
        self._save(entry)
        return curve

    def _taken(self, entry: dict[str, Any], earlier: dict[str, Any], note: str = "an earlier call") -> Curve | None:
        """A finished run's results in place of training it again (same recipe, same settings)."""
        entry.update({k: earlier[k] for k in ("exit", "wall_s", "records") if k in earlier}, taken_from=note)
        entry["cut"] = not self.complete(entry)
        curve = curve_from_records(entry["label"], entry["records"])
        if curve is not None:
            self.curves[entry["label"]] = curve
        print(f"[{entry['label']}] taken from {note}" + (f": final val {curve.final:.4f}" if curve else ""), flush=True)
        self._save(entry)
        return curve

    def _save(self, entry: dict[str, Any]) -> None:
        if not any(e is entry for e in self.pack["runs"]):
            self.pack["runs"].append(entry)
        self._save_pack()

    def baseline(self, mode: str, val: float | None, seconds: float | None) -> tuple[float | None, float | None]:
        """The target (baseline's final val loss) and budget (its training seconds) of a greedy series:
        full: the baseline trained now; timing: 30 of its steps timed now, its final val given (--baseline-val);
        skip: both given. Recorded in the pack's "baselines"."""
        if mode == "full":
            curve = self.run("baseline", "baseline", {}, {"role": "baseline", "baseline": "baseline"})
            if curve is not None and curve.steps[-1] == recipe_values("baseline")["max_steps"]:
                val, seconds = curve.final, curve.train_seconds
        elif mode == "timing":
            steps = recipe_values("baseline")["max_steps"]
            timing = Lever("baseline-timing", {"max_steps": "30", "eval_interval": "0"}, "", time_factor=30 / steps)
            entry = {"role": "baseline-timing", "baseline": None}
            self.run(timing.label, "baseline", timing.changes, entry, timing)
            times = sorted(r["step_time"] for r in entry.get("records", []) if r["type"] == "train" and r["step"])
            seconds = times[len(times) // 2] * recipe_values("baseline")["max_steps"] if times else seconds
        self.pack.setdefault("baselines", {})["baseline"] = {"mode": mode, "val": val, "seconds": seconds}
        self._save_pack()
        return val, seconds

    def greedy(self, target: float | None) -> None:
        """The plan's recipe as shipped, then each lever on top of the best run so far."""
        plan = self.plan
        entry = {"role": "reference", "lever": {}, "what": "as shipped", "baseline": "baseline"}
        twin = self.pack_entry("baseline") if same_settings(plan.recipe, "baseline") else None
        if twin is not None and "baseline" in self.curves:  # the recipe is the baseline: its run is the reference
            entry.update(label=plan.start, recipe=plan.recipe, changes={})
            best = self._taken(entry, twin, "the baseline's run (the same settings)")
        else:
            best = self.run(plan.start, plan.recipe, {}, entry)
        if best is None or entry.get("cut"):
            return
        self.recipe_seconds[plan.recipe] = best.train_seconds  # the levers' cost estimates, measured
        best_label, best_changes = plan.start, {}
        self.pack["best"] = {"label": best_label, "recipe": plan.recipe, "changes": best_changes}
        for n, lever in enumerate(plan.levers):
            entry = {"role": "lever", "what": lever.what, "compared_to": best_label, "baseline": "baseline"}
            entry["lever"] = {**lever.changes, **({"steps": f"x{lever.scale_steps}"} if lever.scale_steps != 1 else {})}
            skip = wanted(lever, best_changes)
            if skip is not None:
                entry.update(label=lever.label, decision=skip)
                self._save(entry)
                continue
            changes = variant(plan.recipe, best_changes, lever)
            later = [x for x in plan.levers[n + 1 :] if x.reach]  # keep time for the first shorter schedule
            reserve = self.estimate(plan.recipe, later[0]) if later and not lever.reach else 0.0
            curve = self.run(lever.label, plan.recipe, changes, entry, lever, reserve)
            if "exit" not in entry:
                continue  # skipped: no time left for it
            kept, why = decide(lever, curve, entry["cut"], best, target, self.min_gain)
            entry.update(kept=kept, decision=why)
            self._save(entry)
            if kept and curve is not None:
                best, best_label, best_changes = curve, lever.label, changes
            self.pack["best"] = {"label": best_label, "recipe": plan.recipe, "changes": best_changes}
            self._save_pack()

    def pack_entry(self, label: str) -> dict[str, Any] | None:
        return next((e for e in self.pack["runs"] if e.get("label") == label), None)

    def each(self, best: dict[str, Any] | None) -> None:
        """A non-greedy plan: each run on its own recipe (the Muon ones with a levers series' best changes)."""
        for lever in self.plan.levers:
            recipe = lever.recipe or self.plan.recipe
            changes = dict(lever.changes)
            if lever.carry_best and best:
                changes = {**transfer(best["changes"], best["recipe"], recipe), **changes}
            entry = {"role": "run", "what": lever.what, "baseline": lever.baseline, "lever": changes}
            curve = self.run(lever.label, recipe, changes, entry, lever)
            if lever.label == lever.baseline and curve is not None and not entry["cut"]:
                base = self.pack.setdefault("baselines", {})
                base[lever.label] = {"mode": "full", "val": curve.final, "seconds": curve.train_seconds}
                self._save_pack()

    def _save_pack(self) -> None:
        from gpt2.fileio import atomic_write_json

        atomic_write_json(self.pack_path, self.pack)
