"""The parameters attribution runs with. Every caller goes through `current_parameters()` so
that this is the one place that decides."""

from __future__ import annotations

import sys

from schemas.events import Parameters


def current_parameters() -> Parameters:
    """Governance's active parameters when its agent runs in this worker (it keeps them in a
    Faust table), else the schema's defaults. The agent module is looked up, not imported:
    importing it would register its tables and agents on a worker that runs attribution alone."""
    governance = sys.modules.get("pipeline.governance_agent")
    if governance is None:
        return Parameters()
    return governance.current_parameters()
