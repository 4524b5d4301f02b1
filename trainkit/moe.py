"""Mixture-of-experts feed-forward (Mixtral, Qwen2-MoE) used in place of the dense MLP.

Parameter names and layouts equal transformers 5's in-memory ones (``gate.weight``,
``experts.gate_up_proj`` [E, 2 * I, H], ``experts.down_proj`` [E, H, I], ``shared_expert.*``,
``shared_expert_gate.weight``): the expert stacks shard along dim 0 for expert parallelism, and
``trainkit.weights`` maps them to the per-expert tensors of HF checkpoints.

After each forward a ``MoE`` layer keeps its load-balancing loss and how many token-slots it
dropped; ``Transformer.moe_aux_loss`` and ``Transformer.moe_drop_counts`` collect them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from trainkit.config import ModelConfig


def expert_size(cfg: ModelConfig) -> int:
    return cfg.moe_intermediate_size or cfg.intermediate_size


def _grouped_mm(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x[rows of e] @ weights[e].T`` for every expert e, rows ending at ``offsets[e]``, in one kernel.

    Autocast leaves grouped_mm alone, so this applies the autocast dtype itself, as ``F.linear`` would.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weights = x.to(dtype), weights.to(dtype)
    return F.grouped_mm(x, weights.transpose(-2, -1), offs=offsets)


class Experts(nn.Module):
    """SwiGLU experts stacked along dim 0, gate and up projections fused as in transformers."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x`` holds each expert's tokens in one contiguous slice, ``counts[e]`` rows for expert e."""
        # Expert parallelism makes the stacks DTensors; this rank computes its own slice of experts.
        gate_up, down = (p.to_local() if isinstance(p, DTensor) else p for p in (self.gate_up_proj, self.down_proj))
        offsets = counts.cumsum(0, dtype=torch.int32)
        gate, up = _grouped_mm(x, gate_up, offsets).chunk(2, dim=-1)
        return _grouped_mm(F.silu(gate) * up, down, offsets)


class MoE(nn.Module):
    """Top-k routed experts (softmax, then the top-k weights renormalised, as Mixtral), plus an
    optional always-on ``shared_expert`` scaled by a sigmoid gate (Qwen2-MoE)."""

    def __init__(self, cfg: ModelConfig, shared_expert: nn.Module | None = None):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.capacity_factor = cfg.capacity_factor
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, expert_size(cfg))
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if shared_expert is not None else None
        # Set by each forward.
        self.aux_loss: torch.Tensor | None = None
        self.dropped, self.routed = 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.gate(x).float().softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # Token-slots in choice-major order, so every first choice claims capacity before any second choice.
        experts, weights = chosen.T.flatten(), weights.T.flatten()
        counts = torch.bincount(experts, minlength=self.num_experts)
        # Switch / Mixtral load balancing: num_experts * sum_e(fraction of slots to e * mean probability of e).
        self.aux_loss = self.num_experts * (counts / len(x) * probs.mean(dim=0)).sum()
        order = experts.argsort(stable=True)  # slots grouped by expert, each group in slot order
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * len(experts) / self.num_experts)
            rank_in_expert = torch.arange(len(order), device=x.device) - (counts.cumsum(0) - counts)[experts[order]]
            order = order[rank_in_expert < capacity]
            counts = counts.clamp(max=capacity)
        self.dropped, self.routed = len(experts) - len(order), len(experts)
        tokens = order % len(x)
        out = self.experts(x[tokens], counts) * weights[order, None]
        # Dropped slots add nothing: the residual connection carries their tokens through.
        y = torch.zeros_like(x).index_add(0, tokens, out.to(x.dtype))
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.reshape(shape)
