"""Parameter-efficient fine-tuning: LoRA / DoRA adapters (peft) on a frozen base, which QLoRA keeps in
4-bit NF4 (bitsandbytes)."""

from lora.adapters import (
    apply_lora,
    init_lora_weights,
    load_adapter,
    load_base_weights,
    merge_adapters,
    save_adapter,
    target_modules,
)
from lora.job import apply_adapters, init_adapters, load_weights
from lora.qlora import load_quantized, quantize_base

__all__ = [
    "apply_adapters",
    "init_adapters",
    "load_weights",
    "apply_lora",
    "init_lora_weights",
    "load_adapter",
    "load_base_weights",
    "load_quantized",
    "merge_adapters",
    "quantize_base",
    "save_adapter",
    "target_modules",
]
