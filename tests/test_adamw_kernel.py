"""``trainkit.optim.TritonAdamW``, whose update is one Triton kernel per parameter
(``trainkit.triton_kernels.adamw_step``), against torch's AdamW; without a GPU in triton's interpreter on
CPU tensors (see conftest)."""

import dataclasses

import pytest
import torch
import triton
import triton.language as tl

from parallel.engine import TorchEngine
from tests.test_train import spec_for
from trainkit.optim import TritonAdamW, build_optimizer, param_groups
from trainkit.triton_kernels import to_output

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BETAS = (0.9, 0.999)
# torch's CUDA kernel, and this one, round the hyperparameters to float32 (1 - 0.999f is 1.3e-5 off
# 0.001); torch's CPU kernels take 1 - beta in float64. The references get the float32 betas, so that
# what is compared is the arithmetic.
FLOAT32_BETAS = tuple(torch.tensor(BETAS).tolist())
# Two programs and a ragged end, one ragged program, and a vector (no weight decay).
SHAPES = [(70, 70), (33, 40), (40,)]
LRS = [1e-2, 3e-2, 2e-2, 5e-3, 1e-3]  # a schedule: the kernel takes each step's lr
WEIGHT_DECAY = 0.1  # on the matrices; trainkit.optim.param_groups exempts vectors


def random_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for shape in SHAPES]


def random_grads(params: list[torch.Tensor], g: torch.Generator) -> list[torch.Tensor]:
    return [(torch.randn(p.shape, generator=g) * 0.1).to(p.dtype) for p in params]


def paired_updates(dtype: torch.dtype, fused_reference: bool):
    """TritonAdamW and torch's AdamW over the LRS schedule with a clip divisor (``grad_scale``) that
    changes every step. Each step starts both from the reference's weights and states, so that each
    comparison is of one update. Yields, per step, its lr and per parameter (ours, reference, gradient)
    triples of weights, exp_avg and exp_avg_sq. torch's fused reference takes ``grad_scale`` itself;
    its single-tensor one gets the gradients already divided."""
    init = random_params(dtype)
    ours = [p.to(DEVICE, copy=True).requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    optimizer = TritonAdamW(param_groups(ours, WEIGHT_DECAY), betas=BETAS)
    reference = torch.optim.AdamW(
        param_groups(theirs, WEIGHT_DECAY),
        betas=FLOAT32_BETAS,
        fused=fused_reference,
        foreach=None if fused_reference else False,
    )
    g = torch.Generator().manual_seed(1)
    for i, lr in enumerate(LRS):
        grad_scale = torch.tensor(1.0 + i)
        for opt in (optimizer, reference):
            for group in opt.param_groups:
                group["lr"] = lr
        grads = random_grads(theirs, g)
        with torch.no_grad():
            for mine, ref, grad in zip(ours, theirs, grads):
                mine.copy_(ref)
                mine.grad = grad.to(DEVICE, copy=True)
                ref.grad = grad.clone() if fused_reference else grad / grad_scale
                for key in ("exp_avg", "exp_avg_sq") if reference.state else ():
                    optimizer.state[mine][key].copy_(reference.state[ref][key])
        optimizer.grad_scale, optimizer.found_inf = grad_scale.to(DEVICE), torch.zeros((), device=DEVICE)
        if fused_reference:
            reference.grad_scale, reference.found_inf = grad_scale, torch.zeros(())
        optimizer.step()
        reference.step()
        for mine, ref, grad in zip(ours, theirs, grads):
            assert torch.equal(mine.grad.cpu(), grad), "the gradient must be read, not written"
            assert optimizer.state[mine]["step"].item() == reference.state[ref]["step"].item() == i + 1
        yield (
            lr,
            [
                (weights_and_states(optimizer, mine), weights_and_states(reference, ref), grad.float() / grad_scale)
                for mine, ref, grad in zip(ours, theirs, grads)
            ],
        )


def weights_and_states(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[torch.Tensor]:
    state = optimizer.state[param]
    return [param.detach().cpu(), state["exp_avg"].cpu(), state["exp_avg_sq"].cpu()]


def test_float32_update_matches_torch_adamw():
    for lr, tensors in paired_updates(torch.float32, fused_reference=False):
        for (param, exp_avg, exp_avg_sq), (ref_param, ref_exp_avg, ref_exp_avg_sq), _ in tensors:
            # 1 - beta2 ** step is float32 here as in torch's CUDA kernel, float64 in the reference: at
            # step 2 the float32 1 - 0.999 ** 2 is uncertain by 1.5e-5 of itself, 7.5e-6 of the update.
            torch.testing.assert_close(param, ref_param, rtol=1e-6, atol=1e-5 * lr)
            torch.testing.assert_close(exp_avg, ref_exp_avg, rtol=1e-6, atol=1e-6 * ref_exp_avg.abs().max().item())
            torch.testing.assert_close(exp_avg_sq, ref_exp_avg_sq, rtol=1e-6, atol=0.0)


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bfloat16 values lie between a and b, per element."""

    def ordered(x):
        bits = x.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def test_bfloat16_update_is_torch_fused_within_one_ulp():
    """Both compute in float32 and round once; they differ in float32 rounding (torch's CPU kernel
    writes the first moment as a lerp, CUDA's and ours as two fmas), which now and then puts a result
    on the other side of a bfloat16 rounding boundary."""
    differing, total = 0, 0
    for _, tensors in paired_updates(torch.bfloat16, fused_reference=True):
        for ours, theirs, grad in tensors:
            for name, mine, ref in zip(("param", "exp_avg", "exp_avg_sq"), ours, theirs):
                distance = ulps(mine, ref)
                # Where 0.9 m + 0.1 g nearly cancels, float32 rounding of its terms is many bfloat16 steps
                # of the small result: there the difference is held to float32 steps of the gradient.
                cancels = (mine.float() - ref.float()).abs() <= 2**-22 * grad.abs() if name == "exp_avg" else False
                assert ((distance <= 1) | cancels).all(), f"{name}: {distance.max().item()} bfloat16 steps apart"
                differing += (distance > 0).sum().item()
                total += distance.numel()
    assert differing < 0.002 * total, f"{differing} of {total} values differ"


def test_found_inf_skips_the_step_entirely():
    params = [p.to(DEVICE).requires_grad_() for p in random_params(torch.bfloat16)]
    optimizer = TritonAdamW(param_groups(params, WEIGHT_DECAY))
    g = torch.Generator().manual_seed(1)
    for p, grad in zip(params, random_grads(params, g)):
        p.grad = grad.to(DEVICE)
    optimizer.step()  # states now nonzero
    before = [(p.clone(), {k: v.clone() for k, v in optimizer.state[p].items()}) for p in params]
    for p, grad in zip(params, random_grads(params, g)):
        p.grad = grad.to(DEVICE)
    optimizer.grad_scale = torch.tensor(2.0, device=DEVICE)
    optimizer.found_inf = torch.ones((), device=DEVICE)
    optimizer.step()
    for p, (weights, state) in zip(params, before):
        assert torch.equal(p, weights)
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in state.items())  # step included
    optimizer.found_inf.zero_()
    optimizer.step()
    for p, (weights, _) in zip(params, before):
        assert optimizer.state[p]["step"].item() == 2 and not torch.equal(p, weights)


def test_a_param_without_grad_is_left_alone():
    trained, idle, vector = [p.to(DEVICE).requires_grad_() for p in random_params(torch.float32)]
    optimizer = TritonAdamW(param_groups([trained, idle, vector], WEIGHT_DECAY))
    trained.grad = torch.ones_like(trained)
    before = [trained.clone(), idle.clone(), vector.clone()]
    optimizer.step()
    assert not torch.equal(trained, before[0])
    assert torch.equal(idle, before[1]) and torch.equal(vector, before[2])
    assert idle not in optimizer.state and vector not in optimizer.state


def test_state_dict_round_trip_with_torch_adamw():
    """Two steps of torch's single-tensor AdamW, two of TritonAdamW from its state dict, one of torch's
    from TritonAdamW's: five steps of torch's AdamW all along (float32, betas as float32)."""
    init = random_params(torch.float32)
    handed_on = [p.to(DEVICE, copy=True).requires_grad_() for p in init]
    throughout = [p.clone().requires_grad_() for p in init]
    reference = torch.optim.AdamW(param_groups(throughout, WEIGHT_DECAY), betas=FLOAT32_BETAS, foreach=False)
    g = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(param_groups(handed_on, WEIGHT_DECAY), betas=FLOAT32_BETAS, foreach=False)
    for step, lr in enumerate(LRS, start=1):
        if step in (3, 5):  # torch's -> ours, then ours -> torch's
            kind = TritonAdamW if step == 3 else torch.optim.AdamW
            state_dict = optimizer.state_dict()
            optimizer = kind(param_groups(handed_on, WEIGHT_DECAY))
            optimizer.load_state_dict(state_dict)
        if step == 3:  # torch's single-tensor steps are on the CPU, unfused: the kernel reads them beside the param
            assert all(group["fused"] for group in optimizer.param_groups)
            steps = [(optimizer.state[p]["step"], p.device) for p in handed_on]
            assert all(s.dtype == torch.float32 and s.device == device and s.item() == 2 for s, device in steps)
        for opt in (optimizer, reference):
            for group in opt.param_groups:
                group["lr"] = lr
        for mine, ref, grad in zip(handed_on, throughout, random_grads(throughout, g)):
            mine.grad, ref.grad = grad.to(DEVICE), grad
        optimizer.step()
        reference.step()
    for mine, ref in zip(handed_on, throughout):
        torch.testing.assert_close(mine.detach().cpu(), ref.detach(), rtol=1e-6, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            want = reference.state[ref][key]
            torch.testing.assert_close(
                optimizer.state[mine][key].cpu(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item()
            )
        assert optimizer.state[mine]["step"].item() == 5


@pytest.mark.parametrize("case", ["amsgrad", "maximize", "tensor_lr", "complex", "non_contiguous"])
def test_what_the_kernel_does_not_do_is_refused(case):
    param = torch.zeros(4, 4, device=DEVICE, requires_grad=True)
    group = {"params": [param]}
    if case in ("amsgrad", "maximize"):
        group[case] = True
    elif case == "tensor_lr":
        group["lr"] = torch.tensor(1e-3)
    elif case == "complex":
        group["params"] = [param.detach().to(torch.complex64).requires_grad_()]
    elif case == "non_contiguous":
        group["params"] = [param.detach().t().requires_grad_()]
    with pytest.raises(ValueError, match="TritonAdamW"):
        TritonAdamW([group])


def test_a_sparse_grad_is_refused():
    param = torch.zeros(4, 4, device=DEVICE, requires_grad=True)
    optimizer = TritonAdamW([param])
    param.grad = torch.zeros_like(param).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


def test_build_optimizer_takes_it_on_cuda_only(cache_dir, tmp_path):
    """On CUDA for plain tensors of a million elements on average, and the engine then clips and skips
    inside the step; torch's elsewhere, and for small tensors (adapters), which its fused kernel steps
    many to a launch. (CUDA specs over CPU parameters: the choice is all that is checked.)"""
    model = torch.nn.Linear(2048, 1024, bias=False)
    cpu, unfused = (
        spec_for(cache_dir, f"train.output_dir={tmp_path}", "train.device=cpu", f"optim.fused={fused}")
        for fused in ("true", "false")
    )
    cuda = dataclasses.replace(cpu, device_type="cuda")
    assert type(build_optimizer(model, cuda)) is TritonAdamW
    assert TorchEngine(model, cuda).skips_on_device
    assert type(build_optimizer(model, cpu)) is torch.optim.AdamW
    assert type(build_optimizer(model, dataclasses.replace(unfused, device_type="cuda"))) is torch.optim.AdamW
    small = build_optimizer(torch.nn.Linear(1024, 1024), cuda)  # a bias beside the matrix: 0.5 M on average
    assert type(small) is torch.optim.AdamW and small.defaults["fused"]


@triton.jit
def _round_kernel(bits_ptr, out_ptr):
    tl.store(out_ptr, to_output(tl.load(bits_ptr).to(tl.float32, bitcast=True), tl.bfloat16))


def test_rounding_to_bfloat16_keeps_a_nan():
    """The GPU's NaN is 0x7FFFFFFF: rounded by carry it would become -0, and a diverged weight would
    pass for zero."""
    out = torch.empty(1, dtype=torch.bfloat16, device=DEVICE)
    _round_kernel[(1,)](torch.tensor([0x7FFFFFFF], dtype=torch.int32, device=DEVICE), out)
    assert out.isnan().all()
