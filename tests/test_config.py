"""Config composition, the typed schema and the job spec's refusals (all before any heavy work)."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from trainkit.cli import compose_config
from trainkit.config import ConfigError, JobConfig, register_schema
from trainkit.spec import build_job_spec

ROOT = Path(__file__).resolve().parent.parent


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return hydra_compose("train", overrides=list(overrides))


def test_cfg_job_prints_composed_config_with_every_shape_override():
    shape = {
        "hidden_size": 256,
        "num_layers": 3,
        "num_heads": 8,
        "num_kv_heads": 2,
        "intermediate_size": 640,
        "vocab_size": 1000,
        "tie_embeddings": False,
        "rope_theta": 500000.0,
        "max_position_embeddings": 1024,
    }
    args = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in shape.items()]
    out = subprocess.run(
        [sys.executable, "train.py", "--cfg", "job", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    printed = yaml.safe_load(out)
    assert {k: printed["model"][k] for k in shape} == shape
    assert set(printed) == {f.name for f in dataclasses.fields(JobConfig)}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'"),
        ("+train.foo=1", "unknown config key 'train.foo'"),
        ("+foo.bar=1", "unknown config key 'foo.bar': 'foo' is no config section"),
        ("logging.wandb.enabld=true", "unknown config key 'logging.wandb.enabld': logging.wandb takes enabled"),
        ("train.steps=abc", "train.steps: Value 'abc'"),
        ("model.tie_embeddings=maybe", "model.tie_embeddings: Value 'maybe' is not a valid bool"),
        ("model=nope", "In 'train': Could not find 'model/nope': pick model= one of"),
        ("data=jsonl_chat", "data.source has no value"),
    ],
)
def test_composition_errors_name_the_key(override, expected):
    with pytest.raises(ConfigError, match="^" + re.escape(expected)) as info:
        compose_config([override])
    assert "\n" not in str(info.value)


def test_good_overrides_pass_and_hydra_flags_are_skipped():
    compose_config(["--cfg", "job", "model=llama3_2_1b", "train.steps=5", "hydra.run.dir=x"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.seq_len=9000"], "data.seq_len=9000 exceeds model.max_position_embeddings=8192"),
        (["data.seq_len=1"], "data.seq_len=1 must be at least 2"),
        (["train.steps=0"], "train.steps=0 must be > 0"),
        (["train.micro_batch_size=-1"], "train.micro_batch_size=-1 must be > 0"),
        (["model.num_kv_heads=2"], "model.num_heads=9 is not a multiple of model.num_kv_heads=2"),
        (["model.num_heads=7", "model.num_kv_heads=7"], "model.hidden_size=576 is not divisible by model.num_heads=7"),
        (["model.source=null"], "model.source is null"),
        (["data.kind=dialog"], "data.kind='dialog'"),
        (["data.format=csv"], "data.format='csv'"),
        (["precision.compute_dtype=float8"], "precision.compute_dtype='float8'"),
        (["precision.compute_dtype=float16"], "precision.compute_dtype=float16 without precision.grad_scaler=true"),
        (["optim.name=sgd"], "optim.name='sgd'"),
        (["optim.warmup_steps=500"], "optim.warmup_steps=500 must be below train.steps"),
        (["train.device=tpu"], "train.device='tpu'"),
    ],
)
def test_spec_refuses_bad_values(tmp_path, overrides, expected):
    cfg = compose(f"train.output_dir={tmp_path / 'run'}", *overrides)
    with pytest.raises(ConfigError, match="^" + re.escape(expected)) as info:
        build_job_spec(cfg, world_size=1)
    assert "\n" not in str(info.value)


def test_cuda_requested_without_gpu_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cfg = compose(f"train.output_dir={tmp_path}", "train.device=cuda")
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        build_job_spec(cfg, world_size=1)


def test_output_dir_holding_a_run_is_protected(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    cfg = compose(f"train.output_dir={tmp_path}")
    with pytest.raises(ConfigError, match="already holds a run: pass train.resume=true"):
        build_job_spec(cfg, world_size=1)
    for escape in ("train.resume=true", "train.overwrite=true"):
        build_job_spec(compose(f"train.output_dir={tmp_path}", escape), world_size=1)


def test_spec_derives_batch_and_dtypes(tmp_path):
    cfg = compose(
        f"train.output_dir={tmp_path / 'run'}",
        "precision=bf16",
        "train.micro_batch_size=3",
        "train.grad_accum_steps=2",
        "data.seq_len=128",
        "parallel=ddp",
    )
    spec = build_job_spec(cfg, world_size=4)
    assert spec.global_batch_size == 24
    assert spec.tokens_per_step == 24 * 128
    assert str(spec.compute_dtype) == "torch.bfloat16" and str(spec.param_dtype) == "torch.float32"


TINY_SHAPE = ["model.num_heads=4", "model.num_kv_heads=2", "model.hidden_size=64", "model.intermediate_size=128"]


@pytest.mark.parametrize(
    "world, overrides, expected",
    [
        (
            4,
            ["parallel=fsdp_tp", "parallel.tp=3"],
            "the world has 4 processes, not a multiple of the fixed degrees' product 3",
        ),
        (
            6,
            ["parallel=fsdp_tp", "parallel.dp_shard=2"],
            "parallel dp_replicate x dp_shard x tp = 1 x 2 x 2 = 4 but the world has 6",
        ),
        (2, ["parallel=single", "parallel.dp_shard=-1", "parallel.tp=-1"], "parallel.dp_shard, parallel.tp are all -1"),
        (
            2,
            ["parallel=tp", "model.num_kv_heads=3", "model.num_heads=9", "model.hidden_size=72"],
            "parallel.tp=2 does not divide model.num_heads=9",
        ),
        (4, ["parallel=tp"], "parallel.tp=4 does not divide model.num_kv_heads=2"),
        (
            2,
            ["parallel=tp", "model.intermediate_size=127"],
            "parallel.tp=2 does not divide model.intermediate_size=127",
        ),
        (2, ["parallel=fsdp_ep"], "parallel.ep=2 but the model is dense"),
        (4, ["parallel=fsdp_ep", "model.num_experts=6"], "parallel.ep=4 does not divide model.num_experts=6"),
        (
            4,
            [
                "parallel=fsdp_ep",
                "parallel.ep=4",
                "parallel.dp_shard=2",
                "parallel.dp_replicate=2",
                "model.num_experts=8",
            ],
            "parallel.ep=4 must divide parallel.dp_shard=2",
        ),
        (
            2,
            ["parallel=zero3", "parallel.tp=2", "parallel.dp_shard=1"],
            "parallel.backend=deepspeed cannot be combined with tp",
        ),
        (2, ["parallel=zero2", "parallel.offload_params=true"], "parallel.offload_params needs parallel.zero_stage=3"),
        (2, ["parallel=zero1", "parallel.zero_stage=0"], "parallel.zero_stage=0: DeepSpeed needs 1, 2 or 3"),
        (2, ["parallel=fsdp", "parallel.zero_stage=2"], "parallel.zero_stage / offload_optimizer"),
        (1, ["parallel=fsdp_offload"], "parallel.cpu_offload is FSDP2's offload"),
        (4, ["parallel.dp_replicate=2", "parallel.tp=2"], "parallel.dp_replicate with tp needs FSDP2 under it"),
        (2, ["parallel.backend=megatron"], "parallel.backend='megatron'"),
        (2, ["parallel.dp_shard=0"], "parallel degrees must be >= 1 or -1"),
        (1, ["ac.mode=some"], "ac.mode='some'"),
        (1, ["optim.name=paged_adamw_8bit"], "optim.name=paged_adamw_8bit pages optimizer states"),
        (1, ["optim.name=lion"], "optim.name='lion'"),
        (1, ["peft.method=prefix"], "peft.method='prefix'"),
        (1, ["peft=lora", "peft.r=0"], "peft.r=0 must be >= 1"),
        (2, ["peft=lora", "parallel=tp"], "peft.method=lora with parallel.tp=2"),
        (1, ["peft=qlora", "model.num_experts=4"], "peft.method=qlora quantizes dense linears only"),
        (2, ["parallel=zero2", "precision=fp16"], "precision=fp16: DeepSpeed has no float16 on the CPU"),
        (
            2,
            ["parallel=zero2", "parallel.deepspeed_config=/no/ds.json"],
            "parallel.deepspeed_config=/no/ds.json does not exist",
        ),
        (2, ["parallel=tp", "model.num_experts=4"], "parallel.tp=2 with experts"),
        (
            1,
            ["model.num_experts=4", "model.hidden_size=60", "model.num_heads=4"],
            "model.hidden_size=60 and the expert size",
        ),
    ],
)
def test_parallel_combinations_are_refused_before_any_process_group(tmp_path, world, overrides, expected):
    cfg = compose(
        f"train.output_dir={tmp_path / 'run'}", "model.source=null", "model.tokenizer=x", *TINY_SHAPE, *overrides
    )
    with pytest.raises(ConfigError, match="^" + re.escape(expected)) as info:
        build_job_spec(cfg, world_size=world)
    assert "\n" not in str(info.value)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "world, preset, degrees",
    [
        (2, "ddp", (2, 1, 1, 1)),
        (2, "fsdp", (1, 2, 1, 1)),
        (4, "hsdp", (2, 2, 1, 1)),
        (4, "fsdp_tp", (1, 2, 2, 1)),
        (2, "tp", (1, 1, 2, 1)),
        (4, "fsdp_ep", (1, 4, 1, 4)),
        (4, "zero3", (1, 4, 1, 1)),
    ],
)
def test_presets_resolve_to_the_world(tmp_path, world, preset, degrees):
    extra = ["model.num_experts=8"] if preset == "fsdp_ep" else []
    cfg = compose(
        f"train.output_dir={tmp_path}",
        "model.source=null",
        "model.tokenizer=x",
        *TINY_SHAPE,
        f"parallel={preset}",
        *extra,
    )
    d = build_job_spec(cfg, world_size=world).dims
    assert (d.dp_replicate, d.dp_shard, d.tp, d.ep) == degrees


@pytest.mark.parametrize("group", ["model", "data", "parallel", "ac", "precision", "peft"])
def test_every_preset_composes_into_a_valid_spec(tmp_path, group):
    """Each option file of the group makes a valid job with the other defaults (parallel: on 4 ranks)."""
    extra = {
        "data": ["data.source=/any/file.jsonl"],
        "parallel": ["model=llama3_2_1b", "model.num_experts=8"],  # heads TP divides; experts EP needs
    }.get(group, [])
    for option in sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml")):
        cfg = compose(f"train.output_dir={tmp_path / option}", f"{group}={option}", *extra)
        if group == "parallel" and option != "fsdp_ep":
            cfg.model.num_experts = 0
        spec = build_job_spec(cfg, world_size=4 if group == "parallel" and option != "single" else 1)
        assert re.sub(r"[-.]", "_", getattr(spec.cfg, group).name) == option
