"""The configuration: what can be set (``models``), how it is read (``load``), the reference
generated from it (``reference``) and the key's hygiene (``secrets``)."""

from engine.config.load import load_config
from engine.config.models import (
    ENV_KEYS,
    GEN_TYPES,
    Config,
    DocumentQAConfig,
    GenerationConfig,
    GenType,
    InputConfig,
    KeyFactsConfig,
    LimitsConfig,
    OutputConfig,
    QualityConfig,
    RayConfig,
    RetryConfig,
    RunConfig,
    SummaryConfig,
    TeacherConfig,
)

__all__ = [
    "ENV_KEYS",
    "GEN_TYPES",
    "Config",
    "DocumentQAConfig",
    "GenType",
    "GenerationConfig",
    "InputConfig",
    "KeyFactsConfig",
    "LimitsConfig",
    "OutputConfig",
    "QualityConfig",
    "RayConfig",
    "RetryConfig",
    "RunConfig",
    "SummaryConfig",
    "TeacherConfig",
    "load_config",
]
