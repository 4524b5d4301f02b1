"""Job specs from override lines, composed exactly as ``train.py`` composes them."""

from __future__ import annotations

from trainkit.cli import compose_config
from trainkit.spec import JobSpec, build_job_spec


def spec_of(overrides: list[str], world_size: int) -> JobSpec:
    return build_job_spec(compose_config(list(overrides)), world_size)
