"""The memory simulator: its output contract, its sanity, its tracing against real saved tensors, and
every committed GPU measurement predicted again within the stated bounds."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from profiling import simulator, validate
from profiling.dry_run import check_fits
from profiling.hardware import H100
from profiling.job import spec_of
from profiling.simulator import cached_trace, predict
from trainkit.config import ConfigError
from trainkit.model import build_model, materialize

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "results" / "memory_validation.jsonl"
SMALL = ["model=smollm2_135m", "model.source=null", "model.num_layers=4", "data.seq_len=256"]
TOKENIZER = "model.tokenizer=tokenizer"  # composed, never read by the simulator


def spec(overrides, world_size=1):
    return spec_of([*overrides, TOKENIZER, "train.output_dir=/nonexistent/test-profiling"], world_size)


def test_dry_run_writes_the_json_contract_and_a_picture(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "train.py", *SMALL, TOKENIZER, "parallel=fsdp", "dry_run=true", "dry_run_world_size=2"]
        + [f"train.output_dir={out}", "gpu=h200"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "fits" in done.stdout and "peak allocated" in done.stdout
    plan = json.loads((tmp_path / "run-dry-run" / "memory_plan.json").read_text())
    assert plan["gpu_memory_bytes"] == 150_109_028_352 and plan["fits"] is True
    assert [r["rank"] for r in plan["ranks"]] == [0, 1]
    for rank in plan["ranks"]:
        assert rank["peak_reserved_bytes"] >= rank["peak_allocated_bytes"] > 0
        assert sum(rank["breakdown"].values()) == rank["peak_allocated_bytes"]
        assert {"parameters", "optimizer_states", "activations"} <= rank["breakdown"].keys()
    assert "<svg" in (tmp_path / "run-dry-run" / "memory_plan.html").read_text()
    assert not out.exists()  # the run's own folder stays free for the real run


def test_more_shards_never_more_parameter_memory():
    parameters = [
        predict(spec([*SMALL, "parallel=fsdp"], world), H100).worst.breakdown["parameters"] for world in (2, 4, 8)
    ]
    assert parameters[0] > parameters[1] > parameters[2]


def test_checkpointing_keeps_fewer_activations():
    activations = {
        ac: predict(spec([*SMALL, f"ac={ac}"]), H100, reserved=False).worst.breakdown["activations"]
        for ac in ("none", "selective", "full")
    }
    assert activations["none"] > activations["selective"] > activations["full"]


def test_trace_matches_the_tensors_a_real_cpu_run_saves():
    """The per-layer activations the trace keeps equal the bytes autograd really saves in the same model
    on the CPU (float32, grouped-query heads: the CUDA path is the math attention, which the CPU runs too)."""
    overrides = [
        "model=smollm2_135m",
        "model.source=null",
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.num_heads=4",
        "model.num_kv_heads=2",
        "model.intermediate_size=128",
        "precision=fp32",
        "data.seq_len=32",
        "data.pack=false",
        "train.micro_batch_size=2",
    ]
    job = spec(overrides)
    trace = cached_trace(job, 1)
    live = {}
    for name, events, *_ in trace.segments:
        if name == "mb0.head.bwd":
            break
        for e in events:
            if e > 0:
                live[e - 1] = name
            else:
                del live[-e - 1]
    traced = sum(trace.sizes[u] for u, name in live.items() if trace.categories[u] != "inputs")

    model = materialize(build_model(job.cfg.model), torch.device("cpu"))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, 100, (2, 32))
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    def math_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, None, 0.0, True, None, enable_gqa=True)[0]

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = math_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids)
    finally:
        F.scaled_dot_product_attention = original
    # The loss keeps the gradients it computed in forward on its node, not as saved tensors.
    held = sum(g.untyped_storage().nbytes() for g in loss.grad_fn.grads if g is not None)
    real = sum(saved.values()) + loss.untyped_storage().nbytes() + held
    assert traced == pytest.approx(real, rel=0.01)


def test_empty_storages_in_the_trace_change_nothing():
    """torch 2.11's non-reentrant checkpoint keeps an empty tensor per checkpointed call: a storage of
    0 bytes whose free must not read as a second allocation (its size has no sign)."""
    job = spec([*SMALL, "ac=full"])
    key = simulator.trace_key(job, 1)
    original = cached_trace(job, 1)
    expected = predict(job, H100)
    segments = [(name, list(events), *rest) for name, events, *rest in original.segments]
    sizes, categories = list(original.sizes), list(original.categories)
    birth, order = list(original.birth), list(original.order)
    names = [name for name, *_ in segments]
    for born, dies in [("mb0.head.fwd", "mb0.head.bwd")] + [
        (f"mb0.layer{q}.fwd", f"mb0.layer{q}.bwd") for q in range(original.prototype.traced)
    ]:  # one empty storage per traced layer, at the same position in each, and one in the head
        uid, at = len(sizes), names.index(born)
        sizes.append(0), categories.append(None), birth.append(at)
        order.append(sum(e > 0 for e in segments[at][1]))
        segments[at][1].append(uid + 1)
        segments[names.index(dies)][1].insert(0, -(uid + 1))
    simulator._TRACES[key] = dataclasses.replace(
        original, segments=segments, sizes=sizes, categories=categories, birth=birth, order=order
    )
    try:
        got = predict(job, H100)
    finally:
        simulator._TRACES[key] = original
    assert (got.worst.peak_allocated, got.worst.peak_reserved, got.worst.peak_moment) == (
        expected.worst.peak_allocated,
        expected.worst.peak_reserved,
        expected.worst.peak_moment,
    )


def test_qlora_traces_under_torch_2_11s_fake_mode_rule(monkeypatch):
    """torch 2.11's fake mode returns NotImplemented for any tensor subclass but ``Parameter`` itself,
    bitsandbytes' ``Params4bit`` included, which has no dispatch of its own: ``to_empty`` failed with
    "Multiple dispatch failed for aten.empty_like" (torch 2.13 lets it through). The trace swaps such
    parameters for plain ones first; under 2.11's rule the prediction is the same."""
    import torch._subclasses.fake_tensor as fake_tensor

    job = spec([*SMALL, "peft=qlora"])
    expected = predict(job, H100).worst

    def torch_2_11_rule(x):
        return (
            not isinstance(x, fake_tensor.FakeTensor)
            and isinstance(x, torch.Tensor)
            and type(x) is not torch.Tensor
            and type(x) is not torch.nn.Parameter
        )

    monkeypatch.setattr(fake_tensor, "_check_for_subclass_arg", torch_2_11_rule)
    monkeypatch.setattr(simulator, "_TRACES", {})
    got = predict(job, H100).worst
    assert (got.peak_allocated, got.peak_reserved, got.peak_moment) == (
        expected.peak_allocated,
        expected.peak_reserved,
        expected.peak_moment,
    )


def test_autocast_cache_frees_newest_first():
    """Leaving autocast frees its cached weight copies in hash-map order, which changed from run to run
    (and ``reserved`` with it, under full checkpointing): the trace fixes one order."""
    job = spec([*SMALL, "precision=bf16", "ac=full"])
    trace = cached_trace(job, 1)
    exits = [events for name, events, *_ in trace.segments if name.endswith("autocast_exit")]
    frees = [e for events in exits for e in events if e < 0]
    assert frees and all(sorted(f for f in events if f < 0) == [f for f in events if f < 0] for events in exits)


def test_a_run_that_does_not_fit_is_refused_with_a_config_that_does():
    job = spec(
        ["model=llama3_8b", "model.source=null", "model.num_layers=8", "precision=bf16", "gpu=h100"]
        + [
            "train.micro_batch_size=8",
            "data.seq_len=4096",
        ]
    )
    with pytest.raises(ConfigError, match=r"predicted peak .* nearest config that fits: ac="):
        check_fits(job, [])


def _rows():
    if not TABLE.exists():
        return []
    return [json.loads(line) for line in TABLE.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("row", _rows(), ids=lambda r: f"{r['config']}-rank{r['rank']}")
def test_committed_measurement_is_predicted_within_bounds(row):
    assert validate.check_row(row) == []


def test_the_regression_check_fails_on_a_wrong_row():
    rows = _rows()
    row = dict(rows[0]) if rows else {"config": "small", "overrides": SMALL, "world_size": 1, "gpu": "h100", "rank": 0}
    predicted = validate.prediction_columns(row["overrides"], row["world_size"], row["gpu"])
    wrong = {**row, "measured_allocated": predicted["predicted_allocated"] * 1.2}
    wrong["measured_reserved"] = predicted["predicted_reserved"] * 1.2
    problems = validate.check_row(wrong)
    assert len(problems) == 2 and "allocated" in problems[0] and "reserved" in problems[1]


def test_kernel_summary_sums_kinds_and_busy_time(tmp_path):
    """profiling.kernels: time per kind, and busy time as the union of overlapping kernels."""
    from profiling.kernels import summarise

    def kernel(name, ts, dur, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [
        kernel("nvjet_sm90_tst_256x128_TNT", 0, 10),
        kernel("triton_poi_fused_add_mul_0", 5, 10),  # overlaps the matmul on another stream
        kernel("void kDequantizeBlockwise<__nv_bfloat16>", 30, 5),
        kernel("Memcpy HtoD (Pageable -> Device)", 40, 10, cat="gpu_memcpy"),
        {"ph": "X", "cat": "user_annotation", "name": "step_3", "ts": 0, "dur": 50},
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    s = summarise(str(trace))
    assert s["steps"] == 1
    assert s["kinds_ms"] == {"matmul": 0.01, "compiled_fused": 0.01, "copy_or_set": 0.01, "nf4_dequantize": 0.005}
    assert s["window_ms"] == 0.05
    assert s["gpu_busy_share"] == pytest.approx(30 / 50)  # [0, 15) + [30, 35) + [40, 50)
    assert s["top_kernels"][-1]["kind"] == "nf4_dequantize"
