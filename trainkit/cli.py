"""Command-line composition checks: a bad key, type or option becomes one line that names the fix.

Hydra reports composition errors as several lines and suggests ``+key=value``, which a typed schema
refuses anyway. ``compose_config`` composes the command line's overrides once with Hydra's compose
API (before ``hydra.main`` runs, in ``train.py``) and turns any failure into a ``ConfigError`` with one
line; the launcher and the memory planner take the typed config it returns.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError

from trainkit.config import ConfigError, JobConfig, register_schema

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Hydra flags that take a value in the next argument.
VALUE_FLAGS = {"--cfg", "-c", "--config-name", "-cn", "--config-dir", "-cd", "--package", "-p", "--info", "-i"}


def _schema_node(path: list[str]):
    """The dataclass type at ``path`` below JobConfig, or None when the path leaves the schema."""
    node = JobConfig
    for part in path:
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = next((a for a in typing.get_args(hints[part]) if dataclasses.is_dataclass(a)), hints[part])
    return node if dataclasses.is_dataclass(node) else None


def _unknown_key(key: str) -> str | None:
    """The one-line refusal of ``key`` when the schema has no such field, else None."""
    parent, _, name = key.rpartition(".")
    node = _schema_node(parent.split(".") if parent else [])
    if node is not None and name in {f.name for f in dataclasses.fields(node)}:
        return None
    if node is None:
        sections = ", ".join(f.name for f in dataclasses.fields(JobConfig))
        return f"unknown config key '{key}': '{parent}' is no config section (they are {sections})"
    known = ", ".join(f.name for f in dataclasses.fields(node))
    return f"unknown config key '{key}': {parent or 'the top level'} takes {known}; fix the key's spelling"


def _explain(err: Exception) -> str:
    cause = err.__cause__ or err
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        return _unknown_key(key) or str(cause.msg).splitlines()[0]
    if isinstance(cause, MissingMandatoryValue):
        return f"{key or cause.msg} has no value and the job needs one: set it on the command line ({key}=...)"
    if isinstance(cause, ValidationError) and key:
        message = str(cause.msg).splitlines()[0]
        return f"{key}: {message}; give a value of the field's type (python train.py --cfg job shows them)"
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group = err.missing_cfg_file.rsplit("/", 1)[0]
        options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        return f"{str(err).splitlines()[0]}: pick {group}= one of {', '.join(options)}"
    return str(err).splitlines()[0]


def overrides_of(argv: list[str]) -> tuple[str, list[str]]:
    """The config name and the key=value overrides in a Hydra command line."""
    config_name, overrides, skip = "train", [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg in VALUE_FLAGS:
            skip = True
            if arg in ("--config-name", "-cn") and i + 1 < len(argv):
                config_name = argv[i + 1]
        elif not arg.startswith("-") and "=" in arg and not arg.lstrip("+~").startswith("hydra"):
            overrides.append(arg)
    return config_name, overrides


def compose_config(argv: list[str]) -> JobConfig:
    """The typed config of ``python train.py <argv>``; a bad key, type or option raises ``ConfigError``."""
    config_name, overrides = overrides_of(argv)
    for override in overrides:
        # Hydra lets '+key=value' add keys to a typed config; trainkit has none to add.
        if override.startswith("+") and (refusal := _unknown_key(override.lstrip("+").split("=", 1)[0])):
            raise ConfigError(refusal)
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name, overrides=overrides)
        return OmegaConf.to_object(cfg)  # '+key=value' slips past composition; the typed object does not
    except Exception as err:  # every composition failure is a config error here
        raise ConfigError(_explain(err)) from err
