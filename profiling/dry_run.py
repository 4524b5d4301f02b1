"""``train.py dry_run=true`` and the memory check a real CUDA run makes before it starts."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from profiling import report
from profiling.hardware import resolve_gpu
from profiling.simulator import Prediction, predict
from trainkit.config import ConfigError
from trainkit.spec import JobSpec, build_job_spec


def dry_run(spec: JobSpec, overrides: list[str]) -> Prediction:
    """Predict, print the per-rank table and the verdict, write ``memory_plan.json`` / ``.html``
    beside the run's output folder (the folder itself stays empty for the real run)."""
    prediction = predict(spec, resolve_gpu(spec.cfg.gpu))
    print(report.table(prediction))
    folder = Path(f"{spec.output_dir}-dry-run")
    title = f"{spec.cfg.model.name} on {spec.world_size} x {prediction.gpu.name}: {' '.join(overrides)}"
    json_path, html_path = report.write(prediction, overrides, folder, title)
    print(f"wrote {json_path} and {html_path}")
    return prediction


# Changes tried, in order, when a run does not fit: each keeps the global batch and the model.
REMEDIES = (
    ("ac=selective", {"ac": {"name": "selective", "mode": "selective"}}),
    ("ac=full", {"ac": {"name": "full", "mode": "full"}}),
    ("halve train.micro_batch_size, double train.grad_accum_steps", "halve"),
    ("optim.name=adamw_8bit", {"optim": {"name": "adamw_8bit"}}),
    ("parallel.reshard_after_forward=true", {"parallel": {"reshard_after_forward": True}}),
    ("parallel=fsdp_offload", {"parallel": {"cpu_offload": True}}),
)


def _apply(cfg, change):
    if change == "halve":
        t = cfg.train
        if t.micro_batch_size == 1:
            return None
        half = dataclasses.replace(t, micro_batch_size=t.micro_batch_size // 2, grad_accum_steps=t.grad_accum_steps * 2)
        return dataclasses.replace(cfg, train=half)
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in change.items()})


def nearest_fit(spec: JobSpec) -> tuple[str, Prediction] | None:
    """The first of ``REMEDIES`` (alone, then cumulatively) whose job is valid and fits."""
    cfg, applied = spec.cfg, []
    gpu = resolve_gpu(spec.cfg.gpu)
    for description, change in REMEDIES:
        starts = (spec.cfg,) if cfg is spec.cfg else (spec.cfg, cfg)
        for start in starts:  # the change alone, then on top of the earlier ones
            changed = _apply(start, change)
            if changed is None:
                continue
            try:
                candidate = build_job_spec(changed, spec.world_size)
            except ConfigError:
                continue
            prediction = predict(candidate, gpu)
            if prediction.fits:
                return "; ".join([*applied, description] if start is cfg else [description]), prediction
        changed = _apply(cfg, change)
        if changed is not None:
            cfg, applied = changed, [*applied, description]
    return None


def check_fits(spec: JobSpec, overrides: list[str]) -> None:
    """Refuse a run whose predicted memory does not fit its GPU, naming the nearest config that does.

    The check only advises: should the simulator itself fail on this job, the run starts anyway."""
    gpu = resolve_gpu(spec.cfg.gpu)  # an unknown gpu= name is the user's error, reported as such
    try:
        prediction = predict(spec, gpu)
    except Exception as err:  # noqa: BLE001 - a simulator fault must never stop a run
        print(f"trainkit: warning: memory check skipped, the simulator failed: {err!r}", file=sys.stderr)
        return
    if prediction.fits:
        return
    worst = prediction.worst
    message = (
        f"predicted peak {report.gib(worst.device_used)} per GPU ({report.gib(worst.peak_allocated)} allocated, "
        f"during {worst.peak_moment}) exceeds the {report.gib(prediction.budget)} budget of the "
        f"{prediction.gpu.name}"
    )
    fix = nearest_fit(spec)
    if fix is not None:
        message += f"; nearest config that fits: {fix[0]} ({report.gib(fix[1].worst.device_used)})"
    raise ConfigError(message + "; memory_check=false starts it anyway")
