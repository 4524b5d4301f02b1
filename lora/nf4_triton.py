"""QLoRA's double-quantized NF4 dequantization as one Triton kernel (the GPU path of ``nf4_matmul``).

bitsandbytes dequantizes a double-quantized weight in three kernels: the 8-bit absmax codes to float32
absmaxes, ``absmax += offset``, then the 4-bit codes. Per element the job reads half a byte and writes
one 16-bit value, but the three launches (and bitsandbytes' 64-thread blocks) ran at about a fifth of
HBM bandwidth in an 8B QLoRA profile. This kernel does the whole thing in one pass, bit for bit as
bitsandbytes' CUDA kernels (``kDequantizeBlockwise``: float32 products, one rounding to the output).

Importing this module needs triton; ``lora.qlora`` imports it only on the first CUDA call. With
``TRITON_INTERPRET=1`` set before the import the launcher runs on CPU tensors, which is how the tests
check it against bitsandbytes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from trainkit.triton_kernels import to_output

# bitsandbytes' NF4 levels, in the order of the 4-bit index (csrc/kernels.cu, nf4_dequantization_lut).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip

# Outputs per program: 2 KiB of packed bytes in, 8 KiB of bf16 out. With 4 warps a thread gets 16
# contiguous bytes (one 128-bit load) and 32 contiguous outputs (128-bit stores; unmeasured so far:
# a GPU run should see ld.global.v4 / st.global.v4 in the PTX and ~3 TB/s on an H100).
PROGRAM_OUTPUTS = 4096


@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr,  # uint8, two 4-bit indices per byte, high nibble first
    absmax_codes_ptr,  # uint8, one per quantization block
    absmax_code_ptr,  # float32[256], the values of those codes
    absmax_scale_ptr,  # float32, one per ABSMAX_BLOCK absmax codes
    offset_ptr,  # float32 scalar added to every absmax
    levels_ptr,  # float32[16], NF4_LEVELS
    out_ptr,
    n_bytes,
    n_out,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ABSMAX_BLOCK: tl.constexpr,
):
    """One program dequantizes ROWS quantization blocks of BLOCK outputs, seen as a [ROWS, BLOCK / 2]
    tile of packed bytes, so that each block's absmax is computed once (not per element) and the
    bytes and outputs are each one contiguous, vectorisable run.

    absmax = code[absmax_codes[b]] * scale[b // ABSMAX_BLOCK] + offset  (two float32 roundings: the
    launcher turns off FMA contraction), out[2i] = NF4[byte_i >> 4] * absmax, out[2i + 1] =
    NF4[byte_i & 15] * absmax, each product rounded once to the output dtype.
    """
    blocks = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    block_in = blocks * BLOCK < n_out
    code = tl.load(absmax_codes_ptr + blocks, mask=block_in, other=0)
    scale = tl.load(absmax_scale_ptr + blocks // ABSMAX_BLOCK, mask=block_in, other=0.0)
    absmax = tl.load(absmax_code_ptr + code) * scale
    absmax = (absmax + tl.load(offset_ptr))[:, None]

    byte = blocks[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
    packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0)
    high = tl.load(levels_ptr + (packed >> 4)) * absmax
    low = tl.load(levels_ptr + (packed & 15)) * absmax

    out = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    values = to_output(tl.join(high, low).reshape(ROWS, BLOCK), out_ptr.dtype.element_ty)  # interleaved
    tl.store(out_ptr + out, values, mask=out < n_out)


@functools.cache
def _levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dequantize_nf4(
    packed: torch.Tensor,
    absmax_codes: torch.Tensor,
    absmax_code: torch.Tensor,
    absmax_scale: torch.Tensor,
    offset: torch.Tensor,
    blocksize: int,
    absmax_blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The ``shape`` weight in ``dtype`` (bfloat16, float16 or float32) from bitsandbytes' packed NF4
    bytes (any storage dtype, contiguous) and double-quantized statistics: what bitsandbytes'
    ``dequantize_blockwise``, ``+= offset`` and ``dequantize_4bit`` give, in one launch."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n_out = out.numel()
    if n_out >= 2**31:  # int32 offsets
        raise ValueError(f"dequantize_nf4 takes fewer than 2**31 elements, got {n_out}")
    rows = max(1, PROGRAM_OUTPUTS // blocksize)
    grid = (triton.cdiv(triton.cdiv(n_out, blocksize), rows),)
    _dequantize_nf4_kernel[grid](
        packed.view(torch.uint8), absmax_codes, absmax_code, absmax_scale, offset, _levels(packed.device), out,
        (n_out + 1) // 2, n_out, ROWS=rows, BLOCK=blocksize, ABSMAX_BLOCK=absmax_blocksize,
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out
