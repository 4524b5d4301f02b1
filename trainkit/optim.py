"""AdamW and its learning-rate schedule, shared by every parallel backend."""

from __future__ import annotations

import math

import torch

from trainkit.spec import JobSpec


def lr_lambda(spec: JobSpec):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak (or constant)."""
    o, steps = spec.cfg.optim, spec.cfg.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        progress = (step - o.warmup_steps) / max(1, steps - o.warmup_steps)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on vectors (norms, biases). Empty groups are left out: DeepSpeed drops them, and
    the LR schedule must see the groups the optimizer keeps (adapters alone have no vectors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, spec: JobSpec) -> torch.optim.Optimizer:
    """AdamW over the trained parameters: torch's, with fused kernels on CUDA and foreach elsewhere
    (CPU-offloaded weights step on the CPU); or bitsandbytes' with 8-bit states (``adamw_8bit``),
    which can also page out to CPU memory under pressure (``paged_adamw_8bit``)."""
    o = spec.cfg.optim
    if o.name != "adamw":
        import bitsandbytes as bnb  # only when asked for: it probes the GPU at import

        optimizer = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[o.name]
        return optimizer(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    on_gpu = spec.device_type == "cuda" and not spec.cfg.parallel.cpu_offload
    fused = o.fused if o.fused is not None else on_gpu
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        fused=fused,
        foreach=None if fused else True,
    )
