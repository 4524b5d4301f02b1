"""The DeepSpeed ZeRO engine (stages 1-3, CPU offload) behind the same methods as ``TorchEngine``.

The DeepSpeed config is generated from the job spec, then the user's ``parallel.deepspeed_config``
JSON is merged over it. The loop keeps control of what it already decides: it scales the loss for
the whole global batch (so DeepSpeed must not divide by the accumulation steps again) and says
which micro-batch ends a step (the accumulation boundary), so ``step`` applies exactly once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from parallel.mesh import World
from trainkit.config import ConfigError
from trainkit.optim import build_optimizer, lr_lambda, param_groups
from trainkit.spec import JobSpec

TAG = "deepspeed"  # the checkpoint's subfolder
# DeepSpeed JIT-builds its ops (CPU Adam; on CPU also a shared-memory all-reduce) with the first
# ninja on PATH: put this environment's first, whether or not it was activated.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def merge(base: dict, override: dict) -> dict:
    """``override`` wins key by key; nested dicts merge instead of replacing each other."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = merge(merged[key], value)
        merged[key] = value
    return merged


def deepspeed_config(spec: JobSpec) -> dict:
    """The DeepSpeed config of the job, with ``parallel.deepspeed_config`` merged over it."""
    p, t = spec.cfg.parallel, spec.cfg.train
    offload = {"device": "cpu", "pin_memory": spec.device_type == "cuda"}
    zero = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = offload
    if p.offload_params:
        zero["offload_param"] = offload
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": spec.global_batch_size,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.compute_dtype == torch.bfloat16},
        "fp16": {"enabled": spec.compute_dtype == torch.float16, "loss_scale": 0},  # 0: dynamic loss scale
        "gradient_clipping": spec.cfg.optim.grad_clip,
    }
    if p.deepspeed_config is None:
        return config
    path = Path(p.deepspeed_config)  # the job spec checked that it exists
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"parallel.deepspeed_config={path} is not valid JSON: {err}") from err
    return merge(config, user)


def build_deepspeed_optimizer(model: torch.nn.Module, spec: JobSpec) -> torch.optim.Optimizer:
    """The torch AdamW of the other backends; DeepSpeed's CPU Adam when optimizer states live on the CPU
    (ZeRO-Offload takes no other optimizer)."""
    if not spec.cfg.parallel.offload_optimizer:
        return build_optimizer(model, spec)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    o = spec.cfg.optim
    groups = param_groups(model.parameters(), o.weight_decay)
    return DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)


class DeepSpeedEngine:
    skips_on_device = False  # DeepSpeed clips inside its step, which the loop calls after its checks

    def __init__(self, model: torch.nn.Module, spec: JobSpec, world: World):
        """``model`` whole on every rank; ZeRO shards it over the process group, which for this backend
        is ``world.dp_mesh``'s (``ParallelDims`` allows neither tp nor dp_replicate)."""
        config = deepspeed_config(spec)  # first: a bad user JSON fails before any work
        if not dist.is_initialized():  # a single process has no group yet; DeepSpeed needs one
            os.environ.setdefault("LOCAL_RANK", "0")
            backend = "nccl" if spec.device_type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # DeepSpeed joins the group of its accelerator's backend; on CPU that is ccl when oneccl is
        # installed. Name the group we already have, so it wraps that one instead of making another.
        get_accelerator()._communication_backend_name = dist.get_backend()
        optimizer = build_deepspeed_optimizer(model, spec)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec))
        # The DeepSpeed engine is the module the loop calls: its hooks gather ZeRO-3 shards.
        self.model, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=self.scheduler,  # stepped on each applied step, saved in checkpoints
            config=config,
            dist_init_required=False,
        )

    def set_gradient_sync(self, enabled: bool) -> None:
        """The last micro-batch closes the accumulation: DeepSpeed finishes the gradient reduction
        there, and ``step`` applies the update."""
        self.model.set_gradient_accumulation_boundary(enabled)

    def backward(self, loss: torch.Tensor) -> None:
        # The loop's loss is already a mean over the global batch: no division by accumulation steps.
        self.model.backward(loss, scale_wrt_gas=False)

    def clip_grads(self) -> None:
        """Nothing to do before the step: DeepSpeed clips inside it, and its norm exists only after it."""

    def step(self) -> float:
        """Clip (DeepSpeed's gradient_clipping), step and advance the schedule; returns the norm before clipping."""
        self.model.step()
        return float(self.model.get_global_grad_norm())

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path) -> None:
        """Model, ZeRO optimizer shards and LR schedule, all inside ``folder`` (DeepSpeed writes
        ``<dir>/<tag>/`` plus its zero_to_fp32.py recovery script in ``<dir>``)."""
        self.model.save_checkpoint(folder, tag=TAG, save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.model.load_checkpoint(folder, tag=TAG)
        if path is None:  # DeepSpeed only warns
            raise FileNotFoundError(f"{folder} holds no DeepSpeed checkpoint")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded weights on the CPU with HF names, on rank 0; a collective under ZeRO-3."""
        if self.model.zero_optimization_partition_weights():
            # Gathered one module at a time onto rank 0; the other ranks get None.
            return self.model._zero3_consolidated_16bit_state_dict() or {}
        return {k: v.detach().cpu() for k, v in self.model.module.state_dict().items()}
