"""Where a profiled window's GPU time went: ``python -m profiling.kernels <trace_rank0.json>``.

Reads the Chrome / Perfetto trace that ``logging.profile_steps`` writes and prints, for its GPU
kernels, the time per kind (matmul, attention, NF4 dequantization, compiled fused kernels, optimizer,
communication, copies, other), the top kernels by time, and how much of the window the GPU was busy:
the idle share is launch overhead and host synchronisation, the first thing to look at when a run is
slower than its FLOPs say. ``--json`` writes the same figures to a file.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

# First match wins: matmul kernel names also contain words like "fused", so they are tested first.
KINDS = (
    ("matmul", re.compile(r"gemm|nvjet|cutlass|cublas|xmma|splitK", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|cudnn", re.I)),
    ("nf4_dequantize", re.compile(r"dequant", re.I)),
    ("communication", re.compile(r"nccl", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|optimizer", re.I)),
    ("compiled_fused", re.compile(r"^triton_", re.I)),
)


def kind_of(event: dict) -> str:
    if event.get("cat") in ("gpu_memcpy", "gpu_memset"):
        return "copy_or_set"
    return next((kind for kind, pattern in KINDS if pattern.search(event["name"])), "other")


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: kernels on several streams may overlap."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarise(trace_path: str, top: int = 15) -> dict:
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not kernels:
        raise SystemExit(f"{trace_path}: no GPU kernels in this trace; profile a CUDA run")
    labels = {e["name"] for e in events if e.get("cat") == "user_annotation"}
    steps = [name for name in labels if re.fullmatch(r"step_\d+", name)]
    start = min(e["ts"] for e in kernels)
    window_us = max(e["ts"] + e["dur"] for e in kernels) - start
    by_kind, by_name = defaultdict(float), defaultdict(lambda: [0.0, 0, ""])
    for e in kernels:
        by_kind[kind_of(e)] += e["dur"]
        by_name[e["name"]][0] += e["dur"]
        by_name[e["name"]][1] += 1
        by_name[e["name"]][2] = kind_of(e)
    busy_us = busy_time([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    return {
        "trace": trace_path,
        "steps": len(steps) or None,
        "window_ms": window_us / 1e3,
        "gpu_busy_share": busy_us / window_us,
        "kinds_ms": {k: v / 1e3 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": name[:120], "ms": t / 1e3, "calls": n, "kind": kind}
            for name, (t, n, kind) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
        ],
    }


def print_summary(s: dict) -> None:
    per_step = s["steps"] or 1
    busy = s["gpu_busy_share"]
    print(f"{s['trace']}: {s['window_ms']:.1f} ms of GPU time over {per_step} step(s), GPU busy {busy:.1%}")
    total = sum(s["kinds_ms"].values())
    for kind, ms in s["kinds_ms"].items():
        print(f"  {kind:<16} {ms / per_step:9.2f} ms/step  {ms / total:6.1%}")
    print("  top kernels (ms over the window, calls):")
    for k in s["top_kernels"]:
        print(f"    {k['ms']:9.2f} {k['calls']:6d}  {k['kind']:<15} {k['name']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args()
    summary = summarise(args.trace, args.top)
    print_summary(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
