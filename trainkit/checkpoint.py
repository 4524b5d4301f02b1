"""Training checkpoints through torch.distributed.checkpoint (DCP): save every N steps, resume exactly.

A checkpoint is ``<output_dir>/checkpoints/step_<N>/`` holding what the engine saves (model,
optimizer, LR schedule, grad scaler) plus one ``rng_rank<R>.pt`` per rank. The step is in the name,
and the sampler is a function of the step, so the step is also the data position. It is written
under a ``.tmp`` name and renamed when every rank has finished, so a folder without it is complete.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from parallel.mesh import World, barrier

STEP_DIR = re.compile(r"^step_(\d+)$")


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Checkpointer:
    def __init__(self, output_dir: Path, world: World):
        self.folder = output_dir / "checkpoints"
        self.world = world

    def latest(self) -> Path | None:
        """The newest complete checkpoint; half-written ``.tmp`` folders are never chosen."""
        steps = [
            (int(m.group(1)), p) for p in self.folder.glob("step_*") if (m := STEP_DIR.match(p.name)) and p.is_dir()
        ]
        return max(steps)[1] if steps else None

    def save(self, engine, step: int) -> Path:
        final = self.folder / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
            tmp.mkdir(parents=True)
        barrier()
        engine.save(tmp)
        torch.save(_rng_state(self.world.device), tmp / f"rng_rank{self.world.rank}.pt")
        barrier()
        if self.world.is_main:
            tmp.rename(final)
        barrier()
        return final

    def load(self, path: Path, engine) -> int:
        """Restore everything in place and return the step the checkpoint was taken after."""
        engine.load(path)
        rng_file = path / f"rng_rank{self.world.rank}.pt"
        if rng_file.exists():  # absent when resuming on more ranks than saved: the seed then rules
            _set_rng_state(torch.load(rng_file, weights_only=True), self.world.device)
        return int(STEP_DIR.match(path.name).group(1))
