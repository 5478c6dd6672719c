"""The GPU worker service: `requests` -> engine -> `results`, exactly once.

The worker joins the `requests` consumer group; requests are keyed by adapter id, so each
adapter's traffic lands on one worker and its adapter stays warm there. The event loop only
talks to Kafka; the engine runs on one executor thread, so heartbeats never wait on a forward
pass.

Exactly once. Each assigned input partition has its own transactional producer, whose
transactional id names the partition (not the worker): whoever owns the partition next starts
a producer with the same id, which fences the previous owner (its open transaction is aborted,
its later commits fail) - the classic zombie fencing, needed because the offset commit in a
transaction carries no consumer-group generation. A partition's results and dead letters are
produced in one transaction with the offset after the last record they cover, and only for the
finished prefix of the partition (see `partition_backlog`). A worker killed at any moment leaves an
aborted or committed transaction: read-committed consumers see each result once, and the new
owner re-consumes exactly the records whose results were not committed.

Membership is static (the worker id is the group instance id): a worker restarted with the same
id gets its partitions back without a rebalance; two live workers need distinct ids.

Streaming requests also get token deltas on `token-deltas` as they are generated, from a plain
producer outside the transactions: a side channel that may lose or repeat nothing that matters,
since the committed result is the truth a streaming client ends with.

Rebalances and SIGTERM drain: the worker stops taking records, runs the engine until what it
consumed is finished (time-boxed), commits, and lets go. What did not finish in time is
dropped and re-consumed by the next owner.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from inference.worker.backend import BackendConfig, Completed, ServingBackend
from inference.worker.metrics import WorkerMetrics
from inference.worker.partition_backlog import PartitionBacklog, ReadyPrefix
from inference.worker.sketching import SketchPolicy
from infra.kafka.clients import ensure_topics, make_consumer, make_producer
from infra.kafka.consumer_group import request_rejoin, rewind_to_committed
from infra.kafka.dead_letters import validated
from infra.kafka.events import Outgoing, send_event
from infra.kafka.security import WORKER
from infra.kafka.transactions import send_and_commit
from infra.keys import KeyRole, create_key
from infra.settings import Settings
from schemas.events import InferenceResult, TokenDelta
from schemas.ids import check_id, new_id
from schemas.signatures import sign_event
from schemas.topics import topic_name

log = logging.getLogger("loraledger.worker")

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    device: str = "cpu"
    backend: BackendConfig = field(default_factory=BackendConfig)
    sketch: SketchPolicy = field(default_factory=SketchPolicy)
    metrics_port: int = 0  # 0: no HTTP endpoint
    commit_interval_s: float = 0.2
    step_budget_s: float = 0.05
    max_buffered: int = 0  # consumed, unfinished requests before fetching pauses; 0: 4 x batch
    drain_timeout_s: float = 30.0
    session_timeout_ms: int = 10_000
    status_interval_s: float = 10.0

    def __post_init__(self) -> None:
        check_id(self.worker_id, "worker id")
        if self.commit_interval_s <= 0 or self.step_budget_s <= 0 or self.drain_timeout_s < 0:
            raise ValueError("commit interval and step budget must be positive")

    @property
    def buffer_limit(self) -> int:
        return self.max_buffered or 4 * self.backend.max_batch


def group_id(settings: Settings) -> str:
    return f"{settings.topic_prefix}loraledger-worker"


def transactional_id(settings: Settings, partition: TopicPartition) -> str:
    """Stable per input partition, so the partition's next owner fences the previous one."""
    return f"{group_id(settings)}.{partition.topic}.{partition.partition}"


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.worker._on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.worker._on_assigned(list(assigned))


class Worker:
    def __init__(
        self,
        settings: Settings,
        config: WorkerConfig,
        backend_factory: Callable[[WorkerMetrics], ServingBackend] | None = None,
    ) -> None:
        # The worker principal: the only one the broker lets write `results`.
        self.settings = settings.acting_as(WORKER)
        self.config = config
        self.metrics = WorkerMetrics()
        self._backend_factory = backend_factory or self._default_backend
        self.backend: ServingBackend | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._fatal: BaseException | None = None
        self._epoch = 0  # bumped by every rebalance callback
        self._ledgers: dict[TopicPartition, PartitionBacklog] = {}
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._delta_producer: AIOKafkaProducer | None = None
        self._partition_of: dict[str, TopicPartition] = {}  # backend key -> input partition
        self._last_commit = time.monotonic()
        self._last_status = time.monotonic()
        # Results are signed, so that the processor credits this worker only when the
        # signature verifies against the key registered for its id (`loraledger workers
        # register`); an unregistered worker's results are served but never paid.
        self._signing_key = create_key(settings.home, KeyRole.WORKER, config.worker_id)

    def _default_backend(self, metrics: WorkerMetrics) -> ServingBackend:
        return ServingBackend.build(
            self.settings.base_model_dir,
            self.settings.adapters_dir,
            worker_id=self.config.worker_id,
            device=self.config.device,
            config=self.config.backend,
            sketch_policy=self.config.sketch,
            metrics=metrics,
        )

    def request_stop(self) -> None:
        """Stop taking work, finish what is in flight, commit, and return from `run`."""
        self._stopping.set()

    @property
    def partitions(self) -> list[int]:
        return sorted(tp.partition for tp in self._ledgers)

    # --- main loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        await ensure_topics(self.settings, ["requests", "results", "dead-letters", "token-deltas"])
        self.backend = await self._call(self._backend_factory, self.metrics)
        self._delta_producer = make_producer(self.settings)
        await self._delta_producer.start()
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port)
        consumer = make_consumer(
            self.settings,
            [],
            group_id(self.settings),
            # Static membership: a worker restarted with the same id takes its partitions back
            # at once, without a rebalance of the others; one that stays away loses them after
            # the session timeout.
            group_instance_id=self.config.worker_id,
            session_timeout_ms=self.config.session_timeout_ms,
            heartbeat_interval_ms=max(100, self.config.session_timeout_ms // 4),
        )
        consumer.subscribe(
            [topic_name("requests", self.settings.topic_prefix)], listener=_Rebalance(self)
        )
        self._consumer = consumer
        await consumer.start()
        log.info("worker %s joined group %s", self.config.worker_id, group_id(self.settings))
        try:
            while not self._stopping.is_set():
                self._raise_fatal()
                await self._fetch(consumer)
                async with self._lock:
                    await self._work()
                self._log_status()
            self._raise_fatal()
            async with self._lock:
                await self._drain(list(self._ledgers))
            log.info("worker %s stopped after draining", self.config.worker_id)
        finally:
            await consumer.stop()
            await asyncio.gather(*(p.stop() for p in self._producers.values()),
                                 return_exceptions=True)
            self._producers.clear()
            if self._delta_producer is not None:
                await self._delta_producer.stop()
            if self.backend is not None:
                await self._call(self.backend.close)
            self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    async def _fetch(self, consumer: Any) -> None:
        assert self.backend is not None
        unfinished = sum(ledger.unfinished for ledger in self._ledgers.values())
        room = self.config.buffer_limit - unfinished
        if room <= 0:
            return
        busy = not self.backend.idle()
        epoch = self._epoch
        batch = await consumer.getmany(timeout_ms=0 if busy else 100, max_records=room)
        if not batch:
            return
        async with self._lock:
            if epoch != self._epoch:
                # A rebalance ran meanwhile. aiokafka returns only records of the current
                # assignment, so these may be the first ones read after it: the positions are
                # already past them. Drop them and go back to the committed offsets, where the
                # new assignment starts, or they would never be served while later records
                # are, and their offsets committed with those.
                await rewind_to_committed(consumer, [tp for tp in batch if tp in self._ledgers])
                return
            for tp, records in batch.items():
                ledger = self._ledgers.get(tp)
                if ledger is None:
                    continue
                for record in records:
                    self._take(tp, ledger, record)

    def _take(self, tp: TopicPartition, ledger: PartitionBacklog, record: Any) -> None:
        assert self.backend is not None
        key = new_id()
        if ledger.track(record.offset, key) is None:
            return
        # A dead letter goes out in the transaction that commits its record's offset.
        checked = validated([record], self.settings, f"worker-{self.config.worker_id}")
        if checked.events:
            self._partition_of[key] = tp
            self.backend.enqueue(checked.events[0][1], key)
        else:
            ledger.finish(key, checked.dead_letters)
            self.metrics.dead_letters.inc()

    async def _work(self, flush: bool = False) -> None:
        """Advance the engine one slice and commit when due. Caller holds the lock."""
        assert self.backend is not None
        now = time.monotonic()
        commit_due = flush or now - self._last_commit >= self.config.commit_interval_s
        if not self.backend.idle():
            completed = await self._call(
                self.backend.advance, self.config.step_budget_s, commit_due
            )
            self._record(completed)
            await self._send_deltas(self.backend.take_deltas())
        if commit_due or self.backend.idle():
            await self._commit()

    async def _send_deltas(self, deltas: list[TokenDelta]) -> None:
        """Best effort, not awaited to the broker: a lost delta is made good by the result."""
        if self._delta_producer is None:
            return
        for delta in deltas:
            try:
                await send_event(self._delta_producer, self.settings, delta)
            except KafkaError as exc:
                log.debug("token delta for %s not sent: %s", delta.request_id, exc)

    def _record(self, completed: list[Completed]) -> None:
        for item in completed:
            tp = self._partition_of.pop(item.key, None)
            ledger = self._ledgers.get(tp) if tp is not None else None
            if ledger is None:
                continue  # its partition was revoked meanwhile
            result = sign_event(item.result, self._signing_key)
            ledger.finish(item.key, [Outgoing.of(result)], result)

    async def _commit(self) -> None:
        self._last_commit = time.monotonic()
        work = [
            self._commit_partition(tp, ledger, prefix)
            for tp, ledger in self._ledgers.items()
            if (prefix := ledger.ready()) is not None
        ]
        if not work:
            return
        outcomes = await asyncio.gather(*work, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _commit_partition(
        self, tp: TopicPartition, ledger: PartitionBacklog, prefix: ReadyPrefix
    ) -> None:
        producer = self._producers.get(tp)
        if producer is None:
            return
        try:
            await send_and_commit(
                producer,
                self.settings,
                prefix.messages,
                {tp: prefix.next_offset},
                group_id(self.settings),
            )
        except ProducerFenced:
            # Either a zombie (the group gave the partition to another worker, which fenced
            # us) or a transaction the broker timed out. The uncommitted records are not ours
            # to finish; the group says whose they are: still ours, the partition gets a new
            # producer and is read again from its committed offset.
            self.metrics.transactions.labels("fenced").inc()
            log.warning("partition %d was fenced; dropping its work and rejoining the group",
                        tp.partition)
            await self._release([tp])
            producer = self._producers.pop(tp, None)
            if producer is not None:
                await producer.stop()
            if self._consumer is not None:
                request_rejoin(self._consumer)
            return
        except KafkaError as exc:
            # Aborted: nothing of it is visible. The prefix stays and is retried.
            self.metrics.transactions.labels("aborted").inc()
            log.warning("transaction for partition %d aborted, will retry: %s", tp.partition, exc)
            return
        ledger.confirm(prefix)
        self.metrics.transactions.labels("committed").inc()
        now = time.monotonic()
        for entry in prefix.entries:
            if isinstance(entry.payload, InferenceResult):
                self.metrics.observe_committed(entry.payload, now - entry.received_at)

    async def _drain(self, partitions: list[TopicPartition]) -> None:
        """Finish what was consumed from `partitions` (time-boxed) and commit. Caller holds
        the lock."""
        assert self.backend is not None
        deadline = time.monotonic() + self.config.drain_timeout_s
        while (
            any(self._ledgers[tp].unfinished for tp in partitions if tp in self._ledgers)
            and not self.backend.idle()
            and time.monotonic() < deadline
        ):
            await self._work(flush=True)
        await self._work(flush=True)

    # --- rebalancing -------------------------------------------------------------------------

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self._lock:
            self._epoch += 1
            mine = [tp for tp in revoked if tp in self._ledgers]
            if not mine or self.backend is None:
                return
            try:
                await self._drain(mine)
            except BaseException as exc:  # surfaced by the main loop; aiokafka would swallow it
                self._fatal = exc
                self._stopping.set()
            await self._release(mine)
            log.info("worker %s released partitions %s", self.config.worker_id,
                     sorted(tp.partition for tp in mine))

    async def _release(self, partitions: list[TopicPartition]) -> None:
        """Forget partitions and what was consumed from them. Caller holds the lock."""
        dropped: set[str] = set()
        for tp in partitions:
            ledger = self._ledgers.pop(tp, None)
            if ledger is not None:
                dropped.update(ledger.keys())
        for key in dropped:
            self._partition_of.pop(key, None)
        if dropped and self.backend is not None:
            await self._call(self.backend.drop, dropped)

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        async with self._lock:
            self._epoch += 1
            # Every assigned partition gets a new producer, also one this worker held before
            # the rebalance: while it was away (paused past its session), the partition's
            # next owner fenced that producer, and its commits would all fail.
            stale = list(self._producers)
            await asyncio.gather(*(self._producers.pop(tp).stop() for tp in stale),
                                 return_exceptions=True)
            try:
                await asyncio.gather(*(self._start_producer(tp) for tp in assigned))
            except BaseException as exc:
                self._fatal = exc
                self._stopping.set()
                return
            for tp in assigned:
                self._ledgers.setdefault(tp, PartitionBacklog())
            log.info("worker %s owns partitions %s", self.config.worker_id, self.partitions)

    async def _start_producer(self, tp: TopicPartition) -> None:
        producer = make_producer(
            self.settings, transactional_id=transactional_id(self.settings, tp)
        )
        await producer.start()  # init_transactions: fences and aborts the previous owner
        self._producers[tp] = producer

    def _log_status(self) -> None:
        now = time.monotonic()
        if now - self._last_status < self.config.status_interval_s or self.backend is None:
            return
        self._last_status = now
        pending = sum(len(ledger) for ledger in self._ledgers.values())
        log.info(self.metrics.status_line(self.config.worker_id, self.partitions, pending))


async def run_worker(settings: Settings, config: WorkerConfig) -> None:
    """Run a worker until SIGTERM or SIGINT, then drain and return."""
    import signal

    worker = Worker(settings, config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    await worker.run()
