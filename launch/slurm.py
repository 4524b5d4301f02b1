"""The sbatch script of a job: nodes and GPUs per node from the config's degrees, one launcher per node.

srun starts ``python -m launch`` once per node; each reads its node index, the node count and the job
id from Slurm's variables and meets the others at node 0 (c10d rendezvous), so one command line
serves every node. Slurm's warning signal (USR1, ``GRACE_S`` before pre-emption or the time limit)
makes every worker save a checkpoint at the end of its step and exit; a requeued job resumes there.
"""

from __future__ import annotations

import os
import shlex
import sys
from string import Template

from trainkit.spec import JobSpec

GRACE_S = 120
RENDEZVOUS_PORT = 29500
SBATCH = Template("""\
#!/bin/bash
# trainkit: $nodes node(s) x $gpus GPU(s) = $world processes ($degrees).
# Written by python -m launch --slurm; give partition, account and time limit to sbatch.
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --signal=USR1@$grace
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
cd $cwd
export MASTER_ADDR="$$(scontrol show hostnames "$$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT=$port
srun --ntasks-per-node=1 $python -m launch --nproc-per-node=$gpus --max-restarts=$restarts $overrides
""")


def sbatch_script(spec: JobSpec, nnodes: int, gpus_per_node: int, max_restarts: int, overrides: list[str]) -> str:
    d = spec.dims
    return SBATCH.substitute(
        nodes=nnodes,
        gpus=gpus_per_node,
        world=d.world_size,
        degrees=f"dp_replicate={d.dp_replicate} dp_shard={d.dp_shard} tp={d.tp} ep={d.ep}, {d.backend}",
        job_name=shlex.quote(f"trainkit-{spec.cfg.model.name}"),
        grace=GRACE_S,
        cwd=shlex.quote(os.getcwd()),
        port=RENDEZVOUS_PORT,
        python=shlex.quote(sys.executable),
        restarts=max_restarts,
        # A requeued job finds its own run in the output dir: it continues it.
        overrides=shlex.join([*overrides, "train.resume=true"]),
    )
