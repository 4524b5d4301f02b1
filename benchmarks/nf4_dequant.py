"""NF4 dequantization per call on one GPU, for Llama-3-8B's linear shapes: bitsandbytes' three ops
(``lora.qlora._bnb_dequantize``) against the Triton kernel (``lora.nf4_triton``), after checking that
they agree bit for bit.

    python benchmarks/nf4_dequant.py [--dtype bfloat16] [--calls 50]

Per shape: device time per call (back-to-back calls queued behind a sleeping kernel, so the host's pace
does not count), the bandwidth that time implies (packed bytes and absmax codes read, output written),
and host time per call (the wall time of enqueuing them).
"""

from __future__ import annotations

import argparse
import time

import bitsandbytes as bnb
import torch

from lora.nf4_triton import dequantize_nf4
from lora.qlora import NF4State, _bnb_dequantize

SHAPES = {"q/o_proj": (4096, 4096), "k/v_proj": (1024, 4096), "gate/up_proj": (14336, 4096), "down_proj": (4096, 14336)}


def per_call(fn, inputs: tuple, calls: int) -> tuple[float, float]:
    """(host seconds, device seconds) per call of ``fn(*inputs)``."""
    fn(*inputs)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(50_000_000)  # the calls queue up behind it
    start.record()
    t = time.perf_counter()
    for _ in range(calls):
        fn(*inputs)
    host = (time.perf_counter() - t) / calls
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / 1e3 / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, {args.dtype} out")
    for name, shape in SHAPES.items():
        weight = torch.randn(shape, device="cuda", dtype=dtype) * 0.02
        packed, state = bnb.functional.quantize_4bit(
            weight, compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16
        )
        s = NF4State.of(state)
        inputs = (packed, s.absmax_codes, s.absmax_code, s.absmax_scale, s.offset, s.blocksize, s.absmax_blocksize)
        inputs = (*inputs, s.shape, dtype)
        want, got = _bnb_dequantize(*inputs), dequantize_nf4(*inputs)
        assert torch.equal(got, want), f"{name}: {(got != want).sum().item()} values differ from bitsandbytes'"
        n = weight.numel()
        moved = n // 2 + n // s.blocksize + n * dtype.itemsize
        for path, fn in [("bitsandbytes", _bnb_dequantize), ("triton", dequantize_nf4)]:
            host, device = per_call(fn, inputs, args.calls)
            print(
                f"{name:>12} {shape[0]:>5}x{shape[1]:<5} {path:>12}: device {device * 1e6:7.1f} us "
                f"({moved / device / 1e9:6.0f} GB/s), host {host * 1e6:5.1f} us"
            )


if __name__ == "__main__":
    main()
