"""Step metrics: the FLOPs formula behind MFU, CUDA memory counters, and the run's log sinks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainkit.config import LoggingConfig, ModelConfig
from trainkit.model import head_dim

# Dense bf16 peak FLOP/s (without sparsity) by device-name fragment, from the vendors' data sheets.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N + 12 * L * H * Q * T (PaLM appendix B).

    N counts the matmul parameters a token goes through (every parameter but the embedding lookup;
    the output head counts even when tied; of an MoE layer the router, the top-k experts and the
    shared expert), 6 = 2 forward + 4 backward FLOPs per parameter per token; the second term is
    attention's score and value matmuls, L layers, H heads, Q head dim, T sequence length.
    """
    hd = head_dim(m)
    attn = m.hidden_size * hd * (2 * m.num_heads + 2 * m.num_kv_heads)
    mlp = 3 * m.hidden_size * m.intermediate_size
    if m.num_experts:
        expert = 3 * m.hidden_size * (m.moe_intermediate_size or m.intermediate_size)
        shared = 3 * m.hidden_size * m.shared_expert_intermediate_size
        mlp = m.num_experts_per_tok * expert + shared + m.hidden_size * m.num_experts
    matmul_params = m.num_layers * (attn + mlp) + m.vocab_size * m.hidden_size
    return 6 * matmul_params + 12 * m.num_layers * m.num_heads * hd * seq_len


def peak_flops(device: torch.device, cfg: LoggingConfig) -> float | None:
    """Peak FLOP/s of one device, or None where it is unknown (MFU is then reported as null)."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def cuda_memory(device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {
        "max_memory_allocated_bytes": stats["allocated_bytes.all.peak"],
        "max_memory_reserved_bytes": stats["reserved_bytes.all.peak"],
    }


class MetricsLog:
    """Appends one JSON record per line to ``metrics.jsonl`` and mirrors it to wandb when enabled."""

    def __init__(self, output_dir: Path, cfg: LoggingConfig, run_config: dict):
        self.path = output_dir / cfg.metrics_file
        self.wandb_run = None
        if cfg.wandb.enabled:
            import wandb  # only when asked for: a heavy import, absent on some machines

            self.wandb_run = wandb.init(
                project=cfg.wandb.project,
                name=cfg.wandb.run_name,
                mode=cfg.wandb.mode,
                dir=str(output_dir),
                config=run_config,
            )

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
