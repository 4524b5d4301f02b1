"""Triton kernels of trainkit's CUDA paths, and the rounding helper they share with ``lora.nf4_triton``.

Importing this module needs triton; callers import it on their first CUDA call. With
``TRITON_INTERPRET=1`` set before the import the kernels run on CPU tensors in triton's interpreter,
which is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Logits per loop iteration of a row: 8 KiB of bf16 read per iteration, 16 values a thread at 8 warps.
VOCAB_BLOCK = 4096


@triton.jit
def to_output(x, dtype: tl.constexpr):
    """float32 -> ``dtype``, rounding to nearest even like CUDA's conversions. bfloat16 is rounded by
    hand: triton's interpreter truncates float32 -> bfloat16, and the CPU tests must check what the GPU
    runs (no NaNs here: the inputs are finite)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _cross_entropy_grad_kernel(logits_ptr, targets_ptr, losses_ptr, vocab, row_stride, BLOCK: tl.constexpr):
    """One program per row. Pass 1 reads the row once for its log-sum-exp (a running maximum and sum
    per lane, merged at the end); pass 2 reads it again and writes exp(logit - lse), minus 1 at the
    target, over it. All arithmetic in float32, one rounding to the logits' dtype."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * row_stride
    cols = tl.arange(0, BLOCK)
    high = tl.full([BLOCK], float("-inf"), tl.float32)
    total = tl.full([BLOCK], 0.0, tl.float32)
    for start in range(0, vocab, BLOCK):
        x = tl.load(logits_ptr + start + cols, mask=start + cols < vocab, other=float("-inf")).to(tl.float32)
        new_high = tl.maximum(high, x)
        shift = tl.where(new_high == float("-inf"), 0.0, new_high)  # a lane that has seen no logit yet
        total = total * tl.exp(high - shift) + tl.exp(x - shift)
        high = new_high
    row_max = tl.max(high, 0)
    lse = row_max + tl.log(tl.sum(total * tl.exp(high - row_max), 0))

    target = tl.load(targets_ptr + row)
    ignored = target == -100
    target = tl.where(ignored, 0, target)
    target_logit = tl.load(logits_ptr + target).to(tl.float32)  # before pass 2 overwrites it
    tl.store(losses_ptr + row, tl.where(ignored, 0.0, lse - target_logit))

    for start in range(0, vocab, BLOCK):
        mask = start + cols < vocab
        p = tl.exp(tl.load(logits_ptr + start + cols, mask=mask, other=0.0).to(tl.float32) - lse)
        p = tl.where(start + cols == target, p - 1.0, p)
        tl.store(logits_ptr + start + cols, to_output(p, logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``trainkit.cross_entropy.cross_entropy_grad_`` in one launch: row losses, gradient in place."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_grad needs logits with contiguous rows")
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block = min(VOCAB_BLOCK, triton.next_power_of_2(vocab))
        _cross_entropy_grad_kernel[(rows,)](logits, targets, losses, vocab, logits.stride(0), BLOCK=block, num_warps=8)
    return losses
