"""trainkit's entry point: ``python train.py [group=option ...] [key=value ...]``.

``python train.py --cfg job`` prints the composed config; ``torchrun --nproc_per_node=N train.py``
runs data parallel; ``python train.py ... dry_run=true`` predicts each rank's GPU memory without a
GPU, weights, data or process group. Bad input, or a run predicted not to fit its GPU, ends with
one line on stderr that names the fix, and exit code 2.
"""

import sys

import hydra
from omegaconf import DictConfig

from trainkit.cli import compose_config, overrides_of
from trainkit.config import ConfigError, register_schema

register_schema()


def fail(err: ConfigError) -> None:
    print(f"trainkit: error: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base=None, config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from trainkit.spec import build_job_spec

    try:
        spec = build_job_spec(cfg, cfg.dry_run_world_size if cfg.dry_run else None)
        overrides = overrides_of(sys.argv[1:])[1]
        if spec.cfg.dry_run:
            from profiling.dry_run import dry_run

            dry_run(spec, overrides)
            return
        if spec.device_type == "cuda" and spec.cfg.memory_check:
            from profiling.dry_run import check_fits

            check_fits(spec, overrides)
        from trainkit.trainer import train  # heavy imports only once the config is known to be good

        train(spec)
    except ConfigError as err:
        fail(err)


if __name__ == "__main__":
    try:
        compose_config(sys.argv[1:])
    except ConfigError as err:
        fail(err)
    main()
