"""The proxy speedrun's run series: which recipe variants a GPU call runs, in which order, and what each
is expected to cost. `benchmarks/speedrun.py plan NAME` runs one (see its docstring).

A greedy plan changes one recipe (muon-short) one lever at a time, each against the best run so far,
the levers in order of expected gain per second of device time (published evidence at GPT-2 small
scale; issue 19). A lever is kept only if it pays (speedrun_series.decide). The plan ends with
shorter schedules of the best recipe (`reach`): the time a run needs to end at the baseline's loss,
the issue's headline number; the series keeps time for the first of them. Step-count settings
(warmups, evaluation interval, max_steps) are the recipe's; a lever that changes the batch size scales
them (`scale_steps`) so the schedule covers the same tokens.

Costs are in units of the recipe's own training time (muon-short: ~25 s on an H100, 23 s on an H200)
plus each run's start-up (a fresh `gpt2 train`: imports, a compilation that hits the shared inductor
cache after the first run, evaluations, the final checkpoint): ~25 s warm, ~50 s for the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Settings counted in optimizer steps: scaled together when a lever changes the tokens per step.
STEP_SETTINGS = ("max_steps", "warmup_steps", "eval_interval", "log_interval", "muon_momentum_warmup_steps")
STEP_SETTINGS += ("seq_len_warmup_steps", "batch_warmup_steps")


@dataclass(frozen=True)
class Lever:
    """One run of a series: settings changed on top of the best run so far (greedy plans) or on top
    of `recipe` alone."""

    label: str  # its run directory: letters, digits and '-' only
    changes: dict[str, str]
    what: str  # the lever and its evidence, one line
    time_factor: float = 1.0  # training time relative to the recipe's (estimated)
    extra_s: float = 0.0  # start-up beyond the usual (compilations of other shapes)
    scale_steps: float = 1.0  # multiply every STEP_SETTINGS value (the recipe's, or the best run's)
    speed: bool = False  # kept if no worse than the noise and faster (rather than lower loss)
    reach: bool = False  # a shorter schedule: kept if it still reaches the baseline's loss, sooner
    # Conditions on the best run so far, each "key" (sets it) or "key=value" (sets it to exactly that):
    needs: tuple[str, ...] = ()  # run only if every one holds (else the lever changes nothing)
    unless: tuple[str, ...] = ()  # run only if none holds (e.g. a lower lr only where a higher one lost)
    recipe: str | None = None  # another configs/speedrun recipe than the plan's (non-greedy plans)
    baseline: str | None = None  # non-greedy plans: the run whose final loss and time it is measured against
    carry_best: bool = False  # non-greedy plans: on top of a levers series' best changes (--changes-from)
    data: str = "proxy"  # the shards it trains on: "proxy" (330 books) or "all" (every carried book)


@dataclass(frozen=True)
class Plan:
    name: str
    recipe: str  # configs/speedrun/NAME.toml that the levers change
    greedy: bool  # levers on top of the best so far (True) or each alone on its recipe
    what: str
    levers: tuple[Lever, ...] = field(default_factory=tuple)
    reference: str = ""  # greedy plans: the label of the recipe's run as shipped (default: the recipe's name)

    @property
    def start(self) -> str:
        return self.reference or self.recipe


MUON_SHORT_LEVERS = (
    Lever("normuon", {"muon_normuon": "true"}, "NorMuon: -2.3% steps in modded-nanogpt's record", 1.01),
    Lever(
        "head-lr",
        {"embedding_lr": "6e-3", "embedding_beta1": "0.8"},
        "tied embedding / LM head at a head-like AdamW lr (0.004-0.008) and beta1 0.8, as modded-nanogpt's head",
    ),
    Lever(
        "cautious-wd",
        {"muon_weight_decay": "0.2", "muon_cautious_wd": "true"},
        "Muon decay 0.2 (nanochat's optimum at width 768), cautious: -1.6% steps in modded-nanogpt",
        1.01,
    ),
    Lever(
        "no-clip",
        {"grad_clip": "0"},
        "no gradient clipping: no benefit in nanochat at any scale, ~2% time",
        0.99,
        speed=True,
    ),  # fmt: skip
    Lever(
        "momentum-warmup",
        {"muon_momentum_warmup_steps": "30", "muon_momentum_start": "0.85"},
        "Muon momentum 0.85 -> 0.95 over the first 17% of the steps (modded-nanogpt's 300 of ~1750)",
    ),
    Lever("warmup-2", {"warmup_steps": "2"}, "a shorter lr warmup (Muon needs little; modded-nanogpt uses none)"),
    Lever("polar-express", {"muon_ns_coefficients": "polar_express"}, "Polar Express Newton-Schulz coefficients"),
    Lever("cooldown-0.7", {"decay_fraction": "0.7"}, "WSD cooldown over 70% of the steps instead of 50%"),
    Lever("cooldown-sqrt", {"decay_shape": "sqrt"}, "1 - sqrt cooldown (Hagele et al. 2024) instead of linear"),
    Lever(
        "batch-32k",
        {"total_batch_size": "32768", "micro_batch_size": "32"},
        "2^15 tokens per step, same tokens (65K beat 131K by 0.05 nats here); more, slower steps",
        1.12,
        extra_s=25.0,  # micro-batches of 32: another shape to compile
        scale_steps=2.0,
    ),
    Lever(
        "seq-warmup",
        {"seq_len_warmup_steps": "60", "seq_len_warmup_start": "256"},
        "sequence-length warmup 256 -> 512 -> 1024 over a third of the steps (2 more compilations)",
        0.93,
        extra_s=50.0,
    ),
    Lever("split-heads", {"muon_split_heads": "true"}, "each head's query and key orthogonalized on its own"),
    Lever("ema", {"weight_ema": "0.95", "ema_start": "0.5"}, "tail weight average over the cooldown (EMA 0.95)"),
    Lever(
        "batch-ramp",
        {"batch_warmup_steps": "40", "batch_warmup_tokens": "32768", "micro_batch_size": "32"},
        "batch ramp 2^15 -> 2^16 tokens over the first 40 steps",
        1.06,
        extra_s=25.0,
    ),
    Lever(
        "plain-wd", {"muon_cautious_wd": "false"}, "the decay without the cautious mask", needs=("muon_cautious_wd",)
    ),
    Lever(
        "batch-131k",
        {"total_batch_size": "131072"},
        "2^17 tokens per step (2 micro-steps), same tokens: 2^15 cost 0.149 nats here, so try the other side",
        0.97,
        scale_steps=0.5,
    ),
    Lever("cooldown-0.85", {"decay_fraction": "0.85"}, "an even longer cooldown (0.7 beat 0.5 by 0.011)"),
    Lever("floor-0.1", {"min_lr_ratio": "0.1"}, "the cooldown ends at 10% of the peak lr, not 0"),
    # The AdamW groups' own rates (issue 19: "position embeddings and 1-D parameters with their own rates");
    # all four groups run at max_lr 1.8e-3 today, and a head-like 6e-3 for the tied embedding cost 0.039.
    Lever("embed-lr-0.5x", {"embedding_lr": "9e-4"}, "the tied embedding / LM head at half the AdamW lr"),
    Lever("position-lr-3x", {"position_lr": "5.4e-3"}, "the position embeddings at 3x the AdamW lr"),
    Lever("scalar-lr-3x", {"scalar_lr": "5.4e-3"}, "biases and LayerNorm parameters at 3x the AdamW lr"),
    Lever("adamw-lr-0.67x", {"max_lr": "1.2e-3"}, "every AdamW group at 2/3 of its lr (3e-3 cost 0.03 in round one)"),
    Lever("muon-lr-3e-3", {"muon_lr": "3e-3"}, "Muon lr 3e-3 on top of the kept levers"),
    Lever("muon-lr-2e-3", {"muon_lr": "2e-3"}, "Muon lr 2e-3 on top of the kept levers"),
    Lever("shorter-1", {}, "the best recipe with 85% of its steps", 0.85, scale_steps=0.85, reach=True),
    Lever("shorter-2", {}, "the best recipe with 85% of its steps again", 0.85, scale_steps=0.85, reach=True),
)

# The AdamW rival (what users get where Muon cannot run, e.g. under FSDP), tuned greedily like Muon, from
# the seed recipe (baseline.toml: the series reuses the baseline's run as its reference, labelled "seed");
# the lead writes the series' best into adamw-best.toml, which `plan final` runs. Each run is full length
# (~236 s on an H100 + start-up): two a GPU call, a series over several calls (`plan adamw --resume` carries
# the finished runs into the next call). A value "xF" multiplies the best run's setting (or the recipe's), so
# a warmup lever stays a fraction of the schedule whatever batch size was kept before it.
ADAMW_LEVERS = (
    Lever(
        "batch-65k",
        {"total_batch_size": "65536"},
        "2^16 tokens per step (one micro-step), same tokens: halving Muon's batch from 2^17 gained 0.05-0.11 nats",
        1.01,
        scale_steps=2.0,
    ),
    Lever("lr-9e-4", {"max_lr": "9e-4"}, "1.5x the seed's lr"),
    Lever("lr-4e-4", {"max_lr": "4e-4"}, "2/3 of the seed's lr, where 1.5x did not pay", unless=("max_lr",)),
    Lever("lr-1.2e-3", {"max_lr": "1.2e-3"}, "2x the seed's lr, where 1.5x paid", needs=("max_lr=9e-4",)),
    Lever(
        "wsd-sqrt",
        {"lr_schedule": "wsd", "decay_fraction": "0.5", "decay_shape": "sqrt", "min_lr_ratio": "0"},
        "warmup-stable-decay, a 1-sqrt cooldown over half the steps to 0 (Hagele et al. 2024), not cosine to 10%",
    ),
    Lever("warmup-0.4x", {"warmup_steps": "x0.4"}, "a shorter warmup: 1.5% of the steps instead of the seed's 3.75%"),
    Lever("lr-2.7e-4", {"max_lr": "2.7e-4"}, "2/3 again, where 4e-4 paid (-0.045)", needs=("max_lr=4e-4",)),
    Lever("no-clip", {"grad_clip": "0"}, "no gradient clipping (no benefit in nanochat)", speed=True),
    Lever("beta2-0.99", {"beta2": "0.99"}, "beta2 0.99 instead of 0.95"),
)

# A second regime (issue 19): one pass over distinct text, no repetition. 124M on one pass of the 330
# books (the proxy's shards), and a ~30M-parameter model on one pass of every carried book ("all" shards,
# `speedrun.py prepare --all`). The Muon runs take the recipe the levers series ends with (--changes-from).
REGIME2_LEVERS = (
    Lever("onepass-baseline", {}, "the seed recipe, one pass of the 330 books (211 steps)",
          recipe="onepass-baseline", baseline="onepass-baseline"),
    Lever("onepass-muon", {}, "the best Muon recipe, one pass of the 330 books (422 steps)",
          recipe="onepass-muon", baseline="onepass-baseline", carry_best=True),
    Lever("small-baseline", {}, "the seed recipe, 30M model, one pass of every carried book",
          recipe="small-baseline", baseline="small-baseline", data="all"),
    Lever("small-muon", {}, "the best Muon recipe, 30M model, one pass of every carried book",
          recipe="small-muon", baseline="small-baseline", carry_best=True, data="all"),
)  # fmt: skip

# The shipped recipes' final curves as the tomls stand, with the baseline re-measured in the same series. The
# levers are written into the tomls by the lead, not carried here: muon-short's transfer to the 1,600-step
# muon-full lost 0.117 nats (RESULTS.md "The final series, first part"), so each toml holds what was measured
# on its own length.
FINAL_LEVERS = (
    Lever("baseline", {}, "the seed recipe scaled to the proxy", recipe="baseline", baseline="baseline"),
    Lever("muon-short", {}, "time-to-baseline run", recipe="muon-short", baseline="baseline"),
    Lever("muon-full", {}, "equal-wall-clock run", recipe="muon-full", baseline="baseline"),
    Lever("adamw-best", {}, "the AdamW rival", recipe="adamw-best", baseline="baseline"),
)

PLANS = {
    "levers": Plan("levers", "muon-short", True, "every lever on muon-short, greedily", MUON_SHORT_LEVERS),
    "adamw": Plan(
        "adamw", "baseline", True, "the AdamW rival, tuned greedily from the seed recipe", ADAMW_LEVERS, "seed"
    ),
    "regime2": Plan("regime2", "onepass-muon", False, "the second regime: one pass, two model sizes", REGIME2_LEVERS),
    "final": Plan("final", "muon-short", False, "the shipped recipes' curves, one series", FINAL_LEVERS),
}

# Training seconds of each recipe on an H100 as shipped (issue 19's measurements; estimates for the rest).
RECIPE_SECONDS = {"baseline": 236.0, "muon-short": 25.0, "muon-full": 226.0, "adamw-best": 236.0}
RECIPE_SECONDS.update({"onepass-baseline": 57.0, "onepass-muon": 60.0, "small-baseline": 60.0, "small-muon": 60.0})
STARTUP_S = {"first": 50.0, "warm": 25.0}
