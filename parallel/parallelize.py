"""Turn the meta-device model into the trained one: TP → EP → AC → compile → FSDP2 (or DDP), then materialise.

Each ``apply_*`` step is small and documented; ``parallelize`` only decides which ones run. Every
step works on the meta device, so no rank ever holds more than its shard of the weights.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from parallel.expert_parallel import apply_ep
from parallel.mesh import World
from trainkit.config import ACConfig
from trainkit.model import Transformer, materialize, set_param_dtypes
from trainkit.spec import JobSpec

# Tensor parallel plans: module path → style. The residual stream between blocks stays sharded on
# the sequence dimension (sequence parallel); attention and MLP gather it, work on head / hidden
# shards, and reduce-scatter back. The output head leaves logits sharded on the vocabulary for
# loss_parallel, so full logits never exist on one rank.
TP_ROOT_PLAN = {
    "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
    "model.norm": SequenceParallel(),
    "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
}
TP_BLOCK_PLAN = {
    "input_layernorm": SequenceParallel(),
    # forward(x, cos, sin, mask): only x is sharded; RoPE tables and mask cover the whole sequence.
    "self_attn": PrepareModuleInput(
        input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
    ),
    "self_attn.q_proj": ColwiseParallel(),
    "self_attn.k_proj": ColwiseParallel(),
    "self_attn.v_proj": ColwiseParallel(),
    "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
    "post_attention_layernorm": SequenceParallel(),
    "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
    "mlp.gate_proj": ColwiseParallel(),
    "mlp.up_proj": ColwiseParallel(),
    "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
}

# Selective AC keeps what is expensive to recompute (matmuls, attention) and recomputes the rest.
SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.higher_order.flex_attention,  # packed rows on CUDA; visible to the policy under compile=true
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}


def apply_tp(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Shard attention heads and MLP hidden units over ``tp_mesh``; see the plans above."""
    parallelize_module(model, tp_mesh, TP_ROOT_PLAN)
    for block in model.model.layers.values():
        parallelize_module(block, tp_mesh, TP_BLOCK_PLAN)
    model.tie_weights()  # each module was distributed on its own; share the embedding again


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: Transformer, ac: ACConfig) -> None:
    """Wrap blocks so backward recomputes their activations: all, one in ``every_n``, or op-selective."""
    for index, (name, block) in enumerate(model.model.layers.items()):
        if ac.mode == "every_n" and index % ac.every_n != 0:
            continue
        if ac.mode == "selective":
            block = checkpoint_wrapper(
                block, context_fn=partial(create_selective_checkpoint_contexts, _selective_policy)
            )
        else:
            block = checkpoint_wrapper(block)
        model.model.layers[name] = block


def apply_compile(model: Transformer, mode: str) -> None:
    """Compile each block together with its AC wrapper: the compiler sees the checkpointed region and
    recomputes in backward only what backward needs.

    Blocks share one graph (the first block, whose input needs no gradient under adapters, gets a
    second), so compilation costs about one block's time however deep the model is;
    ``Module.compile`` works in place, keeping parameter names, and FSDP2's hooks stay outside the
    graph. Not ``fullgraph``: code the compiler cannot trace runs eagerly instead of failing the job.
    ``mode`` is torch.compile's (``compile_mode``): reduce-overhead replays each block as a CUDA graph.
    """
    for block in model.model.layers.values():
        block.compile(mode=mode)


def activation_offload(ac: ACConfig, device: torch.device):
    """Context for forward + backward: tensors saved for backward live in CPU memory when asked (page-locked
    on CUDA). ``torch.autograd.graph.save_on_cpu``, except that a tensor comes back with its strides: the
    backward of a compiled kernel (flex_attention's, for packed rows) checks them."""
    if not ac.offload:
        return contextlib.nullcontext()
    pin = device.type == "cuda"

    def pack(tensor):
        host = torch.empty_like(tensor, device="cpu", pin_memory=pin)
        host.copy_(tensor)
        return tensor.device, host

    def unpack(packed):
        device, host = packed
        return host.to(device, non_blocking=pin)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def apply_fsdp(model: Transformer, spec: JobSpec, world: World) -> None:
    """Shard each block, then the root (embedding, final norm, head), over the data-parallel mesh.

    Blocks gather their weights just before use and reshard after forward when
    ``reshard_after_forward`` (ZeRO-3-like); the root keeps its weights for the backward that
    starts right after it. With dp_replicate > 1 the mesh is 2-D: HSDP. Expert stacks already
    sharded over the EP ranks are sharded again over the data-parallel ranks left beside them.
    """
    p, dims = spec.cfg.parallel, spec.dims
    compute = None if spec.compute_dtype == spec.param_dtype else spec.compute_dtype
    policies = {
        "mp_policy": MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32),
        "offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if p.cpu_offload else OffloadPolicy(),
        "reshard_after_forward": p.reshard_after_forward,
    }
    replicate = ("dp_replicate",) if dims.dp_replicate > 1 else ()
    dp_mesh = world.mesh[(*replicate, "dp_shard")]
    experts_mesh = world.mesh[(*replicate, "dp_shard_mod_ep")]
    # Experts fewer than the ranks sharding them cannot split on dim 0 (already the EP dim): use dim 1.
    experts_dim = Shard(1) if dims.dp_shard > spec.cfg.model.num_experts else Shard(0)
    for block in model.model.layers.values():
        if dims.ep > 1:
            fully_shard(block.mlp.experts, mesh=experts_mesh, shard_placement_fn=lambda _: experts_dim, **policies)
        fully_shard(block, mesh=dp_mesh, **policies)
    fully_shard(model, mesh=dp_mesh, **{**policies, "reshard_after_forward": False})


def apply_ddp(model: nn.Module, world: World) -> DistributedDataParallel:
    """Replicate the model and all-reduce gradients; construction broadcasts rank 0's weights."""
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, process_group=world.dp_mesh.get_group())


def parallelize(model: Transformer, spec: JobSpec, world: World) -> nn.Module:
    dims = spec.dims
    # Trained weights (and so optimizer states) in param_dtype; frozen ones only feed compute.
    set_param_dtypes(model, trainable=spec.param_dtype, frozen=spec.compute_dtype)
    if dims.tp > 1:
        apply_tp(model, world.mesh["tp"])
    if dims.ep > 1:
        apply_ep(model, world.mesh["ep"])
    if spec.cfg.ac.mode != "none":
        apply_ac(model, spec.cfg.ac)
    if spec.cfg.compile:
        apply_compile(model, spec.cfg.compile_mode)
    if dims.uses_fsdp:
        apply_fsdp(model, spec, world)
    materialize(model, world.device)
    if dims.uses_ddp:
        return apply_ddp(model, world)
    return model


def unwrap(model: nn.Module) -> Transformer:
    """The plain model under whatever wrapper ``parallelize`` (DDP) or the DeepSpeed engine added;
    both keep it as ``.module``."""
    return model if isinstance(model, Transformer) else model.module


def loss_context(spec: JobSpec):
    """Cross-entropy on vocabulary-sharded logits under TP; nothing to do otherwise."""
    return loss_parallel() if spec.dims.tp > 1 else contextlib.nullcontext()
