"""LoRA and DoRA adapters on our own model, through peft.

``peft.inject_adapter_in_model`` wraps the targeted ``nn.Linear`` layers in place, so module names
stay ours (= HF's) plus peft's ``base_layer`` / ``lora_A.default`` / ``lora_B.default``; QLoRA then
stores those base layers in NF4 (``lora.qlora``). Injection works on the meta device: adapters exist
before the parallel plan shards the model, and ``init_lora_weights`` gives them peft's init once the
base weights are loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from bitsandbytes.nn import Linear4bit
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import dequantize_module_weight
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from trainkit.config import ConfigError
from trainkit.weights import copy_into, load_hf_weights

ADAPTER = "default"  # peft's adapter name; we train one adapter at a time
FILE_PREFIX = "base_model.model."  # where PeftModel keeps the wrapped model, so where its files name keys
AC_WRAPPER_NAME = "_checkpoint_wrapped_module."  # the submodule name checkpoint_wrapper puts in parameter names
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PRESETS = {"attention": ATTENTION, "mlp": MLP, "all-linear": ATTENTION + MLP}


def target_modules(model: nn.Module, requested: list[str]) -> list[str]:
    """Linear names inside the blocks that ``requested`` names or presets pick; ``lm_head`` is never one."""
    linears = list(
        dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear))
    )
    names = []
    for item in requested:
        if item not in PRESETS and item not in linears:
            raise ConfigError(
                f"peft.target_modules: {item!r} is not a linear layer of the blocks; "
                f"valid: {', '.join(linears)} or a preset ({', '.join(PRESETS)})"
            )
        names += [name for name in PRESETS.get(item, [item]) if name in linears]
    if not names:
        raise ConfigError(f"peft.target_modules={requested} matches no linear layer; valid: {', '.join(linears)}")
    return list(dict.fromkeys(names))


def apply_lora(model: nn.Module, cfg) -> nn.Module:
    """Wrap the targeted linears in LoRA (or DoRA) layers and freeze everything else, in place.

    Call on the meta-device model, before the parallel plan, so FSDP shards the adapters with their
    blocks; ``init_lora_weights`` or ``load_adapter`` fills them after the base weights are loaded.
    """
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules(model, cfg.target_modules),
        use_dora=cfg.use_dora,
        task_type="CAUSAL_LM",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@contextlib.contextmanager
def without_adapters(model: nn.Module):
    """The model with each LoRA layer swapped for the layer it wraps: base weights under HF names."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        model.set_submodule(name, layer.get_base_layer())
    try:
        yield model
    finally:
        for name, layer in layers.items():
            model.set_submodule(name, layer)


def load_base_weights(model: nn.Module, folder) -> None:
    """``load_hf_weights`` for a model with adapters: the base layers get the checkpoint's tensors."""
    with without_adapters(model):
        load_hf_weights(model, folder)


@torch.no_grad()
def init_lora_weights(model: nn.Module) -> None:
    """peft's init for adapters built on meta: A kaiming-uniform, B zeros, so training starts at the base
    model. A is drawn whole on the CPU and then sharded, so every sharding starts from the same
    adapters. A DoRA magnitude starts as the row norms of the base weight: load the base weights first."""
    for layer in lora_layers(model).values():
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        whole_a = torch.empty(a.shape, dtype=a.dtype)
        nn.init.kaiming_uniform_(whole_a, a=math.sqrt(5))  # peft's default for A
        copy_into(a, whole_a)
        copy_into(b, torch.zeros(b.shape, dtype=b.dtype))
        if ADAPTER in layer.lora_magnitude_vector:
            weight = dequantize_module_weight(layer.get_base_layer())
            layer.lora_magnitude_vector[ADAPTER].weight.copy_(torch.linalg.norm(weight.float(), dim=1))


def _file_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters themselves, under the key names of peft's adapter_model.safetensors.

    Keyed by parameter names, which match the module names peft walks (a state_dict would not: it
    drops the name activation checkpointing's wrapper adds, so peft would find no adapter in it)."""
    params = get_peft_model_state_dict(model, state_dict=dict(model.named_parameters()), adapter_name=ADAPTER)
    return {FILE_PREFIX + key.replace(AC_WRAPPER_NAME, ""): param for key, param in params.items()}


def _gathered(params: list[torch.Tensor]):
    """ZeRO-3 leaves each rank its partition of a large parameter: gather them whole (a collective)."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed  # only DeepSpeed runs get here

    return deepspeed.zero.GatheredParameters(params)


@torch.no_grad()
def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: str) -> Path:
    """Write peft's adapter folder, which ``PeftModel.from_pretrained(<the HF base>, out_dir)`` loads.

    Sharded adapters are gathered first, a collective: call on every rank; rank 0 writes.
    """
    params = _file_params(model)
    with _gathered(list(params.values())):
        state = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in params.items()}
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    out = Path(out_dir)
    if dist.is_initialized() and dist.get_rank() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(model.peft_config[ADAPTER], base_model_name_or_path=str(base_model_name_or_path))
    config.save_pretrained(out)
    save_file(state, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir) -> None:
    """Copy a saved adapter into the model's adapters (built by ``apply_lora`` with the same config)."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    saved = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    ours = model.peft_config[ADAPTER]
    for key in ("r", "lora_alpha", "use_dora"):
        if saved.get(key) != getattr(ours, key):
            raise ConfigError(f"{adapter_dir}: the adapter has {key}={saved.get(key)}, the config {getattr(ours, key)}")
    params = _file_params(model)
    with safe_open(path, framework="pt", device="cpu") as f:
        keys = set(f.keys())
        if keys != params.keys():
            raise ConfigError(
                f"{path} does not fit the adapters: missing {sorted(params.keys() - keys)[:3]}, "
                f"unexpected {sorted(keys - params.keys())[:3]}: use the peft.target_modules it was trained with"
            )
        for key in keys:
            copy_into(params[key], f.get_tensor(key))


def _dense_linear(base: nn.Module, weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if base.bias is not None:
        linear.bias = nn.Parameter(base.bias.detach().to(weight.dtype), requires_grad=False)
    return linear


def _merged_weight(layer: LoraLayer) -> torch.Tensor:
    """W + scale * B @ A, or DoRA's magnitude * (W + ...) / row norm; an NF4 W is dequantized first."""
    weight = dequantize_module_weight(layer.get_base_layer()).detach()
    variant = layer.lora_variant.get(ADAPTER)
    merged = variant.merge_safe(layer, ADAPTER, weight) if variant else weight + layer.get_delta_weight(ADAPTER)
    return merged.to(weight.dtype)


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight, in place: every LoRA layer (and any NF4 linear left)
    becomes a plain ``nn.Linear``, so ``model.state_dict()`` has HF names for ``save_hf_state_dict``."""
    for name, layer in lora_layers(model).items():
        model.set_submodule(name, _dense_linear(layer.get_base_layer(), _merged_weight(layer)))
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            model.set_submodule(name, _dense_linear(module, dequantize_module_weight(module).detach()))
    return model
