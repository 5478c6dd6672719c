"""The closing trace: which request of the run is followed to its payout."""

from __future__ import annotations

import pytest
from demo_support import record, result

from loraledger.demo.steps.collection import Collected
from loraledger.demo.steps.trace import pick_traced_request


def test_the_traced_request_prefers_an_attributed_planted_fact():
    collected = Collected()
    for rid in ("a", "b", "c"):
        collected.results[rid] = result(rid)
    collected.attributions["a"] = record("a")
    collected.attributions["b"] = record("b", weighted=False)
    assert pick_traced_request(collected, {}) == "a"
    with pytest.raises(RuntimeError, match="no request of this run was attributed"):
        pick_traced_request(Collected(), {})
