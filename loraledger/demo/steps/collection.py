"""Step 6, inference and attribution: send the requests, then read the log until each has its
result, attribution and reward entries."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from infra.kafka.clients import make_admin, make_consumer
from infra.kafka.events import publish
from infra.settings import Settings
from loraledger.demo.errors import DemoError
from loraledger.demo.processes import Service
from loraledger.demo.ui import progress_bar
from pipeline.rewards import fee_for
from schemas.codec import DecodeError, decode
from schemas.events import (
    AttributionRecord,
    InferenceRequest,
    InferenceResult,
    Parameters,
    RewardEntry,
)
from schemas.topics import topic_name

WATCHED_TOPICS = ("results", "attributions", "rewards")
REQUESTS_PER_PUBLISH = 50

# (broker topic, partition): the consumer's topic-partition keys are such tuples.
Partition = tuple[str, int]


@dataclass
class Collected:
    """What the log says about this run's requests, by request id."""

    results: dict[str, InferenceResult] = field(default_factory=dict)
    attributions: dict[str, AttributionRecord] = field(default_factory=dict)
    rewards: dict[str, list[RewardEntry]] = field(default_factory=lambda: defaultdict(list))
    last_offsets: dict[Partition, int] = field(default_factory=dict)  # highest seen

    def done(self, request_id: str) -> bool:
        """Result, attribution and every reward entry in (error results are not attributed
        and cost nothing). The entries of one request commit in one transaction but are keyed
        by beneficiary, so they land on several partitions and may arrive in different fetches;
        they always sum to the request's fee, which tells when the last one is in."""
        result = self.results.get(request_id)
        if result is None:
            return False
        if result.status != "ok":
            return True
        if request_id not in self.attributions:
            return False
        if fee_for(result, Parameters()) == 0:
            return True
        entries = self.rewards.get(request_id)
        return bool(entries) and sum(entry.amount for entry in entries) == entries[0].fee_total

    def events(self) -> list[Any]:
        entries = [entry for group in self.rewards.values() for entry in group]
        return [*self.results.values(), *self.attributions.values(), *entries]


async def _missing_topics(settings: Settings, names: Sequence[str]) -> list[str]:
    admin = make_admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    return [name for name in names if name not in existing]


async def start_collector(settings: Settings):
    """A consumer positioned at the end of the watched topics, before any request is sent, so
    it sees exactly what follows."""
    # Checked first: subscribing to a missing topic would have the broker auto-create it.
    missing = await _missing_topics(
        settings, [topic_name(name, settings.topic_prefix) for name in WATCHED_TOPICS]
    )
    if missing:
        raise DemoError(f"topic {missing[0]} does not exist: `loraledger stack up` creates it")
    # Without a group the consumer is assigned every partition of its topics when it starts.
    consumer = make_consumer(settings, WATCHED_TOPICS, group_id=None, from_beginning=False)
    await consumer.start()
    await consumer.seek_to_end()
    for partition in consumer.assignment():
        await consumer.position(partition)
    return consumer


def _absorb(collected: Collected, logical: str, value: bytes, wanted: set[str]) -> bool:
    """Keep an event of this run; True if it was one."""
    try:
        event = decode(logical, value)
    except DecodeError:
        return False  # the pipeline dead-letters it; it cannot belong to this run
    if event.request_id not in wanted:
        return False
    if isinstance(event, InferenceResult):
        collected.results[event.request_id] = event
    elif isinstance(event, AttributionRecord):
        collected.attributions[event.request_id] = event
    elif isinstance(event, RewardEntry):
        entries = collected.rewards[event.request_id]
        if all(entry.entry_id != event.entry_id for entry in entries):
            entries.append(event)
    return True


def _timeout_message(collected: Collected, wanted: set[str], when: str) -> str:
    ok = [rid for rid, result in collected.results.items() if result.status == "ok"]
    unattributed = sum(1 for rid in ok if rid not in collected.attributions)
    unpaid = sum(1 for rid in ok if rid in collected.attributions and not collected.done(rid))
    return (
        f"{when}: {len(wanted) - len(collected.results)} requests without a "
        f"result (worker), {unattributed} without an attribution (attribution agent), "
        f"{unpaid} without reward entries (attribution agent)"
    )


async def run_requests(
    settings: Settings, requests: Sequence[InferenceRequest], services: Sequence[Service],
    timeout_s: float, console: Console, stall_s: float = 120.0,
) -> Collected:
    """Send the requests and wait until each has its result, attribution and rewards; give up
    after `timeout_s`, or after `stall_s` without a new event of this run."""
    consumer = await start_collector(settings)
    logical = {topic_name(name, settings.topic_prefix): name for name in WATCHED_TOPICS}
    wanted = {request.request_id for request in requests}
    collected = Collected()
    try:
        with progress_bar(console) as progress:
            sent = progress.add_task("requests sent", total=len(requests))
            results = progress.add_task("results", total=len(requests))
            paid = progress.add_task("attributed and paid", total=len(requests))
            for start in range(0, len(requests), REQUESTS_PER_PUBLISH):
                chunk = requests[start:start + REQUESTS_PER_PUBLISH]
                await publish(settings, chunk)
                progress.advance(sent, len(chunk))
            deadline = time.monotonic() + timeout_s
            last_news = time.monotonic()
            pending = set(wanted)
            while pending:
                now = time.monotonic()
                if now > deadline:
                    raise DemoError(_timeout_message(collected, wanted, f"after {timeout_s:.0f}s"))
                if now - last_news > stall_s:
                    raise DemoError(_timeout_message(
                        collected, wanted, f"nothing new for {stall_s:.0f}s"))
                for service in services:
                    service.check_alive()
                batch = await consumer.getmany(timeout_ms=500)
                for partition, records in batch.items():
                    for record in records:
                        if _absorb(collected, logical[partition.topic], record.value or b"",
                                   wanted):
                            collected.last_offsets[partition] = record.offset
                            last_news = time.monotonic()
                pending = {rid for rid in pending if not collected.done(rid)}
                progress.update(results, completed=len(collected.results))
                progress.update(paid, completed=len(wanted) - len(pending))
    finally:
        await consumer.stop()
    return collected
