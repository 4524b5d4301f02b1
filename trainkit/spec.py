"""The validated job spec: the composed config plus what follows from it and the world it runs in.

``build_job_spec`` does every check that needs no weights, data or process group, so a bad config
fails in well under a second with one line that names the field and the fix. The trainer and the
memory simulator both take the ``JobSpec`` it returns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from parallel.mesh import ParallelDims
from trainkit.checkpoint import check_resumable
from trainkit.config import ConfigError, JobConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DATA_FORMATS = ("auto", "text", "json", "parquet")
DATA_KINDS = ("text", "chat", "instruction")
SAMPLE_BY = ("document", "paragraph", "line")
SCHEDULES = ("cosine", "constant")
AC_MODES = ("none", "full", "every_n", "selective")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
PEFT_METHODS = ("none", "lora", "qlora")
ON_NONFINITE = ("stop", "skip")


@dataclass(frozen=True)
class JobSpec:
    cfg: JobConfig
    dims: ParallelDims
    device_type: str  # "cuda" or "cpu"
    param_dtype: torch.dtype
    compute_dtype: torch.dtype

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def global_batch_size(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum_steps * self.dp_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.cfg.data.seq_len

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(section, names: str, prefix: str) -> None:
    for name in names.split():
        value = getattr(section, name)
        _require(value > 0, f"{prefix}.{name}={value} must be > 0")


def _dtype(field: str, name: str) -> torch.dtype:
    _require(name in DTYPES, f"{field}={name!r} is not a dtype trainkit knows: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_model(m) -> None:
    _positive(m, "hidden_size num_layers num_heads num_kv_heads intermediate_size vocab_size", "model")
    _require(
        m.num_heads % m.num_kv_heads == 0,
        f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={m.num_kv_heads}: "
        "grouped-query attention needs whole groups",
    )
    _require(
        m.head_dim is not None or m.hidden_size % m.num_heads == 0,
        f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}: "
        "change one of them or set model.head_dim",
    )
    if m.num_experts > 0:
        _require(
            0 < m.num_experts_per_tok <= m.num_experts,
            f"model.num_experts_per_tok={m.num_experts_per_tok} must be between 1 and "
            f"model.num_experts={m.num_experts}",
        )
        expert_size = m.moe_intermediate_size or m.intermediate_size
        # grouped_mm needs 16-byte aligned rows: 8 bf16 values.
        _require(
            m.hidden_size % 8 == 0 and expert_size % 8 == 0,
            f"model.hidden_size={m.hidden_size} and the expert size {expert_size} must be multiples of 8 for the "
            "grouped expert matmul: round them up",
        )
    _require(
        m.source is not None or m.tokenizer is not None,
        "model.source is null (random init) and so is model.tokenizer: set model.tokenizer to a tokenizer folder",
    )


def check_data(d, max_positions: int) -> None:
    _require(d.format in DATA_FORMATS, f"data.format={d.format!r}: use one of {', '.join(DATA_FORMATS)}")
    _require(d.kind in DATA_KINDS, f"data.kind={d.kind!r}: use one of {', '.join(DATA_KINDS)}")
    _require(d.sample_by in SAMPLE_BY, f"data.sample_by={d.sample_by!r}: use one of {', '.join(SAMPLE_BY)}")
    _require(d.seq_len >= 2, f"data.seq_len={d.seq_len} must be at least 2")
    _require(
        d.seq_len <= max_positions,
        f"data.seq_len={d.seq_len} exceeds model.max_position_embeddings={max_positions}: "
        f"lower data.seq_len to at most {max_positions}",
    )
    _require(0 <= d.eval_fraction < 1, f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")


def _check_optim(o, steps: int) -> None:
    _require(o.name in OPTIMIZERS, f"optim.name={o.name!r}: use one of {', '.join(OPTIMIZERS)}")
    _require(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r}: use one of {', '.join(SCHEDULES)}")
    _positive(o, "lr", "optim")
    _require(len(o.betas) == 2, f"optim.betas={list(o.betas)} must hold two numbers, e.g. [0.9,0.95]")
    _require(
        0 <= o.warmup_steps < steps,
        f"optim.warmup_steps={o.warmup_steps} must be below train.steps={steps}",
    )


def _check_ac(ac) -> None:
    _require(ac.mode in AC_MODES, f"ac.mode={ac.mode!r}: use one of {', '.join(AC_MODES)}")
    _require(ac.every_n >= 1, f"ac.every_n={ac.every_n} must be >= 1")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _check_compile(cfg: JobConfig, dims: ParallelDims) -> None:
    mode = cfg.compile_mode
    _require(mode in COMPILE_MODES, f"compile_mode={mode!r}: use one of {', '.join(COMPILE_MODES)}")
    _require(mode == "default" or cfg.compile, f"compile_mode={mode} applies to compiled blocks: add compile=true")
    if mode not in CUDA_GRAPH_MODES:
        return
    # Replayed graphs reuse their output memory: the gradients one micro-batch leaves there, the next
    # overwrites; gathered (FSDP2, ZeRO-3) and bucketed (DDP) parameters and gradients move between
    # steps; ac.offload copies to the host outside any graph. One process, one micro-batch is what runs.
    _require(
        dims.world_size == 1 and cfg.train.grad_accum_steps == 1 and not cfg.ac.offload,
        f"compile_mode={mode} replays CUDA graphs, which trainkit runs on one process with "
        "train.grad_accum_steps=1 and no ac.offload: use compile_mode=default for this job",
    )


def _check_peft(cfg: JobConfig, dims: ParallelDims, device_type: str) -> None:
    pe = cfg.peft
    _require(pe.method in PEFT_METHODS, f"peft.method={pe.method!r}: use one of {', '.join(PEFT_METHODS)}")
    _require(
        cfg.optim.name != "paged_adamw_8bit" or device_type == "cuda",
        "optim.name=paged_adamw_8bit pages optimizer states between GPU and CPU: it needs a GPU; use adamw_8bit",
    )
    if pe.method == "none":
        return
    _require(pe.r >= 1, f"peft.r={pe.r} must be >= 1")
    _require(0 <= pe.dropout < 1, f"peft.dropout={pe.dropout} must be in [0, 1)")
    _require(
        dims.tp == 1,
        f"peft.method={pe.method} with parallel.tp={dims.tp}: adapters compose with DDP, FSDP2 and DeepSpeed, "
        "not tensor parallel: set parallel.tp=1",
    )
    _require(
        not (pe.use_dora and dims.uses_fsdp),
        "peft.use_dora under FSDP2: DoRA's init needs whole base weights; use peft=lora or one process",
    )
    if pe.method == "qlora":
        _require(cfg.model.num_experts == 0, "peft.method=qlora quantizes dense linears only: use peft=lora for MoE")


def _check_recovery(t, dims: ParallelDims) -> None:
    """Checkpoint retention, non-finite steps, resume."""
    k = t.keep_checkpoints
    _require(k >= 0, f"train.keep_checkpoints={k}: keep the newest K >= 1 checkpoints, or 0 for all of them")
    _require(
        t.on_nonfinite in ON_NONFINITE, f"train.on_nonfinite={t.on_nonfinite!r}: use one of {', '.join(ON_NONFINITE)}"
    )
    # DeepSpeed holds the reduced gradients inside its engine, out of the loop's reach until its step.
    _require(
        t.on_nonfinite == "stop" or dims.backend == "torch",
        "train.on_nonfinite=skip with parallel.backend=deepspeed: DeepSpeed cannot drop a step's gradients; "
        "use train.on_nonfinite=stop",
    )
    _require(
        not (t.resume and t.overwrite),
        "train.resume=true and train.overwrite=true contradict each other: continue the run or replace it, not both",
    )


def _check_output_dir(t) -> None:
    out = Path(t.output_dir)
    holds_run = out.is_dir() and any(out.iterdir())
    _require(
        not holds_run or t.resume or t.overwrite,
        f"train.output_dir={out} already holds a run: pass train.resume=true to continue it, "
        "train.overwrite=true to replace it, or choose another train.output_dir",
    )


def _check_logging(cfg, steps: int, device_type: str) -> None:
    """Profiler and memory-snapshot windows: [first, last] inside 1..train.steps; snapshots on CUDA only."""
    for name in ("profile_steps", "memory_snapshot_steps"):
        window = list(getattr(cfg, name))
        _require(
            not window or (len(window) == 2 and 1 <= window[0] <= window[1] <= steps),
            f"logging.{name}={window} must be [first,last] with 1 <= first <= last <= train.steps={steps}, "
            "or [] for off",
        )
    _require(
        not cfg.memory_snapshot_steps or device_type == "cuda",
        "logging.memory_snapshot_steps records CUDA allocations and this run is on the CPU: run it on a GPU, "
        "or use logging.profile_steps for a CPU trace",
    )


def _device_type(requested: str) -> str:
    _require(requested in ("auto", "cpu", "cuda"), f"train.device={requested!r}: use auto, cpu or cuda")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    _require(
        requested == "cpu" or torch.cuda.is_available(),
        "train.device=cuda but no CUDA device is visible: use train.device=cpu or run on a GPU machine",
    )
    return requested


def build_job_spec(cfg: JobConfig | DictConfig, world_size: int | None = None) -> JobSpec:
    """Check the composed config and derive the spec; raises ConfigError with one line on bad input."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    t, p = cfg.train, cfg.precision
    _positive(t, "steps micro_batch_size grad_accum_steps eval_batches log_every", "train")
    _require(t.eval_every >= 0 and t.checkpoint_every >= 0, "train.eval_every and train.checkpoint_every must be >= 0")
    _check_model(cfg.model)
    check_data(cfg.data, cfg.model.max_position_embeddings)
    _check_optim(cfg.optim, t.steps)
    _check_ac(cfg.ac)
    dims = ParallelDims.resolve(cfg.parallel, cfg.model, world_size)
    _check_recovery(t, dims)
    device_type = _device_type(t.device)
    _check_logging(cfg.logging, t.steps, device_type)
    param_dtype = _dtype("precision.param_dtype", p.param_dtype)
    compute_dtype = _dtype("precision.compute_dtype", p.compute_dtype)
    _require(
        not (device_type == "cuda" and compute_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported()),
        "precision=bf16 but this GPU has no bfloat16 support: use precision=fp16",
    )
    _require(
        compute_dtype != torch.float16 or p.grad_scaler,
        "precision.compute_dtype=float16 without precision.grad_scaler=true underflows gradients: use precision=fp16",
    )
    _check_peft(cfg, dims, device_type)
    _check_compile(cfg, dims)
    if dims.backend == "deepspeed":
        _require(
            not (compute_dtype == torch.float16 and device_type == "cpu"),
            "precision=fp16: DeepSpeed has no float16 on the CPU: use precision=bf16 or fp32",
        )
        ds_json = cfg.parallel.deepspeed_config
        _require(
            ds_json is None or Path(ds_json).is_file(),
            f"parallel.deepspeed_config={ds_json} does not exist: point it at a DeepSpeed JSON file",
        )
    _check_output_dir(t)
    check_resumable(cfg, dims)
    return JobSpec(cfg, dims, device_type, param_dtype, compute_dtype)
