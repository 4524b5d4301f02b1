"""The step machinery the loop drives, one class per backend: gradient sync, backward, step, state.

``TorchEngine`` drives the models ``parallelize`` returns (single process, DDP, FSDP2, TP, EP): a
torch optimizer, an LR schedule, a grad scaler, and DCP-ready state dicts. The DeepSpeed engine in
``parallel.deepspeed_engine`` offers the same methods. The loop calls, per optimizer step:
``set_gradient_sync`` and ``backward`` for each micro-batch, then ``clip_grads`` and ``step`` (or
``skip``, which the job spec never asks of DeepSpeed: it cannot drop a step's gradients); and ``model``
for forward passes, ``save`` / ``load`` for checkpoints, ``full_state_dict`` for the HF export.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from parallel.expert_parallel import clip_grad_norm_, grad_norm
from parallel.mesh import World
from trainkit.moe import Experts
from trainkit.optim import build_optimizer, lr_lambda
from trainkit.spec import JobSpec


def build_engine(model: torch.nn.Module, spec: JobSpec, world: World):
    """The engine of ``parallel.backend`` around the parallelized, materialised model."""
    if spec.dims.backend == "deepspeed":
        from parallel.deepspeed_engine import DeepSpeedEngine  # deepspeed imports slowly; load it on demand

        return DeepSpeedEngine(model, spec, world)
    return TorchEngine(model, spec)


class TorchEngine:
    def __init__(self, model: torch.nn.Module, spec: JobSpec):
        self.model = model
        self.spec = spec
        # Expert-parallel gradients arrive summed over the EP ranks (the all-to-all backward), while
        # FSDP averages only over the dp / ep ranks beside them: 1 / ep makes it a dp average too.
        self.expert_params = [p for m in model.modules() if isinstance(m, Experts) for p in m.parameters()]
        # Adapter runs checkpoint what trains; the frozen base comes back from model.source on resume.
        adapters = spec.cfg.peft.method != "none"
        self.state_options = StateDictOptions(ignore_frozen_params=adapters, strict=not adapters)
        self.optimizer = build_optimizer(model, spec)
        # Walking a large model's module tree each step costs milliseconds of idle GPU; what trains is fixed.
        self.trained = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(spec))
        self.scaler = torch.amp.GradScaler(spec.device_type, enabled=spec.cfg.precision.grad_scaler)
        # Fused AdamW on plain tensors (one process, DDP) clips and skips inside its own kernel: it
        # divides the gradients by ``grad_scale`` and changes nothing where ``found_inf`` is set. The
        # update is then queued before the step's one synchronisation (the GPU does not idle while the
        # host decides) and clipping needs no pass of its own. Not under a grad scaler, which sets both.
        # ``TritonAdamW`` (CUDA) is one: an AdamW subclass with torch's fused layout and these two inputs.
        self.skips_on_device = bool(
            self.optimizer.defaults.get("fused")
            and isinstance(self.optimizer, torch.optim.AdamW)
            and not self.scaler.is_enabled()
            and not any(isinstance(p, DTensor) for p in self.trained)
        )

    def set_gradient_sync(self, enabled: bool) -> None:
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
        if isinstance(self.model, DistributedDataParallel):
            self.model.require_backward_grad_sync = enabled
        elif isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(enabled)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def clip_grads(self) -> torch.Tensor:
        """Unscale and clip (``grad_clip`` 0: measure only; with ``skips_on_device`` the optimizer
        clips); returns the global gradient norm before clipping, left on the device so that the loop
        reads it with the loss in one synchronisation."""
        self.scaler.unscale_(self.optimizer)
        if self.spec.dims.ep > 1:
            torch._foreach_div_([p.grad for p in self.expert_params], self.spec.dims.ep)
        clip = self.spec.cfg.optim.grad_clip
        if not self.skips_on_device:
            return clip_grad_norm_(self.trained, clip if clip > 0 else math.inf)
        norm = grad_norm(self.trained)
        if clip > 0:  # clip_grads_with_norm_'s factor min(1, clip / (norm + 1e-6)), as a divisor
            self.optimizer.grad_scale = ((norm.float() + 1e-6) / clip).clamp(min=1.0)  # the kernel reads float32
        return norm

    def step(self, skip_if: torch.Tensor | None = None) -> None:
        """Apply the clipped gradients and advance the schedule. ``skip_if`` (``skips_on_device`` only):
        a boolean on the device; where true the update changes no weight and no optimizer state."""
        if skip_if is not None:
            self.optimizer.found_inf = skip_if.float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        """Drop this step's gradients: no update, nothing carried into the next step. The schedule
        advances as after an update (as ``step(skip_if)`` does): the learning rate follows the step count."""
        if self.scaler.is_enabled():
            self.scaler.update()  # closes the step clip_grads unscaled; the scale reacts as to an overflow
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.state_options)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def save(self, folder: Path) -> None:
        """DCP shards of model, optimizer, schedule and scaler; every rank writes its own part."""
        dcp.save(self._state(), checkpoint_id=folder)

    def load(self, folder: Path) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=folder)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=self.state_options,
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded weights on the CPU, HF names; a collective, every rank must call it."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)
