"""What the benchmark drivers share: composing a model config, timing a plain training loop, running
``train.py`` and a baseline script each in its own process, reading trainkit's ``metrics.jsonl``, the
rows' ratios, and the result file's header (hardware, versions, commit).

Imported by the scripts in this folder as ``common`` (``python benchmarks/<script>.py`` puts the folder
on ``sys.path``).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def model_config(overrides: list[str]):
    """The ``model`` node of the config that ``train.py overrides...`` composes."""
    from hydra import compose, initialize_config_dir  # only the drivers need hydra, not the baselines

    from trainkit.config import register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose("train", overrides=overrides).model


def time_steps(
    step: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    device: torch.device,
    label: str | None = None,
) -> tuple[list[float], list[float]]:
    """Seconds and loss of each ``step(batch)``: the batch is on ``device`` before the clock starts, and
    on CUDA the clock reads after a synchronize at both ends. ``label``: print one line per step."""
    cuda = device.type == "cuda"
    step_times, losses = [], []
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step(batch)
        if cuda:
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if label:
            print(f"{label}: step {i + 1} {step_times[-1]:.3f} s loss {losses[-1]:.4f}", flush=True)
    return step_times, losses


def timing(step_times: list[float], warmup: int, tokens_per_step: int) -> dict:
    """Tokens/s from the median time of the steps after ``warmup``."""
    step_time = statistics.median(step_times[warmup:])
    return {"tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time}


def run_baseline(script: str, args: list[str], out: Path) -> dict:
    """``benchmarks/<script> args... --out=out`` in its own process; the row it wrote."""
    subprocess.run([sys.executable, str(BENCHMARKS / script), *args, f"--out={out}"], check=True)
    return json.loads(out.read_text())


def run_trainkit(overrides: list[str], out: Path) -> list[dict]:
    """``train.py`` in its own process writing to ``out``, then the step records of its metrics.jsonl."""
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        f"train.output_dir={out}",
        "train.overwrite=true",
        "logging.progress_bar=false",
        *overrides,
    ]
    subprocess.run(command, check=True, cwd=ROOT)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def trainkit_row(name: str, overrides: str, records: list[dict], warmup: int, tokens_per_step: int) -> dict:
    """A row from trainkit's step records: tokens/s of the median step time after ``warmup``, the peaks
    over the whole run (None on the CPU, where metrics.jsonl records none), every loss."""

    def peak(key: str) -> int | None:
        values = [r[key] for r in records if key in r]
        return max(values) if values else None

    return {
        "name": name,
        "overrides": overrides,
        **timing([r["step_time_s"] for r in records], warmup, tokens_per_step),
        "max_memory_allocated_bytes": peak("max_memory_allocated_bytes"),
        "max_memory_reserved_bytes": peak("max_memory_reserved_bytes"),
        "losses": [r["loss"] for r in records],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def compare(row: dict, reference: dict, suffix: str = "") -> None:
    """Adds ``speedup<suffix>`` (tokens/s) and ``memory_ratio<suffix>`` (peak allocated) against ``reference``."""
    row[f"speedup{suffix}"] = ratio(row.get("tokens_per_s"), reference.get("tokens_per_s"))
    row[f"memory_ratio{suffix}"] = ratio(
        row.get("max_memory_allocated_bytes"), reference.get("max_memory_allocated_bytes")
    )


def run_variants(variants: list[str], row_of: Callable[[str, str], dict], reference: dict | None) -> list[dict]:
    """One row per ``NAME=OVERRIDES`` variant, compared with ``reference`` when there is one. A failed
    run becomes a row with its error, and the other rows still run (its log shows why)."""
    rows = []
    for variant in variants:
        name, _, overrides = variant.partition("=")
        print(f"=== {name}: {overrides}", flush=True)
        start = time.perf_counter()
        try:
            row = row_of(name, overrides)
        except subprocess.CalledProcessError as error:
            rows.append({"name": name, "overrides": overrides, "error": str(error)})
            continue
        if reference is not None and "error" not in reference:
            compare(row, reference)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        print(f"=== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def header(benchmark: str, commit: str, steps: int, warmup: int, packages: tuple[str, ...]) -> dict:
    """The result file's description of the run: hardware, torch and package versions, commit, timed steps."""
    return {
        "benchmark": benchmark,
        "hardware": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "versions": {p: version(p) for p in packages},
        "commit": commit,
        "steps": steps,
        "timed_steps": f"median step time of steps {warmup + 1}..{steps}",
    }


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
