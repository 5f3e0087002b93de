"""The optimizer, its one home: which parameters it updates, in which groups, with which settings."""

from __future__ import annotations

import torch
from torch import nn

from gpt2.training.config import TrainingConfig


def build_optimizer(model: nn.Module, cfg: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D parameters (matmul weights, embeddings) and none on biases and
    LayerNorm gains; fused kernels on CUDA, the multi-tensor (foreach) path elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate for the next step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
