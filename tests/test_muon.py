"""Muon: float64 reference steps (also with NorMuon, cautious weight decay and Polar Express), split (fused q/k/v,
per-head) matrices, Newton–Schulz's band, exact resume, parity with torch.optim.Muon, bad input, and Newton–Schulz
shared over two gloo processes."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt2.training.muon import NS_COEFFS, POLAR_EXPRESS, Muon, default_ns_dtype, newton_schulz

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(48, 16), (16, 48), (32, 32)]  # tall, wide, square


def ns64(x: torch.Tensor, steps: int = 5, eps: float = 1e-7, polar: bool = False) -> torch.Tensor:
    """Newton–Schulz of one matrix in float64, written out plainly: (A, B) -> (A, B)."""
    x = x.double()
    if x.size(0) > x.size(1):
        return ns64(x.T, steps, eps, polar).T
    norm = torch.linalg.matrix_norm(x)
    x = x / (1.02 * norm + eps) if polar else x / (norm + eps)
    for a, b, c in POLAR_EXPRESS[:steps] if polar else [NS_COEFFS] * steps:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def normuon64(o: torch.Tensor, v: torch.Tensor, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NorMuon on one orthogonalized block from its definition: (rescaled block, new second moments)."""
    per_row = o.size(0) >= o.size(1)  # one second moment per neuron of the larger side
    mean_sq = (o**2).mean(dim=1) if per_row else (o**2).mean(dim=0)
    v = beta2 * v + (1 - beta2) * mean_sq
    scaled = o / v.clamp_min(1e-10).sqrt()[:, None] if per_row else o / v.clamp_min(1e-10).sqrt()[None, :]
    return scaled * torch.linalg.matrix_norm(o) / torch.linalg.matrix_norm(scaled), v


def reference(w, grads, lr=0.02, mu=0.95, nesterov=True, wd=0.1, adjust="match_rms_adamw", splits=1, **options):
    """Muon in float64 from its definition: EMA momentum, Nesterov, per-block NS (quintic or Polar Express),
    NorMuon, lr adjustment, decoupled (or cautious) decay."""
    w, buf = w.double(), torch.zeros_like(w, dtype=torch.float64)
    rows = [w.size(0) // splits] * splits if isinstance(splits, int) else list(splits)
    moments = [torch.zeros(max(r, w.size(1)), dtype=torch.float64) for r in rows]
    for g in grads:
        g = g.double()
        buf = mu * buf + (1 - mu) * g
        u = (1 - mu) * g + mu * buf if nesterov else buf
        blocks = [ns64(block, polar=options.get("polar", False)) for block in u.split(rows)]
        if options.get("normuon"):
            done = [normuon64(o, v, options.get("beta2", 0.95)) for o, v in zip(blocks, moments)]
            blocks, moments = [o for o, _ in done], [v for _, v in done]
        o = torch.cat(blocks)
        scale = {
            "match_rms_adamw": 0.2 * math.sqrt(max(rows[0], w.size(1))),
            "spectral": math.sqrt(max(1, rows[0] / w.size(1))),
        }
        mask = (o * w >= 0).double() if options.get("cautious") else 1.0
        w = w - lr * wd * w * mask - lr * scale.get(adjust, 1.0) * o
    return w


def run(w, grads, **options) -> torch.Tensor:
    """Our Muon on a copy of w, fed `grads` one step each; returns the final weights."""
    p = torch.nn.Parameter(w.clone())
    opt = Muon([p], **options)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def random(*shape: int, seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal tensor, the same on every process."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("adjust", ["match_rms_adamw", "spectral", None])
@pytest.mark.parametrize("shape", SHAPES, ids=["tall", "wide", "square"])
def test_steps_match_float64_reference(shape, adjust):
    w, grads = random(*shape), [random(*shape, seed=s) for s in (1, 2)]  # two steps, so momentum matters
    for nesterov in (True, False):
        ours = run(w, grads, lr=0.02, weight_decay=0.1, adjust_lr=adjust, nesterov=nesterov)
        ref = reference(w, grads, nesterov=nesterov, adjust=adjust)
        torch.testing.assert_close(ours.double(), ref, rtol=0, atol=2e-6)


def test_split_c_attn_orthogonalizes_q_k_v_separately():
    C = 16
    w, grads = random(3 * C, C), [random(3 * C, C, seed=s) for s in (1, 2)]
    split = run(w, grads, lr=0.02, weight_decay=0.1, splits=3)
    torch.testing.assert_close(split.double(), reference(w, grads, splits=3), rtol=0, atol=2e-6)
    # = three unfused C x C matrices (same momentum, NS and lr adjustment, each for C x C)
    parts = [run(wb, [g.chunk(3)[i] for g in grads], lr=0.02, weight_decay=0.1) for i, wb in enumerate(w.chunk(3))]
    torch.testing.assert_close(split, torch.cat(parts), rtol=0, atol=1e-7)
    # the raw update (lr 1, zero weights, one step): split, each C x C block is orthogonal; whole, only the 3C x C
    zero, g = torch.zeros(3 * C, C), grads[:1]
    split_update, whole_update = (-run(zero, g, lr=1.0, adjust_lr=None, splits=k) for k in (3, 1))
    assert all(in_band(torch.linalg.svdvals(block)) for block in split_update.chunk(3))
    assert in_band(torch.linalg.svdvals(whole_update))
    assert not any(in_band(torch.linalg.svdvals(block)) for block in whole_update.chunk(3))


OPTIONS = {
    "normuon": dict(normuon=True, beta2=0.9),
    "cautious": dict(cautious_wd=True),
    "polar": dict(ns_coefficients="polar_express"),
    "all": dict(normuon=True, beta2=0.9, cautious_wd=True, ns_coefficients="polar_express"),
}


def as_reference(options: dict) -> dict:
    """The reference()'s names for Muon's options."""
    return dict(
        normuon=options.get("normuon", False),
        beta2=options.get("beta2", 0.95),
        cautious=options.get("cautious_wd", False),
        polar=options.get("ns_coefficients") == "polar_express",
    )


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=["tall", "wide", "square"])
def test_normuon_cautious_decay_and_polar_express_match_float64_reference(shape, name):
    """Three steps (the second moments and momentum carry over), against the definitions written out in float64."""
    w, grads = random(*shape), [random(*shape, seed=s) for s in (1, 2, 3)]
    for nesterov in (True, False):
        ours = run(w, grads, lr=0.02, weight_decay=0.5, nesterov=nesterov, **OPTIONS[name])
        ref = reference(w, grads, nesterov=nesterov, wd=0.5, **as_reference(OPTIONS[name]))
        torch.testing.assert_close(ours.double(), ref, rtol=0, atol=2e-6)
        assert not torch.allclose(ours.double(), reference(w, grads, nesterov=nesterov, wd=0.5), atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES, ids=["tall", "wide", "square"])
def test_normuon_equalizes_neurons_and_keeps_the_update_norm(shape):
    """With beta2 = 0 the second moment is this step's: every neuron of the larger side gets the same RMS, and
    the update's Frobenius norm is the plain orthogonalized one's."""
    zero, g = torch.zeros(*shape), [random(*shape, seed=1)]
    plain = -run(zero, g, lr=1.0, adjust_lr=None)
    normed = -run(zero, g, lr=1.0, adjust_lr=None, normuon=True, beta2=0.0)
    rms = normed.square().mean(dim=1 if shape[0] >= shape[1] else 0).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, rms.mean().item()), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.linalg.matrix_norm(normed), torch.linalg.matrix_norm(plain), rtol=1e-5, atol=0)


def test_cautious_decay_spares_weights_the_update_pushes_away_from_zero():
    """Without an update the decay is plain; where update and weight disagree in sign nothing is decayed."""
    w = torch.tensor([[1.0, -1.0], [2.0, -2.0]])
    g = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # the update's sign: + everywhere (before orthogonalization)
    p = torch.nn.Parameter(w.clone())
    opt = Muon([p], lr=0.1, weight_decay=1.0, cautious_wd=True, adjust_lr=None, nesterov=False, momentum=0.0)
    p.grad = g.clone()
    opt.step()
    o = (w - p.detach() - 0.1 * (w * (w > 0))) / 0.1  # the orthogonalized update, recovered
    assert torch.all(o > 0)  # the same sign as g here (a rank-1 gradient)
    assert torch.allclose(p.detach()[:, 1], w[:, 1] - 0.1 * o[:, 1])  # negative weights: not decayed
    assert torch.allclose(p.detach()[:, 0], w[:, 0] * 0.9 - 0.1 * o[:, 0])  # positive weights: decayed
    assert torch.equal(run(w, [g], lr=0.1, cautious_wd=True), run(w, [g], lr=0.1))  # no decay: same bits


def test_per_head_query_and_key_blocks_equal_unfused_heads():
    """splits = (hs,) * 2 * n_head + (C,): each head's query and key, and the whole value matrix, orthogonalized
    on their own = optimizing those matrices as separate parameters; also with NorMuon."""
    C, heads = 16, 4
    hs = C // heads
    blocks = (hs,) * 2 * heads + (C,)
    w, grads = random(3 * C, C), [random(3 * C, C, seed=s) for s in (1, 2)]
    for options in ({}, OPTIONS["normuon"]):
        fused = run(w, grads, lr=0.02, weight_decay=0.1, splits=blocks, **options)
        ref = reference(w, grads, splits=blocks, **as_reference(options))
        torch.testing.assert_close(fused.double(), ref, rtol=0, atol=2e-6)
        parts = [
            run(wb, [g.split(blocks)[i] for g in grads], lr=0.02, weight_decay=0.1, **options)
            for i, wb in enumerate(w.split(blocks))
        ]
        # a (hs, C) block's lr adjustment is the C x C one's under match_rms_adamw (both 0.2 sqrt(C))
        torch.testing.assert_close(fused, torch.cat(parts), rtol=0, atol=1e-6)


def in_band(s: torch.Tensor) -> bool:
    """Singular values where this quintic Newton–Schulz leaves them (measured: about 0.68 to 1.13)."""
    return bool(s.min() > 0.65 and s.max() < 1.2)


@pytest.mark.parametrize("shape", [(96, 32), (32, 64), (32, 32)])
def test_newton_schulz_singular_values_land_in_the_quintic_band(shape):
    s = torch.linalg.svdvals(newton_schulz(random(*shape)[None])[0])
    assert in_band(s), s.aminmax()


def test_newton_schulz_runs_in_the_requested_dtype():
    assert newton_schulz(random(8, 4)[None], dtype=torch.bfloat16).dtype == torch.bfloat16
    assert default_ns_dtype(torch.device("cpu")) == torch.float32
    assert default_ns_dtype(torch.device("cuda")) == torch.bfloat16


def make_optimizer(seed: int = 0, process_group=None, **options) -> tuple[list[torch.nn.Parameter], Muon]:
    """A fused (3C, C) attention matrix and a plain MLP-like one, in two groups."""
    attn, mlp = torch.nn.Parameter(random(48, 16, seed=seed)), torch.nn.Parameter(random(64, 16, seed=seed + 1))
    splits = options.pop("splits", 3)
    groups = [{"params": [attn], "splits": splits}, {"params": [mlp]}]
    return [attn, mlp], Muon(groups, lr=0.02, weight_decay=0.1, process_group=process_group, **options)


# Every option at once, with per-head blocks (C = 16, 4 heads): what the resume and sharing tests also cover.
EVERYTHING = dict(OPTIONS["all"], splits=(4,) * 8 + (16,))


def train(params, opt, steps: range) -> None:
    """Steps with gradients that depend on the step number and the weights, as real ones do."""
    for step in steps:
        for i, p in enumerate(params):
            p.grad = random(*p.shape, seed=100 * step + i) + 0.1 * p.detach()
        opt.step()


@pytest.mark.parametrize("options", [{}, EVERYTHING], ids=["plain", "everything"])
def test_exact_resume_through_state_dict(options):
    params, opt = make_optimizer(**options)
    train(params, opt, range(6))

    first, opt1 = make_optimizer(**options)
    train(first, opt1, range(3))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, opt2 = make_optimizer(seed=7, **options)  # different weights, overwritten from the save
    with torch.no_grad():
        for p, q in zip(resumed, saved["params"]):
            p.copy_(q)
    opt2.load_state_dict(saved["optimizer"])
    assert [g["splits"] for g in opt2.param_groups] == [options.get("splits", 3), 1]
    train(resumed, opt2, range(3, 6))
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        assert (
            opt.state[p].keys()
            == opt2.state[q].keys()
            == ({"momentum_buffer", "second_moment"} if options else {"momentum_buffer"})
        )
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], opt2.state[q][key])


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs PyTorch >= 2.9")
@pytest.mark.parametrize("ours, theirs", [("spectral", "original"), ("match_rms_adamw", "match_rms_adamw")])
@pytest.mark.parametrize("shape", SHAPES, ids=["tall", "wide", "square"])
def test_plain_matrix_matches_torch_optim_muon(shape, ours, theirs):
    w, grads = random(*shape), [random(*shape, seed=s) for s in (1, 2, 3)]
    for nesterov in (True, False):
        # torch always runs Newton–Schulz in bf16; in bf16 ours does the same operations, so the bits agree
        mine = run(w, grads, lr=0.02, weight_decay=0.1, adjust_lr=ours, nesterov=nesterov, ns_dtype=torch.bfloat16)
        p = torch.nn.Parameter(w.clone())
        opt = torch.optim.Muon([p], lr=0.02, weight_decay=0.1, adjust_lr_fn=theirs, nesterov=nesterov)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        assert torch.equal(mine, p.detach())


@pytest.mark.parametrize(
    "params, options, message",
    [
        (lambda: [torch.nn.Parameter(torch.zeros(8))], {}, "is not 2-D"),
        (lambda: [torch.nn.Parameter(torch.zeros(2, 3, 4))], {}, "is not 2-D"),
        (lambda: [{"params": [torch.nn.Parameter(torch.zeros(48, 16))], "splits": 5}], {}, "splits=5 does not divide"),
        (lambda: [torch.nn.Parameter(torch.zeros(4, 4))], {"splits": 0}, "splits=0 must be"),
        (lambda: [torch.nn.Parameter(torch.zeros(4, 4))], {"adjust_lr": "rms"}, "adjust_lr='rms' must be one of"),
        (lambda: [torch.nn.Parameter(torch.zeros(4, 4))], {"lr": -1.0}, "lr=-1.0 must be >= 0"),
        (lambda: [torch.nn.Parameter(torch.zeros(4, 4))], {"momentum": 1.0}, "momentum=1.0 must be in"),
        (lambda: [torch.nn.Parameter(torch.zeros(4, 4))], {"ns_dtype": torch.int32}, "must be a float dtype"),
        (lambda: [torch.nn.Parameter(torch.zeros(4, 4))], {"beta2": 1.0}, "beta2=1.0 must be in"),
        (lambda: [torch.nn.Parameter(torch.zeros(4, 4))], {"normuon": 1}, "normuon=1 must be True or False"),
        (lambda: [torch.nn.Parameter(torch.zeros(4, 4))], {"cautious_wd": "yes"}, "cautious_wd='yes' must be"),
        (lambda: [torch.nn.Parameter(torch.zeros(4, 4))], {"ns_coefficients": "cubic"}, "ns_coefficients='cubic'"),
        (lambda: [torch.nn.Parameter(torch.zeros(4, 4))], {"splits": (0, 4)}, "tuple of block heights"),
        (lambda: [torch.nn.Parameter(torch.zeros(4, 4))], {"splits": (2, 1)}, r"sum to 3, not the 4 rows"),
        (lambda: [torch.nn.Parameter(torch.zeros(48, 16))], {"splits": (32, 16)}, "need different lr adjustments"),
        (
            lambda: [torch.nn.Parameter(torch.zeros(4, 4))],
            {"ns_coefficients": "polar_express", "ns_steps": 6},
            "ns_steps=6 exceeds the 5 Polar Express steps",
        ),
    ],
)
def test_bad_input_gives_one_line_value_errors(params, options, message):
    with pytest.raises(ValueError, match=message) as error:
        Muon(params(), **options)
    assert "\n" not in str(error.value)


def test_a_bad_added_group_is_not_kept():
    opt = Muon([torch.nn.Parameter(torch.zeros(4, 4))])
    with pytest.raises(ValueError, match="splits=3 does not divide"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4, 4))], "splits": 3})
    assert len(opt.param_groups) == 1


def test_trains_tiny_gpt2_with_fused_c_attn_split(tiny_model):
    """Muon on the blocks' matrices (c_attn split in three), AdamW on the rest: the loss on one batch falls."""
    matrices = {n: p for n, p in tiny_model.named_parameters() if p.ndim == 2 and n.startswith("transformer.h.")}
    fused = [p for n, p in matrices.items() if n.endswith("attn.c_attn.weight")]
    plain = [p for n, p in matrices.items() if not n.endswith("attn.c_attn.weight")]
    rest = [p for p in tiny_model.parameters() if all(p is not q for q in matrices.values())]
    muon = Muon([{"params": fused, "splits": 3}, {"params": plain}], lr=3e-3, weight_decay=0.1)
    adamw = torch.optim.AdamW(rest, lr=3e-3)
    idx = torch.randint(0, tiny_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(10):
        _, loss = tiny_model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        for opt in (muon, adamw):
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    assert len(fused) == tiny_model.config.n_layer and losses[-1] < losses[0] - 0.5, losses


def _shared_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One gloo rank: train with and without sharing Newton–Schulz; save both results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for options in ({}, EVERYTHING):
            for name, group in (("alone", None), ("shared", dist.group.WORLD)):
                params, opt = make_optimizer(process_group=group, **options)
                train(params, opt, range(3))
                results[name + ("+options" if options else "")] = [p.detach() for p in params]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_shared_newton_schulz_on_two_gloo_processes_matches_unshared(tmp_path):
    mp.spawn(_shared_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for suffix in ("", "+options"):  # also with NorMuon (its state kept on every rank), cautious decay, per-head blocks
        for a, b, c in zip(r0["alone" + suffix], r0["shared" + suffix], r1["shared" + suffix]):
            assert torch.equal(a, b) and torch.equal(b, c)  # same bits as unshared, on every rank
