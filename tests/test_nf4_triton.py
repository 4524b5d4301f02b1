"""The Triton NF4 dequantization (``lora.nf4_triton``) against bitsandbytes', bit for bit.

Without a GPU the kernel runs in triton's interpreter on CPU tensors (see conftest); on a
GPU the same tests compare the compiled kernel with bitsandbytes' CUDA kernels.
"""

import bitsandbytes as bnb
import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

import lora.nf4_triton as nf4_triton
import lora.qlora
from lora.nf4_triton import NF4_LEVELS, PROGRAM_OUTPUTS, dequantize_nf4
from lora.qlora import NF4State, nf4_matmul

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def quantized(shape, dtype, quant_storage=torch.bfloat16, seed=0):
    """bitsandbytes' packed NF4 weight and double-quantized state, as ``lora.qlora`` stores them."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=g) * 0.02 + 0.001).to(DEVICE, dtype)
    return bnb.functional.quantize_4bit(weight, compress_statistics=True, quant_type="nf4", quant_storage=quant_storage)


def triton_dequantize(packed, state, dtype):
    s = NF4State.of(state)
    return dequantize_nf4(
        packed, s.absmax_codes, s.absmax_code, s.absmax_scale, s.offset, s.blocksize, s.absmax_blocksize, s.shape,
        dtype,
    )  # fmt: skip


def test_kernel_is_interpreted_on_cpu():
    assert isinstance(nf4_triton._dequantize_nf4_kernel, InterpretedFunction) == (DEVICE.type == "cpu")


def test_nf4_levels_are_bitsandbytes():
    assert torch.equal(torch.tensor(NF4_LEVELS), bnb.functional.get_4bit_type("nf4", "cpu"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, quant_storage",
    [
        ((4096, 1024), torch.bfloat16),
        ((300, 1000), torch.bfloat16),  # ends inside a program and inside a 64-value block
        ((33, 68), torch.bfloat16),  # less than one program
        ((3, 36), torch.bfloat16),
        ((129, 67), torch.uint8),  # an odd count: the last byte holds one value
    ],
    ids=str,
)
def test_dequantize_matches_bitsandbytes(shape, quant_storage, dtype):
    n = shape[0] * shape[1]
    assert n == 4096 * 1024 or n % PROGRAM_OUTPUTS
    packed, state = quantized(shape, dtype, quant_storage)
    want = bnb.functional.dequantize_4bit(packed, state)
    got = triton_dequantize(packed, state, dtype)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {n} values differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True])
def test_nf4_matmul_through_the_kernel_matches_bitsandbytes(monkeypatch, dtype, transposed):
    """Forward and backward (which dequantizes again) of ``nf4_matmul``, the kernel path forced on."""
    out_features, in_features = 384, 256
    packed, state = quantized((out_features, in_features), dtype)
    s = NF4State.of(state)
    x = torch.randn(2, 5, out_features if transposed else in_features, device=DEVICE).to(dtype)

    launches = []
    monkeypatch.setattr(lora.qlora, "_triton_dequantize", lambda: lambda *a: launches.append(a) or dequantize_nf4(*a))

    def run(use_triton):
        monkeypatch.setattr(lora.qlora, "_use_triton", lambda t: use_triton)
        xi = x.clone().requires_grad_()
        y = nf4_matmul(
            xi, packed, s.absmax_codes, s.absmax_code, s.absmax_scale, s.offset, s.blocksize, s.absmax_blocksize,
            s.shape, transposed,
        )  # fmt: skip
        y.backward(torch.ones_like(y))
        return y, xi.grad

    (y_bnb, grad_bnb), (y_triton, grad_triton) = run(False), run(True)
    assert len(launches) == 2  # forward and backward
    assert torch.equal(y_triton, y_bnb)
    assert torch.equal(grad_triton, grad_bnb)
