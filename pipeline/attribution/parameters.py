"""Where attribution and rewards take their parameters from: a `ParameterSource`, passed in
when the pipeline is built (`pipeline.agents.build_pipeline`). Governance's when its agent runs
in the same worker (it keeps the activation history in a Faust table), else `DEFAULTS`: the
schema's defaults as version 0."""

from __future__ import annotations

from typing import Protocol

from pipeline.governance import GENESIS
from schemas.events import ParametersActivated


class ParameterSource(Protocol):
    def parameters_for_epoch(self, epoch: int) -> ParametersActivated:
        """The activation (version and parameters) in force at `epoch`: what a result of that
        epoch is attributed with, and its fee priced and split with."""
        ...

    async def ready(self) -> None:
        """Return once the answers are complete: a parameter computed before would be a
        default standing in for a version not read yet."""
        ...


class DefaultParameters:
    """Version 0 with the schema's defaults, at every epoch."""

    def parameters_for_epoch(self, epoch: int) -> ParametersActivated:
        return GENESIS

    async def ready(self) -> None:
        return None


DEFAULTS = DefaultParameters()
