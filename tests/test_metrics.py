"""Measurement in every run: per-phase step times, the FLOPs formula behind MFU, profiler traces."""

import json

import pytest

from tests.test_train import read_metrics, spec_for
from trainkit.config import ConfigError, ModelConfig
from trainkit.metrics import PHASES, flops_per_token
from trainkit.trainer import Trainer

PHASE_KEYS = [f"time_{name}_s" for name in PHASES] + ["time_other_s"]

# The TINY shape of tests/test_train.py, counted by hand: hidden 64, 2 layers, 4 heads of 16, 2 kv
# heads, MLP 128, SmolLM2's 49152-token vocabulary, sequences of 64.
ATTN = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v, o: 12288
MLP = 3 * 64 * 128  # gate, up, down: 24576
N = 2 * (ATTN + MLP) + 49152 * 64  # + the output head: 3219456
ATTENTION_FLOPS = 12 * 2 * 4 * 16 * 64  # 12 * L * H * Q * T: 98304
# LoRA r=16 on all seven block linears adds r * (in + out) each: q 64+64, k 64+32, v 64+32, o 64+64,
# gate 64+128, up 64+128, down 128+64.
LORA = 2 * 16 * (128 + 96 + 96 + 128 + 192 + 192 + 192)  # 32768


def fit(cache_dir, run, *overrides):
    trainer = Trainer(spec_for(cache_dir, f"train.output_dir={run}", *overrides))
    trainer.fit()
    trainer.close()
    return trainer


def test_every_step_record_holds_its_phase_times(cache_dir, tmp_path):
    fit(cache_dir, tmp_path, "train.steps=3", "train.grad_accum_steps=2", "train.eval_every=0")
    steps = [r for r in read_metrics(tmp_path) if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert all(r[key] >= 0 for key in PHASE_KEYS), r
        assert r["time_forward_s"] > 0 and r["time_backward_s"] > 0 and r["time_optimizer_s"] > 0
        phases = sum(r[f"time_{name}_s"] for name in PHASES)
        assert phases + r["time_other_s"] == pytest.approx(r["step_time_s"], abs=1e-9)
        assert phases <= r["step_time_s"] + 1e-6


def test_profiler_traces_the_requested_steps_only(cache_dir, tmp_path):
    fit(cache_dir, tmp_path, "train.steps=4", "train.eval_every=0", "logging.profile_steps=[2,3]")
    trace = json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())
    events = trace["traceEvents"]
    assert len(events) > 100
    assert {e["name"] for e in events if e.get("name", "").startswith("step_")} == {"step_2", "step_3"}
    # Profiling stays out of the step times.
    assert all(r["time_other_s"] >= 0 for r in read_metrics(tmp_path) if r["step"] > 0)


def test_adapter_flops_count_the_frozen_base_at_four_per_parameter(cache_dir, tmp_path):
    shape = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}
    model = ModelConfig(name="tiny", vocab_size=49152, **shape)
    assert flops_per_token(model, 64) == 6 * N + ATTENTION_FLOPS == 19415040
    assert flops_per_token(model, 64, adapter_params=LORA) == 4 * N + 6 * LORA + ATTENTION_FLOPS == 13172736
    # The trainer counts the adapters of the model it builds.
    full = Trainer(spec_for(cache_dir, f"train.output_dir={tmp_path / 'full'}"))
    lora = Trainer(spec_for(cache_dir, f"train.output_dir={tmp_path / 'lora'}", "peft=lora"))
    assert (full.flops_per_token, lora.flops_per_token) == (19415040, 13172736)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("logging.profile_steps=[3,2]", "logging.profile_steps=[3, 2] must be [first,last]"),
        ("logging.profile_steps=[0,1]", "1 <= first <= last <= train.steps=4"),
        ("logging.profile_steps=[2,5]", "1 <= first <= last <= train.steps=4"),
        ("logging.profile_steps=[2]", "logging.profile_steps=[2] must be [first,last]"),
        ("logging.memory_snapshot_steps=[1,2]", "records CUDA allocations and this run is on the CPU"),
    ],
)
def test_bad_step_windows_are_refused(cache_dir, tmp_path, override, expected):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        Trainer(spec_for(cache_dir, f"train.output_dir={run}", "train.steps=4", override))
    assert not run.exists()
