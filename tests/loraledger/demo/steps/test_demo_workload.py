"""The requests a run sends."""

from __future__ import annotations

from demo_support import SMALL, prepared

from loraledger.demo.steps.workload import make_requests


def test_requests_spread_over_adapters_and_ask_planted_facts(tmp_path):
    datanets = [prepared(tmp_path, 0), prepared(tmp_path, 1)]
    requests = make_requests(datanets, SMALL)
    assert len(requests) == SMALL.requests
    per_adapter = {r.adapter_id for r in requests}
    assert per_adapter == {"demo-valley-law", "demo-village-health"}
    fact_prompts = {fact.prompt for owner in datanets for fact in owner.facts}
    asked = [r for r in requests if r.prompt in fact_prompts]
    assert 0 < len(asked) < len(requests)
    for request in asked:
        owner = next(p for p in datanets if request.adapter_id.endswith(p.spec.name))
        assert request.prompt in {fact.prompt for fact in owner.facts}
    assert len({r.request_id for r in requests}) == len(requests)
