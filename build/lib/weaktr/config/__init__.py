"""Typed run configuration: the section dataclasses (``schema``) and how a config is read (``loading``)."""

from weaktr.config.loading import (
    apply_override,
    from_dict,
    get_value,
    job_arg_parser,
    load_config,
    parse_job_args,
    resolve_paths,
    save_config,
    to_dict,
    with_values,
)
from weaktr.config.schema import (
    PATH_KEYS,
    BackboneConfig,
    CamEvalConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    PseudoConfig,
    RunConfig,
    RunnerConfig,
    SegModelConfig,
    SegTrainConfig,
    SweepConfig,
    SyntheticConfig,
    TrainConfig,
    per_worker_batch,
)

__all__ = [
    "PATH_KEYS", "BackboneConfig", "CamEvalConfig", "Config", "ConfigError", "DataConfig", "EvalConfig",
    "ModelConfig", "PseudoConfig", "RunConfig", "RunnerConfig", "SegModelConfig", "SegTrainConfig", "SweepConfig",
    "SyntheticConfig", "TrainConfig", "apply_override", "from_dict", "get_value", "job_arg_parser", "load_config",
    "parse_job_args", "per_worker_batch", "resolve_paths", "save_config", "to_dict", "with_values",
]
