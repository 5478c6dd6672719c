"""Vote weights are exactly once: the pipeline killed with SIGKILL in the middle of a burst of
paid results, restarted, and fed results and reward entries published a second time, ends
with governance earnings (the table tallies weigh votes with, as recovered from its
changelog) equal to the ledger's sums per beneficiary and epoch."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import Counter
from pathlib import Path

import ledger_probe
import pipeline_process
import pytest
from attribution_support import billable, make_adapter, make_result, request_for
from signing import Identity

from infra.kafka.events import publish
from infra.settings import Settings, load_settings
from schemas.events import InferenceResult, RewardEntry

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# Epochs follow the broker's append time: short ones, so the run spans several.
EPOCH_SECONDS = 10
OWNERS = {"ad-a": "olga", "ad-b": "oscar"}
WORKERS = (Identity.new("gpu-0"), Identity.new("gpu-1"))
BURST = 120  # results; each is paid three to seven entries


def burst(adapters: dict, first: int, count: int) -> list[InferenceResult]:
    """Results signed by the registered workers, with token ids their usage recounts."""
    made = []
    for index in range(first, first + count):
        adapter_id = sorted(OWNERS)[index % 2]
        result = make_result(adapters[adapter_id], request_id=f"req-{index:04d}",
                             adapter_id=adapter_id)
        if index % 5 == 4:
            # No sketch: its attribution fails and the treasury takes the contributors' share.
            result = result.model_copy(update={"sketch": None})
        made.append(billable(result, 7 + index % 13, 3, WORKERS[index // 2 % 2]))
    return made


def publish_answered(settings: Settings, results: list[InferenceResult]) -> None:
    """The workers' keys and the requests `results` answer, acknowledged before the results
    are sent."""
    asyncio.run(publish(settings, [*(worker.as_worker() for worker in WORKERS),
                                   *(request_for(result) for result in results)]))
    asyncio.run(publish(settings, results))


def ledger_earnings(env: dict[str, str], cwd: Path) -> dict[tuple[str, int], int]:
    done = subprocess.run(ledger_probe.command("earnings"), env=env, cwd=cwd, check=True,
                          capture_output=True, text=True, timeout=120)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return {(beneficiary, int(epoch)): int(amount) for beneficiary, epoch, amount in rows}


def test_sigkill_during_a_reward_burst_leaves_earnings_equal_to_the_ledger(
    kafka_settings, stack_env, tmp_path
):
    settings = kafka_settings
    home = tmp_path / "home"
    home.mkdir()
    env = {**stack_env, "LORALEDGER_EPOCH_SECONDS": str(EPOCH_SECONDS),
           "PYTHONPATH": str(REPO), "LORALEDGER_HOME": str(home)}
    adapters_dir = load_settings(env).adapters_dir
    adapters = {adapter_id: make_adapter(adapters_dir, adapter_id, seed=i, owner_id=owner)
                for i, (adapter_id, owner) in enumerate(sorted(OWNERS.items()))}
    results = burst(adapters, 0, BURST)
    everything = {result.request_id for result in results}
    log = tmp_path / "pipeline.log"

    def paid() -> set[str]:
        return {entry.request_id
                for entry in pipeline_process.committed_events(settings, "rewards")}

    pipeline = pipeline_process.start(env, log)
    try:
        publish_answered(settings, results[:BURST // 2])
        pipeline_process.wait_until(lambda: len(paid()) > 0, "the first entries are paid", log)
        # The rest arrives as the pipeline dies: it is killed with work in flight.
        publish_answered(settings, results[BURST // 2:])
        pipeline_process.kill(pipeline)
        killed_with_unpaid = everything - paid()

        pipeline = pipeline_process.start(env, log)
        # Published twice: results (paid again or not, their entries keep their ids) and
        # reward entries themselves.
        entries: list[RewardEntry] = pipeline_process.committed_events(settings, "rewards")
        asyncio.run(publish(settings, [*results[:10], *entries[:50]]))
        pipeline_process.wait_until(lambda: paid() >= everything, "every request is paid", log)
        pipeline_process.wait_until(
            lambda: pipeline_process.consumed(settings, "results", "attributions", "rewards"),
            "the pipeline is done with every record", log)
        assert pipeline_process.stop(pipeline) == 0
    finally:
        pipeline_process.kill(pipeline)

    assert killed_with_unpaid, "the kill came after the whole burst was paid"
    entries = pipeline_process.committed_events(settings, "rewards")
    by_id = {entry.entry_id: entry for entry in entries}
    assert len(entries) > len(by_id), "no entry was published twice"
    from_log: Counter = Counter()
    for entry in by_id.values():
        from_log[(entry.beneficiary_id, entry.epoch)] += entry.amount
    # The table's state as the next start recovers it.
    earned = pipeline_process.table_changelog(settings, "earned-entries")
    earnings: Counter = Counter()
    for beneficiary, epoch, amount in earned.values():
        earnings[(beneficiary, epoch)] += amount
    assert set(earned) == set(by_id)
    assert dict(earnings) == dict(from_log)
    assert ledger_earnings(env, tmp_path) == dict(from_log)
    assert {beneficiary for beneficiary, _ in from_log} >= {
        *OWNERS.values(), *(worker.name for worker in WORKERS)}
