"""Full fine-tune of the Llama-3.2-1B shape on one GPU: trainkit against transformers, eager and
compiled, in one session, at the same shape, batch, sequence length, dtype and optimizer.

Rows, each in its own process so that memory peaks do not mix:

* ``transformers eager`` and ``transformers + torch.compile``: ``hf_baseline.py`` (``LlamaForCausalLM``,
  bf16 weights, SDPA, fused AdamW, a plain loop, random token ids below the tokenizer's 49152);
* one ``train.py`` run per ``--variant NAME=OVERRIDES`` on the Shakespeare texts of ``--data``, by default
  ``unpacked`` (``data.pack=false``: 2048-token windows of one play, as the baseline's causal rows) and
  ``packed`` (``data.pack=true data.sample_by=paragraph``: paragraphs of mixed length packed into rows,
  attention masked per document).

All rows: random init, B4 x S2048, bf16 weights and optimizer states (``precision.param_dtype=bfloat16``),
no activation checkpointing, AdamW lr 1e-5 betas (0.9, 0.95) weight decay 0.1 constant, gradient
clipping at 1.0; trainkit with ``compile=true``. Tokens/s is batch x seq over the median step time after
``--warmup`` steps; MFU is the same formula for every row (``trainkit.metrics.flops_per_token``, PaLM's
6N + 12 L H Q T) over the device's dense bf16 peak (989 TFLOP/s on an H100). Writes one JSON file:
hardware, versions, commit, the rows, every row's ratios to the compiled baseline, packed / unpacked.

    python benchmarks/full_1b.py --data TEXTS --tokenizer TOK --out results/full_1b/h100.json \\
        --commit $(git rev-parse --short HEAD)
    python benchmarks/full_1b.py --tiny --data TEXTS --tokenizer TOK --out /tmp/tiny.json --commit x  # CPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
from pathlib import Path

import torch
from common import (
    compare,
    header,
    model_config,
    ratio,
    run_baseline,
    run_trainkit,
    run_variants,
    trainkit_row,
    write_result,
)

from trainkit.config import LoggingConfig
from trainkit.metrics import flops_per_token, peak_flops

MODEL = ["model=llama3_2_1b", "model.source=null"]
# --tiny: a 2-layer model of the same family, short rows and a few steps, so the whole driver runs on a CPU.
TINY_MODEL = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "model.vocab_size=49152",
]
VARIANTS = [
    "unpacked=data.pack=false",
    "packed=data.pack=true data.sample_by=paragraph",
]
PHASES = ("data", "forward", "backward", "optimizer", "other")


def trainkit_variant(name: str, overrides: str, args, model: list[str]) -> dict:
    out = args.work / name
    job = [
        *model,
        f"model.tokenizer={args.tokenizer}",
        f"data.source={args.data}",
        f"data.seq_len={args.seq}",
        "data.pack=false",
        "data.eval_fraction=0",  # no eval rows, so no eval pass (nor its compilation) inside the run
        "precision=bf16",
        "precision.param_dtype=bfloat16",  # bf16 weights and AdamW states, as the baseline's .to(bfloat16)
        "parallel=single",
        "ac=none",
        "compile=true",
        f"optim.lr={args.lr}",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        f"optim.grad_clip={args.grad_clip}",
        f"train.micro_batch_size={args.batch}",
        f"train.steps={args.steps}",
        "train.export_hf=false",
        f"cache_dir={args.work / 'cache'}",
        *overrides.split(),
    ]
    records = run_trainkit(job, out)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the final checkpoint only fills the disk
    row = trainkit_row(name, overrides, records, args.warmup, args.batch * args.seq)
    losses = row.pop("losses")
    timed = records[args.warmup :]
    row["label_tokens_per_s"] = statistics.median(r["label_tokens"] / r["step_time_s"] for r in timed)  # no padding
    row["mfu_logged"] = None if timed[0]["mfu"] is None else statistics.median(r["mfu"] for r in timed)
    row["phases_s"] = {p: statistics.median(r[f"time_{p}_s"] for r in timed) for p in PHASES}
    row["losses"] = losses
    return row


def baseline(mode: str, args, model: list[str]) -> dict:
    out = args.work / f"hf_{mode}.json"
    if args.skip_baselines:
        return json.loads(out.read_text())
    print(f"=== transformers {mode}", flush=True)
    command = [
        f"--model-overrides={' '.join(model)}",
        f"--batch={args.batch}",
        f"--seq={args.seq}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--lr={args.lr}",
        f"--grad-clip={args.grad_clip}",
        *(["--compile"] if mode == "compile" else []),
    ]
    try:
        return run_baseline("hf_baseline.py", command, out)
    except subprocess.CalledProcessError as error:  # keep the other rows; the log shows why
        return {"name": f"transformers {mode}", "error": str(error)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder of Shakespeare plain texts (trainkit's rows)")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer folder (SmolLM2's: 49152 ids)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/full_1b"))
    parser.add_argument("--steps", type=int, help="default 20 (--tiny: 4)")
    parser.add_argument("--warmup", type=int, help="steps left out of the timing; default 5 (--tiny: 1)")
    parser.add_argument("--batch", type=int, help="default 4 (--tiny: 2)")
    parser.add_argument("--seq", type=int, help="default 2048 (--tiny: 128)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="both sides; 0: no clipping")
    parser.add_argument("--peak-tflops", type=float, help="MFU's peak; default: trainkit.metrics.peak_flops")
    parser.add_argument("--variant", action="append", help="NAME=OVERRIDES for one trainkit row (replaces defaults)")
    parser.add_argument("--skip-baselines", action="store_true", help="reuse WORK/hf_eager.json, WORK/hf_compile.json")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, B2 x S128, 4 steps: a CPU smoke test")
    args = parser.parse_args()
    for key, full, tiny in (("steps", 20, 4), ("warmup", 5, 1), ("batch", 4, 2), ("seq", 2048, 128)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    model = MODEL + (TINY_MODEL if args.tiny else [])
    args.work.mkdir(parents=True, exist_ok=True)

    eager, compiled = baseline("eager", args, model), baseline("compile", args, model)
    compare(compiled, eager, "_vs_eager")
    trainkit_rows = run_variants(
        args.variant or VARIANTS, lambda name, overrides: trainkit_variant(name, overrides, args, model), compiled
    )
    for row in trainkit_rows:
        compare(row, eager, "_vs_eager")
    rows = [eager, compiled, *trainkit_rows]

    # MFU: one formula for every row, so rows compare; attention counted over the whole row also when packed.
    cfg = model_config(model)
    per_token = flops_per_token(cfg, args.seq)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_flops(device, LoggingConfig(peak_tflops=args.peak_tflops or None))  # the rate trainkit's own MFU uses
    for row in rows:
        if "tokens_per_s" in row:
            row["mfu"] = None if peak is None else per_token * row["tokens_per_s"] / peak

    by_name = {row["name"]: row for row in rows if "error" not in row}
    packing = None
    if "packed" in by_name and "unpacked" in by_name:
        packed, unpacked = by_name["packed"], by_name["unpacked"]
        tokens = ratio(packed["tokens_per_s"], unpacked["tokens_per_s"])
        packing = {
            "tokens_per_s_ratio": tokens,
            "label_tokens_per_s_ratio": ratio(packed["label_tokens_per_s"], unpacked["label_tokens_per_s"]),
            "within_5_percent": tokens >= 0.95,
        }
    result = header(
        f"Full fine-tune, {'tiny 2-layer model' if args.tiny else 'Llama-3.2-1B shape'} (random init), "
        f"B{args.batch} x S{args.seq}, bf16 weights, no AC, fused AdamW, grad clip {args.grad_clip}",
        args.commit,
        args.steps,
        args.warmup,
        ("transformers",),
    )
    result.update(
        {
            "model_overrides": model,
            "flops_per_token": per_token,
            "peak_flops": peak,
            "baseline_data": "random token ids in [0, 49152)",
            "trainkit_data": f"{args.data}, tokenizer {args.tokenizer}",
            "reference": "ratios speedup / memory_ratio: to the compiled baseline; *_vs_eager: to the eager one",
            "packed_vs_unpacked": packing,
            "rows": rows,
        }
    )
    write_result(args.out, result)
    summary = ["name", "tokens_per_s", "mfu", "max_memory_allocated_bytes", "speedup", "memory_ratio", "error"]
    for row in rows:
        print(json.dumps({k: row[k] for k in summary if k in row}), flush=True)
    print(json.dumps({"packed_vs_unpacked": packing}), flush=True)


if __name__ == "__main__":
    main()
