"""The loss's inner step as one op: each row's cross-entropy, with the logits overwritten in place by
their gradient (softmax minus one-hot), so a chunk of logits costs one buffer in the compute dtype.

On CUDA one Triton kernel (``trainkit.triton_kernels``) reads each logit twice and writes its gradient
once; elsewhere torch ops compute the same (the reference the kernel is tested against). Its fake
kernel is what the memory simulator traces: it sees the CUDA kernel's allocations (the row losses),
not the reference's float32 temporaries.
"""

from __future__ import annotations

import functools

import torch


@torch.library.custom_op("trainkit::cross_entropy_grad_", mutates_args=("logits",))
def cross_entropy_grad_(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 loss per row of ``logits`` [rows, vocab] against ``targets`` [rows] (0 where -100), and
    ``logits`` replaced by d(loss_row)/d(logits) in their own dtype: softmax, minus 1 at the target
    (at column 0 for an ignored row, whose gradient the caller discards), times ``scale`` (a float32
    scalar tensor) where given. Float32 throughout, one rounding to the logits' dtype."""
    ignored = targets == -100
    target = targets.clamp(min=0)[:, None]
    logp = torch.log_softmax(logits.float(), dim=-1)
    logp_target = logp.gather(1, target)
    grad = logp.exp_().scatter_(1, target, logp_target.exp().sub_(1))  # p - 1 from float32 p at the target
    logits.copy_(grad if scale is None else grad.mul_(scale))
    return (-logp_target.squeeze(1)).masked_fill(ignored, 0)


@cross_entropy_grad_.register_kernel("cuda")
def _(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    return _triton_kernel()(logits, targets, scale)


@cross_entropy_grad_.register_fake
def _(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


@functools.cache
def _triton_kernel():
    # Imported on the first CUDA call: the kernel is defined at import, and the CPU tests set
    # TRITON_INTERPRET before that.
    from trainkit.triton_kernels import cross_entropy_grad

    return cross_entropy_grad
