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
from pathlib import Path

import torch
from common import header, model_config, run_baseline, run_trainkit, run_variants, trainkit_row, write_result

from trainkit.model import build_model, materialize, set_param_dtypes
from trainkit.weights import save_hf_state_dict

BATCH, SEQ = 2, 2048


def write_random_checkpoint(folder: Path, tokenizer: str) -> None:
    """The shape's weights, initialised as ``init_weights`` does, saved as an HF folder in bf16."""
    cfg = model_config(["model=llama3_8b", "model.source=null"])
    torch.manual_seed(0)
    model = materialize(set_param_dtypes(build_model(cfg), torch.bfloat16, torch.bfloat16), torch.device("cuda"))
    save_hf_state_dict(model.state_dict(), cfg, folder, tokenizer_folder=tokenizer)


def trainkit_variant(name: str, overrides: str, args) -> dict:
    out = args.work / name
    job = [
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
        f"cache_dir={args.work / 'cache'}",
        *overrides.split(),
    ]
    return trainkit_row(name, overrides, run_trainkit(job, out), args.warmup, BATCH * SEQ)


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
    if args.skip_baseline:
        baseline = json.loads(baseline_file.read_text())
    else:
        baseline = run_baseline(
            "hf_qlora_baseline.py",
            [
                f"--weights={args.weights}",
                f"--steps={args.steps}",
                f"--warmup={args.warmup}",
                f"--batch={BATCH}",
                f"--seq={SEQ}",
            ],
            baseline_file,
        )
    rows = [
        baseline,
        *run_variants(args.variant, lambda name, overrides: trainkit_variant(name, overrides, args), baseline),
    ]
    result = header(
        "QLoRA, Llama-3-8B shape (random init), LoRA r=16 all linear, B2 x S2048, bf16",
        args.commit,
        args.steps,
        args.warmup,
        ("transformers", "peft", "bitsandbytes"),
    )
    write_result(args.out, {**result, "rows": rows})


if __name__ == "__main__":
    main()
