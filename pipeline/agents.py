"""Every Faust agent module, imported so that one worker runs them all. Rewards have no agent of
their own: the attribution processor pays each result in the transaction that attributes it."""

import pipeline.attribution.agent  # noqa: F401
import pipeline.governance_agent  # noqa: F401
import pipeline.sink  # noqa: F401
