"""LoRA / DoRA / QLoRA adapters: what trains, what loads, and that every path gives the same logits.

Everything runs in float32 on the CPU, where LoRA arithmetic is exact up to summation order; NF4
layers are quantized from float32 and dequantize back to it.
"""

import weakref

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import LlamaForCausalLM

import lora.qlora
from lora import (
    apply_lora,
    init_lora_weights,
    load_adapter,
    load_base_weights,
    load_quantized,
    merge_adapters,
    quantize_base,
    save_adapter,
)
from tests.test_train import spec_for
from trainkit.config import ConfigError, PeftConfig
from trainkit.model import build_model, materialize
from trainkit.optim import build_optimizer
from trainkit.weights import load_hf_weights, model_config_from_hf

CPU = torch.device("cpu")


def lora_config(**fields) -> PeftConfig:
    """LoRA r=8 on every block linear unless ``fields`` say otherwise."""
    return PeftConfig(**{"name": "lora", "method": "lora", "r": 8, "alpha": 16, **fields})


def tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def adapter_model(folder, quantized: bool = False, fresh: bool = False, **peft) -> nn.Module:
    """The trainer's order: meta model → adapters → (NF4 base) → materialise → base weights → adapter init.

    Unless ``fresh``, B gets random values instead of peft's zeros, so the adapters change the logits.
    """
    model = build_model(model_config_from_hf(folder))
    apply_lora(model, lora_config(**peft))
    if quantized:
        quantize_base(model, compute_dtype=torch.float32, quant_storage=torch.float32)
    materialize(model, CPU)
    if quantized:
        load_quantized(model, folder, CPU)
    else:
        load_base_weights(model, folder)
    init_lora_weights(model)
    if fresh:
        return model
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return model


def plain_model(folder) -> nn.Module:
    model = materialize(build_model(model_config_from_hf(folder)), CPU)
    load_hf_weights(model, folder)
    return model


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference, relative to the largest magnitude of the reference ``b``."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("preset", ["attention", "mlp", "all-linear", "q_proj,down_proj"])
def test_only_adapters_train(tiny_source, preset):
    targets = {
        "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "mlp": ["gate_proj", "up_proj", "down_proj"],
        "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }.get(preset, preset.split(","))
    model = build_model(model_config_from_hf(tiny_source))
    r = 4
    expected = sum(
        r * (m.in_features + m.out_features)
        for name, m in model.model.layers.named_modules()
        if name.rsplit(".", 1)[-1] in targets
    )
    apply_lora(model, lora_config(r=r, target_modules=preset.split(",")))  # on meta, as the trainer does
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected
    assert not model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_fresh_adapters_start_at_the_base_model(tiny_source, use_dora):
    """peft's init after loading: B = 0 (A random), a DoRA magnitude equal to the base rows' norms."""
    model = adapter_model(tiny_source, fresh=True, use_dora=use_dora)
    assert all(p.abs().sum() > 0 for name, p in model.named_parameters() if "lora_A" in name)
    x = tokens(model.cfg.vocab_size)
    with torch.no_grad():
        assert max_rel(model(x), plain_model(tiny_source)(x)) <= 1e-6


@pytest.mark.parametrize("bad", ["qproj", "lm_head"])
def test_unknown_target_module_is_a_config_error(tiny_source, bad):
    model = build_model(model_config_from_hf(tiny_source))
    with pytest.raises(ConfigError, match=r"peft\.target_modules.*q_proj.*down_proj"):
        apply_lora(model, lora_config(target_modules=["attention", bad]))


def test_nf4_base_matches_its_dequantized_base(tiny_source):
    """LoRA over NF4 computes what LoRA over the dequantized weights computes, forward and backward."""
    nf4 = adapter_model(tiny_source, quantized=True)
    dense = adapter_model(tiny_source)
    # The dense model gets the NF4 model's weights as float32: dequantized bases, the same adapters.
    weights = {name: p for name, p in nf4.named_parameters() if p.requires_grad}
    for name, module in nf4.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights[f"{name}.weight"] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    assert not dense.load_state_dict(weights, strict=False).unexpected_keys
    x = tokens(nf4.cfg.vocab_size)
    got, want = nf4(x), dense(x)
    assert max_rel(got, want) <= 1e-5  # float32 both ways: only the summation order differs
    (got.logsumexp(-1).mean()).backward()
    (want.logsumexp(-1).mean()).backward()
    grads = {name: p.grad for name, p in dense.named_parameters() if p.requires_grad}
    for name, p in nf4.named_parameters():
        if p.requires_grad:
            assert max_rel(p.grad, grads[name]) <= 1e-4, name


def test_random_nf4_base_without_weights(tiny_source):
    """model.source=null with QLoRA: each 4-bit layer holds a quantized normal(0, init_std) draw."""
    model = build_model(model_config_from_hf(tiny_source))
    apply_lora(model, lora_config())
    quantize_base(model, compute_dtype=torch.float32, quant_storage=torch.float32)
    materialize(model, CPU)
    torch.manual_seed(0)
    lora.qlora.init_quantized(model, CPU)
    weights = [
        bnb.functional.dequantize_4bit(m.weight.data, m.quant_state)
        for m in model.modules()
        if isinstance(m, lora.qlora.NF4Linear)
    ]
    assert len(weights) == 7 * model.cfg.num_layers
    for w in weights:
        assert w.std().item() == pytest.approx(model.cfg.init_std, rel=0.1)
    assert not torch.equal(weights[0][:8, :8], weights[1][:8, :8])


def test_compiled_nf4_blocks_match_eager(tiny_source):
    """The NF4 matmul op under torch.compile: the eager model's logits and adapter grads."""
    torch.manual_seed(0)  # the same adapter init in both models
    eager = adapter_model(tiny_source, quantized=True)
    torch.manual_seed(0)
    compiled = adapter_model(tiny_source, quantized=True)
    for block in compiled.model.layers.values():
        block.compile()
    x = tokens(eager.cfg.vocab_size)
    got, want = compiled(x), eager(x)
    assert max_rel(got, want) <= 1e-5
    got.logsumexp(-1).mean().backward()
    want.logsumexp(-1).mean().backward()
    grads = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        if p.requires_grad:
            assert max_rel(p.grad, grads[name].grad) <= 1e-4, name


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merged_model_gives_the_adapter_logits(tiny_source, quantized, use_dora):
    model = adapter_model(tiny_source, quantized=quantized, use_dora=use_dora)
    x = tokens(model.cfg.vocab_size)
    with torch.no_grad():
        base = plain_model(tiny_source)(x)
        want = model(x)
        assert max_rel(want, base) > 1e-2  # the adapters matter, so a merge that drops them fails
        got = merge_adapters(model)(x)
    # A plain model with HF names: what trainkit.weights.save_hf_state_dict writes.
    assert all(type(m) is nn.Linear for m in model.model.layers.modules() if isinstance(m, nn.Linear))
    assert model.state_dict().keys() == build_model(model.cfg).state_dict().keys()
    assert max_rel(got, want) <= (1e-4 if quantized else 1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_saved_adapter_loads_in_peft_and_resumes(tiny_source, tmp_path, use_dora):
    model = adapter_model(tiny_source, use_dora=use_dora, target_modules=["attention", "up_proj"])
    x = tokens(model.cfg.vocab_size)
    with torch.no_grad():
        want = model(x)
    save_adapter(model, tmp_path, base_model_name_or_path=str(tiny_source))

    hf = LlamaForCausalLM.from_pretrained(tiny_source, dtype=torch.float32)
    with torch.no_grad():
        hf_base = hf(x).logits
        got = PeftModel.from_pretrained(hf, tmp_path)(x).logits
    assert max_rel(want, hf_base) > 1e-2
    assert max_rel(got, want) <= 1e-4

    resumed = build_model(model.cfg)
    apply_lora(resumed, lora_config(use_dora=use_dora, target_modules=["attention", "up_proj"]))
    materialize(resumed, CPU)
    load_base_weights(resumed, tiny_source)
    load_adapter(resumed, tmp_path)
    with torch.no_grad():
        assert torch.equal(resumed(x), want)
    with pytest.raises(ConfigError, match="missing"):
        load_adapter(adapter_model(tiny_source, use_dora=use_dora), tmp_path)  # other target modules


def test_quantize_while_loading_holds_one_layer(tiny_source, monkeypatch):
    """Each linear is read, quantized and dropped before the next is read; the result is NF4-close."""
    read_linears = []  # weak references to every block linear's full-precision tensor the loader read
    alive_at_quantize = []
    quantize_into, quantize = lora.qlora._quantize_into, bnb.functional.quantize_4bit

    def spy_quantize_into(layer, weight):
        read_linears.append(weakref.ref(weight))
        return quantize_into(layer, weight)

    def spy_quantize(*args, **kwargs):
        alive_at_quantize.append(sum(ref() is not None for ref in read_linears))
        return quantize(*args, **kwargs)

    monkeypatch.setattr(lora.qlora, "_quantize_into", spy_quantize_into)
    monkeypatch.setattr(bnb.functional, "quantize_4bit", spy_quantize)
    model = adapter_model(tiny_source, quantized=True, target_modules=["attention"])
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 7 * model.cfg.num_layers  # the MLP ones too, though LoRA targets attention only
    assert alive_at_quantize == [1] * len(linears)
    # Only packed bytes stay: half a byte per weight.
    assert (
        sum(m.weight.numel() * m.weight.element_size() for m in linears)
        == sum(m.in_features * m.out_features for m in linears) // 2
    )

    x = tokens(model.cfg.vocab_size)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B = 0: the base model alone
                param.zero_()
        got, want = model(x), plain_model(tiny_source)(x)
    # NF4 keeps ~9% mean abs error on Gaussian weights; logits through 2 blocks stay within 15%,
    # while any misplaced or unscaled weight would give errors of order 100%.
    assert ((got - want).abs().mean() / want.abs().mean()).item() < 0.15


def test_bitsandbytes_optimizers_step(cache_dir, tmp_path):
    model = nn.Linear(64, 64)
    for name in ("adamw", "adamw_8bit"):
        optimizer = build_optimizer(model, spec_for(cache_dir, f"train.output_dir={tmp_path}", f"optim.name={name}"))
        model.weight.grad = torch.ones_like(model.weight)
        before = model.weight.detach().clone()
        optimizer.step()
        assert not torch.equal(model.weight, before), name
