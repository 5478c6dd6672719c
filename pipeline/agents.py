"""The pipeline's stream processors, and `build_pipeline`, which builds a Faust app running
some or all of them. Rewards have no processor of their own: the attribution processor pays
each result in the transaction that attributes it."""

from __future__ import annotations

from collections.abc import Collection
from enum import StrEnum

from infra.kafka.security import GOVERNANCE, SINK
from infra.settings import Settings
from pipeline import governance_agent, sink
from pipeline.app import PipelineApp, build_app
from pipeline.attribution import agent as attribution_agent
from pipeline.attribution.parameters import DEFAULTS, ParameterSource


class Processor(StrEnum):
    ATTRIBUTION = "attribution"
    GOVERNANCE = "governance"
    SINK = "sink"


def pipeline_principal(processors: Collection[Processor]) -> str:
    """The Kafka principal of the app's own consumer and producers: governance when the
    governance processor runs in it (its tables' changelogs hold the parameter history and it
    writes `governance-decisions`, which only governance may), the sink otherwise. The
    attribution processor has clients of its own, as the processor."""
    return GOVERNANCE if Processor.GOVERNANCE in processors else SINK


def build_pipeline(
    settings: Settings, processors: Collection[Processor] = tuple(Processor), replicas: int = 1
) -> PipelineApp:
    """The app with `processors` registered, its own topics created with `replicas` copies.
    Attribution attributes and prices with governance's parameter history when governance runs
    in the same worker, else with the defaults (version 0)."""
    app = build_app(settings.acting_as(pipeline_principal(processors)), replicas)
    parameters: ParameterSource = DEFAULTS
    if Processor.GOVERNANCE in processors:
        parameters = governance_agent.register(app, settings)
    if Processor.ATTRIBUTION in processors:
        attribution_agent.register(app, settings, parameters)
    if Processor.SINK in processors:
        sink.register(app, settings)
    return app
