"""The bad-input catalogue: every config or input trainkit cannot run with is refused before any heavy
work, with one line that names the fix, a non-zero exit code, and nothing written over.

Most cases go through the launcher in this process (``python -m launch --dry-run``: composition, the
job spec, the launch plan); the trainer's own checks (weights, data, adapters) run ``Trainer(spec)``
in this process; two cases run the real command lines.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from launch.cli import main as launch_main
from tests.test_train import ROOT, TINY, run_cli, spec_for
from trainkit.checkpoint import MARKER, export_checkpoint, latest_checkpoint
from trainkit.config import ConfigError
from trainkit.trainer import Trainer

# (overrides, processes, what the one line says); "{run}" is a finished run with a checkpoint.
LAUNCH_CASES = [
    (["train.stepz=1"], 1, "unknown config key 'train.stepz'"),
    (["train.steps=many"], 1, "train.steps: Value 'many' of type 'str' could not be converted to Integer"),
    (["parallel=fsdp3"], 1, "pick parallel= one of"),
    (["train.steps=0"], 1, "train.steps=0 must be > 0"),
    (["train.micro_batch_size=0"], 1, "train.micro_batch_size=0 must be > 0"),
    (["train.checkpoint_every=-1"], 1, "train.checkpoint_every must be >= 0"),
    (["train.keep_checkpoints=-1"], 1, "train.keep_checkpoints=-1: keep the newest K >= 1 checkpoints"),
    (["train.on_nonfinite=ignore"], 1, "train.on_nonfinite='ignore': use one of stop, skip"),
    (["parallel=zero3", "train.on_nonfinite=skip"], 1, "DeepSpeed cannot drop a step's gradients"),
    (["train.resume=true", "train.overwrite=true"], 1, "contradict each other"),
    (["model.num_kv_heads=3"], 1, "model.num_heads=4 is not a multiple of model.num_kv_heads=3"),
    (["model.hidden_size=66"], 1, "model.hidden_size=66 is not divisible by model.num_heads=4"),
    (["model.num_experts=4", "model.num_experts_per_tok=5"], 1, "model.num_experts_per_tok=5 must be between"),
    (["model.tokenizer=null"], 1, "set model.tokenizer to a tokenizer folder"),
    (["data.seq_len=9000"], 1, "lower data.seq_len to at most 8192"),
    (["data.seq_len=1"], 1, "data.seq_len=1 must be at least 2"),
    (["data.kind=dialogue"], 1, "data.kind='dialogue': use one of text, chat, instruction"),
    (["data.format=csv"], 1, "data.format='csv': use one of"),
    (["data.eval_fraction=1.0"], 1, "data.eval_fraction=1.0 must be in [0, 1)"),
    (["optim.warmup_steps=5", "train.steps=5"], 1, "optim.warmup_steps=5 must be below train.steps=5"),
    (["optim.lr=0"], 1, "optim.lr=0.0 must be > 0"),
    (["optim.betas=[0.9]"], 1, "must hold two numbers"),
    (["optim.name=sgd"], 1, "optim.name='sgd': use one of adamw"),
    (["precision.param_dtype=float8"], 1, "precision.param_dtype='float8' is not a dtype trainkit knows"),
    (["precision=fp16", "precision.grad_scaler=false"], 1, "underflows gradients: use precision=fp16"),
    (["train.device=cuda"], 1, "no CUDA device is visible: use train.device=cpu"),
    (["optim.name=paged_adamw_8bit"], 1, "it needs a GPU; use adamw_8bit"),
    (["parallel=zero3", "precision=fp16"], 2, "DeepSpeed has no float16 on the CPU"),
    (["ac.mode=sometimes"], 1, "ac.mode='sometimes': use one of"),
    (["compile_mode=fast"], 1, "compile_mode='fast': use one of default, reduce-overhead"),
    (["compile_mode=reduce-overhead"], 1, "compile_mode=reduce-overhead applies to compiled blocks: add compile=true"),
    (["compile=true", "compile_mode=reduce-overhead", "parallel=fsdp"], 2, "replays CUDA graphs, which trainkit"),
    (["compile=true", "compile_mode=max-autotune", "ac=full_offload"], 1, "one process with train.grad_accum"),
    (["compile=true", "compile_mode=reduce-overhead", "train.grad_accum_steps=2"], 1, "use compile_mode=default"),
    (["peft=lora", "parallel=tp"], 2, "adapters compose with DDP, FSDP2 and DeepSpeed, not tensor parallel"),
    (["peft=lora", "peft.dropout=1.0"], 1, "peft.dropout=1.0 must be in [0, 1)"),
    (["peft=dora", "parallel=fsdp"], 2, "DoRA's init needs whole base weights"),
    (["peft=lora", "peft.r=0"], 1, "peft.r=0 must be >= 1"),
    (["parallel=tp"], 3, "parallel.tp=3 does not divide model.num_heads=4"),
    (["--nnodes=1", "parallel=fsdp", "parallel.dp_shard=4"], 2, "= 4 but the world has 2 processes: launch 4"),
    (["parallel.dp_shard=-1", "parallel.tp=-1"], 1, "are all -1: give all but one a number"),
    (["parallel.dp_shard=0"], 1, "parallel degrees must be >= 1 or -1"),
    (["parallel=fsdp_ep"], 2, "but the model is dense: set parallel.ep=1"),
    (["parallel=zero3", "parallel.tp=2"], 2, "cannot be combined with tp or ep"),
    (["parallel.zero_stage=2"], 1, "are DeepSpeed settings"),
    (["parallel=fsdp_offload"], 1, "needs parallel.dp_shard >= 2"),
    (["parallel=zero3", "parallel.deepspeed_config=/nonexistent/ds.json"], 2, "does not exist: point it at"),
    (["--nnodes=2"], 1, "2 nodes x 1 processes need a rendezvous: pass --rdzv-endpoint=HOST:PORT"),
    (["--slurm", "train.overwrite=true"], 1, "a requeued job would remove its own checkpoints"),
    (["--slurm", "parallel=fsdp", "parallel.dp_shard=12"], 8, "need 12 processes, which do not fill nodes of 8"),
    (["train.output_dir={run}"], 1, "already holds a run: pass train.resume=true"),
    (["train.output_dir={run}", "train.resume=true", "model.num_layers=3"], 1, "for model.num_layers=2, the"),
    (["train.output_dir={run}", "train.resume=true", "peft=lora"], 1, "with peft.method=none: resume with peft=none"),
    (["train.output_dir={run}", "train.resume=true", "parallel=zero3"], 1, "by parallel.backend=torch"),
    (["train.output_dir={zero3_run}", "train.resume=true", "parallel=zero3"], 1, "launch 2 processes with"),
]
# (overrides, what the one line says): refused by the trainer, before any step; "{source}" is a tiny
# HF model (hidden size 64), "{chat}" a JSONL file of prompt / response records.
TRAINER_CASES = [
    (["model.source=/nonexistent/model"], "model.source='/nonexistent/model' does not exist"),
    (["model.source={source}", "model.hidden_size=128"], "model.hidden_size=128 but"),
    (["data.source=/nonexistent/data.jsonl"], "data.source='/nonexistent/data.jsonl' does not exist"),
    (["data.text_field=body"], "data.text_field='body' is not a column"),
    (["data.source={chat}", "data.kind=chat", "data.format=json"], "data.messages_field='messages' is not a column"),
    (["peft=lora", "peft.target_modules=[qkv_proj]"], "'qkv_proj' is not a linear layer of the blocks"),
    (["model.vocab_size=1000"], "the tokenizer has 49152 tokens, more than model.vocab_size=1000"),
]


def snapshot(folder):
    """Every file under ``folder`` with its size and modification time: what "nothing written over" means."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")} if folder.exists() else {}


@pytest.fixture(scope="module")
def runs(cache_dir, tiny_source, tmp_path_factory):
    """Placeholders of the cases: a finished 1-step run, the same as if DeepSpeed ZeRO-3 had written it on
    2 processes, a tiny HF model, a chat file without messages."""
    folder = tmp_path_factory.mktemp("catalogue")
    run = folder / "run"
    trainer = Trainer(spec_for(cache_dir, f"train.output_dir={run}", "train.steps=1", "optim.warmup_steps=0"))
    trainer.fit()
    trainer.close()
    zero3_run = shutil.copytree(run, folder / "zero3_run")
    marker = latest_checkpoint(zero3_run) / MARKER
    marker.write_text(
        json.dumps(json.loads(marker.read_text()) | {"backend": "deepspeed", "world_size": 2, "zero_stage": 3})
    )
    chat = folder / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": "Who are you?", "response": "A test."}) + "\n")
    return {"run": run, "zero3_run": zero3_run, "source": tiny_source, "chat": chat}


def fill(overrides: list[str], runs: dict) -> list[str]:
    return [o.format(**runs) for o in overrides]


def one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("trainkit: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


@pytest.mark.parametrize("overrides, processes, expected", LAUNCH_CASES)
def test_launcher_refuses(cache_dir, runs, tmp_path, capsys, overrides, processes, expected):
    before = {name: snapshot(path) for name, path in runs.items()}
    argv = ["--dry-run", f"--nproc-per-node={processes}", f"cache_dir={cache_dir}", *TINY]
    with pytest.raises(SystemExit) as exit_:
        launch_main([*argv, f"train.output_dir={tmp_path / 'out'}", *fill(overrides, runs)])
    assert exit_.value.code == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and {name: snapshot(path) for name, path in runs.items()} == before


def test_launcher_refuses_more_processes_than_gpus(cache_dir, tmp_path, capsys, monkeypatch):
    """On a GPU node: more processes per node than GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as exit_:
        launch_main(
            ["--dry-run", "--nproc-per-node=2", f"cache_dir={cache_dir}", *TINY, f"train.output_dir={tmp_path}"]
        )
    assert exit_.value.code == 2
    assert "--nproc-per-node=2 but this node has 1 GPUs" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("overrides, expected", TRAINER_CASES)
def test_trainer_refuses(cache_dir, runs, tmp_path, overrides, expected):
    out = tmp_path / "out"
    spec = spec_for(cache_dir, f"train.output_dir={out}", *fill(overrides, runs))
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")) as err:
        Trainer(spec)
    assert "\n" not in str(err.value) and not out.exists()


def test_export_refuses_what_is_no_checkpoint(runs, tmp_path):
    for folder in (runs["run"] / "checkpoints", runs["run"] / "checkpoints" / "step_00000001.tmp"):
        with pytest.raises(ConfigError, match="is no complete checkpoint .*: pick a step_<N> folder"):
            export_checkpoint(folder, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_command_lines_refuse(cache_dir, tmp_path):
    """The real command lines: the launcher, and train.py with a refusal of the trainer's."""
    out = tmp_path / "out"
    job = [f"cache_dir={cache_dir}", *TINY, f"train.output_dir={out}"]
    command = [sys.executable, "-m", "launch", "--nproc-per-node=3", *job, "parallel=tp"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "parallel.tp=3 does not divide" in one_error_line(result.stderr)
    result = run_cli(cache_dir, *job[1:], "data.text_field=body")
    assert result.returncode == 2 and "data.text_field='body' is not a column" in one_error_line(result.stderr)
    assert not out.exists()
