"""Parallel degrees, their checks, the device mesh, and the few collectives the trainer needs.

``ParallelDims.resolve`` turns the ``parallel`` config into degrees that multiply to the world size
and refuses impossible combinations before any process group exists. ``init_world`` then joins
torchrun's process group and builds one mesh ``dp_replicate x dp_shard_mod_ep x ep x tp``: expert
parallelism borrows its ranks from the FSDP ones, and ``dp_shard`` is ``dp_shard_mod_ep x ep``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainkit.config import ConfigError, ModelConfig, ParallelConfig

MESH_DIMS = ("dp_replicate", "dp_shard_mod_ep", "ep", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int
    backend: str

    @property
    def dp(self) -> int:
        """Ranks that read different data: the gradient average runs over these."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    @property
    def uses_fsdp(self) -> bool:
        return self.backend == "torch" and self.dp_shard > 1

    @property
    def uses_ddp(self) -> bool:
        return self.backend == "torch" and self.dp_replicate > 1 and self.dp_shard == 1

    @classmethod
    def resolve(cls, p: ParallelConfig, m: ModelConfig, world_size: int) -> ParallelDims:
        degrees = {"dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "tp": p.tp}
        _check(p.backend in ("torch", "deepspeed"), f"parallel.backend={p.backend!r}: use torch or deepspeed")
        _check(
            all(d == -1 or d >= 1 for d in (*degrees.values(), p.ep)),
            f"parallel degrees must be >= 1 or -1 (the rest of the world): got {degrees | {'ep': p.ep}}",
        )
        auto = [k for k, d in degrees.items() if d == -1]
        _check(len(auto) <= 1, f"{', '.join('parallel.' + k for k in auto)} are all -1: give all but one a number")
        fixed = math.prod(d for d in degrees.values() if d != -1)
        if auto:
            _check(
                world_size % fixed == 0,
                f"the world has {world_size} processes, not a multiple of the fixed degrees' product {fixed}: "
                f"launch a multiple of {fixed} processes or change the parallel degrees",
            )
            degrees[auto[0]] = world_size // fixed
        product = math.prod(degrees.values())
        _check(
            product == world_size,
            f"parallel dp_replicate x dp_shard x tp = {' x '.join(map(str, degrees.values()))} = {product} but the "
            f"world has {world_size} processes: launch {product} processes, pick a preset that adapts "
            "(parallel=ddp or parallel=fsdp) or set one degree to -1",
        )
        ep = degrees["dp_shard"] if p.ep == -1 else p.ep
        dims = cls(degrees["dp_replicate"], degrees["dp_shard"], degrees["tp"], ep, p.backend)
        dims._check_model(m)
        dims._check_backend(p)
        return dims

    def _check_model(self, m: ModelConfig) -> None:
        if self.tp > 1:
            _check(
                m.num_experts == 0,
                f"parallel.tp={self.tp} with experts: tensor parallelism covers dense layers only; "
                "use parallel=fsdp_ep",
            )
            for name in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
                value = getattr(m, name)
                _check(
                    value % self.tp == 0,
                    f"parallel.tp={self.tp} does not divide model.{name}={value}: use a tp that divides "
                    f"{value} (e.g. {math.gcd(value, self.tp)})",
                )
        if self.ep > 1:
            _check(m.num_experts > 0, f"parallel.ep={self.ep} but the model is dense: set parallel.ep=1")
            _check(
                m.num_experts % self.ep == 0,
                f"parallel.ep={self.ep} does not divide model.num_experts={m.num_experts}: use an ep that divides it",
            )
            _check(
                self.dp_shard % self.ep == 0,
                f"parallel.ep={self.ep} must divide parallel.dp_shard={self.dp_shard}: experts are sharded "
                "across data-parallel ranks",
            )

    def _check_backend(self, p: ParallelConfig) -> None:
        if self.backend == "deepspeed":
            _check(
                self.tp == 1 and self.ep == 1,
                "parallel.backend=deepspeed cannot be combined with tp or ep: use parallel=fsdp_tp or parallel=fsdp_ep",
            )
            _check(
                self.dp_replicate == 1,
                "parallel.backend=deepspeed shards over all data-parallel ranks: set parallel.dp_replicate=1",
            )
            _check(p.zero_stage in (1, 2, 3), f"parallel.zero_stage={p.zero_stage}: DeepSpeed needs 1, 2 or 3")
            _check(
                not p.offload_params or p.zero_stage == 3,
                "parallel.offload_params needs parallel.zero_stage=3: use parallel=zero3_offload",
            )
        else:
            _check(
                p.zero_stage == 0 and not p.offload_optimizer and not p.offload_params and p.deepspeed_config is None,
                "parallel.zero_stage / offload_optimizer / offload_params / deepspeed_config are DeepSpeed settings: "
                "set parallel.backend=deepspeed (parallel=zero1|zero2|zero3|zero3_offload) or use parallel=fsdp",
            )
            _check(
                not p.cpu_offload or self.uses_fsdp,
                "parallel.cpu_offload is FSDP2's offload and needs parallel.dp_shard >= 2: use parallel=fsdp_offload "
                "on 2 or more processes",
            )
            _check(
                not (self.dp_replicate > 1 and self.dp_shard == 1 and self.tp > 1),
                "parallel.dp_replicate with tp needs FSDP2 under it: set parallel.dp_shard >= 2 (HSDP x TP) or use "
                "parallel=fsdp_tp",
            )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device
    mesh: DeviceMesh | None = None  # MESH_DIMS plus the flattened "dp_shard" and "dp"; None for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_mesh(self) -> DeviceMesh | None:
        """The data-parallel ranks in one dimension: the batch splits and the loss reduces over it."""
        return None if self.mesh is None else self.mesh["dp"]

    @property
    def dp_rank(self) -> int:
        return 0 if self.mesh is None else self.dp_mesh.get_local_rank()


def init_world(device_type: str, dims: ParallelDims) -> World:
    """Join the torchrun process group when there is one; a single process needs none."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if size == 1:
        return World(rank, local_rank, size, device)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device_type == "cuda" else None)
    shape = (dims.dp_replicate, dims.dp_shard // dims.ep, dims.ep, dims.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
    mesh["dp_replicate", "dp_shard_mod_ep", "ep"]._flatten("dp")
    return World(rank, local_rank, size, device, mesh)


def close_world() -> None:
    if dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another still talks on them
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Sum over ``mesh`` (the whole world when None); a no-op for a single process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=None if mesh is None else mesh.get_group())
    return t
