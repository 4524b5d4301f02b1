"""The QLoRA stack users pick today, as its docs show it: transformers + peft + bitsandbytes.

NF4 base with double quantization and bf16 compute, ``prepare_model_for_kbit_training``, gradient
checkpointing (enabled explicitly: with transformers 5 ``prepare_model_for_kbit_training`` leaves it
off), SDPA attention, LoRA on every linear layer, torch AdamW on the adapters, bf16 autocast as the
HF Trainer runs it. Random token ids: throughput and memory do not depend on their values.

    python benchmarks/hf_qlora_baseline.py --weights DIR --out baseline.json
"""

from __future__ import annotations

import argparse
import json

import bitsandbytes as bnb
import torch
from common import time_steps, timing
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from trainkit.metrics import cuda_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="HF folder of the base model")
    parser.add_argument("--out", required=True, help="JSON file for the measured row")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.weights,
        quantization_config=quantization,
        dtype=torch.bfloat16,
        device_map={"": 0},
        attn_implementation="sdpa",
    )
    quantized = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    if quantized == 0:
        raise SystemExit("the base was not quantized: no bitsandbytes Linear4bit layer in the loaded model")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode, where transformers skips gradient checkpointing
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)

    def step(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = (torch.randint(0, vocab, (args.batch, args.seq), generator=generator) for _ in range(args.steps))
    step_times, losses = time_steps(step, batches, torch.device("cuda"))
    row = {
        "name": "transformers + peft + bitsandbytes",
        **timing(step_times, args.warmup, args.batch * args.seq),
        **cuda_memory(torch.device("cuda")),
        "trainable_params": sum(p.numel() for p in trainable),
        "nf4_linears": quantized,
        "losses": losses,
    }
    with open(args.out, "w") as f:
        json.dump(row, f, indent=2)
    print(json.dumps({k: v for k, v in row.items() if k != "losses"}))


if __name__ == "__main__":
    main()
