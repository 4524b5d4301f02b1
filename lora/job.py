"""The adapter steps of a training job, in the order the trainer calls them:
``apply_adapters`` on the meta model (before the parallel plan), ``load_weights`` once it is
materialised, ``init_adapters`` last (DoRA's magnitude starts from the loaded base weights)."""

from __future__ import annotations

import torch
from torch import nn

from lora.adapters import apply_lora, init_lora_weights, load_adapter, load_base_weights
from lora.qlora import init_quantized, load_quantized, quantize_base
from trainkit.config import PeftConfig
from trainkit.spec import JobSpec


def apply_adapters(model: nn.Module, spec: JobSpec) -> None:
    """LoRA / DoRA layers on the targeted linears; for QLoRA the base linears also become NF4, packed
    in the compute dtype so the parallel plan stores and gathers them like the other frozen weights."""
    apply_lora(model, spec.cfg.peft)
    if spec.cfg.peft.method == "qlora":
        quantize_base(model, spec.compute_dtype, quant_storage=spec.compute_dtype)


def load_weights(model: nn.Module, folder, spec: JobSpec, device: torch.device) -> None:
    """The pretrained weights under the adapters (``folder`` None: the random init stays), quantized
    while loading for QLoRA, whose base is quantized from a random init when there is no folder."""
    if spec.cfg.peft.method == "qlora":
        if folder is None:
            init_quantized(model, device)
        else:
            load_quantized(model, folder, device)
    elif folder is not None:
        load_base_weights(model, folder)


def init_adapters(model: nn.Module, cfg: PeftConfig) -> None:
    """A saved adapter to continue from, or peft's fresh init (the model starts as the base)."""
    if cfg.adapter is not None:
        load_adapter(model, cfg.adapter)
    else:
        init_lora_weights(model)
