"""The parameters attribution runs with. Governance will publish the active ones; until then
they are the schema's defaults. Every caller goes through `current_parameters()` so that this
is the one place to change."""

from __future__ import annotations

from schemas.events import Parameters


def current_parameters() -> Parameters:
    return Parameters()
