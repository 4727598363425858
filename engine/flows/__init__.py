"""The generation types, one flow each: the ``Flow`` interface and its registry
(``engine.flows.registry``): ``build_flows`` makes the flows the config asks for,
``stage_settings`` names the config keys behind each stage, for messages that say what to
change."""

from engine.flows.registry import (
    FLOWS,
    Flow,
    FlowFactory,
    FlowType,
    StageSettings,
    build_flows,
    stage_settings,
)

__all__ = [
    "FLOWS",
    "Flow",
    "FlowFactory",
    "FlowType",
    "StageSettings",
    "build_flows",
    "stage_settings",
]
