"""AdamW and its learning-rate schedule, shared by every parallel backend."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

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


def param_groups(params: Iterable[torch.Tensor], weight_decay: float) -> list[dict]:
    """The trained ones of ``params``, no weight decay on vectors (norms, biases). Empty groups are left
    out: DeepSpeed drops them, and the LR schedule must see the groups the optimizer keeps (adapters
    alone have no vectors)."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class TritonAdamW(torch.optim.AdamW):
    """torch's fused AdamW with one Triton kernel per parameter for the update
    (``trainkit.triton_kernels.adamw_step``): torch's float32 arithmetic but for fast square roots and
    divisions (bf16 results within one ulp of torch's), at memory speed: 14 bytes moved per bf16
    parameter, where torch's moves 16 (it writes the unscaled gradient back when clipping) and is
    bound by its IEEE divisions. Its state is torch's fused layout (``step`` a float32 tensor beside the parameter,
    ``exp_avg`` / ``exp_avg_sq`` in the parameter's dtype), so checkpoints go both ways; it honours
    ``grad_scale`` and ``found_inf`` as torch's fused optimizer does (the engine's clipping and
    skipping, or a GradScaler's). Any device where triton runs (its interpreter on CPU in the tests);
    ``build_optimizer`` picks it on CUDA. Plain dense tensors only: FSDP / TP (DTensor) keep torch's."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        # fused=True is the state layout (float32 step tensor on the parameter's device) and AMP scaling
        # inside the step; torch's fused kernel itself never runs: step() is ours.
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._adopt(self.param_groups[-1])

    def __setstate__(self, state: dict) -> None:
        """Also what ``load_state_dict`` ends with: a checkpoint of torch's foreach AdamW keeps its steps
        on the CPU and its groups unfused; the kernel reads the step beside the parameter."""
        super().__setstate__(state)
        for group in self.param_groups:
            self._adopt(group)
            for p in group["params"]:
                if "step" in self.state.get(p, {}):
                    self.state[p]["step"] = self.state[p]["step"].to(p.device, torch.float32)

    @staticmethod
    def _adopt(group: dict) -> None:
        """Refuse in one line what the kernel does not do; the group's state is torch's fused layout."""
        unsupported = [name for name in ("amsgrad", "maximize", "differentiable") if group[name]]
        if unsupported:
            raise ValueError(f"TritonAdamW does not do {' or '.join(unsupported)}: use torch.optim.AdamW")
        if isinstance(group["lr"], torch.Tensor):
            raise ValueError("TritonAdamW takes lr as a float, not a tensor")
        for p in group["params"]:
            if isinstance(p, DTensor):
                raise ValueError("TritonAdamW takes plain tensors: DTensor parameters (FSDP / TP) need torch's AdamW")
            if p.is_complex() or not p.is_contiguous():
                raise ValueError(f"TritonAdamW takes contiguous real parameters, not {p.dtype} of strides {p.stride()}")
        group["fused"] = True

    @torch.no_grad()
    def step(self, closure=None):
        from trainkit.triton_kernels import adamw_step  # triton only once a step runs: see conftest

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            # torch's own: skips grad None, refuses sparse grads, creates the state on first use
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, [], steps)
            if not params:
                continue
            # As torch's fused step: the count advances before the update and goes back where it was skipped.
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            for tensors in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
                adamw_step(
                    *tensors,
                    grad_scale,
                    found_inf,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                )
            if found_inf is not None:
                torch._foreach_sub_(steps, [found_inf] * len(steps))
        return loss


# TritonAdamW launches a kernel per tensor (~25 us of host time each); torch's fused kernel steps many
# tensors per launch. Per-tensor launches pay where tensors are large (the 1B's average 8.5 M elements),
# not for adapters (an 8B's LoRA matrices average 65 k elements in ~450 tensors).
TRITON_ADAMW_MIN_MEAN_NUMEL = 2**20


def build_optimizer(model: torch.nn.Module, spec: JobSpec) -> torch.optim.Optimizer:
    """AdamW over the trained parameters: ``TritonAdamW`` on CUDA for plain tensors (one process,
    DDP) of ``TRITON_ADAMW_MIN_MEAN_NUMEL`` elements on average, torch's fused kernels for smaller
    ones, DTensors (FSDP / TP) and under DeepSpeed, foreach elsewhere
    (CPU-offloaded weights step on the CPU); or bitsandbytes' with 8-bit states (``adamw_8bit``),
    which can also page out to CPU memory under pressure (``paged_adamw_8bit``)."""
    o = spec.cfg.optim
    groups = param_groups(model.parameters(), o.weight_decay)
    if o.name != "adamw":
        import bitsandbytes as bnb  # only when asked for: it probes the GPU at import

        optimizer = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[o.name]
        return optimizer(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    on_gpu = spec.device_type == "cuda" and not spec.cfg.parallel.cpu_offload
    fused = o.fused if o.fused is not None else on_gpu
    options = {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps}
    params = [p for g in groups for p in g["params"]]
    plain = spec.dims.backend == "torch" and not any(isinstance(p, DTensor) for p in params)
    large = sum(p.numel() for p in params) >= TRITON_ADAMW_MIN_MEAN_NUMEL * len(params)
    if fused and on_gpu and plain and large:
        return TritonAdamW(groups, **options)
    return torch.optim.AdamW(groups, **options, fused=fused, foreach=None if fused else True)
