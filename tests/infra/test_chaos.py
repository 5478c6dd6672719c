"""The chaos scenario (tests/support/chaos_run.py) as a test: a three-node cluster, two workers
and two pipeline instances serve a steady stream of requests across many adapters while a
broker, a worker and a pipeline instance are SIGKILLed and a worker is SIGSTOPped past its
session timeout. Once the stream drains, the log and the ledger hold every request exactly
once: one result and one attribution record each, reward entries that sum to the request's fee,
a ClickHouse ledger equal to the Kafka log row for row, and governance earnings equal to the
ledger. `bench/chaos.py` reports the same run's throughput and latency per fault."""

from __future__ import annotations

import json
import subprocess
from collections import Counter, defaultdict

import ledger_probe
import pytest
from chaos_run import FAULTS, ChaosConfig, chaos_run
from pipeline_process import committed_events, table_changelog

from pipeline.rewards import fee_for
from schemas.events import Parameters

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

# The floor: at least 2,000 requests across at least 50 adapters. The rate keeps the
# stream well inside what two single-thread workers serve on a loaded 2-core machine.
CONFIG = ChaosConfig(requests=2000, adapters=56, rate=20.0)


def probe(env: dict[str, str], *args: str):
    done = subprocess.run(ledger_probe.command(*args), env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_faults_on_a_cluster_lose_repeat_and_misplace_no_payment(tmp_path):
    with chaos_run(tmp_path, CONFIG) as run:
        results = committed_events(run.settings, "results")
        records = committed_events(run.settings, "attributions")
        entries = committed_events(run.settings, "rewards")
        earned = table_changelog(run.settings, "earned-entries")
        ledger = {table: probe(run.env, "ids", table) for table in ledger_probe.IDENTIFIED_BY}
        ledger_earnings = probe(run.env, "earnings")

    assert [phase.name for phase in run.phases] == ["steady", *FAULTS]
    assert run.took_over, "the stopped worker's partitions never moved to the other worker"
    assert run.drained, f"consumer groups never committed past these: {run.undrained}"
    assert len(run.sent) >= CONFIG.requests
    assert len({result.adapter_id for result in results}) >= 50
    for name, code in run.exit_codes.items():
        assert code == 0, f"{name} exited {code} on SIGTERM"

    # Exactly one result and one attribution record per request, nothing else.
    sent = set(run.sent)
    for events in (results, records):
        counts = Counter(event.request_id for event in events)
        assert set(counts) == sent
        assert [rid for rid, n in counts.items() if n > 1] == []

    # Every fee paid exactly once: distinct entries, each request's summing to its fee.
    by_id = {entry.entry_id: entry for entry in entries}
    assert len(by_id) == len(entries), "a reward entry was written twice"
    paid: dict[str, int] = defaultdict(int)
    for entry in entries:
        paid[entry.request_id] += entry.amount
    defaults = Parameters()
    fees = {result.request_id: fee_for(result, defaults) for result in results}
    assert {rid for rid, fee in fees.items() if fee} == set(paid)
    assert {rid: paid[rid] for rid in paid} == {rid: fees[rid] for rid in paid}

    # The ledger equals the log, row for row.
    assert ledger["inference_results"] == sorted(sent)
    assert ledger["attributions"] == sorted(sent)
    assert ledger["reward_entries"] == sorted(by_id)

    # Governance earnings (as the next start recovers them) equal the ledger's sums.
    from_log: Counter = Counter()
    for entry in entries:
        from_log[(entry.beneficiary_id, entry.epoch)] += entry.amount
    governance: Counter = Counter()
    for beneficiary, epoch, amount in earned.values():
        governance[(beneficiary, epoch)] += amount
    assert set(earned) == set(by_id)
    assert dict(governance) == dict(from_log)
    assert {(b, int(e)): int(a) for b, e, a in ledger_earnings} == dict(from_log)
