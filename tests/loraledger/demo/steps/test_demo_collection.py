"""What the log says about a run: when a request counts as done, and a collector that sees
exactly the events that follow its start."""

from __future__ import annotations

import asyncio
import time

import pytest
from demo_support import entry, record, result

from infra.kafka.events import publish
from infra.settings import load_settings
from loraledger.demo.errors import DemoError
from loraledger.demo.steps.collection import WATCHED_TOPICS, Collected, start_collector
from schemas.codec import decode
from schemas.events import RewardRole
from schemas.topics import topic_name, topic_spec


def test_a_request_is_done_once_result_attribution_and_rewards_are_in():
    collected = Collected()
    assert not collected.done("r1")
    collected.results["r1"] = result("r1")
    assert not collected.done("r1")
    collected.attributions["r1"] = record("r1")
    assert not collected.done("r1")
    collected.rewards["r1"].append(entry("r1", RewardRole.TREASURY, amount=6, fee_total=60))
    assert not collected.done("r1")  # the other entries are on other partitions, still coming
    collected.rewards["r1"].append(entry("r1", RewardRole.CONTRIBUTOR, amount=54, fee_total=60))
    assert collected.done("r1")
    collected.results["r2"] = result("r2", status="error")
    assert collected.done("r2")  # errors are neither attributed nor paid
    assert len(collected.events()) == 5


@pytest.mark.integration
def test_the_collector_reads_only_what_follows_its_start(kafka_settings):
    logical = {topic_name(name, kafka_settings.topic_prefix): name for name in WATCHED_TOPICS}

    async def scenario() -> tuple[list[str], int]:
        await publish(kafka_settings, [result("before")])
        consumer = await start_collector(kafka_settings)
        try:
            await publish(kafka_settings, [result("after"), record("after")])
            seen: list[str] = []
            deadline = time.monotonic() + 30
            while len(seen) < 2 and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    seen += [decode(logical[r.topic], r.value).request_id for r in records]
            return seen, len(consumer.assignment())
        finally:
            await consumer.stop()

    seen, assigned = asyncio.run(scenario())
    assert sorted(seen) == ["after", "after"]
    assert assigned == sum(topic_spec(name).partitions for name in WATCHED_TOPICS)


@pytest.mark.integration
def test_the_collector_refuses_a_missing_topic(stack_env):
    settings = load_settings(stack_env)  # a fresh prefix whose topics nobody created
    with pytest.raises(DemoError, match=r"topic t\w+\.results does not exist"):
        asyncio.run(start_collector(settings))
