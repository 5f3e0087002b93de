"""Muon: momentum SGD whose update of each weight matrix is orthogonalized by Newton–Schulz.

For every 2-D parameter W (A x B), one step is (Keller Jordan, https://kellerjordan.github.io/posts/muon/;
Liu et al., "Muon is scalable for LLM training", https://arxiv.org/abs/2502.16982):

    m  <- mu m + (1 - mu) g                         momentum buffer, as an EMA (Keller's and torch's form)
    u  <- (1 - mu) g + mu m   (Nesterov)  or  m
    O  <- NS5(u)                                    ~ U V^T of u = U S V^T, singular values pushed into ~[0.7, 1.2]
    W  <- W (1 - lr wd) - adjusted_lr O              decoupled decay uses the unadjusted lr (as Moonshot and torch)

Split matrices: a parameter may be a stack of `splits` equal row blocks, each orthogonalized (and its lr adjusted)
on its own. GPT-2's fused `attn.c_attn.weight` is (3C, C) = [W_q; W_k; W_v]: give it a group with `splits=3` so
the query, key and value matrices are three C x C problems, as they would be unfused. `torch.optim.Muon`
(PyTorch >= 2.9) cannot do this, which is why this module exists. Other differences from it:
- `adjust_lr=None` means no adjustment here; torch's `adjust_lr_fn=None` means its "original" (our "spectral").
- Newton–Schulz runs in `ns_dtype` (bf16 on CUDA, fp32 elsewhere); torch always uses bf16, even on CPU.
- Normalization is X / (||X||_F + eps) (Keller's); torch's is X / max(||X||_F, eps): they differ only when
  ||X||_F is near eps. With `ns_dtype=torch.bfloat16` the two optimizers agree bit for bit (tested).
- Optional sharing of the Newton–Schulz work over a process group (below); torch has none.

Muon is for the hidden weight matrices; embeddings, the tied head, biases and LayerNorm gains belong to AdamW.
It needs whole matrices: under FSDP each rank would orthogonalize only its shard, so use it with DDP (or one GPU).
Every rank holding the same (all-reduced) gradients applies the same update: nothing here is random or per-rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller's quintic: steepest slope at 0 that still lands in ~[0.7, 1.2]
ADJUST_LR = ("match_rms_adamw", "spectral", None)

# Each group option and what it must satisfy; a failure is a one-line ValueError naming both.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: v >= 0, "must be >= 0"),
    "momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "nesterov": (lambda v: isinstance(v, bool), "must be True or False"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "ns_steps": (lambda v: isinstance(v, int) and v >= 1, "must be an int >= 1"),
    "eps": (lambda v: v > 0, "must be > 0"),
    "adjust_lr": (lambda v: v in ADJUST_LR, f"must be one of {ADJUST_LR}"),
    "ns_dtype": (lambda v: v is None or (isinstance(v, torch.dtype) and v.is_floating_point), "must be a float dtype"),
    "splits": (lambda v: isinstance(v, int) and v >= 1, "must be an int >= 1"),
}


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthogonalize each matrix of a stack: (k, A, B) -> (k, A, B) in `dtype`, ~U V^T of each g[i] = U S V^T.

    The quintic overshoots on purpose (fewer steps), so singular values end in ~[0.7, 1.2], not at 1.
    """
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # (k, B, A): iterate on the wide side, so the Gram matrix is the smaller B x B
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # ||X||_2 <= ||X||_F, so every singular value is <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (k, m, m)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X
    return (x.mT if tall else x).contiguous()


def adjusted_lr(lr: float, adjust: str | None, rows: int, cols: int) -> float:
    """The lr that scales an orthogonalized rows x cols update (every singular value ~1, so its RMS is ~1/sqrt(max))."""
    if adjust == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))  # update RMS ~0.2, AdamW's, so AdamW's lr and wd carry over
    if adjust == "spectral":
        return lr * math.sqrt(max(1.0, rows / cols))  # Keller's "original": same spectral-norm change per input
    return lr


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """The dtype Newton–Schulz runs in on `device` when a group's ns_dtype is None.

    bf16 on CUDA: tensor cores make its 15 matmuls cheap, and the quintic tolerates bf16 (it only needs singular
    values in a band). fp32 elsewhere: CPU bf16 matmuls are slow, and fp32 keeps the CPU tests exact.
    """
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_group(group: dict[str, Any]) -> None:
    """Raise a one-line ValueError for an option, or a parameter, that Muon cannot use."""
    for key, (ok, need) in _RULES.items():
        if not ok(group[key]):
            raise ValueError(f"Muon: {key}={group[key]!r} {need}")
    k = group["splits"]
    for p in group["params"]:
        if p.ndim != 2:
            raise ValueError(f"Muon: a parameter of shape {tuple(p.shape)} is not 2-D (optimize it with AdamW)")
        if p.size(0) % k:
            raise ValueError(f"Muon: splits={k} does not divide the {p.size(0)} rows of a {tuple(p.shape)} parameter")


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters; every option is also a param-group option (see the module docstring).

    `splits` (default 1) declares each parameter of a group a stack of that many equal row blocks, orthogonalized
    separately: `Muon([{"params": c_attn_weights, "splits": 3}, {"params": other_matrices}], lr=...)`.
    `process_group` (optional) shares the Newton–Schulz work: rank r of W orthogonalizes matrices r, r+W, ...
    and broadcasts them. Results are the same bits as without it; every rank must step the same parameters.
    State per parameter is its momentum buffer only, so `state_dict()` round-trips exactly. A step holds one update
    and one orthogonalized copy of every matrix at once (sharing needs them together): ~2x the matrices' memory.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        eps: float = 1e-7,
        adjust_lr: str | None = "match_rms_adamw",
        ns_dtype: torch.dtype | None = None,
        splits: int = 1,
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps)
        defaults.update(eps=eps, adjust_lr=adjust_lr, ns_dtype=ns_dtype, splits=splits)
        self.process_group = process_group
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, checked (the base class also calls this from __init__); a bad one is not kept."""
        super().add_param_group(param_group)
        try:
            check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient, in group order (the same order on every rank).

        Launch-bound on a GPU if done matrix by matrix (GPT-2 124M: 48 matrices x ~20 small kernels), so
        the work is batched: one multi-tensor momentum update per group, one Newton-Schulz per stack of
        same-shaped blocks (all 768 x 768 ones of every layer together), one multi-tensor update per lr.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        jobs = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not jobs:
            return loss
        updates = self._momentum(jobs)
        orthogonal = self._orthogonalize(jobs, updates)
        self._apply(jobs, orthogonal)
        return loss

    def _momentum(self, jobs: list[tuple[Tensor, dict[str, Any]]]) -> list[Tensor]:
        """Advance every momentum buffer; return each parameter's (Nesterov) update as
        (splits, A / splits, B) row blocks."""
        out: list[Tensor] = []
        for group in self.param_groups:
            mine = [p for p, g in jobs if g is group]
            if not mine:
                continue
            for p in mine:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            bufs, grads, mu = (
                [self.state[p]["momentum_buffer"] for p in mine],
                [p.grad for p in mine],
                group["momentum"],
            )
            torch._foreach_lerp_(bufs, grads, 1 - mu)
            updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
            out += [u.reshape(group["splits"], -1, p.size(1)) for u, p in zip(updates, mine)]
        return out

    def _orthogonalize(self, jobs: list[tuple[Tensor, dict[str, Any]]], updates: list[Tensor]) -> list[Tensor]:
        """Newton-Schulz of every update, one call per stack of blocks of the same shape and settings;
        with a process group, stack i is done on rank i % W and broadcast (the same bits either way).
        Returns each parameter's orthogonalized update in the parameter's dtype, shaped like it."""
        world, rank = 1, 0
        if self.process_group is not None:
            world, rank = dist.get_world_size(self.process_group), dist.get_rank(self.process_group)
        stacks: dict[tuple, list[int]] = {}
        for i, ((p, group), u) in enumerate(zip(jobs, updates)):
            key = (tuple(u.shape[1:]), group["ns_steps"], group["eps"], group["ns_dtype"] or default_ns_dtype(p.device))
            stacks.setdefault(key, []).append(i)
        out: list[Tensor | None] = [None] * len(jobs)
        works = []
        for n, ((_, steps, eps, dtype), members) in enumerate(stacks.items()):
            stack = torch.cat([updates[i] for i in members])  # (blocks, A, B)
            mine = n % world == rank
            result = newton_schulz(stack, steps, eps, dtype) if mine else torch.empty_like(stack, dtype=dtype)
            if world > 1:
                src = dist.get_global_rank(self.process_group, n % world)
                works.append(dist.broadcast(result, src, group=self.process_group, async_op=True))
            for i, block in zip(members, result.split([updates[i].size(0) for i in members])):
                out[i] = block
        for work in works:
            work.wait()
        return [o.to(p.dtype).view(p.shape) for o, (p, _) in zip(out, jobs)]

    def _apply(self, jobs: list[tuple[Tensor, dict[str, Any]]], orthogonal: list[Tensor]) -> None:
        """p <- p (1 - lr wd) - adjusted_lr O, as multi-tensor ops over parameters that share both factors."""
        by_factors: dict[tuple[float, float], list[int]] = {}
        for i, (p, group) in enumerate(jobs):
            rows, cols = p.size(0) // group["splits"], p.size(1)
            decay = 1 - group["lr"] * group["weight_decay"]
            by_factors.setdefault((decay, adjusted_lr(group["lr"], group["adjust_lr"], rows, cols)), []).append(i)
        for (decay, lr), members in by_factors.items():
            params = [jobs[i][0] for i in members]
            if decay != 1:
                torch._foreach_mul_(params, decay)
            torch._foreach_add_(params, [orthogonal[i] for i in members], alpha=-lr)
