"""Predict one rank's GPU memory over the first training steps of a job spec.

``predict`` traces the job's prototype (``profiling.trace``) once per distinct micro-batch shape and
composes one rank's run from it: the model states the parallel backend keeps (parameters and their
shards, gradients, optimizer states, quantization statistics), the traced layer segments repeated
L times, the backend's working buffers placed where its hooks put them (FSDP2 all-gather and
reduce-scatter buffers with their prefetch and deferred frees, DDP buckets, DeepSpeed ZeRO
partitions and buckets), gradient accumulation, the optimizer step and a second step (the first
with optimizer states). The composed event stream gives ``max_memory_allocated``, the moment of the
peak, a breakdown, a timeline, and ``max_memory_reserved`` through the allocator model.

Every rank of trainkit's plans holds the same amount: FSDP2 and ZeRO pad every shard to one size
(optimizer states are sized on the padded shard, as on rank 0, the fullest), tensor and expert
parallelism split evenly (``ParallelDims`` refuses uneven degrees), and the embedding, head and loss
run on every rank. So one rank is composed and reported for each rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from profiling.allocator import round_size
from profiling.hardware import GPU, MiB
from profiling.program import ALL_GATHER_STREAM, REDUCE_SCATTER_STREAM, Program
from profiling.trace import ParamInfo, Prototype, Trace, compute_view_dtype, trace_key, trace_micro_batches
from trainkit.spec import JobSpec

# cuBLAS keeps one workspace per (handle, stream) in the caching allocator: 32 MiB on Hopper,
# allocated by the first matmul and never freed (measured on the H100: +33,554,432 B allocated).
CUBLAS_WORKSPACE = 32 * MiB
# NCCL's own buffers per communicator, outside torch's allocator: ~0.5 GiB, as Fujii et al.'s
# estimator assumes (arXiv 2411.06465, shared/reference/memory-prediction-prior-art.md).
NCCL_PER_COMMUNICATOR = 512 * MiB
# DDP buckets (torch.nn.parallel.DistributedDataParallel defaults) and its construction-time
# broadcast of rank 0's states in flat chunks.
DDP_BUCKET_BYTES, DDP_FIRST_BUCKET_BYTES, DDP_BROADCAST_BYTES = 25 * MiB, 1 * MiB, 250 * MiB
# DeepSpeed ZeRO's default reduce bucket, in elements (deepspeed/runtime/zero/config.py).
ZERO_REDUCE_BUCKET = 500_000_000
# bitsandbytes 8-bit optimizers: blockwise statistics per 256 elements; parameters under 4,096
# elements keep float32 states; paged states of 100k elements or more live in CUDA managed memory.
BNB_BLOCK, BNB_MIN_8BIT, BNB_MIN_PAGED = 256, 4096, 100_000
# The fit verdict keeps this share of the GPU free: the accuracy bound on reserved memory is 10 %,
# and what nvidia-smi shows beyond it (context, NCCL) is already counted.
SAFETY_MARGIN = 0.05

_TRACES: dict[tuple, Trace] = {}


def cached_trace(spec: JobSpec, micro_batches: int) -> Trace:
    key = trace_key(spec, micro_batches)
    if key not in _TRACES:
        ac = spec.cfg.ac
        prototype = Prototype.of(spec.cfg.model.num_layers, ac.every_n if ac.mode == "every_n" else 1)
        _TRACES[key] = trace_micro_batches(spec, prototype, micro_batches)
    return _TRACES[key]


@dataclass
class RankPrediction:
    rank: int
    peak_allocated: int
    peak_reserved: int
    device_used: int  # what nvidia-smi would show: reserved + CUDA context + NCCL + paged states
    peak_moment: str
    breakdown: dict[str, int]
    timeline: list[tuple[str, int, int]] = field(repr=False)


@dataclass
class Prediction:
    gpu: GPU
    world_size: int
    ranks: list[RankPrediction]
    step_flops: float  # matmul and attention FLOPs of one optimizer step on one rank
    step_allocated_bytes: float  # bytes one optimizer step allocates on one rank (its memory traffic)
    step_offloaded_bytes: float  # activation bytes one step moves to host memory and back
    trained_elements: int  # trained parameters one tensor-parallel rank holds before FSDP / ZeRO sharding
    gathered_bytes: int  # bytes of all its parameters in the compute dtype (what a full gather moves)
    host_bytes: int  # host memory one rank keeps for offloaded states

    @property
    def worst(self) -> RankPrediction:
        return max(self.ranks, key=lambda r: r.device_used)

    @property
    def budget(self) -> int:
        return int(self.gpu.total_memory * (1 - SAFETY_MARGIN))

    @property
    def fits(self) -> bool:
        return self.worst.device_used <= self.budget


def predict(spec: JobSpec, gpu: GPU, reserved: bool = True) -> Prediction:
    """Memory of every rank of ``spec`` on ``gpu``; ``reserved=False`` skips the allocator replay
    (then reserved is taken equal to allocated), for the planner's first pass."""
    composer = StepComposer(spec)
    program = composer.run()
    analysis = program.analyse()
    peak_reserved = program.peak_reserved() if reserved else analysis.peak_allocated
    device_used = peak_reserved + gpu.cuda_context + composer.nccl_bytes() + composer.paged_bytes
    rank = RankPrediction(
        0,
        analysis.peak_allocated,
        peak_reserved,
        device_used,
        analysis.peak_moment,
        analysis.breakdown,
        analysis.timeline,
    )
    ranks = [rank] + [RankPrediction(**{**rank.__dict__, "rank": r}) for r in range(1, spec.world_size)]
    return Prediction(
        gpu,
        spec.world_size,
        ranks,
        composer.step_flops(),
        composer.step_allocated_bytes(),
        composer.step_offloaded_bytes(),
        sum(p.numel for _, g in composer.all_groups() for p in g.trained()),
        sum(p.numel * p.element_size for _, g in composer.all_groups() for p in g.params),
        composer.host_bytes,
    )


@dataclass
class Group:
    """Parameters gathered and reduced together (a layer, its experts, the root) and the number of
    ranks sharding them (1: not sharded)."""

    name: str
    params: list[ParamInfo]
    shards: int

    def local_numel(self, p: ParamInfo) -> int:
        """Elements this rank stores: FSDP2 pads dim 0 to a multiple of the shard count."""
        if self.shards == 1:
            return p.numel
        return math.ceil(p.shape[0] / self.shards) * math.prod(p.shape[1:])

    def gathered_bytes(self) -> int:
        return sum(self.local_numel(p) * self.shards * p.element_size for p in self.params)

    def trained(self) -> list[ParamInfo]:
        return [p for p in self.params if p.trainable]


class StepComposer:
    """One rank's program: model init, then two optimizer steps of grad_accum_steps micro-batches."""

    def __init__(self, spec: JobSpec):
        self.spec, self.cfg, self.dims = spec, spec.cfg, spec.dims
        self.ga = spec.cfg.train.grad_accum_steps
        self.fsdp = self.dims.uses_fsdp
        self.zero = spec.cfg.parallel.zero_stage if self.dims.backend == "deepspeed" else 0
        # Micro-batches after the first find gradients already there (accumulated in place) except
        # under FSDP2, whose hooks take them off the parameters after every backward.
        self.trace = cached_trace(spec, 2 if self.ga > 1 and not (self.fsdp or self.zero >= 2) else 1)
        self.proto: Prototype = self.trace.prototype
        self.L, self.m = self.proto.num_layers, self.proto.traced
        self.layers_of_proto = {q: [j for j in range(self.L) if self.proto.proto(j) == q] for q in range(self.m)}
        self.param_bytes = spec.param_dtype.itemsize
        self.upcast_grads = compute_view_dtype(spec).itemsize != 4  # FSDP2 reduces in float32
        self.offload_fsdp = spec.cfg.parallel.cpu_offload
        self.offload_optimizer = self.zero > 0 and spec.cfg.parallel.offload_optimizer
        self.offload_params = self.zero > 0 and spec.cfg.parallel.offload_params
        self.gathered = self.fsdp or self.zero == 3
        self.dense, self.experts, self.root = self._groups()
        self.paged_bytes = 0
        self.host_bytes = 0
        self.p = Program()
        self.instance = 0  # which composed micro-batch the trace events belong to
        self.grad_keys: list = []  # gradients alive until the optimizer step's zero_grad
        self.held_gathers: list = []  # all-gather buffers forward keeps until the next copy-out
        self.accumulated: dict = {}  # owner -> unsharded gradients kept between micro-batches
        self._index_trace()

    # ------------------------------------------------------------------ trace bookkeeping

    def _index_trace(self) -> None:
        """Per uid: the traced layer that owns it (-1: the root), its (micro-batch, phase), and the
        category it takes when the trace leaves it open (alive at the end of forward: activation)."""
        t = self.trace
        self.segment_names = [name for name, *_ in t.segments]
        self.segment_index: dict[str, list[int]] = {}
        for i, name in enumerate(self.segment_names):
            self.segment_index.setdefault(name, []).append(i)
        self.templates: dict[tuple, list] = {}
        self.owner, self.kind, self.allocs = [], [], {}
        for uid, birth in enumerate(t.birth):
            parts = self.segment_names[birth].split(".")
            layer = int(parts[1][5:]) if len(parts) > 2 and parts[1].startswith("layer") else -1
            kind = (parts[0], parts[-1])
            self.owner.append(layer)
            self.kind.append(kind)
            self.allocs.setdefault((layer, kind), []).append(uid)
        self.referenced = [
            sorted({self.owner[abs(e) - 1] for e in events} - {-1}) for _, events, *_ in t.segments
        ]  # per segment: the traced layers whose uids it touches
        saved, live = set(), set()
        for name, events, *_ in t.segments:
            if name.endswith("head.bwd"):
                saved |= live
            for e in events:
                live.add(e - 1) if e > 0 else live.discard(-e - 1)
        self.categories, self.expert_grad_uids = [], set()
        for uid, category in enumerate(t.categories):
            name = self.segment_names[t.birth[uid]]
            if category in ("gradients", "expert_gradients"):
                if category == "expert_gradients":
                    self.expert_grad_uids.add(uid)
                category = "unsharded_gradients" if self.fsdp or self.zero >= 2 else "gradients"
            elif category is None and name.endswith(".fwd"):
                category = "activations" if uid in saved else "temporaries"
            elif category is None:
                category = "loss" if ".head." in name else "temporaries"
            self.categories.append(category)

    def _segments(self, mb: str, suffix: str) -> list[int]:
        return self.segment_index.get(f"{mb}.{suffix}", [])

    def _template(self, index: int, real: int, proto: int) -> list[tuple]:
        """Segment ``index``'s events for real layer ``real`` (traced as ``proto``), as (layer offset or
        None for the root, uid, allocation or free, rounded size, category). A uid of another traced layer stands for
        the uid in the same position of the real layer as far away, traced as whichever layer
        stands for that one. Templates depend only on the traced layers around ``real``: cached."""
        context = (index, proto, tuple(self.proto.proto(real - proto + q) for q in self.referenced[index]))
        template = self.templates.get(context)
        if template is None:
            template = []
            for event in self.trace.segments[index][1]:
                uid = abs(event) - 1
                category = self.categories[uid]
                if category == "inputs":
                    continue  # the step's batches are placed by _step
                owner, offset = self.owner[uid], None
                if owner >= 0:
                    offset = owner - proto
                    target_proto = self.proto.proto(real + offset)
                    if target_proto != owner:
                        uid = self.allocs[(target_proto, self.kind[uid])][self.trace.order[uid]]
                # The event's sign, not the size's, tells an allocation from a free: an empty storage
                # (torch 2.11's checkpoint saves its inputs on one) has size 0 at both ends.
                template.append((offset, uid, event > 0, round_size(self.trace.sizes[uid]), category))
            self.templates[context] = template
        return template

    def _emit(self, mb: str, suffix: str, real: int, proto: int) -> list:
        """The trace's events of one segment for real layer ``real``; returns the gradients born."""
        grads, p, instance = [], self.p, self.instance
        for index in self._segments(mb, suffix):
            for offset, uid, allocation, size, category in self._template(index, real, proto):
                key = (instance, "root", uid) if offset is None else (instance, real + offset, uid)
                if allocation:
                    p.push(key, size, category)
                    if category.endswith("gradients"):
                        grads.append(key)
                elif key in p.live:
                    p.free(key)
        return grads

    def _emit_autocast_exit(self, mb: str) -> None:
        """The autocast cache empties: in every real layer, the weight copies autograd does not hold."""
        for index in self._segments(mb, "autocast_exit"):
            for event in self.trace.segments[index][1]:
                uid = abs(event) - 1
                owner = self.owner[uid]
                for real in self.layers_of_proto[owner] if owner >= 0 else ["root"]:
                    key = (self.instance, real, uid)
                    if key in self.p.live:
                        self.p.free(key)

    # ------------------------------------------------------------------ model states

    def _groups(self) -> tuple[Group, Group | None, Group]:
        """A layer's dense parameters, its experts (their own FSDP2 group under EP) and the root's."""
        shards = self.dims.dp_shard if self.fsdp else (self.dims.dp if self.zero == 3 else 1)
        layer = [p for p in self.trace.params if p.in_layer]
        root = Group("root", [p for p in self.trace.params if not p.in_layer], shards)
        if self.fsdp and self.dims.ep > 1:
            dense = Group("layer", [p for p in layer if not p.expert], shards)
            return dense, Group("experts", [p for p in layer if p.expert], shards // self.dims.ep), root
        return Group("layer", layer, shards), None, root

    def all_groups(self) -> list[tuple[object, Group]]:
        groups = [("root", self.root)]
        for j in range(self.L):
            groups.append((j, self.dense))
            if self.experts is not None:
                groups.append(((j, "experts"), self.experts))
        return groups

    def _stored_bytes(self, p: ParamInfo) -> int:
        """Bytes per element at rest: trained weights in param_dtype, except in a 16-bit DeepSpeed
        module (its float32 master lives in the optimizer partition); frozen ones in the compute dtype."""
        if not p.trainable or self.zero:
            return p.element_size
        return self.param_bytes

    def _trained_local_numel(self) -> int:
        """Elements of trained parameters this rank keeps optimizer states for."""
        total = sum(g.local_numel(p) for _, g in self.all_groups() for p in g.trained())
        return math.ceil(total / self.dims.dp) if self.zero else total

    def _init_model(self) -> None:
        p = self.p
        p.mark("model init")
        if not (self.offload_fsdp or self.offload_params):
            for owner, group in self.all_groups():
                for i, param in enumerate(group.params):
                    p.alloc(
                        ("param", owner, group.name, i),
                        group.local_numel(param) * self._stored_bytes(param),
                        "parameters",
                    )
        for owner, group in self.all_groups():
            for i, param in enumerate(group.params):
                for k, nbytes in enumerate(param.extra_bytes):
                    p.alloc(("qstate", owner, group.name, i, k), nbytes, "quantization_state")
        m = self.cfg.model
        p.alloc("inv_freq", (m.head_dim or m.hidden_size // m.num_heads) // 2 * 4, "parameters")
        trained_bytes = [q.numel * self._stored_bytes(q) for _, g in reversed(self.all_groups()) for q in g.trained()]
        if self.dims.uses_ddp:
            states = sum(q.numel * self._stored_bytes(q) for _, g in self.all_groups() for q in g.params)
            p.alloc("ddp_broadcast", min(DDP_BROADCAST_BYTES, states), "communication_buffers")
            p.free("ddp_broadcast")
            for i, size in enumerate(_buckets(trained_bytes)):
                p.alloc(("ddp_bucket", i), size, "communication_buffers")
        if self.zero:
            trained = sum(trained_bytes) // self.spec.compute_dtype.itemsize
            if self.zero >= 2:
                bucket = min(ZERO_REDUCE_BUCKET, trained)
                p.alloc("zero_reduce_bucket", bucket * self.spec.compute_dtype.itemsize, "communication_buffers")
            master = 4 * math.ceil(trained / self.dims.dp) if self.spec.compute_dtype != torch.float32 else 0
            if self.offload_optimizer:
                self.host_bytes += master
            elif master:
                p.alloc("zero_fp32_master", master, "optimizer_states")

    def _optimizer_step(self, first: bool) -> None:
        """States appear at the first step (AdamW: two per trained element, plus a step counter per
        tensor on the device for the fused kernel); then clipping's per-tensor norms; then zero_grad."""
        p = self.p
        p.mark("optimizer step")
        trained = [(g, q) for _, g in self.all_groups() for q in g.trained()]
        if first:
            self._allocate_states(trained)
        for i in range(len(trained) + 2):  # _foreach_norm: one float per tensor, then their stack and norm
            p.alloc(("norm", i), 4, "temporaries")
        p.free_all([("norm", i) for i in range(len(trained) + 2)])
        if self.zero == 1 and not self.offload_optimizer:
            grads = 4 * self._trained_local_numel()  # float32 copy of this rank's gradient partition
            p.alloc("zero_fp32_grads", grads, "temporaries")
            p.free("zero_fp32_grads")
        p.free_all(self.grad_keys)
        self.grad_keys = []

    def _allocate_states(self, trained: list[tuple[Group, ParamInfo]]) -> None:
        p, o = self.p, self.cfg.optim
        on_host = self.offload_fsdp or self.offload_optimizer
        if self.zero:
            numel = self._trained_local_numel()
            states = 8 * numel + (4 * numel if self.zero >= 2 else 0)  # Adam moments (+ float32 gradient partition)
            if on_host:
                self.host_bytes += states
            else:
                p.alloc("zero_states", states, "optimizer_states")
            return
        for i, (group, param) in enumerate(trained):
            numel = group.local_numel(param)
            if on_host:
                self.host_bytes += 2 * numel * self.param_bytes
                continue
            if o.name == "adamw":
                for k in ("exp_avg", "exp_avg_sq"):
                    p.alloc((k, i), numel * self.param_bytes, "optimizer_states")
                p.alloc(("step", i), 4, "optimizer_states")
            elif numel < BNB_MIN_8BIT:
                for k in ("state1", "state2"):
                    p.alloc((k, i), numel * 4, "optimizer_states")
            else:
                paged = o.name == "paged_adamw_8bit" and numel >= BNB_MIN_PAGED
                for k in ("state1", "state2"):
                    if paged:  # CUDA managed memory: outside torch's allocator, seen by nvidia-smi
                        self.paged_bytes += numel
                    else:
                        p.alloc((k, i), numel, "optimizer_states")
                for k in ("absmax1", "absmax2"):
                    p.alloc((k, i), math.ceil(numel / BNB_BLOCK) * 4, "optimizer_states")
        if o.name != "adamw":
            p.alloc("qmaps", 2 * 256 * 4, "optimizer_states")  # the shared dynamic quantization maps

    # ------------------------------------------------------------------ FSDP2 / ZeRO-3 gathers

    def _gather(self, owner, group: Group) -> None:
        """``unshard``: on the all-gather copy-in stream, each shard cast to the compute dtype, then
        one flat all-gather buffer."""
        p = self.p
        if (("unsharded", owner, 0) in p.live) or (("all_gather", owner) in p.live):
            return
        casts = [("cast_in", owner, i) for i in range(len(group.params))]
        for key, param in zip(casts, group.params):
            p.alloc(key, group.local_numel(param) * param.element_size, "temporaries", ALL_GATHER_STREAM)
        p.alloc(("all_gather", owner), group.gathered_bytes(), "communication_buffers", ALL_GATHER_STREAM)
        p.free_all(casts)

    def _unshard(self, owner, group: Group, forward: bool) -> None:
        """``wait_for_unshard``: copy out into each parameter's unsharded storage. In forward the
        buffer is kept until the next group's copy-out (to overlap it with the next all-gather);
        in backward it goes at once."""
        p = self.p
        if ("unsharded", owner, 0) in p.live:
            return
        self._gather(owner, group)
        if forward:
            p.free_all(self.held_gathers)
            self.held_gathers = []
        for i, param in enumerate(group.params):
            p.alloc(
                ("unsharded", owner, i),
                group.local_numel(param) * group.shards * param.element_size,
                "unsharded_parameters",
            )
        if forward:
            self.held_gathers.append(("all_gather", owner))
        else:
            p.free(("all_gather", owner))

    def _reshard(self, owner, group: Group) -> None:
        self.p.free_all([k for k in (("unsharded", owner, i) for i in range(len(group.params))) if k in self.p.live])

    def _post_backward(self, owner, group: Group, grads: list, sync: bool) -> None:
        """Reshard, then either reduce-scatter the gradients in float32 into this rank's shard, or
        (no gradient sync) keep them unsharded, upcast to float32, until the micro-batch that syncs."""
        p = self.p
        self._reshard(owner, group)
        trained = group.trained()
        if not trained:
            return
        if self.zero:  # ZeRO copies gradients into its reduce bucket and keeps the float32 partition
            p.free_all(grads)
            return
        kept = self.accumulated.get(owner)
        if not sync:
            if kept is not None:  # added into the gradients kept since the first micro-batch
                p.free_all(grads)
            elif self.upcast_grads:  # FSDP2 keeps them as float32 copies
                kept = [("accumulated", owner, i) for i in range(len(trained))]
                for key, param in zip(kept, trained):
                    p.alloc(key, group.local_numel(param) * group.shards * 4, "unsharded_gradients")
                p.free_all(grads)
            else:  # float32 already: they stay on the unsharded parameters
                kept = grads
            self.accumulated[owner] = kept
            return
        p.free_all(p.live_keys(lambda k: k[0] == "reduce_scatter_input"))
        numel = sum(group.local_numel(q) * group.shards for q in trained)
        # The input is allocated on the current stream, the output on the reduce-scatter stream.
        p.alloc(("reduce_scatter_input", owner), numel * 4, "communication_buffers")
        p.free_all(grads + self.accumulated.pop(owner, []))
        output, shard_bytes = ("sharded_grad", owner), numel // group.shards * 4
        if self.offload_fsdp or (output in p.live):  # copied to the host, or added to the existing shard
            p.alloc(("reduce_output", owner), shard_bytes, "communication_buffers", REDUCE_SCATTER_STREAM)
            p.free(("reduce_output", owner))
        else:
            p.alloc(output, shard_bytes, "gradients", REDUCE_SCATTER_STREAM)
            self.grad_keys.append(output)

    # ------------------------------------------------------------------ the run

    def _micro_batch(self, mb: str, sync: bool) -> None:
        p, gathered = self.p, self.gathered
        groups = [(None, self.dense)] + ([("experts", self.experts)] if self.experts is not None else [])

        def owner(j, tag):
            return j if tag is None else (j, tag)

        p.mark("forward: embedding")
        if gathered:
            self._unshard("root", self.root, forward=True)
        self._emit(mb, "embed.fwd", -1, -1)
        reshard = self.zero == 3 or (self.fsdp and self.cfg.parallel.reshard_after_forward)
        for j in range(self.L):
            q = self.proto.proto(j)
            p.mark(f"forward: layer {j}")
            for tag, group in groups if gathered else ():
                self._unshard(owner(j, tag), group, forward=True)
            self._emit(mb, f"layer{q}.fwd", j, q)
            for tag, group in groups if gathered and reshard else ():
                self._reshard(owner(j, tag), group)
        p.mark("forward: norm and loss")
        # A loss that computes its gradients in forward (LinearCrossEntropy) gives the head its gradient
        # here: kept with the backward's root gradients until the optimizer step frees them.
        root_grads = self._emit(mb, "head.fwd", self.L, self.m)
        self._emit_autocast_exit(mb)
        root_grads += self._emit(mb, "head.fwd_tail", self.L, self.m)
        p.free_all(self.held_gathers)  # the root's post-forward frees the last one
        self.held_gathers = []
        p.mark("backward: loss and norm")
        if gathered:
            self._gather(self.L - 1, self.dense)  # the root's pre-backward prefetches the last layer
        root_grads += self._emit(mb, "head.bwd", self.L, self.m)
        for j in reversed(range(self.L)):
            q = self.proto.proto(j)
            p.mark(f"backward: layer {j}")
            for tag, group in groups if gathered else ():
                self._unshard(owner(j, tag), group, forward=False)
            if gathered and j > 0:
                self._gather(j - 1, self.dense)  # pre-backward prefetch of the layer before
            grads = self._emit(mb, f"layer{q}.bwd", j, q)
            if gathered:
                for tag, group in reversed(groups):
                    mine = [g for g in grads if (g[2] in self.expert_grad_uids) == (tag == "experts")]
                    self._post_backward(owner(j, tag), group, mine, sync)
            elif self.zero == 2:  # copied into the reduce bucket, reduced into this rank's partition
                p.free_all(grads)
            else:
                self.grad_keys += grads
        p.mark("backward: embedding")
        root_grads += self._emit(mb, "embed.bwd", -1, -1)
        if gathered:
            self._post_backward("root", self.root, root_grads, sync)
            p.free_all(p.live_keys(lambda k: k[0] == "reduce_scatter_input"))  # the final callback
        elif self.zero == 2:
            p.free_all(root_grads)
        else:
            self.grad_keys += root_grads
        self._emit(mb, "end", -1, -1)
        self.instance += 1

    def _step(self, step: int) -> None:
        p, c = self.p, self.cfg
        p.mark(f"step {step}")
        batch = c.train.micro_batch_size * c.data.seq_len * 8
        inputs = [("batch", step, i) for i in range(4 * self.ga)]
        for key in inputs:  # all micro-batches' input_ids, labels, position_ids, document_ids
            p.alloc(key, batch, "inputs")
        if step == 1:
            p.alloc("cublas_workspace", CUBLAS_WORKSPACE, "cuda_runtime")
        first_trace, later_trace = "mb0", ("mb1" if "mb1.embed.fwd" in self.segment_names else "mb0")
        micro_batches = [0] + ([1] if self.ga > 2 else []) + ([self.ga - 1] if self.ga > 1 else [])
        for k in micro_batches:
            p.mark(f"step {step} micro-batch {k + 1} of {self.ga}")
            self._micro_batch(first_trace if k == 0 else later_trace, sync=k == self.ga - 1)
        self._optimizer_step(first=step == 1)
        p.free_all(inputs)

    def run(self) -> Program:
        self._init_model()
        for step in (1, 2):
            self._step(step)
        return self.p

    def _per_step(self, measure) -> float:
        """``measure(segment index)`` summed over one optimizer step: every layer, every micro-batch."""

        def total(suffix: str) -> float:
            return sum(measure(i) for i in self._segments("mb0", suffix))

        root = sum(total(s) for s in ("embed.fwd", "head.fwd", "head.bwd", "embed.bwd"))
        layers = sum(total(f"layer{self.proto.proto(j)}.{phase}") for j in range(self.L) for phase in ("fwd", "bwd"))
        return self.ga * (root + layers)

    def step_flops(self) -> float:
        """Matmul and attention FLOPs of one optimizer step on this rank (recomputation included)."""
        return self._per_step(lambda i: self.trace.segments[i][2])

    def step_offloaded_bytes(self) -> float:
        """Activation bytes one optimizer step copies to host memory (and back)."""
        return self._per_step(lambda i: self.trace.segments[i][3])

    def step_allocated_bytes(self) -> float:
        sizes = self.trace.sizes
        return self._per_step(lambda i: sum(sizes[e - 1] for e in self.trace.segments[i][1] if e > 0))

    def nccl_bytes(self) -> int:
        """NCCL buffers of each communicator this rank joins: the world's and each parallel dimension's."""
        d = self.dims
        communicators = sum(size > 1 for size in (d.dp_replicate, d.dp_shard, d.tp, d.ep))
        return NCCL_PER_COMMUNICATOR * (communicators + (d.world_size > 1))


def _buckets(sizes: list[int]) -> list[int]:
    """DDP's gradient buckets over trained tensors in reverse order: the first closes at 1 MiB, the
    others at 25 MiB."""
    buckets, current, cap = [], 0, DDP_FIRST_BUCKET_BYTES
    for size in sizes:
        current += size
        if current >= cap:
            buckets.append(current)
            current, cap = 0, DDP_BUCKET_BYTES
    return buckets + ([current] if current else [])
