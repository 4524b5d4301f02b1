"""What a prediction looks like to a person and to a program: a table, a JSON file, an HTML picture."""

from __future__ import annotations

import html
import json
from pathlib import Path

from profiling.hardware import GiB
from profiling.program import CATEGORIES
from profiling.simulator import Prediction, RankPrediction


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _rank_groups(prediction: Prediction) -> list[tuple[str, RankPrediction]]:
    """Consecutive ranks with the same prediction, as ("0-63", prediction of rank 0)."""
    groups, start = [], 0
    ranks = prediction.ranks
    for i in range(1, len(ranks) + 1):
        if i == len(ranks) or _numbers(ranks[i]) != _numbers(ranks[start]):
            label = str(start) if i - 1 == start else f"{start}-{i - 1}"
            groups.append((label, ranks[start]))
            start = i
    return groups


def _numbers(r: RankPrediction) -> tuple:
    return r.peak_allocated, r.peak_reserved, r.device_used, tuple(r.breakdown.items())


def table(prediction: Prediction) -> str:
    """Per-rank peaks, the breakdown at the peak, and the fit verdict."""
    lines = [f"{'ranks':>10}  {'peak allocated':>15}  {'peak reserved':>14}  {'nvidia-smi':>11}  peak during"]
    for label, r in _rank_groups(prediction):
        lines.append(
            f"{label:>10}  {gib(r.peak_allocated):>15}  {gib(r.peak_reserved):>14}  {gib(r.device_used):>11}  "
            f"{r.peak_moment}"
        )
    worst = prediction.worst
    lines.append("breakdown at the peak (rank %d):" % worst.rank)
    for category in CATEGORIES:
        if worst.breakdown.get(category):
            lines.append(f"  {category:<24} {gib(worst.breakdown[category]):>12}")
    lines.append(verdict(prediction))
    return "\n".join(lines)


def verdict(prediction: Prediction) -> str:
    worst, gpu = prediction.worst, prediction.gpu
    word = "fits" if prediction.fits else "does NOT fit"
    return (
        f"{word}: {gib(worst.device_used)} of {gib(gpu.total_memory)} on each {gpu.name} "
        f"(budget {gib(prediction.budget)}, a {1 - prediction.budget / gpu.total_memory:.0%} margin kept free)"
    )


def to_json(prediction: Prediction, overrides: list[str]) -> dict:
    return {
        "gpu": prediction.gpu.name,
        "gpu_memory_bytes": prediction.gpu.total_memory,
        "budget_bytes": prediction.budget,
        "fits": prediction.fits,
        "world_size": prediction.world_size,
        "overrides": overrides,
        "step_flops_per_rank": prediction.step_flops,
        "host_bytes_per_rank": prediction.host_bytes,
        "ranks": [
            {
                "rank": r.rank,
                "peak_allocated_bytes": r.peak_allocated,
                "peak_reserved_bytes": r.peak_reserved,
                "device_used_bytes": r.device_used,
                "peak_moment": r.peak_moment,
                "breakdown": {k: v for k, v in r.breakdown.items() if v},
            }
            for r in prediction.ranks
        ],
        "timeline": [
            {"moment": moment, "allocated_at_start_bytes": start, "allocated_max_bytes": high}
            for moment, start, high in prediction.worst.timeline
        ],
    }


COLORS = (
    "#4e79a7 #a0cbe8 #f28e2b #ffbe7d #59a14f #8cd17d #b6992d #f1ce63 #499894 #86bcb6 #e15759 #ff9d9a #79706e #d37295"
).split()


def to_html(prediction: Prediction, title: str) -> str:
    """The breakdown at the peak as a stacked bar, and allocated memory over the steps, in inline SVG."""
    worst, width = prediction.worst, 900
    scale = max(prediction.gpu.total_memory, worst.device_used)
    bar, x = [], 0.0
    for color, category in zip(COLORS, CATEGORIES):
        size = worst.breakdown.get(category, 0)
        if not size:
            continue
        w = width * size / scale
        bar.append(
            f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="40" fill="{color}">'
            f"<title>{category}: {gib(size)}</title></rect>"
        )
        bar.append(f'<text x="{x + 2:.1f}" y="55" font-size="10">{category if w > 60 else ""}</text>')
        x += w
    budget_x = width * prediction.budget / scale
    bar.append(f'<line x1="{budget_x:.1f}" y1="0" x2="{budget_x:.1f}" y2="45" stroke="red" stroke-width="2"/>')
    height, points = 300, []
    timeline = worst.timeline
    for i, (_, _, high) in enumerate(timeline):
        px = width * i / max(1, len(timeline) - 1)
        points.append(f"{px:.1f},{height - height * high / scale:.1f}")
    budget_y = height - height * prediction.budget / scale
    legend = "".join(
        f'<span style="background:{c};padding:0 6px;margin-right:4px"></span>{k} {gib(worst.breakdown[k])} &nbsp;'
        for c, k in zip(COLORS, CATEGORIES)
        if worst.breakdown.get(k)
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>
<body style="font-family:sans-serif">
<h2>{html.escape(title)}</h2><p>{html.escape(verdict(prediction))}</p>
<h3>At the peak ({html.escape(worst.peak_moment)}): {gib(worst.peak_allocated)} allocated</h3>
<svg width="{width}" height="60">{"".join(bar)}</svg><p style="font-size:12px">{legend}</p>
<h3>Allocated memory over two optimizer steps (highest within each moment; red: the budget)</h3>
<svg width="{width}" height="{height + 10}">
<polyline fill="none" stroke="#4e79a7" stroke-width="1.5" points="{" ".join(points)}"/>
<line x1="0" y1="{budget_y:.1f}" x2="{width}" y2="{budget_y:.1f}" stroke="red" stroke-dasharray="4"/>
</svg></body></html>
"""


def write(prediction: Prediction, overrides: list[str], folder: Path, title: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path, html_path = folder / "memory_plan.json", folder / "memory_plan.html"
    json_path.write_text(json.dumps(to_json(prediction, overrides), indent=1))
    html_path.write_text(to_html(prediction, title))
    return json_path, html_path
