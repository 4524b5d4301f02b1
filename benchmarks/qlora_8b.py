"""QLoRA of the Llama-3-8B shape on one GPU: trainkit against transformers + peft + bitsandbytes,
in one session, on the same random-initialised weights, batch and sequence length.

Writes a random bf16 checkpoint of the shape once (``--weights``), runs
``hf_qlora_baseline.py`` and then ``train.py`` once per ``--variant``, each in its own process, and
writes one JSON file: hardware, versions, commit, every row and its ratios to the baseline.

    python benchmarks/qlora_8b.py --weights /tmp/llama3-8b --tokenizer TOK --data TEXTS \\
        --commit $(git rev-parse HEAD) --out results/qlora_8b_h100.json \\
        --variant "trainkit=ac=full compile=true"
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from trainkit.config import register_schema
from trainkit.model import build_model, materialize, set_param_dtypes
from trainkit.weights import save_hf_state_dict

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ = 2, 2048


def model_config(overrides: list[str]):
    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose("train", overrides=overrides).model


def write_random_checkpoint(folder: Path, tokenizer: str) -> None:
    """The shape's weights, initialised as ``init_weights`` does, saved as an HF folder in bf16."""
    cfg = model_config(["model=llama3_8b", "model.source=null"])
    torch.manual_seed(0)
    model = materialize(set_param_dtypes(build_model(cfg), torch.bfloat16, torch.bfloat16), torch.device("cuda"))
    save_hf_state_dict(model.state_dict(), cfg, folder, tokenizer_folder=tokenizer)


def trainkit_row(name: str, overrides: str, args, work: Path) -> dict:
    out = work / name
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "model=llama3_8b",
        f"model.source={args.weights}",
        "model.tokenizer=null",  # the checkpoint folder carries the tokenizer
        f"data.source={args.data}",
        f"data.seq_len={SEQ}",
        "data.pack=false",  # whole windows of one play: the baseline's unmasked causal rows
        "peft=qlora",
        "precision=bf16",
        "parallel=single",
        "optim.lr=2e-4",
        "optim.warmup_steps=2",
        f"train.micro_batch_size={BATCH}",
        f"train.steps={args.steps}",
        "train.eval_batches=1",
        f"train.output_dir={out}",
        "train.overwrite=true",
        "logging.progress_bar=false",
        f"cache_dir={work / 'cache'}",
        *overrides.split(),
    ]
    subprocess.run(command, check=True, cwd=ROOT)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    step_time = statistics.median(r["step_time_s"] for r in steps[args.warmup :])
    return {
        "name": name,
        "overrides": overrides,
        "tokens_per_s": BATCH * SEQ / step_time,
        "step_time_s": step_time,
        "max_memory_allocated_bytes": max(r["max_memory_allocated_bytes"] for r in steps),
        "max_memory_reserved_bytes": max(r["max_memory_reserved_bytes"] for r in steps),
        "losses": [r["loss"] for r in steps],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="HF folder; written if it holds no config.json")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (any: the ids are only data)")
    parser.add_argument("--data", required=True, help="text folder for trainkit's rows")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora_8b"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDES for one trainkit row")
    parser.add_argument("--skip-baseline", action="store_true", help="reuse WORK/baseline.json")
    args = parser.parse_args()

    if not (args.weights / "config.json").is_file():
        write_random_checkpoint(args.weights, args.tokenizer)
    args.work.mkdir(parents=True, exist_ok=True)
    baseline_file = args.work / "baseline.json"
    if not args.skip_baseline:
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "hf_qlora_baseline.py"),
                f"--weights={args.weights}",
                f"--out={baseline_file}",
                f"--steps={args.steps}",
                f"--warmup={args.warmup}",
                f"--batch={BATCH}",
                f"--seq={SEQ}",
            ],
            check=True,
        )
    baseline = json.loads(baseline_file.read_text())
    rows = [baseline]
    for variant in args.variant:
        name, _, overrides = variant.partition("=")
        try:
            row = trainkit_row(name, overrides, args, args.work)
        except subprocess.CalledProcessError as error:  # keep the other rows; the log shows why
            rows.append({"name": name, "overrides": overrides, "error": str(error)})
            continue
        row["speedup"] = row["tokens_per_s"] / baseline["tokens_per_s"]
        row["memory_ratio"] = row["max_memory_allocated_bytes"] / baseline["max_memory_allocated_bytes"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    result = {
        "benchmark": "QLoRA, Llama-3-8B shape (random init), LoRA r=16 all linear, B2 x S2048, bf16",
        "hardware": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "versions": {p: version(p) for p in ("transformers", "peft", "bitsandbytes")},
        "commit": args.commit,
        "steps": args.steps,
        "timed_steps": f"median step time of steps {args.warmup + 1}..{args.steps}",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
