"""Muon: momentum SGD whose update of each weight matrix is orthogonalized by Newton–Schulz.

For every 2-D parameter W (A x B), one step is (Keller Jordan, https://kellerjordan.github.io/posts/muon/;
Liu et al., "Muon is scalable for LLM training", https://arxiv.org/abs/2502.16982):

    m  <- mu m + (1 - mu) g                         momentum buffer, as an EMA (Keller's and torch's form)
    u  <- (1 - mu) g + mu m   (Nesterov)  or  m
    O  <- NS5(u)                                    ~ U V^T of u = U S V^T, singular values pushed into ~[0.7, 1.2]
    O  <- NorMuon(O)                                optional, below
    W  <- W (1 - lr wd) - adjusted_lr O              decoupled decay uses the unadjusted lr (as Moonshot and torch)

Options beyond that (all off by default; each is a param-group option):
- `normuon`: NorMuon (Li et al. 2025, https://arxiv.org/abs/2510.05491): a running second moment v of each neuron
  of the larger side (rows of a tall or square block, columns of a wide one), v <- beta2 v + (1 - beta2) mean(O^2)
  over the smaller side, then O <- O / sqrt(v), rescaled so that ||O||_F is what it was (the form measured in
  modded-nanogpt's record; it keeps the lr's meaning, and the rescale makes a bias correction of v moot).
- `cautious_wd`: cautious weight decay (Chen et al. 2025, "Cautious Weight Decay"): decay only the entries
  where the update and the weight agree in sign, W <- W - lr wd W [O W >= 0] - adjusted_lr O.
- `ns_coefficients = "polar_express"`: Amsel et al. 2025 (https://arxiv.org/abs/2505.16932), a different
  (a, b, c) per iteration, designed for bf16 with a 2% safety margin on the normalization (X / (1.02 ||X||_F)).

Split matrices: a parameter may be a stack of row blocks, each orthogonalized (and its lr adjusted) on its own:
`splits=k` for k equal blocks, or a tuple of block heights. GPT-2's fused `attn.c_attn.weight` is (3C, C) =
[W_q; W_k; W_v]: `splits=3` makes the query, key and value matrices three C x C problems, as they would be
unfused; `splits=(hs,) * 2 * n_head + (C,)` orthogonalizes every head's query and key on its own.
`torch.optim.Muon` (PyTorch >= 2.9) cannot do this, which is why this module exists. Other differences from it:
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
# Polar Express (Amsel et al. 2025): one (a, b, c) per iteration for 5 iterations, computed for bf16 with a 2%
# safety factor (the values modded-nanogpt and nanochat use); with these, X is normalized by 1.02 ||X||_F.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NS_COEFFICIENTS = ("quintic", "polar_express")
ADJUST_LR = ("match_rms_adamw", "spectral", None)
NORMUON_FLOOR = 1e-10  # second moments below this count as this (an all-zero neuron stays zero, not NaN)


def _is_splits(v: Any) -> bool:
    if isinstance(v, int) and not isinstance(v, bool):
        return v >= 1
    return isinstance(v, (tuple, list)) and len(v) > 0 and all(isinstance(r, int) and r >= 1 for r in v)


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
    "splits": (_is_splits, "must be an int >= 1 or a tuple of block heights >= 1"),
    "normuon": (lambda v: isinstance(v, bool), "must be True or False"),
    "beta2": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "cautious_wd": (lambda v: isinstance(v, bool), "must be True or False"),
    "ns_coefficients": (lambda v: v in NS_COEFFICIENTS, f"must be one of {NS_COEFFICIENTS}"),
}


def newton_schulz(
    g: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.float32, coefficients: str = "quintic"
) -> Tensor:
    """Orthogonalize each matrix of a stack: (k, A, B) -> (k, A, B) in `dtype`, ~U V^T of each g[i] = U S V^T.

    The quintic overshoots on purpose (fewer steps), so singular values end in ~[0.7, 1.2], not at 1.
    """
    polar = coefficients == "polar_express"
    schedule = POLAR_EXPRESS[:steps] if polar else (NS_COEFFS,) * steps
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # (k, B, A): iterate on the wide side, so the Gram matrix is the smaller B x B
    norm = x.norm(dim=(-2, -1), keepdim=True)  # ||X||_2 <= ||X||_F, so every singular value is <= 1
    x = x / (norm * 1.02 + eps) if polar else x / (norm + eps)
    for a, b, c in schedule:
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


def block_rows(splits: int | tuple[int, ...], rows: int) -> tuple[int, ...]:
    """The heights of the row blocks that `splits` cuts a parameter of `rows` rows into."""
    if isinstance(splits, int):
        return (rows // splits,) * splits
    return tuple(splits)


def check_group(group: dict[str, Any]) -> None:
    """Raise a one-line ValueError for an option, or a parameter, that Muon cannot use."""
    for key, (ok, need) in _RULES.items():
        if not ok(group[key]):
            raise ValueError(f"Muon: {key}={group[key]!r} {need}")
    if isinstance(group["splits"], list):
        group["splits"] = tuple(group["splits"])  # hashable, and saved as given
    if group["ns_coefficients"] == "polar_express" and group["ns_steps"] > len(POLAR_EXPRESS):
        raise ValueError(f"Muon: ns_steps={group['ns_steps']} exceeds the {len(POLAR_EXPRESS)} Polar Express steps")
    k = group["splits"]
    for p in group["params"]:
        if p.ndim != 2:
            raise ValueError(f"Muon: a parameter of shape {tuple(p.shape)} is not 2-D (optimize it with AdamW)")
        if isinstance(k, int) and p.size(0) % k:
            raise ValueError(f"Muon: splits={k} does not divide the {p.size(0)} rows of a {tuple(p.shape)} parameter")
        if isinstance(k, tuple) and sum(k) != p.size(0):
            raise ValueError(
                f"Muon: splits={k} sum to {sum(k)}, not the {p.size(0)} rows of a {tuple(p.shape)} parameter"
            )
        factors = {adjusted_lr(1.0, group["adjust_lr"], r, p.size(1)) for r in block_rows(k, p.size(0))}
        if len(factors) > 1:
            raise ValueError(
                f"Muon: the blocks {k} of a {tuple(p.shape)} parameter need different lr adjustments; "
                "use blocks no taller than the matrix is wide"
            )


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters; every option is also a param-group option (see the module docstring).

    `splits` (default 1) declares each parameter of a group a stack of row blocks, orthogonalized separately:
    `Muon([{"params": c_attn_weights, "splits": 3}, {"params": other_matrices}], lr=...)`.
    `process_group` (optional) shares the Newton–Schulz work: rank r of W orthogonalizes stacks r, r+W, ...
    and broadcasts them. Results are the same bits as without it; every rank must step the same parameters.
    State per parameter is its momentum buffer (and NorMuon's second moments), so `state_dict()` round-trips
    exactly. A step holds one update and one orthogonalized copy of every matrix at once (sharing needs them
    together): ~2x the matrices' memory.
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
        splits: int | tuple[int, ...] = 1,
        normuon: bool = False,
        beta2: float = 0.95,
        cautious_wd: bool = False,
        ns_coefficients: str = "quintic",
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps)
        defaults.update(eps=eps, adjust_lr=adjust_lr, ns_dtype=ns_dtype, splits=splits, normuon=normuon)
        defaults.update(beta2=beta2, cautious_wd=cautious_wd, ns_coefficients=ns_coefficients)
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
        the work is batched: one multi-tensor momentum update per group, one Newton-Schulz (and NorMuon) per
        stack of same-shaped blocks (all 768 x 768 ones of every layer together), one multi-tensor update per lr.
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
        """Advance every momentum buffer; return each parameter's (Nesterov) update, shaped like it."""
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
            out += torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
        return out

    def _orthogonalize(self, jobs: list[tuple[Tensor, dict[str, Any]]], updates: list[Tensor]) -> list[Tensor]:
        """Newton-Schulz of every row block, one call per stack of blocks of the same shape and settings;
        with a process group, stack i is done on rank i % W and broadcast (the same bits either way); then
        NorMuon on every rank (its state stays the same everywhere). Returns each parameter's orthogonalized
        row blocks (views into the stacks, in Newton-Schulz's dtype, or float32 after NorMuon): the update is
        applied block by block, so no parameter-shaped copy is joined (the step reads and writes each
        matrix's worth of memory as few times as it can: it is memory-bound beside its matmuls)."""
        world, rank = 1, 0
        if self.process_group is not None:
            world, rank = dist.get_world_size(self.process_group), dist.get_rank(self.process_group)
        blocks = [_row_blocks(u, g) for (_, g), u in zip(jobs, updates)]
        stacks: dict[tuple, list[tuple[int, int]]] = {}
        for i, (p, group) in enumerate(jobs):
            dtype = group["ns_dtype"] or default_ns_dtype(p.device)
            options = (group["ns_steps"], group["eps"], dtype, group["ns_coefficients"])
            options += (group["beta2"] if group["normuon"] else None,)
            for j, block in enumerate(blocks[i]):
                stacks.setdefault((tuple(block.shape), *options), []).append((i, j))
        results, works = [], []
        for n, (key, members) in enumerate(stacks.items()):
            _, steps, eps, dtype, coefficients, _ = key
            first = blocks[members[0][0]][members[0][1]]
            stack = torch.empty((len(members), *first.shape), dtype=dtype, device=first.device)  # (blocks, A, B)
            mine = n % world == rank
            if mine:  # cast while stacking: one pass, not a float32 stack and then its bf16 copy
                torch._foreach_copy_(list(stack.unbind(0)), [blocks[i][j] for i, j in members])
            result = newton_schulz(stack, steps, eps, dtype, coefficients) if mine else stack
            if world > 1:
                src = dist.get_global_rank(self.process_group, n % world)
                works.append(dist.broadcast(result, src, group=self.process_group, async_op=True))
            results.append(result)
        for work in works:
            work.wait()
        pieces: list[list[Tensor]] = [list(b) for b in blocks]  # each replaced by its orthogonalized block
        for (key, members), result in zip(stacks.items(), results):
            if key[-1] is not None:
                result = self._normuon(result, members, jobs, key[-1])
            for (i, j), block in zip(members, result):
                pieces[i][j] = block
        return pieces

    def _normuon(self, result: Tensor, members: list[tuple[int, int]], jobs: list, beta2: float) -> Tensor:
        """NorMuon on a stack (k, A, B): each neuron of the larger side divided by the root of its running
        mean square, each block rescaled to its Frobenius norm before. Returns float32 (k, A, B)."""
        dim = -1 if result.size(-2) >= result.size(-1) else -2  # average over the smaller side
        size = result.size(dim)
        # one float32 pass over the stack, and no float32 copy of it (result stays in Newton-Schulz's dtype)
        norms = torch.linalg.vector_norm(result, dim=dim, keepdim=True, dtype=torch.float32)
        mean_sq = norms.square() / size  # (k, A, 1) or (k, 1, B)
        views = [self._second_moment(jobs[i][0], jobs[i][1], j) for i, j in members]
        v = torch.stack(views).view_as(mean_sq)
        v.lerp_(mean_sq, 1 - beta2)
        torch._foreach_copy_(views, list(v.flatten(1).unbind(0)))
        scale = v.clamp_min(NORMUON_FLOOR).rsqrt()
        norm = (mean_sq.sum(dim=(-2, -1), keepdim=True) * size).sqrt()  # ||O||_F of each block
        new_norm = (mean_sq * size * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
        return result * (scale * (norm / new_norm.clamp_min(NORMUON_FLOOR)))  # float32 (type promotion)

    def _second_moment(self, p: Tensor, group: dict[str, Any], j: int) -> Tensor:
        """The view of p's NorMuon state for its block j: one float32 value per neuron of the block's larger side
        (the state is one flat buffer per parameter, block after block)."""
        sizes = [max(r, p.size(1)) for r in block_rows(group["splits"], p.size(0))]
        state = self.state[p]
        if "second_moment" not in state:
            state["second_moment"] = torch.zeros(sum(sizes), dtype=torch.float32, device=p.device)
        return state["second_moment"].narrow(0, sum(sizes[:j]), sizes[j])

    def _apply(self, jobs: list[tuple[Tensor, dict[str, Any]]], orthogonal: list[list[Tensor]]) -> None:
        """p <- p (1 - lr wd) - adjusted_lr O (cautious: p <- p - lr wd p [O p >= 0] - adjusted_lr O), as
        multi-tensor ops over the row blocks of parameters that share the factors. O's blocks may be in a
        lower precision than p: each add reads them as p's dtype (the same bits as converting them first)."""
        by_factors: dict[tuple[float, float, float, bool], list[int]] = {}
        for i, (p, group) in enumerate(jobs):
            rows, cols = block_rows(group["splits"], p.size(0))[0], p.size(1)
            lr_wd, cautious = group["lr"] * group["weight_decay"], group["cautious_wd"]
            key = (1 - lr_wd, adjusted_lr(group["lr"], group["adjust_lr"], rows, cols), lr_wd, cautious)
            by_factors.setdefault(key, []).append(i)
        for (decay, lr, lr_wd, cautious), members in by_factors.items():
            params = [b for i in members for b in _row_blocks(*jobs[i])]
            updates = [o for i in members for o in orthogonal[i]]
            if cautious and lr_wd:
                _cautious_decay(params, updates, lr_wd)
            elif decay != 1:
                torch._foreach_mul_(params, decay)
            torch._foreach_add_(params, updates, alpha=-lr)


def _row_blocks(p: Tensor, group: dict[str, Any]) -> tuple[Tensor, ...]:
    """Views of p's row blocks, as its group's `splits` cuts it."""
    return p.split(block_rows(group["splits"], p.size(0)))


def _cautious_decay(params: list[Tensor], updates: list[Tensor], lr_wd: float) -> None:
    """p <- p - lr_wd p [u p >= 0] for every pair: decay only where the update and the weight agree in sign."""
    mask = torch._foreach_mul(updates, params)
    mask = torch._foreach_sign(mask)  # -1, 0 or 1
    torch._foreach_add_(mask, 1.0)
    torch._foreach_clamp_max_(mask, 1.0)  # 0 where they disagree, else 1
    torch._foreach_mul_(mask, params)
    torch._foreach_add_(params, mask, alpha=-lr_wd)
