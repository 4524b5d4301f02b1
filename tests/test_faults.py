"""Faults in one process: a kill while a checkpoint is being written, SIGTERM, checkpoint retention,
non-finite steps (skip or stop), weights-only loading. The multi-process faults (a SIGKILLed rank, a
stop signal reaching one rank, resharding) are in tests/test_launch.py."""

import math
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from parallel.parallelize import unwrap
from tests.test_train import ROOT, losses, read_metrics, spec_for
from trainkit.checkpoint import is_complete, latest_checkpoint, weights_only_loads
from trainkit.trainer import NonFiniteError, Trainer

JOB = ["train.steps=6", "train.micro_batch_size=2", "train.checkpoint_every=2", "train.keep_checkpoints=1"]
# A child process that trains JOB and SIGKILLs itself inside the save of step 4: the shards are on
# disk, the commit marker is not.
KILL_WHILE_SAVING = """
import os, signal, sys
from pathlib import Path
from tests.test_train import spec_for
from trainkit.trainer import Trainer

trainer = Trainer(spec_for(Path(sys.argv[1]), *sys.argv[2:]))
save = trainer.engine.save

def save_then_die(folder):
    save(folder)
    if trainer.step == 4:
        os.kill(os.getpid(), signal.SIGKILL)

trainer.engine.save = save_then_die
trainer.fit()
"""


def fit(spec) -> Trainer:
    trainer = Trainer(spec)
    trainer.fit()
    trainer.close()
    return trainer


def test_kill_while_saving_then_sigterm_resume_exactly(cache_dir, tmp_path, capsys):
    """Killed while writing step 4: step 2 is resumed. SIGTERM during step 3: step 3 is saved (and, the
    newest K=1, alone: the older and the half-written ones are gone), the run returns. Resumed again,
    it finishes with the losses of a run that never stopped."""
    straight, out = tmp_path / "straight", tmp_path / "faulty"
    fit(spec_for(cache_dir, f"train.output_dir={straight}", *JOB))
    job = [f"train.output_dir={out}", *JOB]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, "-c", KILL_WHILE_SAVING, str(cache_dir), *job], cwd=ROOT, env=env, capture_output=True
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000002", "step_00000004.tmp"]
    # The same half-written folder under the final name (a file system whose rename is not atomic).
    (folder / "step_00000004.tmp").rename(folder / "step_00000004")
    assert not is_complete(folder / "step_00000004") and latest_checkpoint(out) == folder / "step_00000002"

    resumed = Trainer(spec_for(cache_dir, *job, "train.resume=true"))
    assert resumed.step == 2
    queue_step = resumed._queue_step

    def sigterm_during_step_3(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return queue_step(step)

    resumed._queue_step = sigterm_during_step_3
    resumed.fit()
    resumed.close()
    assert resumed.step == 3 and sorted(p.name for p in folder.iterdir()) == ["step_00000003"]
    assert "trainkit: SIGTERM: stopped after step 3" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler lives only while training

    assert fit(spec_for(cache_dir, *job, "train.resume=true")).step == 6
    want, records = losses(straight), [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert all(r["loss"] == want[r["step"]] for r in records)


@pytest.mark.parametrize("fused", [False, True], ids=["host_skip", "fused_skips_on_device"])
def test_nonfinite_steps_are_skipped(cache_dir, tmp_path, capsys, fused):
    """Step 2's loss is NaN, step 3 has an infinite gradient: with train.on_nonfinite=skip neither
    updates the weights nor leaves gradients behind; the run goes on and metrics count them. Fused
    AdamW drops the update itself (``skips_on_device``), before the host has read the step's values."""
    job = [f"train.output_dir={tmp_path}", "train.steps=4", "train.on_nonfinite=skip", f"optim.fused={fused}"]
    trainer = Trainer(spec_for(cache_dir, *job))
    assert trainer.engine.skips_on_device == fused
    loss_sum = trainer._loss_sum
    trainer._loss_sum = lambda *args: loss_sum(*args) * (math.nan if trainer.step == 1 else 1.0)
    model = unwrap(trainer.engine.model)
    model.lm_head.weight.register_hook(lambda grad: grad * math.inf if trainer.step == 2 else grad)
    trainer.fit(stop_at=1)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(stop_at=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    trainer.fit()
    trainer.close()
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 2]
    assert [r["grad_norm"] is None for r in records] == [False, True, True, False]
    assert math.isnan(records[1]["loss"]) and math.isfinite(records[3]["loss"])
    err = capsys.readouterr().err
    assert "trainkit: step 2: the loss is not finite (loss nan): skipped, no update" in err
    assert "trainkit: step 3: a gradient is not finite" in err


def test_nonfinite_gradient_stops_the_run(cache_dir, tmp_path):
    """An absurd learning rate blows the weights up in step 1, so step 2's gradients overflow:
    train.on_nonfinite=stop (the default) ends the run there, and step 1 stays the newest checkpoint."""
    job = [f"train.output_dir={tmp_path}", "train.steps=4", "train.checkpoint_every=1", "optim.lr=1e30"]
    trainer = Trainer(spec_for(cache_dir, *job))
    with pytest.raises(NonFiniteError, match=r"^step 2: a gradient is not finite .*train.on_nonfinite=skip$"):
        trainer.fit()
    trainer.close()
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_checkpoint_loads_are_weights_only(tmp_path):
    """DCP and DeepSpeed call torch.load(weights_only=False) for their own entries; inside
    weights_only_loads (every checkpoint load) a pickled callable is refused all the same."""
    path = tmp_path / "state.pt"
    torch.save({"step": 3, "hook": print}, path)
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError, match="Unsupported global: GLOBAL print"):
        torch.load(path, weights_only=False)
    assert torch.load(path, weights_only=False)["hook"] is print  # outside, the caller's choice stands
