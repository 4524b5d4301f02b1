"""``python -m launch [options] [overrides]``: a trainkit config on this machine (any number of
processes), a multi-GPU node, several nodes (torchrun, c10d rendezvous) or Slurm (``--slurm``).

Before any worker starts, the composed config is checked for the world it will run in: its parallel
degrees against nodes x processes per node, the processes per node against this node's GPUs; then
the memory plan's verdict is printed. A bad combination ends with one line and exit code 2. This
process then becomes torchrun's elastic agent. Its workers always get ``train.resume=true``: a restart
after a failure (``--max-restarts``) continues from the newest complete checkpoint. Whether the output
dir may be used (an earlier run there needs train.resume or train.overwrite) is decided here, once,
and node 0 removes an earlier run that train.overwrite replaces.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
from pathlib import Path

from trainkit.checkpoint import remove_run
from trainkit.cli import compose_config
from trainkit.config import ConfigError, ParallelConfig

ROOT = Path(__file__).resolve().parent.parent
SLURM_GPUS_PER_NODE = 8  # --slurm's default node size
# Defaults of the multi-node options: torchrun's usual variables first, then Slurm's (set on every node
# of an allocation, so the sbatch script's one command line serves all nodes).
ENV_DEFAULTS = {
    "nnodes": ("NNODES", "SLURM_NNODES"),
    "node_rank": ("NODE_RANK", "SLURM_NODEID"),
    "rdzv_id": ("RDZV_ID", "SLURM_JOB_ID"),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch",
        description="Check a trainkit config against the world it will run in, then run it through torchrun.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as train.py takes them")
    parser.add_argument("--nnodes", type=int, help="nodes; default $NNODES, $SLURM_NNODES, or what the degrees need")
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        help="processes per node; default what the degrees need, else this node's GPUs (1 on a CPU machine)",
    )
    parser.add_argument("--node-rank", type=int, help="this node's index; default $NODE_RANK, $SLURM_NODEID or 0")
    parser.add_argument(
        "--rdzv-endpoint", help="HOST:PORT on node 0 where the nodes meet; default $MASTER_ADDR:$MASTER_PORT"
    )
    parser.add_argument("--rdzv-id", help="the job's name at the rendezvous, the same on every node")
    parser.add_argument(
        "--max-restarts", type=int, default=0, help="restarts of all workers after a failure, each from the newest "
                                                    "complete checkpoint"
    )  # fmt: skip
    parser.add_argument("--slurm", action="store_true", help="print an sbatch script for the job instead of running it")
    parser.add_argument("--dry-run", action="store_true", help="check, then print the torchrun command; run nothing")
    args = parser.parse_intermixed_args(argv)  # options may come after overrides
    if not args.slurm:  # a script written on a login node must not inherit that shell's allocation
        for name, variables in ENV_DEFAULTS.items():
            if getattr(args, name) is None:
                value = next((os.environ[v] for v in variables if v in os.environ), None)
                setattr(args, name, value if name == "rdzv_id" or value is None else int(value))
        if args.rdzv_endpoint is None and "MASTER_ADDR" in os.environ:
            args.rdzv_endpoint = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '29500')}"
    return args


def degrees_product(p: ParallelConfig) -> int | None:
    """The world size the degrees fix, or None when one of them takes the rest (-1)."""
    degrees = (p.dp_replicate, p.dp_shard, p.tp)
    return math.prod(degrees) if min(degrees) >= 1 else None


def layout(p: ParallelConfig, nnodes: int | None, nproc: int | None, per_node: int) -> tuple[int, int]:
    """Nodes and processes per node: as given, else what the degrees fix, else one node of ``per_node``."""
    need = degrees_product(p)
    if nproc is None:
        nproc = (need // nnodes if nnodes else min(need, per_node)) if need else per_node
    if nnodes is None:
        nnodes = max(1, need // nproc) if need and nproc > 0 else 1
    if min(nnodes, nproc) < 1:
        raise ConfigError(f"--nnodes={nnodes} --nproc-per-node={nproc}: both must be >= 1")
    if need and need % nproc:
        raise ConfigError(
            f"the parallel degrees need {need} processes, which do not fill nodes of {nproc}: pass --nproc-per-node "
            f"(and --nnodes) that multiply to {need}, or change the degrees"
        )
    return nnodes, nproc


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def print_memory_verdict(spec) -> None:
    """The memory simulator's verdict on each GPU of this plan (``spec.cfg.gpu``, else the visible one,
    else an H100), when ``profiling`` is installed."""
    try:
        from profiling.hardware import resolve_gpu
        from profiling.report import verdict
        from profiling.simulator import predict
    except ImportError:
        return
    print(f"launch: memory plan: {verdict(predict(spec, resolve_gpu(spec.cfg.gpu)))}", file=sys.stderr)


def torchrun_argv(args: argparse.Namespace, nnodes: int, nproc: int, overrides: list[str]) -> list[str]:
    if nnodes > 1 and not args.rdzv_endpoint:
        raise ConfigError(
            f"{nnodes} nodes x {nproc} processes need a rendezvous: pass --rdzv-endpoint=HOST:PORT (node 0's address "
            "and a free port, the same on every node) or set MASTER_ADDR and MASTER_PORT; on one node pass "
            f"--nnodes=1 --nproc-per-node={nnodes * nproc}"
        )
    rendezvous = ["--standalone"]
    if args.rdzv_endpoint:
        endpoint, rdzv_id = f"--rdzv-endpoint={args.rdzv_endpoint}", f"--rdzv-id={args.rdzv_id or 'trainkit'}"
        rendezvous = ["--rdzv-backend=c10d", endpoint, rdzv_id]
    sizes = [f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", f"--max-restarts={args.max_restarts}"]
    # Restarts continue the run; the output dir was judged above, with the user's own resume / overwrite.
    workers = [str(ROOT / "train.py"), *overrides, "train.resume=true", "train.overwrite=false"]
    return [*sizes, *rendezvous, *workers]


def prepare(args: argparse.Namespace):
    """Every check, without starting anything: (spec, nodes, processes per node)."""
    from trainkit.spec import build_job_spec

    cfg = compose_config(args.overrides)
    gpus = 0 if args.slurm or cfg.train.device == "cpu" else visible_gpus()
    per_node = SLURM_GPUS_PER_NODE if args.slurm else gpus or 1
    nnodes, nproc = layout(cfg.parallel, args.nnodes, args.nproc_per_node, per_node)
    spec = build_job_spec(cfg, world_size=nnodes * nproc)
    if spec.device_type == "cuda" and not args.slurm and nproc > gpus:
        raise ConfigError(
            f"--nproc-per-node={nproc} but this node has {gpus} GPUs: start at most {gpus} processes per node "
            "(more nodes, or smaller degrees)"
        )
    if args.slurm and cfg.train.overwrite:
        raise ConfigError(
            "--slurm with train.overwrite=true: a requeued job would remove its own checkpoints; remove the earlier "
            "run's outputs yourself or choose another train.output_dir"
        )
    return spec, nnodes, nproc


def run_agent(argv: list[str]) -> None:
    """Become torchrun's elastic agent; exit with the workers' exit code when they fail for good."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as torchrun_args
    from torch.distributed.run import run

    # Slurm sends its pre-emption warning to every process of the job: the workers save and exit, the
    # agent must outlive them (a Python handler, unlike SIG_IGN, is not inherited by the workers).
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    # Restarted workers sharing the agent's store can read the previous attempt's addresses and fail to
    # connect (pytorch/pytorch#135712, #167288): give each rendezvous round a store of its own.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        run(torchrun_args(argv))
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()})
        print(f"launch: the workers failed (exit codes {codes}); see their output above", file=sys.stderr)
        sys.exit(codes[-1] if codes[-1] > 0 else 1)
    except SignalException as err:  # torchrun passed it on to the workers, which got 30 s to save and exit
        print(f"launch: {err.sigval.name}: the workers were stopped", file=sys.stderr)
        sys.exit(128 + err.sigval)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        spec, nnodes, nproc = prepare(args)
        agent_argv = None if args.slurm else torchrun_argv(args, nnodes, nproc, args.overrides)
        d = spec.dims
        where = "" if args.slurm else f", {spec.device_type}"
        print(
            f"launch: {nnodes} node(s) x {nproc} process(es) = world {d.world_size}: dp_replicate={d.dp_replicate} "
            f"dp_shard={d.dp_shard} tp={d.tp} ep={d.ep} ({d.backend}{where})",
            file=sys.stderr,
        )
        if args.slurm or spec.device_type == "cuda":  # the simulator knows GPUs only
            print_memory_verdict(spec)
    except ConfigError as err:
        print(f"trainkit: error: {err}", file=sys.stderr)
        sys.exit(2)
    if args.slurm:
        from launch.slurm import sbatch_script

        print(sbatch_script(spec, nnodes, nproc, args.max_restarts, args.overrides), end="")
    elif args.dry_run:
        print(shlex.join(["torchrun", *agent_argv]))
    else:
        if spec.cfg.train.overwrite and not args.node_rank:
            remove_run(spec.output_dir, spec.cfg.logging.metrics_file)
        run_agent(agent_argv)
