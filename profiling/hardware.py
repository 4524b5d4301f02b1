"""The GPUs the simulator and the planner know: memory, fixed runtime overheads, and roofline rates.

Each constant says where it came from. ``total_memory`` is what ``torch.cuda.get_device_properties``
reports, the budget every prediction is checked against. Rates feed the planner's step-time model
only; memory predictions never depend on them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trainkit.config import ConfigError

GiB = 2**30
MiB = 2**20


@dataclass(frozen=True)
class GPU:
    name: str
    total_memory: int  # bytes, torch.cuda.get_device_properties(...).total_memory
    cuda_context: int  # bytes nvidia-smi shows for a process before its first tensor (driver, kernels, cuBLAS handles)
    matmul_flops: float  # dense bf16 FLOP/s a large matmul reaches (measured, not the data sheet's peak)
    hbm_bandwidth: float  # bytes/s of device memory traffic (read + write)
    nvlink_bandwidth: float  # bytes/s per direction between GPUs of one node
    network_bandwidth: float  # bytes/s per GPU between nodes
    gpus_per_node: int = 8


# H100 80GB HBM3 (SXM): total_memory and the CUDA context (nvidia-smi's figure minus torch's reserved
# bytes once cuBLAS and cuDNN are loaded: 767 MiB) as torch 2.11 shows them on the lent H100
# (results/memory_validation.jsonl); 770 TFLOP/s is the bf16 matmul rate measured there
# (shared/reference/README.md; 798 on an 8192^3 product, KINDS.md); 3.0 TB/s the measured
# device-to-device copy (read + write); NVLink 4 is 450 GB/s per direction (NVIDIA H100 data sheet:
# 900 GB/s bidirectional); one 400 Gb/s InfiniBand NIC per GPU = 50 GB/s.
H100 = GPU("h100", 85_017_493_504, 767 * MiB, 770e12, 3.0e12, 450e9, 50e9)
# H200 141GB HBM3e: total_memory on the lent H200; 788 TFLOP/s and 4.3 TB/s measured there (KINDS.md);
# the CUDA context taken as the H100's (same software image).
H200 = GPU("h200", 150_109_028_352, 767 * MiB, 788e12, 4.3e12, 450e9, 50e9)
# A100 80GB SXM4 (not measured here): 79.35 GiB total_memory; 280 TFLOP/s is ~90 % of the 312 TFLOP/s
# data-sheet peak that large bf16 matmuls reach; 1.8 TB/s of the 2.0 TB/s HBM2e peak; NVLink 3 is
# 300 GB/s per direction; a 200 Gb/s HDR NIC per GPU = 25 GB/s.
A100_80G = GPU("a100_80g", 85_198_045_184, 450 * MiB, 280e12, 1.8e12, 300e9, 25e9)

GPUS = {gpu.name: gpu for gpu in (H100, H200, A100_80G)}
# torch.cuda.get_device_name fragments of the GPUs above.
DEVICE_NAMES = {"H100": H100, "H200": H200, "A100-SXM4-80GB": A100_80G, "A100 80GB": A100_80G}


def gpu_named(name: str) -> GPU:
    if name not in GPUS:
        raise ConfigError(f"gpu={name!r} is not a GPU trainkit knows: use one of {', '.join(GPUS)}")
    return GPUS[name]


def detect_gpu() -> GPU | None:
    """The visible CUDA device, with its real total memory; None without CUDA or for an unknown device."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    known = next((gpu for fragment, gpu in DEVICE_NAMES.items() if fragment in props.name), None)
    if known is None:
        return None
    return dataclasses.replace(known, total_memory=props.total_memory)


def resolve_gpu(name: str | None) -> GPU:
    """``gpu=<name>`` when given, else the visible CUDA device, else the H100 (dry runs on a CPU box)."""
    if name is not None:
        return gpu_named(name)
    return detect_gpu() or H100
