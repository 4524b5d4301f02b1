"""QLoRA: the frozen base linears stored in 4-bit NF4 (bitsandbytes), quantized while loading.

``quantize_base`` swaps the block linears of the meta-device model for empty ``Linear4bit`` layers
whose parameter already has the packed shape ``[out * in / 2 / itemsize, 1]`` in a float
``quant_storage`` dtype: FSDP2 shards and gathers it like any frozen weight (bitsandbytes' FSDP
layout; torch 2.11's FSDP2 refuses uint8 parameters). Nothing may cast it: the storage dtype must be
the dtype the frozen base is materialised in and FSDP's ``param_dtype`` (or no mixed precision).
The quantization statistics are not parameters; they live, replicated, on the module, where they
survive FSDP swapping its gathered weight in: ``module.quant_state`` for bitsandbytes and peft (merge,
DoRA), ``module.nf4_state`` (the same tensors) for the forward.

The forward is ours (``NF4Linear``): bitsandbytes' format dequantized inside one custom op,
``nf4_matmul``, whose backward keeps only the packed bytes and dequantizes again (a frozen base needs
no input saved); torch.compile treats it as one op, so the 16-bit weight never outlives its matmul. On
CUDA with triton installed the dequantization is one Triton kernel (``lora.nf4_triton``, bit-identical
to bitsandbytes'), elsewhere bitsandbytes' own ops.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState
from bitsandbytes.nn import Linear4bit, Params4bit
from torch import nn
from torch.distributed.tensor import DTensor

from lora.adapters import lora_layers, without_adapters
from trainkit.config import ConfigError
from trainkit.weights import copy_into, load_hf_weights


@dataclass
class NF4State:
    """What dequantizing one weight reads, as the tensors and ints ``nf4_matmul`` takes (torch.compile
    cannot trace bitsandbytes' ``QuantState``, whose ``__getattr__`` breaks the graph). Always double
    quantized: the per-block absmaxes are 8-bit codes, blockwise-scaled around ``offset``."""

    blocksize: int
    absmax_codes: torch.Tensor  # uint8, one per block
    absmax_code: torch.Tensor  # the 256 values of those codes
    absmax_scale: torch.Tensor  # one per ``absmax_blocksize`` absmax codes
    absmax_blocksize: int
    offset: torch.Tensor
    shape: list[int]

    @classmethod
    def of(cls, state: QuantState) -> NF4State:
        inner = state.state2
        return cls(
            state.blocksize, state.absmax, inner.code, inner.absmax, inner.blocksize, state.offset,
            list(state.shape),
        )  # fmt: skip


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _use_triton(x: torch.Tensor) -> bool:
    # One Triton kernel instead of bitsandbytes' three (absmax codes, += offset, the 4-bit codes).
    return x.is_cuda and _HAS_TRITON


def _bnb_dequantize(packed, absmax_codes, absmax_code, absmax_scale, offset, blocksize, absmax_blocksize, shape, dtype):
    """``nf4_matmul``'s dequantization off CUDA (or without triton): bitsandbytes' own torch ops, not
    ``functional.dequantize_4bit``, whose QuantState bookkeeping doubled the host time of a call (in a
    QLoRA forward the host, not the GPU, sets the pace)."""
    ops = torch.ops.bitsandbytes
    absmax = ops.dequantize_blockwise.default(absmax_codes, absmax_scale, absmax_code, absmax_blocksize, torch.float32)
    absmax += offset
    return ops.dequantize_4bit.default(packed, absmax, blocksize, "nf4", shape, dtype)


@functools.cache
def _triton_dequantize():
    # Imported on the first CUDA call, not with this module: the kernel is defined at import, and the
    # CPU tests set TRITON_INTERPRET before that.
    from lora.nf4_triton import dequantize_nf4

    return dequantize_nf4


@torch.library.custom_op("trainkit::nf4_matmul", mutates_args=())
def nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax_codes: torch.Tensor,
    absmax_code: torch.Tensor,
    absmax_scale: torch.Tensor,
    offset: torch.Tensor,
    blocksize: int,
    absmax_blocksize: int,
    shape: list[int],
    transposed: bool,
) -> torch.Tensor:
    """``x @ W.T`` (``x @ W`` when ``transposed``) for an NF4 weight ``W`` of ``shape``, dequantized to
    ``x``'s dtype. One opaque op, so the 16-bit weight exists only while its matmul runs: torch.compile
    can neither keep it for backward nor schedule it early."""
    dequantize = _triton_dequantize() if _use_triton(x) else _bnb_dequantize
    weight = dequantize(
        packed, absmax_codes, absmax_code, absmax_scale, offset, blocksize, absmax_blocksize, shape, x.dtype
    )
    return x @ (weight if transposed else weight.t())


@nf4_matmul.register_fake
def _(x, packed, absmax_codes, absmax_code, absmax_scale, offset, blocksize, absmax_blocksize, shape, transposed):
    return x.new_empty(*x.shape[:-1], shape[1] if transposed else shape[0])


def _save_quantized_weight(ctx, inputs, output) -> None:
    # A frozen weight: backward needs neither x nor the dequantized weight, only the packed bytes.
    ctx.save_for_backward(*inputs[1:6])
    ctx.layout = inputs[6:]


def _input_grad(ctx, grad: torch.Tensor):
    *layout, transposed = ctx.layout
    return nf4_matmul(grad, *ctx.saved_tensors, *layout, not transposed), *[None] * 9


nf4_matmul.register_autograd(_input_grad, setup_context=_save_quantized_weight)


class NF4Linear(Linear4bit):
    """A frozen bitsandbytes NF4 linear computed by ``nf4_matmul`` (peft wraps it like ``Linear4bit``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.nf4_state
        out = nf4_matmul(
            x.to(self.compute_dtype), self.weight, s.absmax_codes, s.absmax_code, s.absmax_scale, s.offset,
            s.blocksize, s.absmax_blocksize, s.shape, False,
        )  # fmt: skip
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)


def _nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype, quant_storage: torch.dtype) -> Linear4bit:
    layer = NF4Linear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,  # double quantization: the per-block scales are 8-bit too
        quant_type="nf4",
        quant_storage=quant_storage,
        device="meta",
    )
    packed_rows = linear.weight.numel() // (2 * quant_storage.itemsize)  # two 4-bit codes per byte
    layer.weight = Params4bit(
        torch.empty(packed_rows, 1, dtype=quant_storage, device="meta"),
        requires_grad=False,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=quant_storage,
        module=layer,
        bnb_quantized=True,  # the bytes are filled by load_quantized, never quantized again by .to()
    )
    # bitsandbytes' CPU inference path repacks the weight in place into a layout that merging and
    # saving do not read; keep the portable layout (GPUs never take that path).
    layer.support_avx512bf16_for_cpu = False
    return layer


def quantize_base(model: nn.Module, compute_dtype: torch.dtype, quant_storage: torch.dtype) -> nn.Module:
    """Replace every base ``nn.Linear`` in the blocks (LoRA-wrapped or not) with an empty NF4
    ``Linear4bit``, in place, on meta; ``load_quantized`` fills them after materialisation.

    Call after ``apply_lora``: peft's DoRA init cannot copy a 4-bit layer on meta. The adapters'
    own matrices, embeddings, norms and ``lm_head`` keep their precision.
    """
    if model.cfg.num_experts:
        raise ConfigError("peft.method=qlora needs a dense model: model.num_experts must be 0")
    adapters = {
        id(m) for layer in lora_layers(model).values() for m in (*layer.lora_A.values(), *layer.lora_B.values())
    }
    for name, module in list(model.model.layers.named_modules()):
        if type(module) is nn.Linear and id(module) not in adapters:
            model.model.layers.set_submodule(name, _nf4_linear(module, compute_dtype, quant_storage))
    return model


def _quantize_into(layer: Linear4bit, weight: torch.Tensor) -> None:
    if layer.weight.dtype != layer.quant_storage:  # bytes copied into another dtype would be converted, not kept
        raise ConfigError(
            f"the packed NF4 weights were cast from {layer.quant_storage} to {layer.weight.dtype} after quantize_base: "
            "keep the frozen base in the quant_storage dtype when materialising"
        )
    packed, state = bnb.functional.quantize_4bit(
        weight.to(layer.compute_dtype),  # so it dequantizes to the compute dtype
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=layer.quant_storage,
    )
    copy_into(layer.weight, packed)  # sharded by FSDP: keeps this rank's slice of the bytes
    layer.quant_state = state  # found again after FSDP swaps in the gathered weight
    layer.nf4_state = NF4State.of(state)
    if not isinstance(layer.weight, DTensor):  # to_empty made it a plain Parameter: a Params4bit again
        layer.weight = Params4bit(
            layer.weight.data,
            requires_grad=False,
            quant_state=state,
            quant_type="nf4",
            quant_storage=layer.quant_storage,
            module=layer,
            bnb_quantized=True,
        )


@torch.no_grad()
def init_quantized(model: nn.Module, device: torch.device) -> None:
    """Quantize a random normal init (``init_std``) into every 4-bit layer, one layer at a time:
    real-shape QLoRA runs without a checkpoint. Every rank draws the same weights and keeps its shard."""
    for module in model.modules():
        if isinstance(module, Linear4bit):
            weight = torch.empty(module.out_features, module.in_features, device=device, dtype=module.compute_dtype)
            _quantize_into(module, weight.normal_(0.0, model.cfg.init_std))


@torch.no_grad()
def load_quantized(model: nn.Module, folder, device: torch.device) -> None:
    """Load an HF folder into a ``quantize_base`` model in place of ``load_hf_weights``.

    Tensors are read one at a time; a 4-bit layer's weight goes to ``device``, is quantized there and
    only its packed bytes are kept, so no more than one full-precision linear exists at any moment.
    """
    writers = {
        id(m.weight): ((m.out_features, m.in_features), lambda w, m=m: _quantize_into(m, w.to(device)))
        for m in model.modules()
        if isinstance(m, Linear4bit)
    }
    with without_adapters(model):
        load_hf_weights(model, folder, writers)
