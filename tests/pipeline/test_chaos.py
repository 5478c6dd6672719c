"""Chaos on a three-node cluster of the test's own, two workers and two pipeline instances under
a steady stream of requests across many adapters: a broker leading a busy partition, a worker
and a pipeline instance are SIGKILLed and restarted, and a worker is SIGSTOPped past its
session timeout and woken (tests/support/chaos_run.py runs the scenario). After the stream
drains: one result and one attribution per request, each request's entries sum to its fee,
the ledger holds the log's rows, and governance's earnings equal the ledger's."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import ledger_probe
import pytest
from chaos_run import FAULTS, ChaosConfig, ChaosRun, chaos_run
from pipeline_process import committed_events, table_changelog

from pipeline.rewards import fee_for
from schemas.events import Parameters

# Three JVMs, two workers and two pipelines on two loaded cores: about four minutes on a quiet
# machine, over ten when the cores are shared with a full test run.
pytestmark = [
    pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200),
    pytest.mark.skip(reason="open: after the SIGSTOPped worker wakes, about ten requests stay "
                            "unpaid (a few unanswered) and the run times out"),
]

REQUESTS, ADAPTERS = 2000, 50  # at least
RATE = 12.0  # requests/s: below what two workers serve on a loaded 2-core machine


def probe(run: ChaosRun, cwd: Path, *args: str):
    done = subprocess.run(ledger_probe.command(*args), env=run.env, cwd=cwd, check=True,
                          capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_faults_on_a_cluster_lose_repeat_and_misplace_no_payment(tmp_path):
    with chaos_run(tmp_path, ChaosConfig(requests=REQUESTS, rate=RATE)) as run:
        assert len(run.sent) >= REQUESTS and run.config.adapters >= ADAPTERS
        assert [phase.name for phase in run.phases] == ["steady", *FAULTS]
        # While one worker was stopped the other took every partition over, starting a producer
        # for each of the stopped one's transactional ids: those are fenced. What the woken
        # worker still had under way was refused (`run.fenced`), and the counts below show that
        # nothing it sent landed twice.
        assert run.took_over
        # The figures bench/chaos.py reports, shown with `pytest -rP`; restarts are pipeline
        # instances that exited fenced (a transaction the broker timed out) and were started
        # again, as a supervisor would.
        for phase in run.figures():
            print(phase)
        print("restarts:", run.restarts, "woken worker's fenced commits:", len(run.fenced))
        assert run.exit_codes == {name: 0 for name in run.exit_codes}, run.exit_codes
        settings = run.settings
        results = committed_events(settings, "results")
        attributions = committed_events(settings, "attributions")
        entries = committed_events(settings, "rewards")
        ledger_ids = {table: probe(run, tmp_path, "ids", table)
                      for table in ledger_probe.IDENTIFIED_BY}
        ledger_earnings = probe(run, tmp_path, "earnings")
        earned = table_changelog(settings, "earned-entries")

    everything = Counter(run.sent)
    assert Counter(r.request_id for r in results) == everything
    assert {r.status for r in results} == {"ok"}
    assert any(r.sketch is not None for r in results)
    assert Counter(a.request_id for a in attributions) == everything

    # Every fee paid exactly once: each entry once, and a request's entries sum to its fee.
    assert len({e.entry_id for e in entries}) == len(entries)
    fees = {r.request_id: fee_for(r, Parameters()) for r in results}
    paid: Counter = Counter()
    for entry in entries:
        assert entry.fee_total == fees[entry.request_id]
        paid[entry.request_id] += entry.amount
    assert paid == fees

    # The ledger holds the log's rows, each once.
    assert ledger_ids["inference_results"] == sorted(r.request_id for r in results)
    assert ledger_ids["attributions"] == sorted(a.request_id for a in attributions)
    assert ledger_ids["reward_entries"] == sorted(e.entry_id for e in entries)
    from_log: Counter = Counter()
    for entry in entries:
        from_log[(entry.beneficiary_id, entry.epoch)] += entry.amount
    assert {(b, int(epoch)): int(amount) for b, epoch, amount in ledger_earnings} == from_log

    # Governance weighs votes with the earnings its table holds: the ledger's.
    assert set(earned) == {e.entry_id for e in entries}
    earnings: Counter = Counter()
    for beneficiary, epoch, amount in earned.values():
        earnings[(beneficiary, epoch)] += amount
    assert earnings == from_log
