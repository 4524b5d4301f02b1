"""``python -m launch`` on CPU (gloo): one node, two simulated nodes meeting at a c10d rendezvous on
127.0.0.1, an elastic restart after a rank is SIGKILLed, the Slurm script; the one-node run's FSDP2
checkpoint resumed on 1 and 4 processes (there, a stop signal to one rank), and exported like ZeRO-3's.

Every run is the same FSDP2 job on 2 processes, so each must log the one-node run's losses exactly.
The LR schedule is constant, so a shorter run's step N is the one-node run's step N.
"""

import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch.cli import main as launch_main
from tests.test_train import ROOT, TINY, losses, read_metrics, spec_for
from trainkit.checkpoint import export_checkpoint, latest_checkpoint, read_metadata
from trainkit.trainer import Trainer

STEPS = 8
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def job(cache_dir, tiny_source) -> list[str]:
    """Every test's job; from HF weights, since DeepSpeed initialises differently from FSDP2."""
    weights = [f"model.source={tiny_source}", "model.tokenizer=null", "optim.schedule=constant"]
    steps = [f"train.steps={STEPS}", "train.micro_batch_size=2", "train.checkpoint_every=2", "train.keep_checkpoints=0"]
    return [f"cache_dir={cache_dir}", *TINY, *weights, "parallel=fsdp", *steps]


def launch_argv(job: list[str], out: Path, *extra: str) -> list[str]:
    """The launcher's command line for ``job`` in ``out``; ``extra`` options and overrides come last and win."""
    return [sys.executable, "-m", "launch", *job, f"train.output_dir={out}", *extra]


def start(job: list[str], out: Path, *extra: str) -> subprocess.Popen:
    """A launcher in the background, its output in a log beside the run (pipes could fill and block it)."""
    log = out.parent / f"{out.name}-{time.monotonic_ns()}.log"
    with log.open("w") as sink:
        process = subprocess.Popen(launch_argv(job, out, *extra), cwd=ROOT, env=ENV, stdout=sink, stderr=sink)
    process.log = log
    return process


def finish(process: subprocess.Popen) -> str:
    process.wait(timeout=300)
    return process.log.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_node(job, tmp_path_factory):
    out = tmp_path_factory.mktemp("launch") / "one_node"
    process = start(job, out, "--nproc-per-node=2")
    log = finish(process)
    assert process.returncode == 0, log[-3000:]
    return out


def checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_two_nodes_equal_one_node(job, one_node, tmp_path):
    out = tmp_path / "two_nodes"
    rendezvous = [f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=two-nodes", "--nnodes=2"]
    nodes = [start(job, out, *rendezvous, "--nproc-per-node=1", f"--node-rank={rank}") for rank in (0, 1)]
    logs = [finish(node) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert losses(out) == losses(one_node)
    assert checkpoint_names(out) == checkpoint_names(one_node) == [f"step_{s:08d}" for s in range(2, STEPS + 1, 2)]
    for name in checkpoint_names(out):  # the same shards, byte for byte
        for shard in sorted((one_node / "checkpoints" / name).glob("*.distcp")):
            assert (out / "checkpoints" / name / shard.name).read_bytes() == shard.read_bytes(), (name, shard.name)


def worker_pids(agent: int) -> dict[int, int]:
    """The agent's workers by global rank, read from /proc: its children whose environment holds RANK."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0") if parent == agent else []
        except (FileNotFoundError, ProcessLookupError):  # a process that ended while we looked
            continue
        rank = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")]
        if rank:
            workers[int(rank[0])] = int(stat.parent.name)
    return workers


def wait_for(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return result


def logged(out: Path) -> list[str]:
    """Complete lines of metrics.jsonl (rank 0 writes each with one write)."""
    path = out / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return text.splitlines()[: text.count("\n")]


def test_killed_rank_restarts_and_resumes_exactly(job, one_node, tmp_path):
    """SIGKILL rank 0 at a random step: torchrun restarts both workers, which resume from the newest
    complete checkpoint and finish. Every logged step, re-done ones included, has the one-node loss."""
    out = tmp_path / "killed"
    kill_at = random.Random(7).randint(3, STEPS - 3)
    agent = start(job, out, "--nproc-per-node=2", "--max-restarts=1")
    wait_for(lambda: any(json.loads(line)["step"] == kill_at for line in logged(out)), f"step {kill_at}")
    os.kill(worker_pids(agent.pid)[0], signal.SIGKILL)
    log = finish(agent)
    assert agent.returncode == 0, log[-3000:]
    assert "failed (exitcode: -9) local_rank: 0" in log  # and still exit code 0: the restart finished the run
    want, records = losses(one_node), [r for r in read_metrics(out) if "loss" in r]
    assert {r["step"] for r in records} == set(range(1, STEPS + 1))
    assert all(r["loss"] == want[r["step"]] for r in records)
    assert checkpoint_names(out) == checkpoint_names(one_node)


def test_slurm_script_runs_one_launcher_per_node(job, tmp_path, capsys):
    """The script, run with stand-ins for scontrol and srun (one task per node, each a --dry-run):
    2 nodes x 1 GPU from dp_shard=2, rendezvous at the first node, the job id, resume on requeue."""
    out = tmp_path / "run"
    launch_main(launch_argv(job, out, "--slurm", "--nproc-per-node=1", "parallel.dp_shard=2")[3:])
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --gpus-per-node=1\n" in script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\n")
    srun = "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
    srun += 'for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@" --dry-run; done\n'
    (bin_dir / "srun").write_text(srun)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    slurm = {"SLURM_NNODES": "2", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node-[a-b]"}
    env = {**ENV, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    commands = [shlex.split(line) for line in run.stdout.splitlines()]
    assert len(commands) == 2
    for command in commands:
        for option in ["--nnodes=2", "--nproc-per-node=1", "--rdzv-endpoint=node-a:29500", "--rdzv-id=42"]:
            assert option in command
        assert command[-2:] == ["train.resume=true", "train.overwrite=false"]
    assert not out.exists()


def test_fsdp_checkpoint_resumes_on_1_and_4_processes(cache_dir, job, one_node, tmp_path):
    """The 2-process FSDP2 checkpoint of step 2, resharded by DCP, continues with the one-node losses
    (the same global batch) on 1 process, and on 4, where SIGUSR1 to rank 2 alone makes all four save
    at the end of one step and exit cleanly."""
    want, logged_by_one_node = losses(one_node), len(read_metrics(one_node))
    for name in ("one", "four"):
        shutil.copytree(one_node, tmp_path / name)
        for step in range(4, STEPS + 1, 2):
            shutil.rmtree(tmp_path / name / "checkpoints" / f"step_{step:08d}")
    resume = ["train.resume=true", "train.micro_batch_size=2", "train.grad_accum_steps=2"]
    one = Trainer(spec_for(cache_dir, *job, f"train.output_dir={tmp_path / 'one'}", *resume))  # TINY twice: alike
    assert one.step == 2
    one.fit()
    one.close()
    four = tmp_path / "four"
    agent = start(job, four, "--nproc-per-node=4", "train.micro_batch_size=1", "train.resume=true")
    wait_for(lambda: len(logged(four)) > logged_by_one_node, "the first step on 4 processes")
    os.kill(worker_pids(agent.pid)[2], signal.SIGUSR1)
    log = finish(agent)
    assert agent.returncode == 0, log[-3000:]
    assert "trainkit: a stop signal on another rank: stopped after step" in log
    stopped = read_metrics(four)[-1]["step"]
    assert stopped < STEPS and read_metadata(latest_checkpoint(four))["step"] == stopped
    for name, last in (("one", STEPS), ("four", stopped)):
        records = read_metrics(tmp_path / name)[logged_by_one_node:]
        assert [r["step"] for r in records] == list(range(3, last + 1)), name
        assert [r["loss"] for r in records] == pytest.approx([want[r["step"]] for r in records], rel=1e-5), name


def test_zero3_checkpoint_exports_like_fsdp(job, one_node, tmp_path):
    """A DeepSpeed ZeRO-3 checkpoint of step 2 and the FSDP2 one of the same step export to the same HF
    folder: key set, shapes and (bf16) values."""
    zero3 = tmp_path / "zero3"
    process = start(job, zero3, "--nproc-per-node=2", "parallel=zero3", "train.steps=2")
    log = finish(process)
    assert process.returncode == 0, log[-3000:]
    assert losses(zero3) == pytest.approx({s: v for s, v in losses(one_node).items() if s <= 2}, rel=1e-5)
    command = [sys.executable, "-m", "launch.export", zero3 / "checkpoints" / "step_00000002", tmp_path / "hf_zero3"]
    export = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    export_checkpoint(one_node / "checkpoints" / "step_00000002", tmp_path / "hf_fsdp")
    got, want = (load_file(tmp_path / name / "model.safetensors") for name in ("hf_zero3", "hf_fsdp"))
    assert got.keys() == want.keys()
    for key in want:  # bf16: where the fp32 weights round differently, one bf16 step apart
        assert got[key].shape == want[key].shape
        torch.testing.assert_close(got[key].float(), want[key].float(), rtol=2**-7, atol=1e-6, msg=key)
    assert sorted(p.name for p in (tmp_path / "hf_zero3").iterdir()) == sorted(
        p.name for p in (tmp_path / "hf_fsdp").iterdir()
    )
