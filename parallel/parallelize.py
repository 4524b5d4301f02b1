"""Turn the meta-device model into the trained one: materialise it, then apply each parallelism.

Each ``apply_*`` step is small and documented; ``parallelize`` only decides which ones run.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from parallel.mesh import World
from trainkit.model import Transformer, materialize
from trainkit.spec import JobSpec


def apply_ddp(model: nn.Module, world: World) -> DistributedDataParallel:
    """Replicate the model and all-reduce gradients; construction broadcasts rank 0's weights."""
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def parallelize(model: Transformer, spec: JobSpec, world: World) -> nn.Module:
    # Weights (and so optimizer states) in precision.param_dtype; autocast computes in compute_dtype.
    materialize(model, world.device, spec.param_dtype)
    if world.size > 1:
        return apply_ddp(model, world)
    return model


def unwrap(model: nn.Module) -> Transformer:
    """The plain model under whatever parallel wrapper ``parallelize`` added."""
    return model.module if isinstance(model, DistributedDataParallel) else model
