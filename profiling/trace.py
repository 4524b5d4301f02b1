"""Trace one micro-batch of a few-layer prototype of the job's model and record every allocation.

The prototype is the job's own model (``trainkit.model``, peft / bitsandbytes adapters, the tensor-
and expert-parallel plans, the activation-checkpointing wrappers) with ``m`` layers instead of L,
built at the local shapes one rank sees, under ``FakeTensorMode``: shapes and dtypes are real, no
memory is touched. Its forward and backward run through ``Trainer._loss_sum`` and an autograd
backward like the trainer's, while ``Recorder`` (the fake tensor mode itself) notes each storage an
op creates and, through a weak reference, when it dies. Markers split the event stream into
segments: the embedding, each layer's forward and backward, the head (final norm and loss) and the
autocast exit. ``profiling.simulator`` then repeats the layer segments L times.

The trace runs on the CPU, so the few things that differ on a CUDA device are emulated here, each
checked against torch 2.11 on an H100 (``results/memory_validation.jsonl``):

* attention takes the backend torch picks on a Hopper GPU (cuDNN for 16-bit inputs, memory-efficient
  for float32, the math path for float32 with grouped-query heads; flex_attention for packed rows)
  with its saved tensors, and the kernels' backward workspaces are allocated around the backward;
* trainkit's NF4 matmul (QLoRA) holds its dequantized weight while it runs;
* routing is uniform for mixture-of-experts layers: data-dependent sizes (expert counts, capacity
  masks, all-to-all splits) are the even share.

Autocast runs as CPU autocast: for every op this model uses, its casts equal CUDA autocast's,
including the cache of low-precision copies of float32 weights that lives until autocast exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
import weakref
from dataclasses import dataclass
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from parallel.parallelize import apply_ac, apply_tp, loss_context
from trainkit.model import build_model, set_param_dtypes
from trainkit.spec import JobSpec


@dataclass(frozen=True)
class Prototype:
    """How the L real layers map onto the m traced ones.

    Layer types repeat with period ``period`` (every_n checkpointing) and only the neighbours of a
    layer matter to its segments, so ``m`` layers (the first and the last, and one of each type in
    between) stand for all L.
    """

    num_layers: int  # L
    traced: int  # m
    period: int

    @classmethod
    def of(cls, num_layers: int, period: int) -> Prototype:
        traced = num_layers
        if num_layers > period + 2:
            traced = period + 2 + (num_layers - period - 2) % period
        return cls(num_layers, traced, period)

    def proto(self, layer: int) -> int:
        """The traced layer whose segments stand for real ``layer``."""
        if self.traced == self.num_layers or layer == 0:
            return layer
        if layer == self.num_layers - 1:
            return self.traced - 1
        return 1 + (layer - 1) % self.period


@dataclass(frozen=True)
class ParamInfo:
    """One parameter as this rank stores it before any sharding by FSDP or ZeRO."""

    in_layer: bool  # a block's (else the root's: embedding, final norm, head)
    shape: tuple[int, ...]  # local shape (tensor- / expert-parallel shard)
    element_size: int  # bytes, in the dtype it has while a layer computes
    trainable: bool
    expert: bool  # an expert stack (its own FSDP group under expert parallelism)
    extra_bytes: tuple[int, ...] = ()  # QLoRA quantization state tensors kept beside it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Trace:
    """Allocation events of one or two micro-batches of the prototype.

    ``segments`` is a list of (name, events, matmul FLOPs, bytes saved to host memory); an event is
    ``uid + 1`` for an allocation and ``-(uid + 1)`` for a free. Per uid: its size, its category (None: decided by
    ``profiling.simulator`` from where it lives and dies), its birth segment and its position among
    that segment's allocations.
    """

    prototype: Prototype
    segments: list[tuple[str, list[int], float, int]]
    sizes: list[int]
    categories: list[str]
    birth: list[int]  # segment index
    order: list[int]  # position among the allocations of its birth segment
    params: list[ParamInfo]  # of layer 0 and of the root


class Recorder(FakeTensorMode):
    """The fake tensor mode of the trace, which also records, while ``recording``, the birth and death
    of every storage created under it, by segment. One mode for both, because ``torch.compile`` runs
    its compiled code only when no dispatch mode other than the fake one is active."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self.recording = False  # off while the model is materialised and a compile warms up
        self._depth = 0  # > 0 inside an op
        self.segments: list[list] = [["start", [], 0.0, 0]]  # name, events, matmul FLOPs, bytes offloaded
        self.sizes: list[int] = []
        self.categories: list[str] = []
        self.birth: list[int] = []
        self.order: list[int] = []
        self._uids = WeakIdKeyDictionary()
        self._allocations_in_segment = 0
        self._pending: list[tuple[int, tuple, int]] = []  # out-of-place gradient sums to settle
        self._alias: dict[int, int] = {}  # a sum's uid -> the summand's storage it would reuse
        self.tracking = True
        self.category = None  # forced category for what is created now (inputs, workspaces)
        self._param_storages: WeakIdKeyDictionary | None = None

    def begin(self, name: str) -> None:
        if not self.recording:
            return
        self._settle_accumulations()
        self.segments.append([name, [], 0.0, 0])
        self._allocations_in_segment = 0

    @contextlib.contextmanager
    def creating(self, category: str):
        previous, self.category = self.category, category
        try:
            yield
        finally:
            self.category = previous

    @contextlib.contextmanager
    def untracked(self):
        """What is created here lives in host memory (offloaded activations)."""
        self.tracking = False
        try:
            yield
        finally:
            self.tracking = True

    def watch_params(self, model: nn.Module) -> None:
        """Casts of these parameters are autocast's cached weight copies."""
        self._param_storages = WeakIdKeyDictionary()
        for p in model.parameters():
            self._param_storages[_local(p).untyped_storage()] = True

    def _track(self, tensor: torch.Tensor, category: str | None) -> None:
        storage = _local(tensor).untyped_storage()
        if storage in self._uids:
            return
        uid = len(self.sizes)
        self._uids[storage] = uid
        self.sizes.append(storage.nbytes())
        self.categories.append(category)
        self.birth.append(len(self.segments) - 1)
        self.order.append(self._allocations_in_segment)
        self._allocations_in_segment += 1
        self.segments[-1][1].append(uid + 1)
        weakref.finalize(storage, self._died, uid)

    def _died(self, uid: int) -> None:
        if self.recording:  # teardown after the micro-batches is no part of the step
            self.segments[-1][1].append(-(self._alias.get(uid, uid) + 1))

    def newest_first(self) -> None:
        """Put the frees of the current segment in reverse order of creation, the newest storage first.

        Leaving autocast empties its cache of weight copies, a hash map keyed by the weights'
        ``TensorImpl`` addresses: the copies die in an order that changed from run to run of the
        trace, and with it the allocator's best fit among equal free blocks, hence ``reserved``. The
        order is as arbitrary on the GPU; this one repeats, and is the order the traces took for the
        configurations whose reserved bytes never varied (selective checkpointing, QLoRA)."""
        events = self.segments[-1][1]
        frees = iter(sorted(e for e in events if e < 0))  # -(uid + 1): the newest uid first
        events[:] = [next(frees) if e < 0 else e for e in events]

    def close(self) -> None:
        self._settle_accumulations()
        self.recording = False

    def _settle_accumulations(self) -> None:
        """Backward sums the gradients a tensor gets from several uses with ``old + new``; the real
        autograd engine adds in place into whichever is no longer referenced elsewhere, which it
        never does for tensor subclasses such as fake tensors. A summand freed right after the sum
        was that unreferenced one: the sum becomes it instead of a new allocation."""
        events = self.segments[-1][1]
        for total, operands, position in self._pending:
            tail = events[position + 1 :]
            reused = next((u for u in operands if u is not None and -(u + 1) in tail), None)
            if reused is None:
                continue
            tail.remove(-(reused + 1))
            events[position:] = tail
            self._alias[total] = reused
            self.categories[reused] = self.categories[total]
        self._pending.clear()

    def mark_gradients(self, model: nn.Module) -> None:
        from trainkit.moe import Experts

        experts = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
        for p in model.parameters():
            uid = None if p.grad is None else self._uids.get(_local(p.grad).untyped_storage())
            if uid is not None:
                uid = self._alias.get(uid, uid)
                self.categories[uid] = "expert_gradients" if id(p) in experts else "gradients"

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._depth:  # ops the fake mode runs inside an op are no allocations
            return super().__torch_dispatch__(func, types_, args, kwargs)
        if not self.recording:
            return self._run(func, types_, args, kwargs)
        self._settle_accumulations()
        # An output sharing an input's storage (a view, an in-place op) allocates nothing, also when
        # that input was never tracked (parameters, made before recording began).
        inputs = WeakIdKeyDictionary(
            {_local(t).untyped_storage(): True for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        )
        out = self._run(func, types_, args, kwargs)
        if out is NotImplemented:  # a tensor subclass (DTensor) runs its local ops, which come back here
            return out
        fresh = [
            t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and _local(t).untyped_storage() not in inputs
        ]
        if fresh and func is torch.ops.aten.add.Tensor and not torch.is_grad_enabled() and self._in_backward():
            operands = tuple(
                self._uids.get(_local(a).untyped_storage()) if isinstance(a, torch.Tensor) else None for a in args[:2]
            )
            uid = len(self.sizes)
            self._track(out, self.category)
            if len(self.sizes) > uid:
                self._pending.append((uid, operands, len(self.segments[-1][1]) - 1))
        elif fresh and self.tracking:
            category = self.category
            if category is None and func is torch.ops.aten._to_copy.default and self._is_param(args[0]):
                category = "autocast_weight_copies"
            for t in fresh:
                self._track(t, category)
        self.segments[-1][2] += _op_flops(func, args)
        return out

    def _run(self, func, types_, args, kwargs):
        """The op on fake tensors, or its emulation of what it does on a GPU."""
        emulated = EMULATED_OPS.get(func)
        self._depth += 1
        try:
            if emulated:
                return emulated(self, func, types_, args, kwargs)
            return super().__torch_dispatch__(func, types_, args, kwargs)
        finally:
            self._depth -= 1

    def _in_backward(self) -> bool:
        return self.segments[-1][0].endswith(".bwd")

    def _is_param(self, t) -> bool:
        return self._param_storages is not None and _local(t).untyped_storage() in self._param_storages


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


ATTENTION_FORWARD = (
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
)
ATTENTION_BACKWARD = (
    torch.ops.aten._scaled_dot_product_cudnn_attention_backward.default,
    torch.ops.aten._scaled_dot_product_efficient_attention_backward.default,
)


def _op_flops(func, args) -> float:
    """Matmul and fused-attention FLOPs (2 per multiply-add), for the step-time model; a causal
    attention computes half its score matrix, its backward 2.5 times the forward's work."""
    if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
        return 2.0 * args[0].numel() * args[1].shape[-1]
    if func is torch.ops.aten.addmm.default:
        return 2.0 * args[1].numel() * args[2].shape[-1]
    if func is torch.ops.aten._grouped_mm.default:
        return 2.0 * args[0].numel() * args[1].shape[-1]
    if func in ATTENTION_FORWARD or func in ATTENTION_BACKWARD:
        backward = func in ATTENTION_BACKWARD
        q, k = (_local(t) for t in (args[1:3] if backward else args[0:2]))
        b, h, s, d = q.shape
        work = 4.0 * b * h * s * k.shape[2] * d / 2  # causal or document-masked: about half
        return work * (2.5 if backward else 1.0)
    return 0.0


# ---------------------------------------------------------------- emulations of CUDA-only behaviour


class UniformRouting:
    """Data-dependent sizes of MoE routing, assuming every expert gets its even share of token-slots."""

    def __init__(self, slots_per_rank: int, kept_slots: int, ep: int):
        self.slots_per_rank = slots_per_rank  # tokens * top_k on this rank
        self.kept_slots = kept_slots  # after the capacity limit
        self.ep = ep


ROUTING: list[UniformRouting] = []  # the active routing oracle, if any


def _bincount(recorder, func, types_, args, kwargs):
    minlength = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
    return args[0].new_zeros(minlength, dtype=torch.int64)


def _boolean_index(recorder, func, types_, args, kwargs):
    source, indices = args
    if not any(i is not None and i.dtype == torch.bool for i in indices):
        return FakeTensorMode.__torch_dispatch__(recorder, func, types_, args, kwargs)
    kept = ROUTING[-1].kept_slots
    return source.new_empty((kept, *source.shape[1:]))


def _scalar(recorder, func, types_, args, kwargs):
    # Only expert-parallel dispatch reads values: the slots sent to / received from each EP rank.
    if not ROUTING:  # fake tensors have no values: this raises
        return FakeTensorMode.__torch_dispatch__(recorder, func, types_, args, kwargs)
    routing = ROUTING[-1]
    return routing.slots_per_rank // routing.ep


def _repeat_interleave(recorder, func, types_, args, kwargs):
    repeats = args[0]
    return repeats.new_empty((ROUTING[-1].kept_slots,))


def _nf4_matmul(recorder, func, types_, args, kwargs):
    """trainkit's NF4 matmul dequantizes inside the op (bitsandbytes' ``dequantize_4bit``): the nested
    absmax in float32 and the weight in x's dtype exist while the matmul runs."""
    named = dict(zip((a.name for a in func._schema.arguments), args))  # by name: robust to the op's signature
    x, absmax_codes, shape = named["x"], named["absmax_codes"], named["shape"]
    scratch = [absmax_codes.new_empty(absmax_codes.shape, dtype=torch.float32), x.new_empty(shape)]
    for t in scratch:  # ops inside a dispatch handler bypass the recording: tracked by hand
        recorder._track(t, "quantization_scratch")
    return FakeTensorMode.__torch_dispatch__(recorder, func, types_, args, kwargs)


EMULATED_OPS = {
    torch.ops.aten.bincount.default: _bincount,
    torch.ops.aten.index.Tensor: _boolean_index,
    torch.ops.aten._local_scalar_dense.default: _scalar,
    torch.ops.aten.repeat_interleave.Tensor: _repeat_interleave,
}


class _Workspace:
    """A kernel workspace held from just before an op's backward until its input gradients exist."""

    def __init__(self, recorder: Recorder, nbytes: int):
        self.recorder, self.nbytes, self.buffer = recorder, nbytes, None


class _AllocateInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, workspace):
        ctx.workspace = workspace
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ws = ctx.workspace
        with ws.recorder.creating("temporaries"):
            ws.buffer = torch.empty(ws.nbytes, dtype=torch.uint8, device=grad.device)
        return grad, None


class _FreeAfterBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, workspace):
        ctx.workspace = workspace
        return q.view_as(q), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        ctx.workspace.buffer = None
        return dq, dk, dv, None


class CudaAttention:
    """``F.scaled_dot_product_attention`` as torch 2.11 runs it on a Hopper GPU, swapped in for the
    trace. A patch of the function rather than a ``TorchFunctionMode``: activation checkpointing
    recomputes inside the autograd engine, where Python function modes are not active."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def __enter__(self):
        self.original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self.attention
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self.original

    def attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if torch.is_autocast_enabled("cpu"):  # autocast casts SDPA's inputs before torch picks a backend
            low = torch.get_autocast_dtype("cpu")
            q, k, v = (t.to(low) if t.dtype != low else t for t in (q, k, v))
        gqa = q.shape[1] != k.shape[1]
        b, h, s, d = (_local(q).shape[i] for i in range(4))
        if attn_mask is not None:
            # Packed rows' document mask: on CUDA trainkit.model attends through flex_attention, one
            # BlockMask per forward (no mask per layer), saving like a fused kernel (output, a float32
            # row statistic); its backward adds one float32 row statistic per query.
            return self._fused(q, k, v, b * h * s * 4, dropout_p, True, scale)
        if q.dtype != torch.float32:
            # cuDNN's backward keeps a float32 dq accumulator and a float32 row statistic per query
            # (measured on the H100: peak - gradients = B*H*S*D*4 + B*H*S*4); with grouped-query heads
            # it also expands dk and dv to the query head count before reducing them.
            workspace = b * h * s * d * 4 + b * h * s * 4
            if gqa:
                workspace += 2 * b * h * s * d * q.element_size()
            return self._fused(q, k, v, workspace, dropout_p, is_causal, scale)
        if gqa:
            return torch.ops.aten._scaled_dot_product_attention_math(
                q, k, v, None, dropout_p, is_causal, None, scale=scale, enable_gqa=True
            )[0]
        # Its backward keeps two float32 row statistics per query until the gradients are copied out.
        q, k, v, ws = self._hold(q, k, v, 2 * b * h * s * 4)
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, dropout_p, is_causal, scale=scale
        )[0]
        return _AllocateInBackward.apply(out, ws)

    def _fused(self, q, k, v, workspace, dropout_p, is_causal, scale):
        """A fused kernel's saved tensors (cuDNN's), with ``workspace`` bytes held around its backward."""
        q, k, v, ws = self._hold(q, k, v, workspace)
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, dropout_p, is_causal, False, scale=scale
        )[0]
        return _AllocateInBackward.apply(out, ws)

    def _hold(self, q, k, v, nbytes):
        ws = _Workspace(self.recorder, nbytes)
        return (*_FreeAfterBackward.apply(q, k, v, ws), ws)


# ---------------------------------------------------------------- the prototype and its micro-batch


def _graph_as_is(graph: torch.fx.GraphModule, example_inputs):
    return make_boxed_func(graph)


# torch.compile as inductor splits forward and backward (its decompositions, its min-cut choice of
# what to save and what to recompute), but running the split graphs op by op instead of generating
# kernels: the saved activations are inductor's; the short-lived buffers of fused pointwise ops show
# up one at a time, a little more transient memory than inductor's kernels keep.
INDUCTOR_PARTITION = aot_autograd(
    fw_compiler=_graph_as_is,
    bw_compiler=_graph_as_is,
    partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"),
    decompositions=select_decomp_table(),
)


class _SegmentMark(torch.autograd.Function):
    """Identity whose backward starts a segment: the gradient of this tensor has just arrived."""

    @staticmethod
    def forward(ctx, x, recorder, name):
        ctx.recorder, ctx.name = recorder, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.recorder.begin(ctx.name)
        return grad, None, None


class MarkedLayer(nn.Module):
    """A layer whose forward and backward open their own segments."""

    def __init__(self, layer: nn.Module, index: int, recorder: Recorder, last: bool):
        super().__init__()
        self.layer, self.index, self.recorder, self.last = layer, index, recorder, last

    def forward(self, x, *rest):
        self.recorder.begin(f"layer{self.index}.fwd")
        if self.index == 0:
            x = _SegmentMark.apply(x, self.recorder, "embed.bwd")
        y = self.layer(x, *rest)
        y = _SegmentMark.apply(y, self.recorder, f"layer{self.index}.bwd")
        if self.last:
            self.recorder.begin("head.fwd")
        return y


def trace_key(spec: JobSpec, micro_batches: int) -> tuple:
    """Everything the trace depends on (the spec fields that shape one rank's micro-batch)."""
    c = spec.cfg
    m = dataclasses.asdict(c.model)
    for unused in ("name", "source", "tokenizer", "init_std", "rope_theta", "rope_scaling", "router_aux_loss_coef"):
        m.pop(unused)
    peft = dataclasses.asdict(c.peft) if c.peft.method != "none" else None
    if peft:
        peft.pop("name"), peft.pop("adapter")
    return (
        tuple(sorted(m.items())),
        c.train.micro_batch_size,
        c.data.seq_len,
        c.data.pack,
        spec.dims.tp,
        spec.dims.ep,
        str(compute_view_dtype(spec)),
        str(spec.compute_dtype),
        (c.ac.mode, c.ac.every_n if c.ac.mode == "every_n" else 0, c.ac.offload),
        tuple(sorted((k, str(v)) for k, v in peft.items())) if peft else None,
        spec.cfg.precision.grad_scaler,
        c.compile,
        micro_batches,
    )


def compute_view_dtype(spec: JobSpec) -> torch.dtype:
    """The dtype trained weights have while a layer computes.

    FSDP2's mixed precision gathers them in the compute dtype, DeepSpeed casts its module to it;
    otherwise they stay in param_dtype (and autocast caches low-precision copies).
    """
    if spec.dims.backend == "deepspeed" and spec.compute_dtype != torch.float32:
        return spec.compute_dtype
    if spec.dims.uses_fsdp:
        return spec.compute_dtype
    return spec.param_dtype


@contextlib.contextmanager
def fake_process_group(tp: int, ep: int):
    """A process group of ``tp * ep`` fake ranks (no communication) and its ("ep", "tp") mesh."""
    if tp * ep == 1:
        yield None
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=tp * ep, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (ep, tp), mesh_dim_names=("ep", "tp"))
    finally:
        dist.destroy_process_group()


def build_prototype(spec: JobSpec, traced_layers: int, mesh, recorder: Recorder) -> nn.Module:
    """The job's model with ``traced_layers`` layers, adapters and parallel plans, on the meta device."""
    cfg = dataclasses.replace(spec.cfg.model, num_layers=traced_layers)
    model = build_model(cfg)
    if spec.cfg.peft.method != "none":
        import bitsandbytes.functional as bnbf

        from lora import apply_adapters

        apply_adapters(model, spec)
        if hasattr(torch.ops.trainkit, "nf4_matmul"):
            EMULATED_OPS[torch.ops.trainkit.nf4_matmul.default] = _nf4_matmul
        if "dynamic" not in bnbf.name2qmap:  # built from Python floats: on real tensors, before fake mode
            bnbf.name2qmap["dynamic"] = bnbf.create_dynamic_map()
    set_param_dtypes(model, trainable=compute_view_dtype(spec), frozen=spec.compute_dtype)
    if spec.dims.tp > 1:
        apply_tp(model, mesh["tp"])
    if spec.dims.ep > 1:
        from parallel.expert_parallel import apply_ep

        apply_ep(model, mesh["ep"])
    if spec.cfg.ac.mode != "none":
        apply_ac(model, spec.cfg.ac)
    if spec.cfg.compile:  # where parallel.parallelize.apply_compile compiles, with inductor's partitioner
        for block in model.model.layers.values():
            block.compile(backend=INDUCTOR_PARTITION)
    layers = model.model.layers
    for name in list(layers):
        index = int(name)
        layers[name] = MarkedLayer(layers[name], index, recorder, last=index == traced_layers - 1)
    return model


def _materialize(model: nn.Module, spec: JobSpec) -> None:
    """Fake storage for every parameter; QLoRA layers get their packed bytes and quantization state."""
    _plain_parameters(model)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights()
    if spec.cfg.peft.method == "qlora":
        from bitsandbytes.nn import Linear4bit

        from lora import qlora

        # lora.qlora's own quantization, minus its final re-wrap of the weight as bitsandbytes'
        # Params4bit subclass, which cannot wrap a fake tensor (FSDP-sharded weights skip it too).
        with mock.patch.object(qlora, "Params4bit", lambda data, **_: nn.Parameter(data, requires_grad=False)):
            for module in model.modules():
                if isinstance(module, Linear4bit):
                    weight = torch.empty(module.out_features, module.in_features, dtype=module.compute_dtype)
                    qlora._quantize_into(module, weight)


def _plain_parameters(model: nn.Module) -> None:
    """Swap every parameter of a ``Parameter`` subclass (bitsandbytes' ``Params4bit``) for a plain
    ``Parameter`` of the same shape, dtype and device, before ``to_empty`` runs on it in fake mode.

    torch 2.11's fake mode takes any tensor subclass but ``Parameter`` itself for one it does not know
    and returns NotImplemented for its ops; ``Params4bit`` has no ``__torch_dispatch__`` of its own to
    take over, so ``empty_like`` failed ("Multiple dispatch failed"). torch 2.13 lets such metadata-only
    ``Parameter`` subclasses through as plain parameters, and ``to_empty`` rebuilt them as plain
    ``Parameter``s anyway: the same model on both. The subclass is rebuilt nowhere else in the trace
    (``_materialize`` keeps ``lora.qlora``'s quantization from re-wrapping)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            # By class: a DTensor parameter passes isinstance(p, nn.Parameter) and must stay.
            if type(p) is not nn.Parameter and issubclass(type(p), nn.Parameter):
                with unset_fake_temporarily():  # a real meta tensor, made without the fake mode
                    plain = torch.empty(p.shape, dtype=p.dtype, device=p.device)
                module._parameters[name] = nn.Parameter(plain, requires_grad=p.requires_grad)


def param_inventory(model: nn.Module) -> list[ParamInfo]:
    """Layer 0's parameters and the root's, as materialised on one rank."""
    from trainkit.moe import Experts

    experts = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    stats = {}
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is not None:
            tensors = [state.absmax, state.code, state.offset]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code]
            stats[id(module.weight)] = tuple(t.untyped_storage().nbytes() for t in tensors if t is not None)
    inventory = []
    for name, p in model.named_parameters():
        in_layer = name.startswith("model.layers.")
        if in_layer and not name.startswith("model.layers.0."):
            continue
        local = _local(p)
        inventory.append(
            ParamInfo(
                in_layer,
                tuple(local.shape),
                local.element_size(),
                p.requires_grad,
                id(p) in experts,
                stats.get(id(p), ()),
            )
        )
    return inventory


class _StandIn:
    """What ``Trainer._loss_sum`` reads of a trainer: the spec, the model and the autocast context."""

    def __init__(self, spec: JobSpec, model: nn.Module, autocast):
        self.spec, self.engine, self._autocast = spec, types.SimpleNamespace(model=model), autocast


def _offload_hooks(recorder: Recorder):
    """``parallel.parallelize.activation_offload``: each saved tensor moves to host memory (untracked) and
    comes back as a fresh device copy when backward unpacks it."""

    def pack(t):
        recorder.segments[-1][3] += t.untyped_storage().nbytes()
        with recorder.untracked():
            return t.clone()

    def unpack(host):
        return host.clone()

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def trace_micro_batches(spec: JobSpec, prototype: Prototype, micro_batches: int) -> Trace:
    """Forward and backward of ``micro_batches`` (1 or 2) micro-batches of the prototype."""
    from trainkit.trainer import Trainer  # the trainer's own loss, so the trace follows it

    recorder = Recorder()
    c = spec.cfg
    b, s = c.train.micro_batch_size, c.data.seq_len
    routing = None
    if c.model.num_experts:
        slots = b * s * c.model.num_experts_per_tok
        kept = slots
        if c.model.capacity_factor > 0:
            kept = min(slots, math.ceil(c.model.capacity_factor * slots / c.model.num_experts) * c.model.num_experts)
        routing = UniformRouting(slots, kept, spec.dims.ep)
    with contextlib.ExitStack() as stack:
        mesh = stack.enter_context(fake_process_group(spec.dims.tp, spec.dims.ep))
        model = build_prototype(spec, prototype.traced, mesh, recorder)
        stack.enter_context(recorder)
        _materialize(model, spec)
        params = param_inventory(model)
        if routing is not None:
            ROUTING.append(routing)
            stack.callback(ROUTING.pop)
        recorder.watch_params(model)
        stack.enter_context(CudaAttention(recorder))

        @contextlib.contextmanager
        def autocast():
            ctx = (
                torch.autocast("cpu", dtype=spec.compute_dtype)
                if spec.compute_dtype != torch.float32
                else contextlib.nullcontext()
            )
            with ctx:
                yield
                recorder.begin("autocast_exit")
            recorder.newest_first()
            recorder.begin("head.fwd_tail")

        standin = _StandIn(spec, model, autocast)
        aux_weight = c.model.router_aux_loss_coef / c.train.grad_accum_steps

        def micro_batch(mb: int) -> None:
            recorder.begin(f"mb{mb}.inputs")
            with recorder.creating("inputs"):
                batch = {name: torch.zeros(b, s, dtype=torch.long) for name in ("input_ids", "labels", "position_ids")}
                batch["document_ids"] = torch.zeros(b, s, dtype=torch.long)
            recorder.begin("embed.fwd")
            offload = _offload_hooks(recorder) if c.ac.offload else contextlib.nullcontext()
            with loss_context(spec), offload:
                loss = Trainer._loss_sum(standin, batch)
                total = loss * (1.0 / (b * s)) + model.moe_aux_loss() * aux_weight
                if c.precision.grad_scaler:
                    total = total * torch.full((), 65536.0)  # GradScaler.scale: times a float32 scale tensor
                recorder.begin("head.bwd")
                total.backward()
            recorder.mark_gradients(model)
            recorder.begin("end")

        if c.compile or spec.dims.tp > 1 or spec.dims.ep > 1:
            # One unrecorded micro-batch first: torch.compile compiles, DTensor fills its sharding
            # caches (whose first-call shape computations allocate nothing on a GPU).
            micro_batch(0)
            model.zero_grad(set_to_none=True)
        recorder.recording = True
        for mb in range(micro_batches):
            micro_batch(mb)
        recorder.close()
    segments = _named_by_micro_batch(recorder.segments)
    return Trace(
        prototype,
        segments,
        recorder.sizes,
        recorder.categories,
        recorder.birth,
        recorder.order,
        params,
    )


def _named_by_micro_batch(segments: list[list]) -> list[tuple[str, list[int], float, int]]:
    """Prefix every segment with the micro-batch it belongs to (``mb0.``, ``mb1.``)."""
    named, prefix = [], "mb0"
    for name, events, flops, offloaded in segments:
        if name.startswith("mb") and name.endswith(".inputs"):
            prefix = name.split(".")[0]
        elif name != "start":
            name = f"{prefix}.{name}"
        named.append((name, events, flops, offloaded))
    return named
