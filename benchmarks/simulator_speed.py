"""How fast the memory simulator answers, on this machine: one prediction, and a planner search.

    python benchmarks/simulator_speed.py [--out results/simulator_speed.json]

Measures (after imports) a cold prediction (tracing included) and a warm one (traces cached) of
Llama-3.1-70B on 64 H100s under FSDP2 with full activation checkpointing, and the planner's search
for the same model and world size (every candidate counted, with how many were simulated), then
Llama-3.1-405B on 512 H100s. Writes the timings with the hardware, torch version and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from profiling.hardware import H100
from profiling.job import spec_of
from profiling.plan import plan
from profiling.simulator import _TRACES, predict
from profiling.validate import git_commit

SEVENTY = ["model=llama3_70b", "model.source=null", "gpu=h100", "data.seq_len=8192", "precision=bf16"]
ONE_PREDICTION = [*SEVENTY, "parallel=fsdp", "ac=full", "train.micro_batch_size=1"]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="results/simulator_speed.json")
    args = parser.parse_args()
    import trainkit.trainer  # noqa: F401 - imported once, as train.py does, outside the timings

    spec = spec_of([*ONE_PREDICTION, "train.output_dir=/nonexistent/benchmark"], 64)
    prediction, cold = timed(lambda: predict(spec, H100))
    _, warm = timed(lambda: predict(spec, H100))
    _TRACES.clear()
    search70, search70_s = timed(lambda: plan(SEVENTY, 64, None))
    _TRACES.clear()
    search405, search405_s = timed(lambda: plan(["model=llama3_405b", *SEVENTY[1:]], 512, None))
    result = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "prediction_70b_64xh100_cold_s": round(cold, 3),
        "prediction_70b_64xh100_warm_s": round(warm, 3),
        "prediction_70b_peak_allocated_gib": round(prediction.worst.peak_allocated / 2**30, 2),
        "plan_70b_64xh100": {
            "seconds": round(search70_s, 1),
            "candidates": search70.searched,
            "simulated": search70.simulated,
            "fitting": len(search70.plans),
            "best": " ".join(search70.plans[0].overrides) if search70.plans else None,
        },
        "plan_405b_512xh100": {
            "seconds": round(search405_s, 1),
            "candidates": search405.searched,
            "simulated": search405.simulated,
            "fitting": len(search405.plans),
            "best": " ".join(search405.plans[0].overrides) if search405.plans else None,
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
