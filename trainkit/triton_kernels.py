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
# Elements per block of the scaling kernel (16 a thread at 8 warps), and its most programs: enough to
# fill an H100 several times over, few enough that skipping (one block per program: 64k for a 1B
# model's head) costs microseconds, not the ~170 us measured.
SCALE_BLOCK, SCALE_PROGRAMS = 4096, 2048
# Elements per AdamW program: 4 a thread at 8 warps. More per thread ran slower on an H100 (registers).
ADAMW_BLOCK = 1024


@triton.jit
def to_output(x, dtype: tl.constexpr):
    """float32 -> ``dtype``, rounding to nearest even like CUDA's conversions. bfloat16 is rounded by
    hand: triton's interpreter truncates float32 -> bfloat16, and the CPU tests must check what the GPU
    runs. A NaN is converted, not rounded: the carry would turn the GPU's NaN (0x7FFFFFFF) into -0."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return tl.where(x == x, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), x.to(tl.bfloat16))
    else:
        return x.to(dtype)


@triton.jit
def _cross_entropy_grad_kernel(logits_ptr, targets_ptr, losses_ptr, scale_ptr, vocab, row_stride, BLOCK: tl.constexpr):
    """One program per row. Pass 1 reads the row once for its log-sum-exp (a running maximum and sum
    per lane, merged at the end); pass 2 reads it again and writes exp(logit - lse), minus 1 at the
    target, times the scale where given, over it. All arithmetic in float32, one rounding to the
    logits' dtype."""
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

    scale = 1.0 if scale_ptr is None else tl.load(scale_ptr)
    for start in range(0, vocab, BLOCK):
        mask = start + cols < vocab
        p = tl.exp(tl.load(logits_ptr + start + cols, mask=mask, other=0.0).to(tl.float32) - lse)
        p = tl.where(start + cols == target, p - 1.0, p)
        tl.store(logits_ptr + start + cols, to_output(p * scale, logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``trainkit.cross_entropy.cross_entropy_grad_`` in one launch: row losses, gradient in place."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_grad needs logits with contiguous rows")
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block = min(VOCAB_BLOCK, triton.next_power_of_2(vocab))
        _cross_entropy_grad_kernel[(rows,)](
            logits, targets, losses, scale, vocab, logits.stride(0), BLOCK=block, num_warps=8
        )
    return losses


@triton.jit
def _one_minus_pow(beta, step):
    """``1 - beta ** step`` as torch's CUDA kernel takes it (``1 - powf(beta, step)`` in float32), the
    power correctly rounded: squared up in float64 over the whole steps, then rounded once. Early on
    the subtraction keeps few digits (1 - 0.999), so an inexact power would move the update visibly."""
    power = tl.full((), 1.0, tl.float64)
    base = beta.to(tl.float64)
    exponent = step.to(tl.int32)
    while exponent > 0:
        if exponent % 2 == 1:
            power *= base
        base *= base
        exponent //= 2
    return 1 - power.to(tl.float32)


@triton.jit
def _adamw_kernel(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    step_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    numel,
    lr,
    beta1,
    beta2,
    weight_decay,
    eps,
    BLOCK: tl.constexpr,
):
    """One AdamW update of BLOCK elements in float32, in the order of torch's CUDA ``_fused_adamw_``
    (fused_adam_utils.cuh: its explicit fmas), one rounding per output. The gradient is read, never
    written. Per element it multiplies by the clip divisor's reciprocal and takes the hardware's fast
    square root and division where torch's takes IEEE ones: those made the kernel compute-bound (2.0
    TB/s on an H100, against 2.7 for this one and for a plain read-4-write-3 copy); the float32 results
    move by an ulp or two, the bfloat16 weights and states now and then by one."""
    # The GPU gets the hyperparameters as float32, the interpreter as Python floats: cast for both.
    lr, weight_decay = tl.cast(lr, tl.float32), tl.cast(weight_decay, tl.float32)
    beta1, beta2 = tl.cast(beta1, tl.float32), tl.cast(beta2, tl.float32)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if found_inf_ptr is not None:
        numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)  # a skipped step loads and stores nothing
    mask = offsets < numel
    param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
    # While the loads are in flight: per-program scalars. The step count was advanced on the device.
    step = tl.load(step_ptr)
    step_size = tl.div_rn(lr, _one_minus_pow(beta1, step))
    inv_bias_correction2_sqrt = tl.div_rn(1.0, tl.sqrt_rn(_one_minus_pow(beta2, step)))

    if grad_scale_ptr is not None:
        grad *= tl.div_rn(1.0, tl.load(grad_scale_ptr))
    if weight_decay != 0:
        param = tl.fma(-(lr * weight_decay), param, param)
    exp_avg = tl.fma(beta1, exp_avg, tl.fma(-beta1, grad, grad))
    grad_sq = grad * grad
    exp_avg_sq = tl.fma(beta2, exp_avg_sq, tl.fma(-beta2, grad_sq, grad_sq))
    denom = tl.sqrt(exp_avg_sq) * inv_bias_correction2_sqrt + eps
    param -= tl.fdiv(step_size * exp_avg, denom)

    tl.store(param_ptr + offsets, to_output(param, param_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_ptr + offsets, to_output(exp_avg, exp_avg_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, to_output(exp_avg_sq, exp_avg_sq_ptr.dtype.element_ty), mask=mask)


def adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
) -> None:
    """AdamW on one parameter in place, as torch's fused kernel computes it: the gradient divided by
    ``grad_scale`` (float32, one element) where given, nothing changed where ``found_inf`` (float32, one
    element) is nonzero; ``step`` (float32, on the device) is the count including this update."""
    if not (param.is_contiguous() and grad.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
        raise ValueError("adamw_step needs a contiguous parameter, gradient and states")
    numel = param.numel()
    if numel:
        grid = (triton.cdiv(numel, ADAMW_BLOCK),)
        _adamw_kernel[grid](
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            step,
            grad_scale,
            found_inf,
            numel,
            float(lr),  # float32 in the kernel, as torch's casts its hyperparameters (an int would be specialised)
            float(beta1),
            float(beta2),
            float(weight_decay),
            float(eps),
            BLOCK=ADAMW_BLOCK,
            num_warps=8,
        )


@triton.jit
def _scale_kernel(x_ptr, factor_ptr, numel, BLOCK: tl.constexpr):
    """``x *= factor`` in float32, one rounding, each program striding over blocks; where the factor is
    exactly 1 no block is visited: at most SCALE_PROGRAMS programs exit, not one per block."""
    factor = tl.load(factor_ptr)
    numel = tl.where(factor == 1.0, 0, numel)
    cols = tl.arange(0, BLOCK)
    for block in range(tl.program_id(0), tl.cdiv(numel, BLOCK), tl.num_programs(0)):
        offsets = tl.cast(block, tl.int64) * BLOCK + cols
        mask = offsets < numel
        x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
        tl.store(x_ptr + offsets, to_output(x * factor, x_ptr.dtype.element_ty), mask=mask)


def scale_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x`` (contiguous) times ``factor`` (a float32 scalar tensor on its device), in place, without
    a host synchronisation: a factor of 1 costs a launch, not a pass over ``x``."""
    if not x.is_contiguous():
        raise ValueError("scale_ needs a contiguous tensor")
    if x.numel():
        programs = min(triton.cdiv(x.numel(), SCALE_BLOCK), SCALE_PROGRAMS)
        _scale_kernel[(programs,)](x, factor, x.numel(), BLOCK=SCALE_BLOCK, num_warps=8)
    return x
