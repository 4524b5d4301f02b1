"""Step metrics: the FLOPs formula behind MFU, the matmul rate, per-phase step times, on-demand
profiler traces and memory snapshots, CUDA memory counters, and the run's log sinks."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from torch import nn

from trainkit.config import LoggingConfig, ModelConfig
from trainkit.model import head_dim

# Dense bf16 peak FLOP/s (without sparsity) by device-name fragment, from the vendors' data sheets.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}

PHASES = ("data", "forward", "backward", "optimizer")  # time_<phase>_s in every step record, then time_other_s
MATMUL_SIZE = 8192  # large enough to reach the tensor cores' sustained rate


def flops_per_token(m: ModelConfig, seq_len: int, adapter_params: int | None = None) -> float:
    """Training FLOPs per token: 6 * N + 12 * L * H * Q * T (PaLM appendix B); with adapters on a frozen
    base (``adapter_params`` not None), 4 * N + 6 * A + 12 * L * H * Q * T.

    N counts the matmul parameters a token goes through (every parameter but the embedding lookup;
    the output head counts even when tied; of an MoE layer the router, the top-k experts and the
    shared expert), 6 = 2 forward + 2 input-gradient + 2 weight-gradient FLOPs per parameter per token.
    A frozen weight gets no weight gradient, so the base costs 4 per parameter and only the A adapter
    parameters (LoRA's A and B matrices) cost 6. The last term is attention's score and value matmuls,
    L layers, H heads, Q head dim, T sequence length. Activation-checkpoint recomputation is not
    counted: MFU counts model FLOPs, as PaLM defines it.
    """
    hd = head_dim(m)
    attn = m.hidden_size * hd * (2 * m.num_heads + 2 * m.num_kv_heads)
    mlp = 3 * m.hidden_size * m.intermediate_size
    if m.num_experts:
        expert = 3 * m.hidden_size * (m.moe_intermediate_size or m.intermediate_size)
        shared = 3 * m.hidden_size * m.shared_expert_intermediate_size
        mlp = m.num_experts_per_tok * expert + shared + m.hidden_size * m.num_experts
    matmul_params = m.num_layers * (attn + mlp) + m.vocab_size * m.hidden_size
    weights = 6 * matmul_params if adapter_params is None else 4 * matmul_params + 6 * adapter_params
    return weights + 12 * m.num_layers * m.num_heads * hd * seq_len


def adapter_matmul_params(model: nn.Module) -> int:
    """LoRA A and B parameters (peft's names); DoRA's magnitudes scale outputs, they are no matmul.

    Count on the unsharded (meta) model: every token goes through every adapter."""
    return sum(p.numel() for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name)


def matmul_tflops(device: torch.device, repeats: int = 10) -> float:
    """Measured bf16 TFLOP/s of ``MATMUL_SIZE``^3 matmuls on one CUDA device, after a warm-up.

    CUDA only (the trainer skips it on the CPU: no bf16 peak there to compare with). The memory peaks
    are reset afterwards, so the step records' peaks stay the training's own.
    """
    n = MATMUL_SIZE
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(3):  # cuBLAS picks its kernel and the clocks ramp up
        torch.matmul(a, b, out=out)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        torch.matmul(a, b, out=out)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del a, b, out
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return 2 * n**3 * repeats / seconds / 1e12


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


class PhaseTimer:
    """Seconds per phase (``PHASES``) of each training step, summed over its micro-batches.

    On CUDA each phase is a pair of events on the current stream, read only once the step's values
    have reached the host, so timing adds no sync inside the step; on the CPU, ``perf_counter``. Steps
    may overlap (the loop queues the next step before reading this one's values): ``begin_step``
    opens a step's account, ``times`` closes the oldest open one.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._steps: list[tuple[dict[str, float], list]] = []  # per open step: CPU seconds, CUDA events

    def begin_step(self) -> None:
        self._steps.append((dict.fromkeys(PHASES, 0.0), []))

    @contextlib.contextmanager
    def phase(self, name: str):
        seconds, events = self._steps[-1]
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            events.append((name, start, end))
        else:
            start = time.perf_counter()
            yield
            seconds[name] += time.perf_counter() - start

    def times(self, step_time: float) -> dict[str, float]:
        """The oldest open step's ``time_<phase>_s`` and ``time_other_s`` (the rest of ``step_time``:
        collectives outside the phases, the non-finite check, host time the device waited for). On
        CUDA, call once that step's work is done."""
        seconds, events = self._steps.pop(0)
        for name, start, end in events:
            seconds[name] += start.elapsed_time(end) / 1e3
        times = {f"time_{name}_s": s for name, s in seconds.items()}
        times["time_other_s"] = step_time - sum(seconds.values())
        return times


def phase_postfix(record: dict) -> str:
    """The step's phases in milliseconds, short enough for the progress bar."""
    short = {"data": "data", "forward": "fwd", "backward": "bwd", "optimizer": "opt", "other": "other"}
    return " ".join(f"{label} {record[f'time_{name}_s'] * 1e3:.0f}" for name, label in short.items())


def _within(step: int, window: list[int]) -> bool:
    return bool(window) and window[0] <= step <= window[1]


class StepProfiler:
    """On-demand traces over a window of steps, as ``logging`` asks for them.

    ``profile_steps``: a torch.profiler trace, exported as Chrome / Perfetto JSON to
    ``<output_dir>/profile/trace_rank<r>.json`` (open in https://ui.perfetto.dev), each step labelled
    ``step_<n>``. ``memory_snapshot_steps`` (CUDA): the allocator's history, dumped to
    ``<output_dir>/memory_snapshot_rank<r>.pickle`` (open in https://pytorch.org/memory_viz).
    """

    def __init__(self, cfg: LoggingConfig, output_dir: Path, rank: int, device: torch.device):
        self.profile_steps, self.memory_steps = list(cfg.profile_steps), list(cfg.memory_snapshot_steps)
        self.trace_path = output_dir / "profile" / f"trace_rank{rank}.json"
        self.snapshot_path = output_dir / f"memory_snapshot_rank{rank}.pickle"
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler: torch.profiler.profile | None = None
        self.recording_memory = False

    @contextlib.contextmanager
    def step(self, n: int):
        """Around step ``n`` (1-based): opens the windows it falls in (a resumed run may start inside
        one), labels it, and closes the windows that end with it."""
        if _within(n, self.profile_steps) and self.profiler is None:
            self.profiler = torch.profiler.profile(activities=self.activities)
            self.profiler.start()
        if _within(n, self.memory_steps) and not self.recording_memory:
            torch.cuda.memory._record_memory_history()
            self.recording_memory = True
        label = torch.profiler.record_function(f"step_{n}") if self.profiler else contextlib.nullcontext()
        with label:
            yield
        if self.profile_steps and n >= self.profile_steps[1]:
            self._end_trace()
        if self.memory_steps and n >= self.memory_steps[1]:
            self._end_memory()

    def window_edge(self, n: int) -> bool:
        """Whether a window ends with step ``n`` or starts with step ``n + 1``."""
        return any(w and (w[1] == n or w[0] == n + 1) for w in (self.profile_steps, self.memory_steps))

    def finish(self) -> None:
        """End what a run that stopped inside a window left open."""
        self._end_trace()
        self._end_memory()

    def _end_trace(self) -> None:
        if self.profiler is None:
            return
        self.profiler.stop()
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(self.trace_path))
        self.profiler = None

    def _end_memory(self) -> None:
        if not self.recording_memory:
            return
        torch.cuda.memory._dump_snapshot(str(self.snapshot_path))
        torch.cuda.memory._record_memory_history(enabled=None)
        self.recording_memory = False


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
