"""One measured run for ``profiling.validate``: ``train.py``'s job, then this rank's CUDA memory peaks.

``torchrun ... -m profiling.measure <report.jsonl> <overrides>`` composes the overrides as train.py
does and runs the trainer's steps (no memory check: the run exists to measure; no checkpoint or
export at the end: they come after the steps and only cost time), then appends one JSON line per rank:
``max_memory_allocated`` / ``max_memory_reserved`` from ``torch.cuda.memory_stats()`` and the device
memory in use from ``cudaMemGetInfo`` (what nvidia-smi shows for this process on a dedicated GPU).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys

import torch

from profiling.job import spec_of


def main(report: str, overrides: list[str]) -> None:
    spec = spec_of(overrides, int(os.environ.get("WORLD_SIZE", "1")))
    from parallel.mesh import close_world
    from trainkit.trainer import Trainer

    trainer = Trainer(spec)
    try:
        for _ in range(spec.cfg.train.steps):
            trainer.train_step()
            trainer.step += 1
        torch.cuda.synchronize()
    finally:
        trainer.close()
        close_world()
    stats = torch.cuda.memory_stats()
    free, total = torch.cuda.mem_get_info()
    row = {
        "rank": int(os.environ.get("RANK", "0")),
        "max_allocated": stats["allocated_bytes.all.peak"],
        "max_reserved": stats["reserved_bytes.all.peak"],
        "device_used": total - free,
        "total_memory": total,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    with open(report, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # ranks append concurrently
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
