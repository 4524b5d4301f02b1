"""Measure real runs on the GPUs present and set each rank's measured peaks beside the prediction.

    python -m profiling.validate --grid h100x1 --out results/memory_validation.jsonl \\
        --data <folder of text files> --tokenizer <tokenizer source> [--cases a,b] [--timeout 600]

Each case of the grid runs ``train.steps=3`` from random init through ``torchrun -m profiling.measure``,
then one row per rank is appended to ``--out``: the case, its portable overrides, the world size,
predicted and measured ``max_memory_allocated`` / ``max_memory_reserved`` / device memory in use,
their relative errors, the GPU, torch version and commit. A case that fails is reported and
skipped; the rest go on. ``tests/test_profiling.py`` predicts every committed row again and fails
when an error leaves its bound, so a change that breaks a prediction fails CI.

    python -m profiling.validate --repredict --out results/memory_validation.jsonl

recomputes the predictions (and errors) of the rows already in the file, after a simulator change.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Bounds the regression test holds every committed row to (the acceptance).
ALLOCATED_BOUND, RESERVED_BOUND = 0.05, 0.10
RUN = [
    "train.steps=3",
    "optim.warmup_steps=0",
    "data.eval_fraction=0",
    "train.export_hf=false",
    "logging.progress_bar=false",
]


@dataclass(frozen=True)
class Case:
    name: str
    overrides: tuple[str, ...]
    gpus: int = 1


ONE = "model=llama3_2_1b model.source=null"
EIGHT = "model=llama3_8b model.num_layers=4"
EIGHT_RANDOM = f"{EIGHT} model.source=null"
# The SmolLM2 tokenizer the grids run with has 49152 ids, more than Mixtral's 32000.
MOE = (
    "model=mixtral_8x7b model.source=null model.num_layers=2 model.hidden_size=1024 model.intermediate_size=2048 "
    "model.vocab_size=49152"
)


def _case(name: str, overrides: str, gpus: int = 1) -> Case:
    return Case(name, tuple(overrides.split()), gpus)


GRIDS = {
    "h100x1": [
        _case(
            "smollm2-bf16",
            "model=smollm2_135m model.source=null precision=bf16 train.micro_batch_size=8 data.seq_len=256",
        ),
        _case(
            "smollm2-fp32-s1024",
            "model=smollm2_135m model.source=null precision=fp32 train.micro_batch_size=4 data.seq_len=1024",
        ),
        _case(
            "smollm2-fp16",
            "model=smollm2_135m model.source=null precision=fp16 train.micro_batch_size=8 data.seq_len=512",
        ),
        _case(
            "smollm2-qlora",
            "model=smollm2_135m model.source=null peft=qlora train.micro_batch_size=8 data.seq_len=512",
        ),
        _case("1b-bf16", f"{ONE} precision=bf16 train.micro_batch_size=2 data.seq_len=2048"),
        _case("1b-bf16-ac-full", f"{ONE} precision=bf16 ac=full train.micro_batch_size=4 data.seq_len=2048"),
        _case("1b-bf16-ac-every2", f"{ONE} precision=bf16 ac=every_2 train.micro_batch_size=4 data.seq_len=2048"),
        _case("1b-bf16-ac-selective", f"{ONE} precision=bf16 ac=selective train.micro_batch_size=2 data.seq_len=2048"),
        _case("1b-bf16-ac-offload", f"{ONE} precision=bf16 ac=full_offload train.micro_batch_size=4 data.seq_len=2048"),
        _case("1b-bf16-nopack", f"{ONE} precision=bf16 data.pack=false train.micro_batch_size=4 data.seq_len=1024"),
        _case("1b-bf16-compile", f"{ONE} precision=bf16 compile=true train.micro_batch_size=2 data.seq_len=2048"),
        _case(
            "1b-bf16-adamw8bit",
            f"{ONE} precision=bf16 optim.name=adamw_8bit train.micro_batch_size=2 data.seq_len=2048",
        ),
        _case(
            "1b-bf16-ga2", f"{ONE} precision=bf16 train.grad_accum_steps=2 train.micro_batch_size=2 data.seq_len=1024"
        ),
        _case("1b-fp32-math-attn", f"{ONE} precision=fp32 train.micro_batch_size=1 data.seq_len=1024"),
        _case(
            "1b-lora-selective",
            f"{ONE} precision=bf16 peft=lora ac=selective train.micro_batch_size=4 data.seq_len=2048",
        ),
        _case("8b-4l-lora", f"{EIGHT_RANDOM} precision=bf16 peft=lora train.micro_batch_size=2 data.seq_len=2048"),
        _case(
            "8b-4l-qlora",
            f"{EIGHT_RANDOM} precision=bf16 peft=qlora ac=full train.micro_batch_size=2 data.seq_len=2048",
        ),
        _case(
            "8b-4l-bf16-ac-full", f"{EIGHT_RANDOM} precision=bf16 ac=full train.micro_batch_size=1 data.seq_len=2048"
        ),
        _case("1b-bf16-s4096-ac-full", f"{ONE} precision=bf16 ac=full train.micro_batch_size=1 data.seq_len=4096"),
        _case("1b-fp16-selective", f"{ONE} precision=fp16 ac=selective train.micro_batch_size=2 data.seq_len=2048"),
        _case(
            "1b-bf16-ga4-ac-full",
            f"{ONE} precision=bf16 ac=full train.grad_accum_steps=4 train.micro_batch_size=2 data.seq_len=2048",
        ),
        _case(
            "1b-bf16-compile-ac-full",
            f"{ONE} precision=bf16 compile=true ac=full train.micro_batch_size=4 data.seq_len=2048",
        ),
        _case(
            "1b-lora-adamw8bit",
            f"{ONE} precision=bf16 peft=lora optim.name=adamw_8bit train.micro_batch_size=4 data.seq_len=2048",
        ),
        _case(
            "1b-bf16-every2-offload",
            f"{ONE} precision=bf16 ac=every_2 ac.offload=true train.micro_batch_size=2 data.seq_len=2048",
        ),
        _case("8b-4l-lora-fp16", f"{EIGHT_RANDOM} precision=fp16 peft=lora train.micro_batch_size=2 data.seq_len=2048"),
        _case(
            "8b-4l-qlora-selective",
            f"{EIGHT_RANDOM} precision=bf16 peft=qlora ac=selective train.micro_batch_size=2 data.seq_len=2048",
        ),
        _case(
            "8b-8l-lora-ac-full",
            "model=llama3_8b model.source=null model.num_layers=8 precision=bf16 peft=lora ac=full "
            "train.micro_batch_size=4 data.seq_len=4096",
        ),
        _case(
            "smollm2-bf16-b16-s1024",
            "model=smollm2_135m model.source=null precision=bf16 train.micro_batch_size=16 data.seq_len=1024",
        ),
        _case(
            "qwen-0.5b-lora",
            "model=qwen2_0_5b model.source=null precision=bf16 peft=lora train.micro_batch_size=4 data.seq_len=2048",
        ),
        _case(
            "qwen-0.5b-bias",
            "model=qwen2_0_5b model.source=null precision=bf16 train.micro_batch_size=4 data.seq_len=1024",
        ),
        _case(
            "moe-small",
            f"{MOE} precision=bf16 train.micro_batch_size=4 data.seq_len=1024",
        ),
    ],
    "x2": [
        _case("2-fsdp", f"{ONE} precision=bf16 parallel=fsdp train.micro_batch_size=2 data.seq_len=2048", 2),
        _case(
            "2-fsdp-zero2", f"{ONE} precision=bf16 parallel=fsdp_zero2 train.micro_batch_size=2 data.seq_len=2048", 2
        ),
        _case(
            "2-fsdp-ga2",
            f"{ONE} precision=bf16 parallel=fsdp train.grad_accum_steps=2 train.micro_batch_size=2 data.seq_len=1024",
            2,
        ),
        _case(
            "2-fsdp-ac-lora",
            f"{ONE} precision=bf16 parallel=fsdp ac=full peft=lora train.micro_batch_size=4 data.seq_len=2048",
            2,
        ),
        _case(
            "2-fsdp-offload",
            f"{ONE} precision=bf16 parallel=fsdp_offload train.micro_batch_size=2 data.seq_len=2048",
            2,
        ),
        _case("2-ddp", f"{ONE} precision=bf16 parallel=ddp ac=full train.micro_batch_size=4 data.seq_len=2048", 2),
        _case("2-tp", f"{ONE} precision=bf16 parallel=tp train.micro_batch_size=2 data.seq_len=2048", 2),
        _case(
            "2-ep",
            f"{MOE} precision=bf16 parallel=fsdp_ep train.micro_batch_size=4 data.seq_len=1024",
            2,
        ),
        _case("2-zero1", f"{ONE} precision=bf16 parallel=zero1 train.micro_batch_size=2 data.seq_len=2048", 2),
        _case("2-zero2", f"{ONE} precision=bf16 parallel=zero2 train.micro_batch_size=2 data.seq_len=2048", 2),
        _case("2-zero3", f"{ONE} precision=bf16 parallel=zero3 train.micro_batch_size=2 data.seq_len=2048", 2),
    ],
    "x4": [
        _case(
            "4-hsdp", f"{ONE} precision=bf16 parallel=hsdp ac=selective train.micro_batch_size=2 data.seq_len=2048", 4
        ),
        _case("4-fsdp-tp", f"{ONE} precision=bf16 parallel=fsdp_tp train.micro_batch_size=2 data.seq_len=2048", 4),
        _case(
            "4-fsdp-8b",
            f"{EIGHT_RANDOM} precision=bf16 parallel=fsdp ac=full train.micro_batch_size=2 data.seq_len=4096",
            4,
        ),
        _case("4-tp", f"{ONE} precision=bf16 parallel=tp ac=full train.micro_batch_size=4 data.seq_len=2048", 4),
        _case(
            "4-ep",
            f"{MOE} precision=bf16 parallel=fsdp_ep train.micro_batch_size=4 data.seq_len=1024",
            4,
        ),
        _case(
            "4-zero3-offload",
            f"{ONE} precision=bf16 parallel=zero3_offload train.micro_batch_size=2 data.seq_len=2048",
            4,
        ),
    ],
}


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(case: Case, machine: list[str], workdir: Path, timeout: int) -> list[dict]:
    """Run the case on ``case.gpus`` local GPUs; the per-rank peaks it reports."""
    report = workdir / f"{case.name}.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={case.gpus}"]
    command += ["-m", "profiling.measure", str(report), *case.overrides, *machine, *RUN]
    command += [f"train.output_dir={workdir / case.name}", "train.overwrite=true"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:  # the child's own error line, not torchrun's summary
        causes = [line for line in done.stderr.splitlines() if "Error" in line and "ChildFailedError" not in line]
        raise RuntimeError(causes[-1] if causes else f"exit {done.returncode}")
    return sorted((json.loads(line) for line in report.read_text().splitlines()), key=lambda r: r["rank"])


def prediction_columns(overrides: list[str], world_size: int, gpu_name: str) -> dict:
    from profiling.hardware import resolve_gpu
    from profiling.job import spec_of
    from profiling.simulator import predict

    placeholders = ["train.output_dir=/nonexistent/profiling-validate"]
    if not any(o.startswith("model.tokenizer=") for o in overrides):  # the machine's; never read here
        placeholders.append("model.tokenizer=tokenizer")
    spec = spec_of([*overrides, *placeholders], world_size)
    prediction = predict(spec, resolve_gpu(gpu_name))
    rank = prediction.worst
    return {
        "predicted_allocated": rank.peak_allocated,
        "predicted_reserved": rank.peak_reserved,
        "predicted_device_used": rank.device_used,
        "peak_moment": rank.peak_moment,
    }


def check_row(row: dict) -> list[str]:
    """Predict a committed row again; one message per error outside its bound (none: it holds)."""
    predicted = {**row, **prediction_columns(row["overrides"], row["world_size"], row["gpu"])}
    problems = []
    for what, bound in (("allocated", ALLOCATED_BOUND), ("reserved", RESERVED_BOUND)):
        error = errors(predicted)[f"error_{what}"]
        if abs(error) > bound:
            problems.append(
                f"{row['config']} rank {row['rank']}: peak {what} predicted {predicted[f'predicted_{what}']:,} B, "
                f"measured {row[f'measured_{what}']:,} B: {error:+.1%} is outside +-{bound:.0%}"
            )
    return problems


def errors(row: dict) -> dict:
    return {
        "error_allocated": row["predicted_allocated"] / row["measured_allocated"] - 1,
        "error_reserved": row["predicted_reserved"] / row["measured_reserved"] - 1,
    }


def validate(args) -> None:
    from profiling.hardware import detect_gpu

    gpu = detect_gpu()
    if gpu is None:
        raise SystemExit("profiling.validate: no known CUDA GPU here (see profiling/hardware.py)")
    cases = GRIDS[args.grid]
    if args.cases:  # in the order given
        by_name = {c.name: c for c in cases}
        cases = [by_name[name] for name in args.cases.split(",")]
    commit = args.commit or git_commit()
    machine = [f"data.source={args.data}", f"model.tokenizer={args.tokenizer}"]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        os.environ.setdefault("TRAINKIT_CACHE", str(workdir / "cache"))
        for case in cases:
            overrides = list(case.overrides)
            try:
                measured = measure(case, machine, workdir, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                print(f"{case.name}: not measured: {err}", flush=True)
                continue
            try:
                predicted = prediction_columns(overrides, case.gpus, gpu.name)
            except Exception as err:  # the measurement stands; --repredict fills the prediction in later
                print(f"{case.name}: measured, prediction failed: {err!r}", flush=True)
                predicted = {}
            with open(args.out, "a") as f:
                for m in measured:
                    row = {
                        "config": case.name,
                        "overrides": overrides,
                        "world_size": case.gpus,
                        "rank": m["rank"],
                        **predicted,
                        "measured_allocated": m["max_allocated"],
                        "measured_reserved": m["max_reserved"],
                        "measured_device_used": m["device_used"],
                        "gpu": gpu.name,
                        "device": m["device"],
                        "total_memory": m["total_memory"],
                        "torch": m["torch"],
                        "commit": commit,
                        "date": datetime.date.today().isoformat(),
                    }
                    if predicted:
                        row.update(errors(row))
                    f.write(json.dumps(row) + "\n")
            summary = ", ".join(f"rank {m['rank']} {m['max_allocated'] / 2**30:.2f} GiB" for m in measured)
            print(
                f"{case.name}: {summary}; predicted {predicted.get('predicted_allocated', 0) / 2**30:.2f} GiB",
                flush=True,
            )


def repredict(path: str) -> None:
    """Recompute the prediction columns of every row of ``path`` in place."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    cache: dict[tuple, dict] = {}
    for row in rows:
        key = (tuple(row["overrides"]), row["world_size"], row["gpu"])
        if key not in cache:
            cache[key] = prediction_columns(row["overrides"], row["world_size"], row["gpu"])
        row.update(cache[key])
        row.update(errors(row))
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m profiling.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS))
    parser.add_argument("--out", required=True, help="the JSONL table rows are appended to")
    parser.add_argument("--data", help="data.source for every case (a folder of text files)")
    parser.add_argument("--tokenizer", help="model.tokenizer for every case")
    parser.add_argument("--cases", help="comma-separated case names, run in this order (default: the whole grid)")
    parser.add_argument("--commit", help="the commit measured (default: git rev-parse)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per case")
    parser.add_argument("--repredict", action="store_true", help="recompute the predictions of --out's rows")
    args = parser.parse_args(argv)
    if args.repredict:
        repredict(args.out)
    elif not (args.grid and args.data and args.tokenizer):
        parser.error("--grid, --data and --tokenizer are needed to measure")
    else:
        validate(args)


if __name__ == "__main__":
    main()
