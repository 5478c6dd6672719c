"""The parameters attribution and rewards run with. Every caller goes through this module so
that it is the one place that decides: governance's when its agent runs in this worker (it
keeps the activation history in a Faust table), else the schema's defaults as version 0. The
agent module is looked up, not imported: importing it would register its tables and agents on
a worker that runs attribution alone."""

from __future__ import annotations

import sys
from types import ModuleType

from pipeline.governance import GENESIS
from schemas.events import Parameters, ParametersActivated

GOVERNANCE_MODULE = "pipeline.governance_agent"


def _governance() -> ModuleType | None:
    return sys.modules.get(GOVERNANCE_MODULE)


def governance_in_worker() -> bool:
    """Whether the governance agent (and its parameter history table) runs in this worker."""
    return _governance() is not None


def current_parameters() -> Parameters:
    """The parameters in force now: what attribution computes with."""
    governance = _governance()
    if governance is None:
        return Parameters()
    return governance.current_parameters()


def parameters_for_epoch(epoch: int) -> ParametersActivated:
    """The activation (version and parameters) in force at `epoch`: what a fee is priced and
    split with. Version 0 with the defaults when governance does not run here."""
    governance = _governance()
    if governance is None:
        return GENESIS
    return governance.parameters_for_epoch(epoch)
