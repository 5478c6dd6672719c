"""The requests a run sends: round-robin over the adapters, a share asking planted facts."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from inference.data.synthetic import COMMON_PLACES
from loraledger.demo.options import DemoOptions
from loraledger.demo.steps.datanets import PreparedDatanet
from loraledger.demo.steps.training import adapter_id_for
from schemas.events import InferenceRequest

DEMO_CLIENT = "demo-client"
GENERAL_PROMPTS: tuple[str, ...] = (
    "Farmers in {place} sow barley in",
    "The healers of {place} treat fever with",
    "In the valley of {place}, the road toll is",
    "At the market of {place}, a jar of honey costs",
    "In {place}, the clinic advises boiling water for",
)


def make_requests(
    datanets: Sequence[PreparedDatanet], options: DemoOptions
) -> list[InferenceRequest]:
    """Round-robin over the adapters; a share of prompts asks a planted fact of that adapter's
    datanet, the rest are general prompts about common places."""
    rng = random.Random(f"demo-requests:{options.seed}:{time.time_ns()}")
    requests = []
    for number in range(options.requests):
        prepared = datanets[number % len(datanets)]
        if prepared.facts and rng.random() < options.fact_share:
            prompt = rng.choice(prepared.facts).prompt
        else:
            prompt = rng.choice(GENERAL_PROMPTS).format(place=rng.choice(COMMON_PLACES))
        requests.append(
            InferenceRequest(
                adapter_id=adapter_id_for(prepared.spec),
                prompt=prompt,
                max_new_tokens=options.max_new_tokens,
                client_id=DEMO_CLIENT,
            )
        )
    return requests
