"""Job specs from override lines, composed exactly as ``train.py`` composes them."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainkit.cli import CONFIG_DIR, check_overrides
from trainkit.config import JobConfig, register_schema
from trainkit.spec import JobSpec, build_job_spec


def compose_config(overrides: list[str]) -> JobConfig:
    """The typed config of ``python train.py <overrides>``; a bad override raises ConfigError."""
    check_overrides(list(overrides))
    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return OmegaConf.to_object(compose("train", overrides=list(overrides)))


def spec_of(overrides: list[str], world_size: int) -> JobSpec:
    return build_job_spec(compose_config(overrides), world_size)
