"""Search the parallel plans, checkpointing policies and micro-batch sizes that fit a GPU, fastest first.

    python -m profiling.plan model=llama3_70b world_size=64 gpu=h100 data.seq_len=8192 [global_batch=512]

``world_size`` is the number of GPUs; ``global_batch`` the sequences per optimizer step (default:
one per GPU); every other ``key=value`` is a train.py override. Each candidate (sharding backend and
policy x tensor- and expert-parallel degrees x activation checkpointing x micro-batch, the gradient
accumulation that keeps the global batch, with and without offload) becomes a real job spec, is
predicted by ``profiling.simulator``, kept when it fits with the safety margin, and ranked by the
roofline step time of ``profiling.roofline``. The best few print as ready-to-run override lines.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass

from profiling.hardware import GiB, resolve_gpu
from profiling.roofline import step_time
from profiling.simulator import predict
from trainkit.cli import compose_config
from trainkit.config import ConfigError, JobConfig
from trainkit.spec import build_job_spec

PLACEHOLDER_OUTPUT = "/nonexistent/profiling-plan"  # never written: plans only build specs
# (name, parallel preset fields); tp and ep are set per candidate.
BACKENDS = {
    "fsdp": {"dp_shard": -1},
    "fsdp_zero2": {"dp_shard": -1, "reshard_after_forward": False},
    "hsdp": {"dp_replicate": -1, "dp_shard": 8},
    "fsdp_offload": {"dp_shard": -1, "cpu_offload": True},
    "ddp": {"dp_replicate": -1},
    "zero1": {"backend": "deepspeed", "dp_shard": -1, "zero_stage": 1},
    "zero2": {"backend": "deepspeed", "dp_shard": -1, "zero_stage": 2},
    "zero3": {"backend": "deepspeed", "dp_shard": -1, "zero_stage": 3},
    "zero3_offload": {
        "backend": "deepspeed",
        "dp_shard": -1,
        "zero_stage": 3,
        "offload_optimizer": True,
        "offload_params": True,
    },
}
# Lightest memory first, so that once one does not fit the lighter ones are not tried.
AC = {
    "full_offload": ("full", True),
    "full": ("full", False),
    "every_2": ("every_n", False),
    "selective": ("selective", False),
    "none": ("none", False),
}
MICRO_BATCHES = (1, 2, 4, 8)
TP_DEGREES = (1, 2, 4, 8)
DEFAULT_BATCH_TOKENS = 4 * 2**20  # a default global batch of ~4M tokens, as large-model recipes use


@dataclass
class Plan:
    overrides: list[str]
    peak_allocated: int
    device_used: int
    step_seconds: float
    tokens_per_s_per_gpu: float


def _with(base: JobConfig, backend: str, tp: int, ep: int, ac_name: str, mbs: int, ga: int) -> JobConfig:
    parallel = dataclasses.replace(type(base.parallel)(), name=backend, **{**BACKENDS[backend], "tp": tp, "ep": ep})
    mode, offload = AC[ac_name]
    return dataclasses.replace(
        base,
        parallel=parallel,
        ac=dataclasses.replace(base.ac, name=ac_name, mode=mode, every_n=2, offload=offload),
        train=dataclasses.replace(base.train, micro_batch_size=mbs, grad_accum_steps=ga),
    )


def _overrides(backend: str, tp: int, ep: int, ac_name: str, mbs: int, ga: int) -> list[str]:
    lines = [f"parallel={backend}", f"ac={ac_name}", f"train.micro_batch_size={mbs}"]
    lines += [f"train.grad_accum_steps={ga}"] if ga > 1 else []
    lines += [f"parallel.tp={tp}"] if tp > 1 else []
    lines += [f"parallel.ep={ep}"] if ep > 1 else []
    return lines


class Search:
    """Candidates in groups of one (backend, tp, ep): micro-batches ascending, checkpointing from the
    lightest. Memory only grows along both, so the first candidate that does not fit rules out the
    rest of its row, and a micro-batch whose lightest policy does not fit rules out larger ones."""

    def __init__(self, base: JobConfig, world_size: int, global_batch: int):
        self.base, self.world_size, self.global_batch = base, world_size, global_batch
        self.gpu = resolve_gpu(base.gpu)
        self.searched = self.simulated = 0
        self.plans: list[Plan] = []

    def groups(self):
        m = self.base.model
        eps = [1] + [e for e in (2, 4, 8, 16, 32, 64) if m.num_experts and m.num_experts % e == 0]
        for backend in BACKENDS:
            for tp in TP_DEGREES:
                for ep in eps:
                    if self.world_size % (tp * ep) == 0:
                        yield backend, tp, ep

    def run(self) -> list[Plan]:
        for backend, tp, ep in self.groups():
            dp = self.world_size // tp
            for mbs in MICRO_BATCHES:
                if self.global_batch % (mbs * dp):
                    continue
                ga = self.global_batch // (mbs * dp)
                fitted = False
                for i, ac_name in enumerate(AC):
                    plan = self.evaluate(backend, tp, ep, ac_name, mbs, ga)
                    if plan is None:
                        self.searched += len(AC) - i - 1  # lighter policies need more memory
                        break
                    fitted = fitted or plan is not False
                if not fitted:
                    self.searched += sum(len(AC) for m in MICRO_BATCHES if m > mbs)
                    break
        self.plans.sort(key=lambda p: p.step_seconds)
        return self.plans

    def evaluate(self, backend, tp, ep, ac_name, mbs, ga) -> Plan | None | bool:
        """The plan if it fits (kept), None if it does not fit, False if it is no valid job."""
        self.searched += 1
        try:
            spec = build_job_spec(_with(self.base, backend, tp, ep, ac_name, mbs, ga), self.world_size)
        except ConfigError:
            return False
        self.simulated += 1
        prediction = predict(spec, self.gpu, reserved=False)
        if prediction.fits:
            prediction = predict(spec, self.gpu)  # now with the allocator's reserved memory
        if not prediction.fits:
            return None
        seconds = step_time(spec, prediction).seconds
        worst = prediction.worst
        overrides = _overrides(backend, tp, ep, ac_name, mbs, ga)
        plan = Plan(
            overrides,
            worst.peak_allocated,
            worst.device_used,
            seconds,
            spec.tokens_per_step / seconds / self.world_size,
        )
        self.plans.append(plan)
        return plan


def default_global_batch(seq_len: int, world_size: int) -> int:
    """~4M tokens, rounded up to a multiple of the world size (at least one sequence per GPU)."""
    sequences = max(1, DEFAULT_BATCH_TOKENS // seq_len)
    return -(-sequences // world_size) * world_size


def plan(overrides: list[str], world_size: int, global_batch: int | None) -> Search:
    base = compose_config([*overrides, f"train.output_dir={PLACEHOLDER_OUTPUT}"])
    search = Search(base, world_size, global_batch or default_global_batch(base.data.seq_len, world_size))
    search.run()
    return search


def main(argv: list[str]) -> None:
    world_size, global_batch, top, overrides = 8, None, 5, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "world_size":
            world_size = int(value)
        elif key == "global_batch":
            global_batch = int(value)
        elif key == "top":
            top = int(value)
        else:
            overrides.append(arg)
    start = time.perf_counter()
    try:
        search = plan(overrides, world_size, global_batch)
    except ConfigError as err:
        print(f"trainkit: error: {err}", file=sys.stderr)
        sys.exit(2)
    took = time.perf_counter() - start
    plans = search.plans[:top]
    print(
        f"{search.searched} candidates searched ({search.simulated} simulated) in {took:.1f} s for "
        f"{world_size} x {search.gpu.name}, global batch {search.global_batch} sequences; "
        f"{len(search.plans)} fit, the {len(plans)} fastest:"
    )
    for p in plans:
        print(
            f"  {p.step_seconds:7.2f} s/step  {p.tokens_per_s_per_gpu:8.0f} tokens/s/GPU  "
            f"peak {p.peak_allocated / GiB:6.1f} GiB allocated, {p.device_used / GiB:6.1f} GiB on the GPU"
        )
        print(f"    torchrun --nproc_per_node=<gpus per node> train.py {' '.join(overrides + p.overrides)}")
    if not plans:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
