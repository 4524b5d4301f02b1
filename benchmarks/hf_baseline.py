"""A full fine-tune as transformers users write it: ``LlamaForCausalLM`` in bf16, SDPA, a plain PyTorch loop.

The model is transformers' own, built (random init) from the ``config.json`` that trainkit exports for
the same model config (``--model-overrides``, composed as ``train.py`` composes them), so both run the
same shape. Weights are bfloat16 (``.to(bfloat16)``, no autocast, no float32 master copy), the cache is
off, no activation checkpointing; each step is ``model(input_ids=x, labels=x).loss``, backward, gradient
clipping, fused torch AdamW, ``zero_grad(set_to_none=True)``. ``--compile`` wraps the model in
``torch.compile`` (default mode); the first ``--warmup`` steps (compilation included) are not timed.
Random token ids in ``[0, --token-range)``: speed and memory do not depend on their values.

    python benchmarks/hf_baseline.py --out baseline.json [--compile]
"""

from __future__ import annotations

import argparse
import json

import torch
from common import model_config, time_steps, timing
from transformers import LlamaConfig, LlamaForCausalLM
from transformers import __version__ as transformers_version

from trainkit.metrics import cuda_memory
from trainkit.weights import hf_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the measured row")
    parser.add_argument("--model-overrides", default="model=llama3_2_1b model.source=null", help="train.py overrides")
    parser.add_argument("--compile", action="store_true", help="torch.compile(model)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm; 0: no clipping")
    parser.add_argument("--token-range", type=int, default=49152, help="random ids in [0, this)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = model_config(args.model_overrides.split())
    fields = {k: v for k, v in hf_config(cfg, torch.bfloat16).items() if k not in ("architectures", "model_type")}
    config = LlamaConfig(**fields, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(device, torch.bfloat16)
    model.train()
    if model.config._attn_implementation != "sdpa":
        raise SystemExit(f"attention is {model.config._attn_implementation!r}, not sdpa")
    params = sum(p.numel() for p in model.parameters())  # tied embedding and head count once
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
    )
    trained = torch.compile(model) if args.compile else model

    def step(ids: torch.Tensor) -> torch.Tensor:
        loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    name = "transformers + torch.compile" if args.compile else "transformers eager"
    generator = torch.Generator().manual_seed(0)
    batches = (
        torch.randint(0, args.token_range, (args.batch, args.seq), generator=generator) for _ in range(args.steps)
    )
    step_times, losses = time_steps(step, batches, device, label=name)
    row = {
        "name": name,
        **timing(step_times, args.warmup, args.batch * args.seq),
        "max_memory_allocated_bytes": None,  # on the CPU; on CUDA the peaks of the whole process
        "max_memory_reserved_bytes": None,
        **cuda_memory(device),
        "params": params,
        "transformers": transformers_version,
        "step_times_s": step_times,
        "losses": losses,
    }
    with open(args.out, "w") as f:
        json.dump(row, f, indent=2)
    print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "step_times_s")}), flush=True)


if __name__ == "__main__":
    main()
