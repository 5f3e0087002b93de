"""The proxy speedrun's tooling (benchmarks/speedrun*.py): curves without compilation time, the greedy
series' decisions and step scaling, every planned variant a valid config, the report of a packed series,
and (slow) a whole series on a tiny CPU model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.speedrun_plans import PLANS, Lever
from benchmarks.speedrun_report import Curve, curve_from_records, report_pack
from benchmarks.speedrun_series import decide, recipe_path, transfer, variant, wanted
from gpt2.training import build_config

REPO = Path(__file__).resolve().parents[1]


def records(times: list[float], evals: dict[int, float], lengths: list[int] | None = None) -> list[dict]:
    """Metrics records: one train record per step time, val losses at the given steps."""
    out = [{"type": "event", "event": "start", "device_name": "test"}]
    for step, t in enumerate(times):
        r = {
            "type": "train",
            "step": step,
            "loss": 1.0,
            "step_time": t,
            "tokens": 100 * (step + 1),
            "tokens_per_sec": 10,
        }
        if lengths:
            r["seq_len"] = lengths[step]
        out.append(r)
    return out + [{"type": "eval", "step": s, "val_loss": v} for s, v in evals.items()]


def curve(name: str, final: float, seconds: float, steps: int = 10) -> Curve:
    """A run whose val loss falls linearly from final + 1 to final over `seconds` of training."""
    evals = {s: final + 1 - s / steps for s in range(0, steps + 1, 2)}
    return curve_from_records(name, records([seconds / steps] * steps, evals))


def test_curve_counts_training_time_without_compilation():
    times = [30.0, 1, 1, 1, 1, 20.0, 1, 1, 1, 1]  # step 0 and the first step at a new length compiled
    c = curve_from_records("r", records(times, {0: 11.0, 5: 6.0, 10: 4.0}, [8, 8, 8, 8, 8, 16, 16, 16, 16, 16]))
    assert c.train_seconds == 10.0 and c.seconds == [0.0, 5.0, 10.0] and c.step_time == 1.0
    assert c.time_to(5.0) == pytest.approx(7.5) and c.time_to(3.9) is None and c.val_at(2.5) == pytest.approx(8.5)
    plain = curve_from_records("p", records(times, {10: 4.0}))  # no warmup: only step 0 is compilation
    assert plain.train_seconds == 29.0
    cut = curve_from_records("c", records(times[:6], {0: 11.0, 4: 7.0}))  # a run killed after step 5
    assert cut.final == 7.0 and cut.steps == [0, 4]
    assert curve_from_records("none", records(times, {})) is None


def test_decide_keeps_only_what_pays():
    best = curve("best", 5.0, 100.0)
    loss, speed = Lever("x", {}, ""), Lever("y", {}, "", speed=True)
    assert decide(loss, curve("a", 4.99, 100.0), False, best, None, 0.005)[0]
    assert not decide(loss, curve("a", 4.997, 90.0), False, best, None, 0.005)[0]  # within the noise
    assert decide(speed, curve("a", 5.004, 95.0), False, best, None, 0.005) == (
        True,
        "yes (speed): +0.0040 nats, -5.0% time",
    )
    assert not decide(speed, curve("a", 5.004, 99.5), False, best, None, 0.005)[0]  # faster by under 1%
    assert decide(loss, curve("a", 4.0, 100.0), True, best, None, 0.005) == (False, "no: cut before its end")
    assert decide(loss, None, False, best, None, 0.005) == (False, "no: no evaluation (the run failed)")
    shorter = Lever("s", {}, "", reach=True)
    assert decide(shorter, curve("a", 5.1, 80.0), False, best, 5.05, 0.005) == (
        False,
        "no: ends at 5.1000, above 5.0500",
    )
    kept, why = decide(shorter, curve("a", 5.0, 80.0), False, best, 5.05, 0.005)
    assert kept and why == "yes: reaches 5.0500 at 76.0 s"  # the best reaches 5.05 at 95 s


def test_variants_scale_step_counts_and_carry_to_other_recipes():
    batch = next(lever for lever in PLANS["levers"].levers if lever.label == "batch-32k")
    changes = variant("muon-short", {"warmup_steps": "2", "muon_lr": "3e-3"}, batch)
    assert changes == {"warmup_steps": "4", "muon_lr": "3e-3", "total_batch_size": "32768", "micro_batch_size": "32",
                       "max_steps": "352", "eval_interval": "44", "log_interval": "44"}  # fmt: skip
    carried = transfer({"muon_momentum_warmup_steps": "30", "max_steps": "150", "muon_normuon": "true"}, "muon-short",
                       "onepass-muon")  # fmt: skip
    assert carried == {"muon_momentum_warmup_steps": "72", "muon_normuon": "true"}  # x 422 / 176; its own length
    assert transfer({"max_steps": "150"}, "muon-short", "muon-short") == {"max_steps": "150"}


def test_relative_settings_and_conditions_on_the_best_run():
    """A value "xF" scales the best run's setting (else the recipe's); needs/unless read the best run's changes."""
    shorter = Lever("w", {"warmup_steps": "x0.4"}, "")
    assert variant("baseline", {}, shorter) == {"warmup_steps": "13"}  # 33 x 0.4
    assert variant("baseline", {"warmup_steps": "66", "max_lr": "9e-4"}, shorter)["warmup_steps"] == "26"
    assert variant("baseline", {}, Lever("b", {"beta2": "x1.05"}, "")) == {"beta2": "0.9975"}
    low = Lever("lo", {"max_lr": "4e-4"}, "", unless=("max_lr",))
    high = Lever("hi", {"max_lr": "1.2e-3"}, "", needs=("max_lr=9e-4",))
    assert wanted(low, {}) is None and wanted(high, {}) == "skipped: the best run does not set max_lr=9e-4"
    assert wanted(low, {"max_lr": "0.0009"}) == "skipped: the best run sets max_lr"
    assert wanted(high, {"max_lr": "0.0009"}) is None  # the same number, written otherwise
    assert wanted(Lever("p", {}, "", needs=("muon_cautious_wd=true",)), {"muon_cautious_wd": "true"}) is None


def test_every_planned_run_is_a_valid_config():
    """Each lever's settings (on top of every earlier lever's, the worst case of a greedy series) build."""
    for plan in PLANS.values():
        best: dict[str, str] = {}
        for lever in plan.levers:
            recipe = lever.recipe or plan.recipe
            changes = variant(recipe, best if plan.greedy else {}, lever)
            build_config(recipe_path(recipe), {**changes, "data_root": "x"})
            if plan.greedy and not lever.reach:
                best = changes
    labels = [lever.label for plan in PLANS.values() for lever in plan.levers]
    assert all(label.replace("-", "").replace(".", "").isalnum() for label in labels)


def test_report_of_a_packed_series(tmp_path):
    def entry(label, role, final, seconds, **extra):
        c_records = records([seconds / 10] * 10, {s: final + 1 - s / 10 for s in (0, 5, 10)})
        return {"label": label, "role": role, "records": c_records, "baseline": "baseline", "exit": 0, **extra}

    pack = {
        "plan": "levers",
        "min_gain": 0.005,
        "baselines": {"baseline": {"mode": "full", "val": 5.2, "seconds": 200.0}},
        "best": {"label": "normuon", "recipe": "muon-short", "changes": {"muon_normuon": "true"}},
        "runs": [
            entry("baseline", "baseline", 5.2, 200.0),
            entry("muon-short", "reference", 5.23, 20.0, lever={}),
            entry(
                "normuon",
                "lever",
                5.1,
                20.0,
                lever={"muon_normuon": "true"},
                compared_to="muon-short",
                kept=True,
                decision="yes: -0.1300 nats, +0.0% time",
            ),
            {
                "label": "ema",
                "role": "lever",
                "lever": {"weight_ema": "0.95"},
                "compared_to": "normuon",
                "baseline": "baseline",
                "decision": "skipped: needs ~60 s, 10 s left",
            },
        ],
    }
    text, shown, target, budget = report_pack(pack)
    assert (target, budget) == (5.2, 200.0)
    assert "| normuon    | muon_normuon=true" in text and "yes: -0.1300 nats" in text
    assert "18.0 s = 0.090x" in text  # val 5.6 at 10 s, 5.1 at 20 s: 5.2 at 18 s, 0.09 of the baseline's 200 s
    assert "skipped: needs ~60 s" in text and "best: normuon = muon-short" in text
    assert [c.name for c in shown] == ["baseline", "muon-short", "normuon"]


@pytest.mark.slow
def test_a_series_runs_end_to_end_on_a_tiny_cpu_model(pattern_data, tmp_path):
    """`speedrun.py plan levers --smoke`: the baseline timed, the reference and two levers trained in fresh
    processes, packed, reported, plotted."""
    pack, png = tmp_path / "levers.json", tmp_path / "levers.png"
    args = [sys.executable, "benchmarks/speedrun.py", "plan", "levers", "--smoke", "--data", str(pattern_data)]
    args += ["--out", str(tmp_path / "runs"), "--baseline-mode", "timing", "--baseline-val", "4.5"]
    args += ["--only", "normuon,no-clip", "--pack", str(pack), "--png", str(png), "--budget-s", "300"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(pack.read_text())["runs"]
    assert [e["label"] for e in runs] == ["baseline-timing", "muon-short", "normuon", "no-clip"]
    assert all(e["exit"] == 0 and any(r["type"] == "eval" for r in e["records"]) for e in runs)
    assert "kept?" in proc.stdout and png.stat().st_size > 10_000


def test_changes_from_is_refused_by_a_plan_that_runs_its_recipes_as_shipped(tmp_path):
    """`plan final` runs the tomls as they stand: a --changes-from it would ignore is an error, before any data."""
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"best": {"recipe": "muon-short", "changes": {"muon_normuon": "true"}}}))
    args = [sys.executable, "benchmarks/speedrun.py", "plan", "final", "--changes-from", str(best)]
    args += ["--out", str(tmp_path / "runs")]
    proc = subprocess.run(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert proc.returncode == 2 and "drop --changes-from" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_series_resumed_in_a_second_call_trains_only_what_is_new(pattern_data, tmp_path):
    """`plan adamw` twice, the second with --resume: the first call's runs (the baseline, the reference that
    is the baseline's own run, the lever) are taken, not trained again; the greedy choice replays and only the
    new lever trains. A pack of another plan is refused before anything runs."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "benchmarks/speedrun.py", "plan", "adamw", "--smoke", "--data", str(pattern_data)]
    base += ["--out", str(tmp_path / "runs"), "--budget-s", "300"]

    def call(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    first, second = tmp_path / "a1.json", tmp_path / "a2.json"
    proc = call("--only", "lr-9e-4", "--pack", str(first))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[seed] taken from the baseline's run" in proc.stdout  # the plan starts from the seed recipe
    # the deadline killed lr-9e-4 after its final evaluation (while it wrote its last checkpoint): complete
    packed = json.loads(first.read_text())
    lever = next(e for e in packed["runs"] if e["label"] == "lr-9e-4")
    lever.update(exit=None, cut=True)
    packed["migrated"] = "seed: taken by hand"
    first.write_text(json.dumps(packed))
    proc = call("--only", "lr-9e-4,lr-4e-4,lr-1.2e-3", "--resume", str(first), "--pack", str(second))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = json.loads(second.read_text())
    assert resumed["migrated"] == "seed: taken by hand"  # the prior pack's note goes on with its runs
    runs = {e["label"]: e for e in resumed["runs"]}
    assert list(runs) == ["baseline", "seed", "lr-9e-4", "lr-4e-4", "lr-1.2e-3"]
    assert runs["baseline"]["taken_from"] == runs["lr-9e-4"]["taken_from"] == "an earlier call"
    old = {e["label"]: e for e in json.loads(first.read_text())["runs"]}
    assert runs["lr-9e-4"]["records"] == old["lr-9e-4"]["records"] and runs["lr-9e-4"]["cut"] is False
    kept = runs["lr-9e-4"]["kept"]  # the smoke model decides; either way exactly one lr lever trains now
    trained = [label for label, e in runs.items() if "taken_from" not in e and "exit" in e]
    assert trained == (["lr-1.2e-3"] if kept else ["lr-4e-4"])
    # killed before its final evaluation: cut, so a resumed call trains it again
    lever["records"] = [r for r in lever["records"] if not (r["type"] == "eval" and r["step"] == 6)]
    first.write_text(json.dumps(packed))
    proc = call("--only", "lr-9e-4", "--resume", str(first), "--pack", str(second))
    assert proc.returncode == 0 and "[lr-9e-4] taken" not in proc.stdout and "[lr-9e-4] exit 0" in proc.stdout
    refused = call("--resume", str(tmp_path / "missing.json"))
    assert refused.returncode != 0 and "not a readable series pack" in refused.stderr
    (tmp_path / "other.json").write_text(json.dumps({"format": 1, "plan": "levers", "runs": []}))
    refused = call("--resume", str(tmp_path / "other.json"))
    assert refused.returncode != 0 and "a pack of plan 'levers', not 'adamw'" in refused.stderr
    for entry in packed["runs"]:  # a pack from another card: its wall-clock times compare with nothing here
        for record in (r for r in entry["records"] if r.get("event") == "start"):
            record["device_name"] = "NVIDIA H100 80GB HBM3"
    (tmp_path / "h100.json").write_text(json.dumps(packed))
    refused = call("--resume", str(tmp_path / "h100.json"))
    assert refused.returncode != 0 and "its runs ran on NVIDIA H100 80GB HBM3, this call trains on" in refused.stderr


def test_carry_then_prepare_takes_the_first_books(tmp_path, monkeypatch, capsys):
    """`carry` packs the first N books (xz) and the validation books; `prepare` tokenizes the first 330 of
    them (here 2) into shards outside the carried folder."""
    import lzma

    from benchmarks import speedrun

    shared, source, data = tmp_path / "shared", tmp_path / "carry", tmp_path / "runs" / "data"
    shared.mkdir()
    books = [json.dumps({"text": f"Book {i}. " + "Some words of a story. " * 200}) for i in range(4)]
    with lzma.open(shared / "train.jsonl.xz", "wt") as f:
        f.write("\n".join(books) + "\n")
    with lzma.open(shared / "val.jsonl.xz", "wt") as f:
        f.write(json.dumps({"text": "A validation book. " * 300}) + "\n")
    speedrun.carry(3, shared, source)
    assert "MiB of 64 MiB: fits" in capsys.readouterr().out
    with lzma.open(source / "train.jsonl.xz", "rt") as f:
        assert f.read().splitlines() == books[:3]
    monkeypatch.setattr(speedrun, "PROXY_BOOKS", 2)
    speedrun.prepare(source, data)
    assert (data.parent / "train330.jsonl").read_text().splitlines() == books[:2]
    assert (data / "manifest.json").is_file() and not list(source.glob("*.jsonl"))
