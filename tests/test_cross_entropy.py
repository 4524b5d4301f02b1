"""``trainkit.cross_entropy.cross_entropy_grad_``: its reference against autograd, and the CUDA path's
Triton kernel against the reference (in triton's interpreter on CPU tensors without a GPU: see conftest)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import trainkit.triton_kernels as triton_kernels
from trainkit.cross_entropy import cross_entropy_grad_

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The kernel and the reference round float32 sums in different orders: at most one 16-bit step apart.
GRAD_TOLERANCE = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}


def logits_and_targets(rows, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[1::3] = -100  # every third row ignored
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_reference_is_autograds_cross_entropy(dtype):
    logits, targets = logits_and_targets(7, 300, dtype)
    x = logits.float().requires_grad_()
    want = F.cross_entropy(x, targets, ignore_index=-100, reduction="none")
    want.sum().backward()
    got_grad = logits.clone()
    got = cross_entropy_grad_(got_grad, targets)
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    kept = targets != -100  # an ignored row's gradient is the caller's to discard
    torch.testing.assert_close(got_grad[kept].float(), x.grad[kept], rtol=GRAD_TOLERANCE[dtype], atol=1e-7)


def test_reference_scales_the_gradient_before_rounding():
    logits, targets = logits_and_targets(7, 300, torch.bfloat16)
    unscaled, scaled, scale = logits.clone(), logits.clone(), torch.tensor(1 / 3)
    assert torch.equal(cross_entropy_grad_(scaled, targets, scale), cross_entropy_grad_(unscaled, targets))
    x = logits.float().requires_grad_()
    (F.cross_entropy(x, targets, ignore_index=-100, reduction="sum") * scale).backward()
    kept = targets != -100
    assert torch.equal(scaled[kept], x.grad[kept].bfloat16())  # one rounding, of the scaled float32 value
    assert not torch.equal(scaled, (unscaled.float() * scale).bfloat16())  # not two


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("vocab", [96, 4096, 5000], ids=lambda v: f"vocab{v}")  # < one block, one, and a ragged two
def test_triton_kernel_matches_reference(dtype, vocab, scaled):
    logits, targets = logits_and_targets(5, vocab, dtype, seed=vocab)
    scale = torch.tensor(0.37) if scaled else None
    want_grad = logits.clone()
    want = cross_entropy_grad_(want_grad, targets, scale)  # the reference, on the CPU
    got_grad = logits.to(DEVICE)
    got = triton_kernels.cross_entropy_grad(got_grad, targets.to(DEVICE), scale if scale is None else scale.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad.cpu().float(), want_grad.float(), rtol=GRAD_TOLERANCE[dtype], atol=1e-7)


def test_op_runs_the_triton_kernel_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_kernels, "cross_entropy_grad", lambda *a: calls.append(a) or torch.zeros(2))
    import trainkit.cross_entropy

    trainkit.cross_entropy._triton_kernel.cache_clear()
    logits, targets = logits_and_targets(2, 10, torch.float32)
    cross_entropy_grad_(logits.to(DEVICE), targets.to(DEVICE))
    trainkit.cross_entropy._triton_kernel.cache_clear()
    assert len(calls) == (DEVICE.type == "cuda")


def test_fake_kernel_allocates_only_the_row_losses():
    with FakeTensorMode():
        logits = torch.empty(6, 50, dtype=torch.bfloat16)
        losses = cross_entropy_grad_(logits, torch.zeros(6, dtype=torch.long))
    assert losses.shape == (6,) and losses.dtype == torch.float32


@pytest.mark.parametrize("factor", [0.1, 2.0, 1.0])
def test_scale_kernel_scales_in_float32_with_one_rounding(factor, monkeypatch):
    """Two programs striding over four blocks, the last ragged; a factor of 1 (skipped) changes nothing."""
    monkeypatch.setattr(triton_kernels, "SCALE_PROGRAMS", 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * triton_kernels.SCALE_BLOCK + 7, generator=g).bfloat16()
    x[5] = math.nan
    got = triton_kernels.scale_(x.clone().to(DEVICE), torch.tensor(factor, device=DEVICE)).cpu()
    assert torch.equal(got.isnan(), x.isnan())
    assert torch.equal(got[~x.isnan()], (x.float() * factor).bfloat16()[~x.isnan()])
