"""A roofline estimate of one optimizer step's time on one rank, for ranking plans.

Three bounds, from the composed prediction and the spec:

* matmul time: the traced matmul and attention FLOPs (recomputation included) at the GPU's
  measured matmul rate (``profiling.hardware``);
* memory time: every byte the step allocates is written once and read once, at the measured HBM
  bandwidth (the elementwise work between matmuls is bound by it);
* communication: each collective's bytes on the wire at NVLink bandwidth inside a node, the
  per-GPU network bandwidth across nodes; ring algorithms move (n-1)/n of the buffer per rank, an
  all-reduce twice that.

FSDP2 / ZeRO all-gathers and reduce-scatters, and DDP's all-reduce, overlap computation (the step
takes the longer of the two); tensor-parallel collectives and expert all-to-alls sit between the
layer's matmuls and add to it. CPU offload adds its host transfers at PCIe speed and the CPU's
optimizer step; activation offload its saved tensors' round trip to host memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from profiling.hardware import GPU
from profiling.simulator import Prediction
from trainkit.spec import JobSpec

PCIE_BANDWIDTH = 25e9  # bytes/s, effective host<->device copies over PCIe gen5 x16 (64 GB/s raw per direction)
CPU_ADAM_RATE = 1e9  # parameters/s of a fused CPU Adam step (DeepSpeed's CPU Adam on ~32 cores)


@dataclass(frozen=True)
class StepTime:
    compute: float
    memory: float
    overlapped_comm: float  # hidden behind compute when shorter
    exposed_comm: float  # tensor / expert parallel collectives and offload transfers
    seconds: float


def _ring(nbytes: float, ranks: int) -> float:
    return nbytes * (ranks - 1) / ranks if ranks > 1 else 0.0


def _bandwidth(gpu: GPU, span: int) -> float:
    """A group whose ranks lie ``span`` apart in the rank order stays inside one node when it fits."""
    return gpu.nvlink_bandwidth if span <= gpu.gpus_per_node else gpu.network_bandwidth


def step_time(spec: JobSpec, prediction: Prediction) -> StepTime:
    gpu, d, c = prediction.gpu, spec.dims, spec.cfg
    compute = prediction.step_flops / gpu.matmul_flops
    memory = 2 * prediction.step_allocated_bytes / gpu.hbm_bandwidth
    shard_span = d.dp_shard * d.tp  # the mesh is dp_replicate x dp_shard x tp, tp innermost
    overlapped = exposed = 0.0
    trained, gathered = prediction.trained_elements, prediction.gathered_bytes
    if d.uses_fsdp or (d.backend == "deepspeed" and c.parallel.zero_stage == 3):
        shards = d.dp_shard if d.uses_fsdp else d.dp
        passes = 2 if (c.parallel.reshard_after_forward or not d.uses_fsdp) else 1
        volume = passes * _ring(gathered, shards) + _ring(trained * 4, shards)  # gathers, fp32 reduce-scatter
        overlapped += volume / _bandwidth(gpu, shard_span)
        if d.dp_replicate > 1:  # HSDP: all-reduce of the fp32 gradient shard across replicas
            overlapped += 2 * _ring(trained * 4 / shards, d.dp_replicate) / _bandwidth(gpu, d.world_size)
    elif d.backend == "deepspeed":  # ZeRO-1/2: reduce-scatter 16-bit gradients, all-gather updated parameters
        volume = 2 * _ring(trained * spec.compute_dtype.itemsize, d.dp)
        overlapped += volume / _bandwidth(gpu, d.world_size)
    elif d.dp > 1:  # DDP all-reduce
        overlapped += 2 * _ring(trained * spec.param_dtype.itemsize, d.dp) / _bandwidth(gpu, d.world_size)
    tokens = c.train.micro_batch_size * c.data.seq_len * c.train.grad_accum_steps
    activation = tokens * c.model.hidden_size * spec.compute_dtype.itemsize
    if d.tp > 1:  # sequence parallel: per layer 2 all-gathers + 2 reduce-scatters forward, as many backward
        recompute = 1.5 if c.ac.mode != "none" else 1.0
        exposed += c.model.num_layers * 8 * recompute * _ring(activation, d.tp) / _bandwidth(gpu, d.tp)
    if d.ep > 1:  # dispatch + combine, forward and backward, of top_k copies of every token
        volume = c.model.num_layers * 4 * c.model.num_experts_per_tok * _ring(activation / d.tp, d.ep)
        exposed += volume / _bandwidth(gpu, d.ep * d.tp)
    exposed += 2 * prediction.step_offloaded_bytes / PCIE_BANDWIDTH  # saved activations out and back
    offload = c.parallel.cpu_offload or c.parallel.offload_optimizer
    if offload:  # gradients down and parameters up every step, the optimizer on the CPU
        local = trained / (d.dp_shard if d.uses_fsdp else d.dp)
        exposed += 2 * local * 4 / PCIE_BANDWIDTH + local / CPU_ADAM_RATE
    seconds = max(compute + memory, overlapped) + exposed
    return StepTime(compute, memory, overlapped, exposed, seconds)
