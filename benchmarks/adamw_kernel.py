"""AdamW's step on one GPU over the Llama-3.2-1B parameters (bf16 weights, gradients and states, 1.24 B
parameters in 146 tensors, weight decay on the matrices only): torch's fused AdamW with ``grad_scale``
(the clip divisor) and ``found_inf`` (the skip flag) set, as ``TorchEngine`` steps it; torch's fused
without them; and ``trainkit.optim.TritonAdamW`` with them. First, one update of each from the same
weights and states on the last layer's tensors: how many values differ between the two.

    python benchmarks/adamw_kernel.py [--steps 20] [--warmup 3]

Per optimizer: device time per step (the median of --steps, each step queued behind a sleeping kernel
so that the host's pace of ~150 launches does not count), host time per step (enqueuing it), and the
bandwidth the device time implies for the bytes the step must move: 16 a parameter for torch's with
``grad_scale`` (it writes the unscaled gradient back), 14 for the others (read weight, gradient and
both states, write weight and states: 17.3 GB); then each device time over TritonAdamW's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from trainkit.optim import TritonAdamW, param_groups

HIDDEN, LAYERS, VOCAB = 2048, 16, 128256
# q, k, v, o, gate, up, down, the two RMSNorm weights
LAYER = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)]
LAYER += [(HIDDEN,), (HIDDEN,)]
SHAPES = [(VOCAB, HIDDEN), *LAYER * LAYERS, (HIDDEN,)]  # tied embedding, blocks, final norm
# The 1B job's optimizer (results/README.md): lr 1e-5, betas (0.9, 0.95), weight decay 0.1.
OPTIONS = {"lr": 1e-5, "betas": (0.9, 0.95), "eps": 1e-8}
WEIGHT_DECAY = 0.1


def trained_params(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    params = []
    for shape in shapes:
        p = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02).requires_grad_()
        p.grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) * 1e-3
        params.append(p)
    return params


def torch_adamw(params: list[torch.Tensor]) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(params, WEIGHT_DECAY), **OPTIONS, fused=True)


def skips_on_device(optimizer: torch.optim.Optimizer, grad_scale: float) -> torch.optim.Optimizer:
    """Set what ``TorchEngine`` sets: a clip divisor and a skip flag, both on the device."""
    optimizer.grad_scale = torch.tensor(grad_scale, device="cuda")
    optimizer.found_inf = torch.zeros((), device="cuda")
    return optimizer


def compare_one_update(shapes: list[tuple[int, ...]]) -> None:
    """Two steps of torch's fused AdamW for nonzero states, then one more of it and one of TritonAdamW
    from a copy of its weights, gradients and states, with a clip divisor of 1.25."""
    theirs = trained_params(shapes, seed=1)
    reference = torch_adamw(theirs)
    for _ in range(2):
        reference.step()
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    for mine, ref in zip(ours, theirs):
        mine.grad = ref.grad.clone()  # a copy: torch's step divides its own in place
    optimizer = TritonAdamW(param_groups(ours, WEIGHT_DECAY), **OPTIONS)
    optimizer.load_state_dict(copy.deepcopy(reference.state_dict()))
    for opt in (reference, optimizer):
        skips_on_device(opt, 1.25).step()
    pairs = {"weights": [(mine, ref) for mine, ref in zip(ours, theirs)]}
    for key in ("exp_avg", "exp_avg_sq"):
        pairs[key] = [(optimizer.state[mine][key], reference.state[ref][key]) for mine, ref in zip(ours, theirs)]
    counts = []
    for name, tensors in pairs.items():
        differ = sum((mine != ref).sum().item() for mine, ref in tensors)
        apart = max(bfloat16_steps(mine, ref).max().item() for mine, ref in tensors)
        counts.append(f"{name} {differ} (at most {apart:.0f} bfloat16 steps apart)")
    total = sum(p.numel() for p in theirs)
    print(f"one update of {total:,} parameters, TritonAdamW's values unlike torch's fused: " + ", ".join(counts))


def bfloat16_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the last bfloat16 place of b (8 significant bits)."""
    return (a.float() - b.float()).abs() / torch.ldexp(
        torch.ones_like(b, dtype=torch.float32), torch.frexp(b.float()).exponent - 8
    )


def per_step(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> tuple[float, float]:
    """(device seconds, host seconds) per step, medians."""
    for _ in range(warmup):
        optimizer.step()
    torch.cuda.synchronize()
    device, host = [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(50_000_000)  # the step's launches queue up behind it
        start.record()
        t = time.perf_counter()
        optimizer.step()
        host.append(time.perf_counter() - t)
        end.record()
        torch.cuda.synchronize()
        device.append(start.elapsed_time(end) / 1e3)
    return statistics.median(device), statistics.median(host)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    params = trained_params(SHAPES)
    numel = sum(p.numel() for p in params)
    print(f"{torch.cuda.get_device_name()}, {numel:,} parameters in {len(params)} tensors, bfloat16")
    compare_one_update(SHAPES[-len(LAYER) - 1 :])
    # grad_scale 1: the divisor when the norm is under the clip; the kernels do the same work either way.
    rows = [
        ("torch fused, grad_scale + found_inf", 16, lambda: skips_on_device(torch_adamw(params), 1.0)),
        ("torch fused", 14, lambda: torch_adamw(params)),
        (
            "TritonAdamW, grad_scale + found_inf",
            14,
            lambda: skips_on_device(TritonAdamW(param_groups(params, WEIGHT_DECAY), **OPTIONS), 1.0),
        ),
    ]
    times = {}
    for name, bytes_per_param, build in rows:  # one optimizer's states (5 GB) at a time
        device, host = times[name] = per_step(build(), args.steps, args.warmup)
        print(
            f"{name:>36}: device {device * 1e3:6.2f} ms ({bytes_per_param * numel / device / 1e9:5.0f} GB/s), "
            f"host {host * 1e3:5.2f} ms"
        )
    triton_time = times[rows[-1][0]][0]
    for name, (device, _) in times.items():
        print(f"{name:>36}: {device / triton_time:.2f}x TritonAdamW's device time")


if __name__ == "__main__":
    main()
