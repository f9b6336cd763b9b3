"""Typed configuration: ``load_config(path, overrides)`` -> ``Config``."""

from llm.config.defaults import (
    AblationConfig,
    Config,
    DatasetConfig,
    DataSourceConfig,
    EvalConfig,
    MLAConfig,
    ModelConfig,
    PEERConfig,
    TrainConfig,
    WandbConfig,
    YarnConfig,
)
from llm.config.errors import ConfigError
from llm.config.loader import config_diff, dump_config, from_dict, load_config, save_config, to_dict
from llm.config.validation import validate_config

__all__ = [
    "AblationConfig",
    "Config",
    "ConfigError",
    "DataSourceConfig",
    "DatasetConfig",
    "EvalConfig",
    "MLAConfig",
    "ModelConfig",
    "PEERConfig",
    "TrainConfig",
    "WandbConfig",
    "YarnConfig",
    "config_diff",
    "dump_config",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
    "validate_config",
]
