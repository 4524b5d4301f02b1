"""Every parallel strategy on CPU (gloo, torchrun) gives the losses of the single-process run.

All runs start from the same HF folder (a small random Llama with tied embeddings, saved once), so
sharded initialisation plays no part, and use the same global batch of 4 rows per step.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from parallel.parallelize import activation_offload
from tests.conftest import TINY_MOE
from tests.test_train import ROOT, TINY, losses, read_metrics, spec_for
from trainkit.config import ACConfig
from trainkit.trainer import Trainer

STEPS = 4
FP32_TOLERANCE = 1e-5  # relative, per step
LOW_PRECISION_TOLERANCE = 2e-2  # relative: bf16 / fp16 rounding differs with each strategy's reduction order


def overrides(source, out, *extra):
    common = [*TINY, f"model.source={source}", "model.tokenizer=null", f"train.steps={STEPS}", "train.eval_every=2"]
    return [*common, f"train.output_dir={out}", *extra]


def launch(cache_dir, tmp_path, nproc: int, cases: dict[str, list[str]]) -> None:
    cases_file = tmp_path / f"cases{nproc}.json"
    cases_file.write_text(json.dumps({name: [f"cache_dir={cache_dir}", *o] for name, o in cases.items()}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "tests/dist_cases.py", str(cases_file)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


def reference(cache_dir, source, out, *extra):
    trainer = Trainer(
        spec_for(cache_dir, *overrides(source, out, "train.micro_batch_size=2", "train.grad_accum_steps=2", *extra))
    )
    trainer.fit()
    trainer.close()
    return out


def assert_same_run(got_dir, want_dir, rel):
    got, want = losses(got_dir), losses(want_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=rel), (got_dir.name, step)
    evals = [r["eval_loss"] for r in read_metrics(got_dir) if "eval_loss" in r]
    assert evals == pytest.approx([r["eval_loss"] for r in read_metrics(want_dir) if "eval_loss" in r], rel=rel)


# name → (overrides on 2 processes); each keeps the global batch at 4 rows.
TWO_PROCESS_CASES = {
    "ddp": ["parallel=ddp", "train.micro_batch_size=2"],
    "ddp_accumulate": ["parallel=ddp", "train.micro_batch_size=1", "train.grad_accum_steps=2"],
    "fsdp": ["parallel=fsdp", "train.micro_batch_size=2"],
    "fsdp_accumulate": ["parallel=fsdp", "train.micro_batch_size=1", "train.grad_accum_steps=2"],
    "fsdp_zero2": ["parallel=fsdp_zero2", "train.micro_batch_size=2"],
    "fsdp_offload": ["parallel=fsdp_offload", "train.micro_batch_size=2"],
    "tp": ["parallel=tp", "train.micro_batch_size=2", "train.grad_accum_steps=2"],
    "ac_full": ["parallel=fsdp", "ac=full", "train.micro_batch_size=2"],
    "ac_every_2": ["parallel=fsdp", "ac=every_2", "train.micro_batch_size=2"],
    "ac_selective": ["parallel=fsdp", "ac=selective", "train.micro_batch_size=2"],
    "ac_full_offload": ["parallel=ddp", "ac=full_offload", "train.micro_batch_size=2"],
    "tp_ac_selective": ["parallel=tp", "ac=selective", "train.micro_batch_size=2", "train.grad_accum_steps=2"],
}
FOUR_PROCESS_CASES = {
    "hsdp": ["parallel=hsdp", "train.micro_batch_size=1"],
    "fsdp_tp": ["parallel=fsdp_tp", "train.micro_batch_size=2"],
}
# name → (precision, overrides on 2 processes); compared with the 1-process run in that precision.
LOW_PRECISION_CASES = {
    "fsdp_bf16": ("bf16", ["parallel=fsdp", "train.micro_batch_size=2"]),
    "tp_bf16": ("bf16", ["parallel=tp", "train.micro_batch_size=2", "train.grad_accum_steps=2"]),
    "fsdp_fp16": ("fp16", ["parallel=fsdp", "train.micro_batch_size=2"]),
    "ddp_fp16": ("fp16", ["parallel=ddp", "train.micro_batch_size=2"]),
    "tp_fp16": ("fp16", ["parallel=tp", "train.micro_batch_size=2", "train.grad_accum_steps=2"]),
}


def test_strategies_match_one_process(cache_dir, tiny_source, tmp_path):
    want = {
        p: reference(cache_dir, tiny_source, tmp_path / f"reference_{p}", f"precision={p}")
        for p in ("fp32", "bf16", "fp16")
    }
    low = {name: [f"precision={p}", *o] for name, (p, o) in LOW_PRECISION_CASES.items()}
    two = {name: overrides(tiny_source, tmp_path / name, *o) for name, o in {**TWO_PROCESS_CASES, **low}.items()}
    launch(cache_dir, tmp_path, 2, two)
    four = {name: overrides(tiny_source, tmp_path / name, *o) for name, o in FOUR_PROCESS_CASES.items()}
    launch(cache_dir, tmp_path, 4, four)
    for name in [*TWO_PROCESS_CASES, *FOUR_PROCESS_CASES]:
        assert_same_run(tmp_path / name, want["fp32"], FP32_TOLERANCE)
    for name, (precision, _) in LOW_PRECISION_CASES.items():
        assert_same_run(tmp_path / name, want[precision], LOW_PRECISION_TOLERANCE)


# Dropless routing and no aux loss: both depend on how the batch is split, so equality needs them off.
MOE = [f"model.{k}={v}" for k, v in TINY_MOE.items()]
MOE += ["model.tie_embeddings=false", "model.router_aux_loss_coef=0", "model.capacity_factor=0"]
MOE_CASES = {  # name → (processes, overrides)
    "ep": (2, ["parallel=fsdp_ep", "train.micro_batch_size=2"]),
    "fsdp_x_ep": (4, ["parallel=fsdp_ep", "parallel.ep=2", "train.micro_batch_size=1"]),
    "fsdp_moe_no_ep": (2, ["parallel=fsdp", "train.micro_batch_size=2"]),
}


def test_expert_parallel_matches_one_process(cache_dir, tiny_moe_source, tmp_path):
    want = reference(cache_dir, tiny_moe_source, tmp_path / "reference", *MOE)
    for nproc in (2, 4):
        cases = {n: overrides(tiny_moe_source, tmp_path / n, *MOE, *o) for n, (p, o) in MOE_CASES.items() if p == nproc}
        launch(cache_dir, tmp_path, nproc, cases)
    for name in MOE_CASES:
        assert_same_run(tmp_path / name, want, FP32_TOLERANCE)
        assert all(r["moe_dropped_fraction"] == 0 for r in read_metrics(tmp_path / name) if "loss" in r)


ZERO3_PARTITION_ALL = ROOT / "tests" / "zero3_partition_all.json"
ADAPTER_CASES = {  # name → (peft preset, overrides on 2 processes)
    "lora_ddp": ("lora", ["parallel=ddp", "train.micro_batch_size=2"]),
    "lora_fsdp": ("lora", ["parallel=fsdp", "train.micro_batch_size=2"]),
    "lora_fsdp_ac": (
        "lora",
        ["parallel=fsdp_zero2", "ac=full", "train.micro_batch_size=1", "train.grad_accum_steps=2"],
    ),
    "qlora_fsdp": ("qlora", ["parallel=fsdp", "train.micro_batch_size=2"]),
    "qlora_ddp_ac": ("qlora", ["parallel=ddp", "ac=selective", "train.micro_batch_size=2"]),
    "lora_zero2": ("lora", ["parallel=zero2", "train.micro_batch_size=2"]),
    # Every parameter partitioned (tiny ones are kept whole by default): adapters are gathered to save.
    "qlora_zero3": (
        "qlora",
        ["parallel=zero3", f"parallel.deepspeed_config={ZERO3_PARTITION_ALL}", "train.micro_batch_size=2"],
    ),
}


def test_adapters_match_one_process(cache_dir, tiny_source, tmp_path):
    """LoRA and QLoRA (NF4 base) under DDP, FSDP2 and AC: the 1-process losses, non-zero finite grad norms."""
    want = {p: reference(cache_dir, tiny_source, tmp_path / f"reference_{p}", f"peft={p}") for p in ("lora", "qlora")}
    cases = {n: overrides(tiny_source, tmp_path / n, f"peft={p}", *o) for n, (p, o) in ADAPTER_CASES.items()}
    launch(cache_dir, tmp_path, 2, cases)
    for name, (preset, _) in ADAPTER_CASES.items():
        assert_same_run(tmp_path / name, want[preset], FP32_TOLERANCE)
        norms = [r["grad_norm"] for r in read_metrics(tmp_path / name) if "grad_norm" in r]
        assert all(0 < n < float("inf") for n in norms), (name, norms)
        got = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
        expected = load_file(tmp_path / f"reference_{preset}" / "adapter" / "adapter_model.safetensors")
        assert got.keys() == expected.keys(), name
        for key in expected:  # the trained adapters themselves, gathered from every sharding
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


class _StrideCheck(torch.autograd.Function):
    """Saves its input and, in backward, fails unless it comes back with the strides it had, as the
    compiled flex_attention backward does."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.stride = x.stride()
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        assert x.stride() == ctx.stride, f"saved {ctx.stride}, unpacked {x.stride()}"
        return grad


def test_activation_offload_brings_saved_tensors_back_with_their_strides():
    x = torch.randn(2, 6, 4, 3, requires_grad=True)
    with activation_offload(ACConfig(mode="full", offload=True), torch.device("cpu")):
        y = _StrideCheck.apply(x.transpose(1, 2))  # [B, H, S, D] from [B, S, H, D], as attention's q
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
