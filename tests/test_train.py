"""The loop end to end: exact resume, DDP equal to one process, the real default job, bad inputs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.conftest import TOKENIZER
from trainkit.config import register_schema
from trainkit.spec import build_job_spec
from trainkit.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
# A small random Llama on the real SmolLM2 tokenizer and Shakespeare: quick, yet every part is real.
TINY = [
    "model.source=null",
    "precision=fp32",
    f"model.tokenizer={TOKENIZER}",
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "data.seq_len=64",
    "optim.lr=1e-3",
    "optim.warmup_steps=1",
    "train.eval_batches=2",
    "train.export_hf=false",
    "logging.progress_bar=false",
]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def spec_for(cache: Path, *overrides: str):
    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("train", overrides=[f"cache_dir={cache}", *TINY, *overrides])
    return build_job_spec(cfg, world_size=1)


def run_cli(cache: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "train.py"]
    if nproc > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "train.py",
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launcher, f"cache_dir={cache}", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_resume_continues_exactly(cache_dir, tmp_path, peft):
    common = ["train.steps=6", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.eval_every=3"]
    common.append(f"peft={peft}")
    straight = tmp_path / "straight"
    Trainer(spec_for(cache_dir, f"train.output_dir={straight}", *common)).fit()

    resumed = tmp_path / "resumed"
    first = Trainer(spec_for(cache_dir, f"train.output_dir={resumed}", *common))
    first.fit(stop_at=3)
    first.close()
    assert (resumed / "checkpoints" / "step_00000003").is_dir()
    second = Trainer(spec_for(cache_dir, f"train.output_dir={resumed}", "train.resume=true", *common))
    assert second.step == 3
    second.fit()

    want, got = losses(straight), losses(resumed)
    assert sorted(got) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=0, abs=1e-6), step
    evals = [r["eval_loss"] for r in read_metrics(resumed) if "eval_loss" in r]
    assert evals == pytest.approx([r["eval_loss"] for r in read_metrics(straight) if "eval_loss" in r], abs=1e-6)


def test_ddp_two_processes_equal_one_process(cache_dir, tmp_path):
    common = [*TINY, "train.steps=4", "train.eval_every=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    ref = run_cli(cache_dir, *common, f"train.output_dir={one}", "train.micro_batch_size=2", "train.grad_accum_steps=2")
    assert ref.returncode == 0, ref.stderr[-3000:]
    ddp = run_cli(
        cache_dir, *common, f"train.output_dir={two}", "train.micro_batch_size=2", "train.grad_accum_steps=1", nproc=2
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    want, got = losses(one), losses(two)
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5)
    assert [r["eval_loss"] for r in read_metrics(two) if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in read_metrics(one) if "eval_loss" in r], rel=1e-5
    )


def test_default_job_fine_tunes_real_smollm2(cache_dir, tmp_path):
    """The default config, shortened: real weights, real data; eval loss falls; the HF export loads."""
    run = tmp_path / "run"
    result = run_cli(
        cache_dir,
        f"train.output_dir={run}",
        "train.steps=6",
        "train.micro_batch_size=2",
        "train.eval_every=6",
        "train.eval_batches=2",
        "train.checkpoint_every=3",
        "data.seq_len=64",
        "optim.lr=5e-4",
        "optim.warmup_steps=1",
        "logging.progress_bar=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < evals[0]
    step = next(r for r in records if r.get("step") == 1)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(step)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]

    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(run / "hf")
    ids = tok("To be, or not to be", return_tensors="pt").input_ids
    assert torch.isfinite(hf(ids).logits).all()


BAD_INPUTS = [
    (["model.source=/nonexistent/model"], "model.source"),
    (["data.source=/nonexistent/data.jsonl"], "data.source"),
    (["data.text_field=body"], "data.text_field"),
    (["data.seq_len=9000"], "data.seq_len=9000 exceeds model.max_position_embeddings"),
    (["train.stepz=1"], "unknown config key 'train.stepz'"),
    (["train.steps=many"], "train.steps"),
]


@pytest.mark.parametrize("overrides, expected", BAD_INPUTS)
def test_bad_input_is_refused_in_one_line(cache_dir, tmp_path, overrides, expected):
    run = tmp_path / "run"
    result = run_cli(cache_dir, f"train.output_dir={run}", "logging.progress_bar=false", *overrides)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("trainkit: error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not run.exists()


def test_empty_dataset_is_refused(cache_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    run = tmp_path / "run"
    result = run_cli(cache_dir, f"train.output_dir={run}", f"data.source={empty}", "data.format=json")
    assert result.returncode == 2 and "trainkit: error:" in result.stderr, result.stderr[-2000:]
    assert not run.exists()


def test_overwrite_replaces_the_earlier_run(cache_dir, tmp_path):
    first = Trainer(spec_for(cache_dir, f"train.output_dir={tmp_path}", "train.steps=2", "train.eval_batches=1"))
    first.fit()
    first.close()
    (tmp_path / "notes.txt").write_text("mine")  # the user's own file stays
    again = [f"train.output_dir={tmp_path}", "train.steps=1", "optim.warmup_steps=0", "train.overwrite=true"]
    second = Trainer(spec_for(cache_dir, *again))
    second.fit()
    second.close()
    assert sorted(losses(tmp_path)) == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_existing_run_is_not_written_over(cache_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    result = run_cli(cache_dir, f"train.output_dir={run}")
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_wandb_is_imported_only_when_enabled(tmp_path):
    """Off by default and never imported then; when enabled it logs offline beside metrics.jsonl."""
    from trainkit.config import LoggingConfig, WandbConfig
    from trainkit.metrics import MetricsLog

    probe = "import sys, pathlib, trainkit.trainer, trainkit.metrics as m, trainkit.config as c; "
    probe += "m.MetricsLog(pathlib.Path(sys.argv[1]), c.LoggingConfig(), {}); print('wandb' in sys.modules)"
    off = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert off.stdout.strip() == "False", off.stderr[-2000:]

    log = MetricsLog(tmp_path, LoggingConfig(wandb=WandbConfig(enabled=True)), {"model": "tiny"})
    log.write({"step": 1, "loss": 2.5})
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.5}]


def test_param_dtype_sets_master_weights_and_keeps_rope_in_float32(cache_dir, tmp_path):
    spec = spec_for(
        cache_dir,
        f"train.output_dir={tmp_path}",
        "train.steps=2",
        "precision.param_dtype=bfloat16",
        "train.eval_batches=1",
    )
    trainer = Trainer(spec)
    record = trainer.fit()
    trainer.close()
    assert {p.dtype for p in trainer.engine.model.parameters()} == {torch.bfloat16}
    assert trainer.engine.model.inv_freq.dtype == torch.float32
    assert record["step"] == 2 and 0 < record["loss"] < 20


def run_traced(cache_dir: Path, out: Path, job: list[str], ahead: bool) -> tuple[list[str], list[dict]]:
    """A run with ``runs_ahead`` forced to ``ahead``, step 4's loss made NaN: the order in which steps
    were queued (q) and finished (f), and the metrics records without timings."""
    trainer = Trainer(spec_for(cache_dir, f"train.output_dir={out}", *job))
    assert trainer.engine.skips_on_device and not trainer.runs_ahead  # off on the CPU: nothing to overlap
    trainer.runs_ahead = ahead
    order, queuing = [], []
    queue_step, finish_step, loss_sum = trainer._queue_step, trainer._finish_step, trainer._loss_sum
    trainer._queue_step = lambda step: order.append(f"q{step + 1}") or queuing.append(step) or queue_step(step)
    trainer._finish_step = lambda queued: order.append(f"f{trainer.step + 1}") or finish_step(queued)
    trainer._loss_sum = lambda *args: loss_sum(*args) * (math.nan if queuing[-1:] == [3] else 1.0)
    trainer.fit()
    trainer.close()
    timings = ("time_", "step_time_s", "tokens_per_s", "mfu")
    return order, [{k: v for k, v in r.items() if not k.startswith(timings)} for r in read_metrics(out)]


def test_steps_queued_ahead_record_as_steps_one_at_a_time(cache_dir, tmp_path):
    """On CUDA, with the update on the device (fused AdamW), the loop queues each step before it reads
    the previous one's values; forced on here on the CPU. The records (loss, norm, LR, eval loss, a NaN
    step skipped) and checkpoints equal those of one step at a time, and it never queues past a step
    whose weights are read (eval at 3 and 6, checkpoint at 5, the end)."""
    job = ["train.steps=7", "train.eval_every=3", "train.checkpoint_every=5", "optim.fused=true"]
    job.append("train.on_nonfinite=skip")
    one_at_a_time, ahead = (run_traced(cache_dir, tmp_path / f"ahead_{a}", job, a) for a in (False, True))
    assert one_at_a_time[0] == "q1 f1 q2 f2 q3 f3 q4 f4 q5 f5 q6 f6 q7 f7".split()
    assert ahead[0] == "q1 q2 f1 q3 f2 f3 q4 q5 f4 f5 q6 f6 q7 f7".split()
    assert ahead[1] == one_at_a_time[1]
    assert [r["skipped_steps"] for r in ahead[1] if "loss" in r] == [0, 0, 0, 1, 1, 1, 1]
    assert len([r for r in ahead[1] if "eval_loss" in r]) == 4  # before step 1, at 3, 6 and 7
    for a in (False, True):
        assert sorted(p.name for p in (tmp_path / f"ahead_{a}" / "checkpoints").iterdir()) == [
            "step_00000005",
            "step_00000007",
        ]


@pytest.mark.parametrize(
    "precision, tolerance",
    # bf16: clipping before the step rounds the clipped gradients to bf16, and the logged norm is a bf16
    # value, so the two runs may differ by one bf16 step (2**-7 relative at most; torch 2.11 put step 5's
    # norms one apart, 0.56 %). Clipping skipped in either run would move them by far more (norms ~28x the clip).
    [([], 1e-5), (["precision=bf16", "precision.param_dtype=bfloat16"], 2**-7)],
    ids=["fp32", "bf16_weights"],
)
def test_fused_adamw_clips_inside_its_step_as_clipping_before_it(cache_dir, tmp_path, precision, tolerance):
    """optim.fused=true divides the gradients by the clip factor inside AdamW's kernel (``grad_scale``),
    optim.fused=false clips them before the step: the same losses, and the same norms before clipping."""
    runs = {}
    for fused in (False, True):
        out = tmp_path / f"fused_{fused}"
        job = [f"train.output_dir={out}", "train.steps=5", "optim.grad_clip=0.05", f"optim.fused={fused}", *precision]
        trainer = Trainer(spec_for(cache_dir, *job))
        assert trainer.engine.skips_on_device == fused
        trainer.fit()
        trainer.close()
        runs[fused] = [r for r in read_metrics(out) if "loss" in r]
    assert all(r["grad_norm"] > 0.05 for r in runs[False])  # every step clipped
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close([r[key] for r in runs[True]], [r[key] for r in runs[False]], rtol=tolerance, atol=0)
