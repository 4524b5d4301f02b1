"""Training checkpoints through torch.distributed.checkpoint (DCP): save every N steps, resume exactly,
at any world size or sharding strategy.

A checkpoint is ``<output_dir>/checkpoints/step_<N>/`` holding what the engine saves (model, optimizer,
LR schedule, grad scaler), one ``rng_rank<R>.pt`` per rank and the commit marker ``commit.json`` (step,
world size, backend, model shape, skipped steps). Every rank writes under a ``.tmp`` name; once all
have finished, rank 0 writes the marker last, then renames the folder. Only a folder holding its
marker is ever resumed, so a kill at any moment of a save leaves the previous checkpoint the newest.

DCP reshards on load: a checkpoint written by FSDP2 on N processes loads on any other world size or
torch strategy. DeepSpeed's own checkpoints do not reshard. Loading reads safe formats only: every
``torch.load`` inside (DCP's non-tensor entries, DeepSpeed's files, the RNG states) runs weights-only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from operator import attrgetter
from pathlib import Path

import torch
from omegaconf import OmegaConf

from parallel.mesh import ParallelDims, World, barrier
from trainkit.config import ConfigError, JobConfig, ModelConfig

STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "commit.json"


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def model_shape(m: ModelConfig) -> dict:
    """The fields that fix the model's tensor shapes, resolved (``head_dim=None`` as its value)."""
    from trainkit.weights import RESOLVED_FIELDS, SHAPE_FIELDS  # weights imports slowly: only when needed

    return {name: (RESOLVED_FIELDS.get(name) or attrgetter(name))(m) for name in SHAPE_FIELDS}


def metadata(cfg: JobConfig, dims: ParallelDims, step: int, skipped_steps: int) -> dict:
    """What the commit marker records: enough to refuse a resume that cannot load the checkpoint."""
    return {
        "step": step,
        "skipped_steps": skipped_steps,
        "world_size": dims.world_size,
        "backend": dims.backend,
        "zero_stage": cfg.parallel.zero_stage,
        "peft": cfg.peft.method,
        "model": model_shape(cfg.model),
    }


def step_folders(output_dir) -> list[tuple[int, Path]]:
    """Every ``step_<N>`` folder (complete or not) under ``output_dir/checkpoints``, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    return sorted((int(m.group(1)), p) for p in folder.glob("step_*") if (m := STEP_DIR.match(p.name)))


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def latest_checkpoint(output_dir) -> Path | None:
    """The newest complete checkpoint; half-written folders (``.tmp``, or without the marker) never are."""
    complete = [p for _, p in step_folders(output_dir) if is_complete(p)]
    return complete[-1] if complete else None


def read_metadata(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def check_resumable(cfg: JobConfig, dims: ParallelDims) -> None:
    """With ``train.resume=true``, refuse in one line a newest checkpoint this config cannot load."""
    path = latest_checkpoint(cfg.train.output_dir) if cfg.train.resume else None
    if path is None:
        return
    saved, here = read_metadata(path), metadata(cfg, dims, 0, 0)
    where = f"train.resume=true but {path} was written"
    for name, value in saved["model"].items():
        if here["model"][name] != value:
            raise ConfigError(
                f"{where} for model.{name}={value}, the config has {here['model'][name]}: resume with the run's "
                f"model (its config.yaml) or choose another train.output_dir"
            )
    if saved["peft"] != here["peft"]:
        raise ConfigError(f"{where} with peft.method={saved['peft']}: resume with peft={saved['peft']}")
    if saved["backend"] != here["backend"]:
        raise ConfigError(
            f"{where} by parallel.backend={saved['backend']}: resume with a {saved['backend']} parallel preset"
        )
    if here["backend"] == "deepspeed" and any(saved[k] != here[k] for k in ("world_size", "zero_stage")):
        raise ConfigError(
            f"{where} by DeepSpeed ZeRO-{saved['zero_stage']} on {saved['world_size']} processes, which does not "
            f"reshard: launch {saved['world_size']} processes with parallel.zero_stage={saved['zero_stage']}"
        )


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside unpickles tensors and plain containers only, whatever ``weights_only``
    its caller passes: DCP and DeepSpeed pass False for their own non-tensor entries."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _deepspeed_safe_globals() -> list:
    """The plain-data classes DeepSpeed pickles into its checkpoints (none when it is not loaded)."""
    if "deepspeed" not in sys.modules:
        return []
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def remove_run(out: Path, metrics_file: str) -> None:
    """What an earlier run wrote into ``out`` (and only that: the folder may hold the user's files)."""
    for name in ("checkpoints", "hf", "adapter", "wandb"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (metrics_file, "config.yaml"):
        (out / name).unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, cfg: JobConfig, dims: ParallelDims, world: World):
        self.cfg, self.dims, self.world = cfg, dims, world
        self.output_dir = Path(cfg.train.output_dir)
        self.folder = self.output_dir / "checkpoints"

    def save(self, engine, step: int, skipped_steps: int) -> Path:
        final = self.folder / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.world.is_main:
            for stale in (tmp, final):  # left by a run killed while saving this step
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        engine.save(tmp)
        torch.save(_rng_state(self.world.device), tmp / f"rng_rank{self.world.rank}.pt")
        barrier()
        if self.world.is_main:
            marker = tmp / MARKER
            marker.write_text(json.dumps(metadata(self.cfg, self.dims, step, skipped_steps)))
            _fsync(marker)
            tmp.rename(final)
            _fsync(self.folder)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        """Remove incomplete folders (no save is in flight now) and complete ones beyond the newest K."""
        keep = self.cfg.train.keep_checkpoints
        complete = [p for _, p in step_folders(self.output_dir) if is_complete(p)]
        old = complete[:-keep] if keep > 0 else []
        incomplete = [p for p in self.folder.iterdir() if p.is_dir() and not is_complete(p)]
        for path in old + incomplete:
            shutil.rmtree(path)

    def load(self, path: Path, engine) -> dict:
        """Restore everything in place and return the checkpoint's metadata (its ``step`` among them)."""
        with weights_only_loads():
            engine.load(path)
            rng_file = path / f"rng_rank{self.world.rank}.pt"
            if rng_file.exists():  # absent when resuming on more ranks than saved: the seed then rules
                _set_rng_state(torch.load(rng_file, weights_only=True), self.world.device)
        return read_metadata(path)


def _full_weights(checkpoint: Path, cfg: JobConfig) -> dict[str, torch.Tensor]:
    """The unsharded model weights of a checkpoint, gathered in this one process."""
    if read_metadata(checkpoint)["backend"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from parallel.deepspeed_engine import TAG

        with weights_only_loads():
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from trainkit.model import build_model, materialize

    weights = materialize(build_model(cfg.model), torch.device("cpu")).state_dict()
    with weights_only_loads():  # only the model: the optimizer and the rest stay on disk
        dcp.load({"model": weights}, checkpoint_id=checkpoint, planner=DefaultLoadPlanner(allow_partial_load=True))
    return weights


def export_checkpoint(checkpoint, out, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the model of a complete checkpoint (DCP from any torch strategy, or DeepSpeed ZeRO) as an HF
    folder, the format of a run's ``hf/``; the run's ``config.yaml`` beside ``checkpoints/`` gives the model."""
    from trainkit.weights import prepare_hf_folder, save_hf_state_dict

    checkpoint = Path(checkpoint)
    if not is_complete(checkpoint):
        raise ConfigError(f"{checkpoint} is no complete checkpoint (it has no {MARKER}): pick a step_<N> folder")
    run_config = checkpoint.parent.parent / "config.yaml"
    cfg: JobConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.load(run_config)))
    if cfg.peft.method != "none":
        raise ConfigError(f"{checkpoint} holds adapters only: merge them into the base with lora.merge_adapters")
    tokenizer = cfg.model.tokenizer or cfg.model.source
    tokenizer_dir = None if tokenizer is None else prepare_hf_folder(tokenizer, cfg.cache_dir, field="model.tokenizer")
    return save_hf_state_dict(
        _full_weights(checkpoint, cfg), cfg.model, out, tokenizer_folder=tokenizer_dir, dtype=dtype
    )
