"""The DeepSpeed backend on CPU (gloo, torchrun): ZeRO 1/2/3 and ZeRO-3 offload give the losses of
the single-process run, resume exactly, and export the same weights.

One 2-process launch runs every case (deepspeed imports slowly), a second one the resume. The
ZeRO-3 offload case JIT-builds DeepSpeed's CPU Adam once, cached in ~/.cache/torch_extensions.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.test_parallel import (
    FP32_TOLERANCE,
    LOW_PRECISION_TOLERANCE,
    STEPS,
    assert_same_run,
    launch,
    overrides,
    reference,
)
from tests.test_train import read_metrics, spec_for
from trainkit.config import ConfigError

MATCH_CASES = {
    "zero1": ["parallel=zero1", "train.micro_batch_size=2"],
    "zero2": ["parallel=zero2", "train.micro_batch_size=2"],
    "zero2_accumulate": ["parallel=zero2", "train.micro_batch_size=1", "train.grad_accum_steps=2"],
    "zero3": ["parallel=zero3", "train.micro_batch_size=2", "train.checkpoint_every=2", "train.export_hf=true"],
    "zero3_offload": ["parallel=zero3_offload", "train.micro_batch_size=2"],
}
BF16_CASE = ["parallel=zero3", "precision=bf16", "train.micro_batch_size=2"]
LOGGED = ("step", "loss", "grad_norm", "lr", "eval_loss")


def test_deepspeed_matches_one_process_resumes_and_exports(cache_dir, tiny_source, tmp_path):
    want = reference(cache_dir, tiny_source, tmp_path / "reference", "train.export_hf=true")
    want_bf16 = reference(cache_dir, tiny_source, tmp_path / "reference_bf16", "precision=bf16")
    cases = {name: overrides(tiny_source, tmp_path / name, *o) for name, o in MATCH_CASES.items()}
    cases["zero3_bf16"] = overrides(tiny_source, tmp_path / "zero3_bf16", *BF16_CASE)
    launch(cache_dir, tmp_path, 2, cases)
    for name in MATCH_CASES:
        assert_same_run(tmp_path / name, want, FP32_TOLERANCE)
        assert list((tmp_path / name / "checkpoints" / f"step_{STEPS:08d}").rglob("*optim_states.pt")), name
    assert_same_run(tmp_path / "zero3_bf16", want_bf16, LOW_PRECISION_TOLERANCE)

    # The ZeRO-3 run as if stopped after step 2, resumed in a new launch: it must log steps 3 and 4
    # only, with the straight run's losses, grad norms and LRs (so the schedule was restored too).
    straight, resumed = tmp_path / "zero3", tmp_path / "zero3_resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:08d}")
    resume = overrides(tiny_source, resumed, *MATCH_CASES["zero3"], "train.resume=true")
    launch(cache_dir, tmp_path, 2, {"resume": resume})
    logged = read_metrics(straight)
    appended = [{k: r[k] for k in LOGGED if k in r} for r in read_metrics(resumed)[len(logged) :]]
    assert appended == [pytest.approx({k: r[k] for k in LOGGED if k in r}, rel=0, abs=1e-6) for r in logged[-2:]]

    # ZeRO-3 gathers its shards for the HF export. Exports are bf16: where the two runs' fp32 weights
    # round differently the values differ by one bf16 step (atol: weights that trained to ~0).
    got = load_file(straight / "hf" / "model.safetensors")
    expected = load_file(want / "hf" / "model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key].float(), expected[key].float(), rtol=2**-7, atol=1e-6, msg=key)

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(straight / "hf", dtype=torch.float32)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_deepspeed_config_follows_the_job_and_takes_the_users_json(cache_dir, tmp_path):
    from parallel.deepspeed_engine import deepspeed_config  # imports deepspeed: only in this test

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 0.5}))
    job = [f"train.output_dir={tmp_path / 'run'}", "parallel=zero3_offload", "train.micro_batch_size=2"]
    bf16_with_user_json = ["train.grad_accum_steps=3", "precision=bf16", f"parallel.deepspeed_config={user}"]
    config = deepspeed_config(spec_for(cache_dir, *job, *bf16_with_user_json))
    offload = {"device": "cpu", "pin_memory": False}
    zero = {"stage": 3, "offload_optimizer": offload, "offload_param": offload, "overlap_comm": True}
    assert config["zero_optimization"] == zero
    batch = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    assert [config[k] for k in batch] == [2, 3, 6]
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"] and config["gradient_clipping"] == 0.5
    with pytest.raises(ConfigError, match="parallel.deepspeed_config=.*does not exist"):
        deepspeed_config(spec_for(cache_dir, *job, f"parallel.deepspeed_config={tmp_path / 'missing.json'}"))
