"""Group membership, against the real broker: a worker restarted with the same worker id gets
back the partitions it had, and the other worker of the group sees no rebalance at all; a
worker whose producers are fenced while its partitions are still its own asks the group again
and serves on."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition
from task_waits import wait_for

from inference.base_model import build_base_model
from inference.worker.backend import BackendConfig
from inference.worker.service import Worker, WorkerConfig, transactional_id
from infra.kafka.clients import make_producer
from infra.kafka.events import publish, read_topic
from infra.settings import Settings, load_settings
from schemas.events import InferenceRequest
from schemas.topics import TOPICS, topic_name

pytestmark = pytest.mark.integration

class CountingWorker(Worker):
    """A worker that counts the rebalance callbacks it receives."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        config = WorkerConfig(worker_id, backend=BackendConfig(max_batch=2, max_seq_len=64),
                              session_timeout_ms=10_000)
        super().__init__(settings, config)
        self.callbacks = 0

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        self.callbacks += 1
        await super()._on_assigned(assigned)

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        self.callbacks += 1
        await super()._on_revoked(revoked)


@pytest.fixture
def settings(kafka_settings, stack_env, tmp_path) -> Settings:
    base = tmp_path / "base-model"
    build_base_model(base, load_settings().cache_dir, "test")
    (tmp_path / "home" / "adapters").mkdir(parents=True)
    return load_settings({**stack_env, "LORALEDGER_HOME": str(tmp_path / "home"),
                          "LORALEDGER_BASE_MODEL": str(base)})


def test_a_restarted_worker_gets_its_partitions_back_without_a_rebalance(settings: Settings):
    partitions = TOPICS["requests"].partitions

    async def scenario() -> None:
        first, second = CountingWorker(settings, "wa"), CountingWorker(settings, "wb")
        workers = [first, second]
        tasks = [asyncio.create_task(first.run())]
        try:
            await wait_for(lambda: len(first.partitions) == partitions, "the first", tasks)
            tasks.append(asyncio.create_task(second.run()))
            await wait_for(
                lambda: second.partitions
                and len(first.partitions) + len(second.partitions) == partitions,
                "the group to share the partitions", tasks,
            )
            had, callbacks = second.partitions, first.callbacks

            second.request_stop()
            await tasks.pop()
            again = CountingWorker(settings, "wb")
            workers.append(again)
            tasks.append(asyncio.create_task(again.run()))
            await wait_for(lambda: again.partitions, "the restarted worker", tasks)

            assert again.partitions == had
            await asyncio.sleep(1.0)  # a rebalance of the first would show meanwhile
            assert first.callbacks == callbacks, "the other worker went through a rebalance"
            assert sorted(first.partitions + again.partitions) == list(range(partitions))
        finally:
            for worker in workers:
                worker.request_stop()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())


def test_a_worker_fenced_without_a_rebalance_rejoins_and_serves_on(settings: Settings):
    """The broker aborts a transaction left open past its timeout by bumping its producer's
    epoch, which the worker sees as a fence though no other worker owns the partition, and no
    rebalance will come. Here the test bumps every partition's epoch, as that abort does; the
    worker must ask the group again, get its partitions back with new producers and answer the
    requests sent after the fence."""
    partitions = TOPICS["requests"].partitions

    async def answered(request_ids: set[str]) -> set[str]:
        return {item.event.request_id async for item in read_topic(settings, "results")
                if item.event is not None and item.event.request_id in request_ids}

    async def scenario() -> None:
        worker = CountingWorker(settings, "wf")
        tasks = [asyncio.create_task(worker.run())]
        try:
            await wait_for(lambda: len(worker.partitions) == partitions, "the worker", tasks)
            callbacks = worker.callbacks
            for partition in range(partitions):
                tp = TopicPartition(topic_name("requests", settings.topic_prefix), partition)
                fencer = make_producer(worker.settings, transactional_id(settings, tp))
                await fencer.start()  # init_transactions bumps the epoch
                await fencer.stop()
            # No adapter: keyed by request id, so they spread over the partitions.
            requests = [InferenceRequest(prompt=f"question {i}", max_new_tokens=2)
                        for i in range(3 * partitions)]
            await publish(settings, requests)
            wanted = {request.request_id for request in requests}

            async def all_answered() -> bool:
                return await answered(wanted) == wanted

            await wait_for(all_answered, f"answers to all {len(wanted)} requests sent after "
                           "the fence", tasks)
            assert worker.callbacks > callbacks, "the worker never asked the group again"
            assert len(worker.partitions) == partitions
        finally:
            worker.request_stop()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
