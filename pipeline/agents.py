"""Every Faust agent module, imported so that one worker runs them all."""

import pipeline.attribution.agent  # noqa: F401
import pipeline.governance_agent  # noqa: F401
import pipeline.rewards_agent  # noqa: F401
import pipeline.sink  # noqa: F401
