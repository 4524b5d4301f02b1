"""Expert parallelism: each rank of the EP group holds num_experts / ep experts of every MoE layer.

The EP ranks are data-parallel ranks: each routes its own tokens. ``MoE`` sorts its token-slots by
expert and hands them to ``Experts``; around that call, an all-to-all sends every slice to the rank
holding its expert and a second one brings the results back, so the rest of the model never knows.
The expert stacks become DTensors sharded on dim 0 (the expert dim) over the EP mesh.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_module, distribute_tensor

from trainkit.config import ConfigError
from trainkit.moe import Experts


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty(sum(recv), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable splits; gradients travel back the way the rows came."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


class ExpertParallel:
    """The token exchange around one ``Experts`` module: ``dispatch`` before it, ``combine`` after."""

    def __init__(self, ep_mesh: DeviceMesh):
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()

    def dispatch(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x, counts = inputs  # x: token-slots grouped by global expert, counts[e] of them for expert e
        # received[r, e]: how many slots rank r sends to our local expert e.
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)
        received = received.view(self.ep, -1)
        self.send = counts.view(self.ep, -1).sum(dim=1).tolist()
        self.recv = received.sum(dim=1).tolist()
        x = AllToAll.apply(x, self.send, self.recv, self.group)
        # Slots arrive grouped by source rank, then expert; regroup them by expert for ``Experts``.
        local_expert = torch.arange(received.numel(), device=x.device) % received.shape[1]
        self.order = local_expert.repeat_interleave(received.flatten()).argsort(stable=True)
        return x[self.order], received.sum(dim=0)

    def combine(self, module: nn.Module, out: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        out = out[self.order.argsort()]  # back to source-rank order
        return AllToAll.apply(out, self.recv, self.send, self.group)


def _shard_experts(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for param_name, param in module.named_parameters(recurse=False):
        module.register_parameter(param_name, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)])))


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts over the 1-D ``ep_mesh`` and route tokens to them by all-to-all.

    Works on a meta-device or a materialised model (then the experts come from the mesh's first rank).
    """
    for experts in [m for m in model.modules() if isinstance(m, Experts)]:
        num_experts = experts.gate_up_proj.shape[0]
        if num_experts % ep_mesh.size():
            raise ConfigError(f"parallel.ep={ep_mesh.size()} does not divide model.num_experts={num_experts}")
        ep = ExpertParallel(ep_mesh)
        distribute_module(experts, ep_mesh, _shard_experts, input_fn=ep.dispatch, output_fn=ep.combine)


def _grads_by_mesh(parameters) -> list[list[nn.Parameter]]:
    by_mesh = defaultdict(list)
    for param in parameters:
        if param.grad is not None:
            by_mesh[param.device_mesh if isinstance(param, DTensor) else None].append(param)
    return list(by_mesh.values())


def _total_norm(groups: list[list[nn.Parameter]]) -> torch.Tensor:
    norms = []
    for params in groups:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    return torch.linalg.vector_norm(torch.stack(norms))


def grad_norm(parameters) -> torch.Tensor:
    """The total L2 norm of the gradients of ``parameters``, also over parameters on different meshes
    (the expert stacks on the EP mesh, the rest on the data-parallel one), which torch's
    ``get_total_norm`` cannot put in one norm; a plain tensor."""
    return _total_norm(_grads_by_mesh(parameters))


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over ``grad_norm``'s meshes; ``max_norm`` inf only measures.
    Returns the total norm before clipping."""
    groups = _grads_by_mesh(parameters)
    total = _total_norm(groups)
    if max_norm < math.inf:
        for params in groups:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
