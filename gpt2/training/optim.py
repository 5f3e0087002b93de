"""The optimizer, its one home: which parameters it updates, in which groups, with which settings.

    adamw   AdamW on every parameter; weight decay on 2-D ones (matmuls, embeddings), none on biases
            and LayerNorm gains (the seed recipe, as GPT-3 and build-nanogpt).
    muon    Muon (gpt2.training.muon) on the 2-D weight matrices inside the Blocks, c_attn's query,
            key and value orthogonalized as three C x C matrices (or every head's query and key on
            its own: muon_split_heads), with NorMuon, cautious weight decay and the Polar Express
            coefficients as options; AdamW on the rest, in three groups with their own learning rate
            and weight decay: the tied token embedding / LM head (also its own beta1), the position
            embeddings, and the biases and LayerNorm parameters.

Every group carries a "name"; its peak learning rate and weight decay (and Muon's momentum) come from
the TrainingConfig at every step (apply_schedule), so the config stays the one source of truth, also
for a resumed run; settings a checkpoint restores instead (betas, NorMuon, ...) must not change on a
resume (gpt2.training.plan.RESUME_FIXED).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gpt2.distributed import get_world_size, is_distributed
from gpt2.training.config import TrainingConfig
from gpt2.training.muon import Muon

QKV_SUFFIX = "attn.c_attn.weight"


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Every trainable parameter of a GPT in exactly one group, chosen by name (tied ones once):
    qkv (each Block's fused c_attn weight), matrices (the Blocks' other 2-D weights), embedding
    (wte = lm_head), position (wpe), scalar (biases, LayerNorm weights and biases)."""
    groups: dict[str, list[nn.Parameter]] = {k: [] for k in ("qkv", "matrices", "embedding", "position", "scalar")}
    for name, p in model.named_parameters():  # yields the tied wte/lm_head Parameter once
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            groups["scalar"].append(p)
        elif name.startswith("transformer.h."):
            groups["qkv" if name.endswith(QKV_SUFFIX) else "matrices"].append(p)
        elif name == "transformer.wpe.weight":
            groups["position"].append(p)
        else:
            groups["embedding"].append(p)
    return groups


def group_settings(cfg: TrainingConfig, name: str) -> tuple[float, float]:
    """(peak learning rate, weight decay) of the group called `name` under this config."""
    pick = lambda value, default: default if value is None else value  # noqa: E731
    settings = {
        "decay": (cfg.max_lr, cfg.weight_decay),
        "no_decay": (cfg.max_lr, 0.0),
        "muon_qkv": (cfg.muon_lr, cfg.muon_weight_decay),
        "muon": (cfg.muon_lr, cfg.muon_weight_decay),
        "embedding": (pick(cfg.embedding_lr, cfg.max_lr), pick(cfg.embedding_weight_decay, cfg.weight_decay)),
        "position": (pick(cfg.position_lr, cfg.max_lr), pick(cfg.position_weight_decay, cfg.weight_decay)),
        "scalar": (pick(cfg.scalar_lr, cfg.max_lr), cfg.scalar_weight_decay),
    }
    return settings.get(name, settings["decay"])  # groups of checkpoints older than names: AdamW's


def build_optimizer(model: nn.Module, cfg: TrainingConfig, device: torch.device) -> Any:
    """The optimizer of `cfg.optimizer` over `model`'s parameters (see the module docstring)."""
    if cfg.optimizer == "muon":
        return _muon(parameter_groups(model), cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]  # in model order: the checkpoint format's
    adamw_groups = [
        {"name": "decay", "params": [p for p in params if p.dim() >= 2]},
        {"name": "no_decay", "params": [p for p in params if p.dim() < 2]},
    ]
    return _adamw(adamw_groups, cfg, device)


def _adamw(groups: list[dict[str, Any]], cfg: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW: fused kernels on CUDA, the multi-tensor (foreach) path elsewhere."""
    for group in groups:
        group["lr"], group["weight_decay"] = group_settings(cfg, group["name"])
        if group["name"] == "embedding" and cfg.embedding_beta1 is not None:
            group["betas"] = (cfg.embedding_beta1, cfg.beta2)  # a head-like beta1 for the tied LM head
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def qkv_splits(cfg: TrainingConfig) -> int | tuple[int, ...]:
    """The row blocks of c_attn's (3C, C) weight that Muon orthogonalizes separately: the whole matrix,
    the query, key and value matrices, or every head's query and key and the value matrix."""
    if not cfg.muon_split_qkv:
        return 1
    if not cfg.muon_split_heads:
        return 3
    model = cfg.model_config()
    return (model.head_dim,) * 2 * model.n_head + (model.n_embd,)


def _muon(groups: dict[str, list[nn.Parameter]], cfg: TrainingConfig, device: torch.device) -> MuonAdamW:
    matrices = [{"name": "muon_qkv", "params": groups["qkv"], "splits": qkv_splits(cfg)}]
    matrices.append({"name": "muon", "params": groups["matrices"]})
    for group in matrices:
        group["lr"], group["weight_decay"] = group_settings(cfg, group["name"])
    # Under DDP every rank holds the same gradients: each orthogonalizes 1/W of the matrices and
    # broadcasts them (the same bits as doing all of them everywhere).
    shared = dist.group.WORLD if is_distributed() and get_world_size() > 1 else None
    adjust = None if cfg.muon_adjust_lr == "none" else cfg.muon_adjust_lr
    muon = Muon(
        matrices,
        lr=cfg.muon_lr,
        momentum=cfg.muon_momentum,
        nesterov=cfg.muon_nesterov,
        adjust_lr=adjust,
        normuon=cfg.muon_normuon,
        beta2=cfg.muon_normuon_beta2,
        cautious_wd=cfg.muon_cautious_wd,
        ns_coefficients=cfg.muon_ns_coefficients,
        process_group=shared,
    )
    rest = [{"name": name, "params": groups[name]} for name in ("embedding", "position", "scalar")]
    return MuonAdamW(muon, _adamw(rest, cfg, device))


class MuonAdamW:
    """Muon and AdamW stepped as one optimizer: one param_groups list (for the schedule and for
    clipping), one state_dict {"muon": ..., "adamw": ...}, zero_grad and step of both."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw
        self.optimizers = (muon, adamw)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("the checkpoint's optimizer state is not Muon + AdamW; resume with --optimizer adamw")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def optimizers_of(optimizer: Any) -> tuple[torch.optim.Optimizer, ...]:
    """The torch optimizers inside (MuonAdamW holds two; a plain optimizer is itself)."""
    return tuple(getattr(optimizer, "optimizers", (optimizer,)))


def apply_schedule(optimizer: Any, cfg: TrainingConfig, factor: float, momentum: float | None = None) -> None:
    """Set every group's learning rate to its peak times `factor`, and its weight decay, from `cfg`;
    Muon's momentum to `momentum` (its warmup's value at this step) when given."""
    for group in optimizer.param_groups:
        name = group.get("name", "decay" if group["weight_decay"] else "no_decay")
        peak, decay = group_settings(cfg, name)
        group["lr"], group["weight_decay"] = peak * factor, decay
        if momentum is not None and name.startswith("muon"):
            group["momentum"] = momentum
