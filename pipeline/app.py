"""The pipeline's Faust app, built by `build_app(settings)`. Each processor module exposes
`register(app, settings, ...)`, which declares its topics, tables, agents and tasks on the app
it is given; `pipeline.agents.build_pipeline` builds the app and registers the processors a
worker runs. Nothing is built or read from the environment at import.

Stopping (SIGTERM, Ctrl-C) under `exactly_once` runs in this order:

1. the stop hooks (`stop_first`): the app's own transactional loops (the attribution task)
   finish their open transaction, commit and close, while the Faust consumer still runs;
2. Faust stops fetching, and `_consumer_wait_empty` waits until every event the agents took
   has been processed and acknowledged (the ledger sink writes its current batch), committing
   as it goes;
3. one last commit ends the transactions, and the consumer commits nothing after it (nor sends
   a table write: see `_Consumer._commit_offsets`); then the agents are stopped.

Faust 0.15.3 ends the transactions at the end of 2, but its streams keep acknowledging
events afterwards: those that flow control makes them skip (unprocessed) and, once the agents
are cancelled, those they were holding. The consumer's own stop then commits these, into
producers that are no longer in a transaction: `IllegalOperation('Not in the middle of a
transaction')`. That abandons the consumer's stop before its fetcher thread stops, and the
thread keeps the process alive after the event loop has closed (the hang). Had the commit
gone through, it would have marked skipped events as done.

Faust waits in step 2 on every rebalance too. There the wait commits what the streams finished
and keeps the transactions open and the agents running: the instance goes on with the
partitions it keeps.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, NoReturn

import faust
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from faust.transport.consumer import TransactionManager
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.producer import ProducerBuffer
from faust.types.tuples import FutureMessage

from infra.kafka.security import faust_credentials
from infra.kafka.transactions import after_last_committed
from infra.settings import Settings
from schemas.topics import topic_spec

log = logging.getLogger(__name__)

StopHook = Callable[[], Awaitable[None]]

STOP_HOOK_TIMEOUT_S = 15.0  # a hook that takes longer is abandoned; its transaction aborts
# Events not acknowledged within these bounds stay uncommitted and are processed again after a
# restart: giving up early costs a redo, never an event.
DRAIN_TIMEOUT_S = 15.0
DRAIN_STALL_S = 3.0  # with no acknowledgement at all


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def seek_to_committed(self) -> Mapping[Any, int | None]:
        return await self.call_thread(
            seek_to_committed, self._ensure_consumer(), self.app.tables.changelog_topics
        )

    async def _highwaters(self, partitions: list[Any]) -> Any:
        # Recovery reads a changelog partition until it has applied the record at highwater-1.
        # Faust 0.15.3 takes a transactional app's highwaters from the consumer's fetch state
        # (`last_stable_offset`), which is empty for a partition not fetched since the last
        # rebalance: the highwater reads -1. Recovery then thinks there is nothing to read (a
        # table, the governance parameters among them, starts incomplete), and a table already
        # holding offset 9 of a partition fails the consistency check ("9 > -1") when an
        # instance joins or leaves the group. The end offset the broker reports is no better:
        # below it lie transaction markers and, after an instance was killed, the records of its
        # aborted transactions, which recovery never sees. Faust checks for that only once its
        # changelog queue has been idle for ten seconds, which never happens while another
        # instance writes the tables: the instance would recover for ever. So the highwater is
        # the offset after the last committed record.
        ends = await self._ensure_consumer().end_offsets(partitions)
        by_kafka_tp = {TopicPartition(tp.topic, tp.partition): tp for tp in ends}
        try:
            after = await asyncio.wait_for(
                after_last_committed(
                    self.app.kafka_settings,
                    {kafka_tp: ends[tp] for kafka_tp, tp in by_kafka_tp.items()},
                ),
                timeout=self.app.conf.broker_request_timeout,
            )
        except (KafkaError, TimeoutError) as error:
            log.warning("changelog tails unread (%r): recovery waits on the end offsets", error)
            return ends
        return {by_kafka_tp[kafka_tp]: offset for kafka_tp, offset in after.items()}

    async def _seek_wait(self, consumer: Any, partitions: Mapping[Any, int | None]) -> None:
        # Faust 0.15.3 seeks the standby changelog partitions it holds, including one a
        # rebalance added while recovery ran, whose start offset was never built: it is still
        # None, aiokafka's seek raises ValueError and the worker crashes. A partition with
        # nothing read yet starts from its beginning, as a built offset of -1 would have.
        unread = [tp for tp, offset in partitions.items() if offset is None or offset < 0]
        if unread:
            # aiokafka's seek_to_beginning takes its own TopicPartition only, not Faust's TP.
            await consumer.seek_to_beginning(
                *(TopicPartition(tp.topic, tp.partition) for tp in unread)
            )
        read_offsets = self.consumer._read_offset
        for tp, offset in partitions.items():
            if tp in unread:
                read_offsets.pop(tp, None)
                continue
            consumer.seek(tp, offset)
            if offset > 0:
                read_offsets[tp] = offset
            else:
                read_offsets.pop(tp, None)
        await asyncio.wait_for(
            asyncio.gather(*[consumer.position(tp) for tp in partitions]),
            timeout=self.app.conf.broker_request_timeout,
        )


class _Consumer(faust_aiokafka.Consumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lost_heads: dict[Any, int] = {}

    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _new_offset(self, tp: Any) -> int | None:
        # Faust 0.15.3 commits the first run of consecutive offsets among those acknowledged,
        # after adding the offsets its gaps cover (transaction markers between records). A gap
        # it records ends at the record that revealed it, which is acknowledged as well: the
        # offset appears twice, the run ends there, and each commit advances by one
        # transaction. Behind any backlog the group's offsets then fall ever further behind
        # (seen: committed 169 with every offset up to 627 done). Merge the gaps here and drop
        # the duplicates, so a commit covers everything done.
        merge_acknowledged(self._acked[tp], self._gap.get(tp))
        return super()._new_offset(tp)

    async def _commit_offsets(self, offsets: Mapping[Any, int],
                              start_new_transaction: bool = True) -> bool:
        # Table writes wait in the producer's buffer (`send_soon`) until a background task sends
        # them; Faust flushes it before a plain commit but not before a transactional one. A
        # write queued before its event was acknowledged could then miss the transaction that
        # commits the event, and after the last commit at stop it found no transaction open
        # (IllegalOperation): the buffer crashed and the instance exited 1. The offsets are
        # fixed by now, so every write of an event they cover is in the buffer or being sent.
        if self.in_transaction:
            buffer = self.app.producer.buffer
            await buffer.drain()
            if not start_new_transaction:
                buffer.closed = True
        return await super()._commit_offsets(offsets, start_new_transaction=start_new_transaction)

    async def force_commit(self, *args: Any, **kwargs: Any) -> bool:
        self._forget_revoked()
        await self._reread_lost_heads()
        return await super().force_commit(*args, **kwargs)

    def _forget_revoked(self) -> None:
        # A rebalance clears the acknowledgements of the partitions it revokes, but an agent
        # still holding one of their records acknowledges it afterwards. Committing that offset
        # would go through the partition's transactional producer, which its new owner has
        # fenced: Faust crashes the app. The new owner reads the record again instead.
        assigned = self.assignment()
        for tp in [tp for tp in self._acked if tp not in assigned]:
            self._forget_acknowledgements(tp)

    def _forget_acknowledgements(self, tp: Any) -> None:
        for state in (self._acked, self._acked_index, self._gap):
            state.pop(tp, None)

    async def _reread_lost_heads(self) -> None:
        # Faust commits a partition up to the first offset not yet acknowledged. After a member
        # was killed and the group rebalanced twice in a few seconds, an instance that kept a
        # partition was seen with committed offset 13 and every offset from 15 on acknowledged,
        # nothing in flight, and it never committed again. A rebalance clears a partition's
        # acknowledgements and seeks it to its committed offset; records fetched before the
        # seek and delivered after it would move the read offset past the records re-read
        # from there, which Faust then drops as already read. When two commits in a row find
        # such a hole with nothing in flight below it, read the partition again from its
        # committed offset: the agents are idempotent (ids), so a record processed twice is
        # counted once.
        # A record taken before the last rebalance and cleared from its agent's queue stays
        # unacknowledged for good: only this generation's records are in flight.
        generation = self.app.consumer_generation_id
        lost = holes_at_head(
            self._acked, self._gap, self._committed_offset,
            ((message.tp, message.offset) for message in self._unacked_messages
             if message.generation_id == generation),
        )
        seen, self._lost_heads = self._lost_heads, lost
        for tp, committed in lost.items():
            if seen.get(tp) != committed:
                continue
            log.warning("%s: offsets from %d were never acknowledged; reading them again",
                        tp, committed)
            self._forget_acknowledgements(tp)
            await self.seek(tp, committed)


def merge_acknowledged(acked: list[int], gaps: Any) -> None:
    """Add to `acked` (in place, sorted, without duplicates) the offsets that `gaps` (Faust's
    interval tree of offsets known to hold no record) covers up to its highest offset, and
    remove those intervals from `gaps`."""
    if acked and gaps:
        covered = [n for interval in gaps.overlap(0, max(acked))
                   for n in range(interval.begin, interval.end)]
        if covered:
            acked.extend(covered)
            gaps.chop(0, max(acked) + 1)
    acked[:] = sorted(set(acked))


def holes_at_head(
    acked: Mapping[Any, list[int]],
    gaps: Mapping[Any, Any],
    committed: Mapping[Any, int | None],
    in_flight: Iterable[tuple[Any, int]],
) -> dict[Any, int]:
    """The partitions Faust cannot commit and nothing will fix, each with its committed offset:
    the first offset acknowledged (or known to hold no record, an interval of `gaps`) lies more
    than one past the committed offset, and no record in flight lies below it."""
    waiting: dict[Any, int] = {}
    for tp, offset in in_flight:
        waiting[tp] = min(offset, waiting.get(tp, offset))
    holes = {}
    for tp, offsets in acked.items():
        at = committed.get(tp)
        starts = [*offsets, *(interval.begin for interval in gaps.get(tp, ()))]
        if not at or not starts:
            continue
        head = min(starts)
        if head - at > 1 and waiting.get(tp, head) >= head:
            holes[tp] = at
    return holes


class _TransactionManager(TransactionManager):
    async def on_rebalance(self, assigned: Any, revoked: Any, newly_assigned: Any) -> None:
        # Faust stops the transactional producers of the partitions it counts as revoked, and
        # after a member left and came back it counted none, so an instance kept the producers
        # of partitions that had moved away. Their new owner fenced them; when the partitions
        # came back, Faust reused the fenced producers and the instance crashed on its next send
        # ("Can't send messages while not in transaction"). Stop every producer whose
        # partitions are not in the new assignment.
        ours = self._tps_to_transactional_ids(assigned)
        stale = sorted(set(self.producer._transaction_producers) - ours)
        if stale:
            log.info("stopping the transactional producers of partitions moved away: %s", stale)
            await self._stop_transactions(stale)
        await super().on_rebalance(assigned, revoked, newly_assigned)


class _ProducerBuffer(ProducerBuffer):
    """Faust's buffer of table writes (`send_soon`), which a background task sends: drained
    before every transactional commit, and closed by the last one at stop."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._sending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False

    async def _send_pending(self, fut: FutureMessage) -> None:
        if self.closed:
            # Written by an event processed after the last commit: the event stays uncommitted
            # and its partition's next owner processes it again, writing this again.
            return
        self._sending += 1
        self._idle.clear()
        try:
            await super()._send_pending(fut)
        finally:
            self._sending -= 1
            if not self._sending:
                self._idle.set()

    async def drain(self) -> None:
        """Send every write queued, and wait for the one the background task is sending."""
        while True:
            try:
                fut = self.pending.get_nowait()
            except asyncio.QueueEmpty:
                break
            await self._send_pending(fut)
        await self._idle.wait()


class _Producer(faust_aiokafka.Producer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer = _ProducerBuffer(loop=self.loop, beacon=self.beacon)
        self.buffer.app = self.app


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer
    Producer = _Producer
    TransactionManager = _TransactionManager


class PipelineApp(faust.App):
    """faust.App with the stop order above, and changelog highwaters read from the broker."""

    def __init__(self, *args: Any, kafka_settings: Settings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stop_hooks: list[StopHook] = []
        self.kafka_settings = kafka_settings  # its principal: the app's own Kafka clients'

    def main(self) -> NoReturn:
        """Run the Faust worker, authenticated as its settings' principal (read only now, so
        building an app needs no credentials)."""
        self.conf.broker_credentials = faust_credentials(self.kafka_settings)
        super().main()

    def stop_first(self, hook: StopHook) -> StopHook:
        """Register `hook` to run (and be awaited) first when the app stops."""
        self._stop_hooks.append(hook)
        return hook

    def _new_transport(self) -> _Transport:
        return _Transport(self.conf.broker_consumer, self)

    async def on_stop(self) -> None:
        for hook in self._stop_hooks:
            try:
                await asyncio.wait_for(hook(), STOP_HOOK_TIMEOUT_S)
            except Exception:
                log.exception("stop hook %s failed", getattr(hook, "__qualname__", hook))
        await super().on_stop()

    async def _consumer_wait_empty(self, consumer: Any, logger: Any) -> None:
        if not self.in_transaction:
            await super()._consumer_wait_empty(consumer, logger)
            return
        logger.info("Wait for streams...")
        await _wait_streams(consumer, logger)
        if not self.should_stop:
            # Faust also waits here when a rebalance revokes partitions, and the agents go on
            # afterwards. Commit what the streams finished, in transactions that go on: Faust's
            # own wait ends them, and its periodic commit then commits into a producer with no
            # transaction open (IllegalOperation: the instance crashes). The partitions revoked
            # are committed here; their next owner's producers fence ours.
            await consumer.commit()
            return
        # Stopping: one last commit ends the transactions, after the last event is processed.
        await consumer.commit_and_end_transactions()
        # From here on an acknowledgement is not a processed event: the streams acknowledge
        # what flow control makes them skip and what they drop when cancelled. Committing
        # those would lose them, and would fail anyway (no transaction is open).
        consumer.commit = _no_commit
        await self.agents.stop()


async def _wait_streams(consumer: Any, logger: Any) -> None:
    """Faust's own wait loop (Consumer.wait_empty), minus its final commit that ends the
    transactions, and bounded: wait until the streams acknowledged what they took, committing
    as they go."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_TIMEOUT_S
    last_progress, waiting = loop.time(), len(consumer._unacked_messages)
    while consumer._unacked_messages:
        now = loop.time()
        if len(consumer._unacked_messages) < waiting:
            last_progress, waiting = now, len(consumer._unacked_messages)
        # An event read by two agents can stay unacknowledged for good (one agent's queue copy
        # was cleared when the flow stopped); stop waiting once nothing moves.
        if now > deadline or now - last_progress > DRAIN_STALL_S:
            stuck = Counter(message.topic for message in consumer._unacked_messages)
            logger.info("%s unprocessed, redone by the partitions' next owner", dict(stuck))
            break
        await consumer.commit()
        if not consumer._unacked_messages:
            break
        await consumer._wait_for_ack(timeout=1)
        consumer._clean_unacked_messages()


async def seek_to_committed(
    consumer: Any, changelog_topics: Iterable[str]
) -> dict[TopicPartition, int | None]:
    """Seek every assigned partition to its committed offset, and the stream partitions without
    one (or at 0) to their beginning; returns the committed offsets. Table changelogs are never
    committed: recovery and the standby reads keep their positions.

    When a rebalance stops the flow, Faust drops the records it has fetched and not yet handed
    to the streams, and relies on this seek to fetch them again. aiokafka's own seek skips the
    partitions with no committed offset above 0 and leaves them where the fetch left them: a
    partition that nobody had committed yet (its first owner was killed) kept its position past
    records that no one processed, and the group never committed it. They start again from the
    beginning, as `consumer_auto_offset_reset='earliest'` would have started them."""
    committed = await consumer.seek_to_committed()
    changelogs = set(changelog_topics)
    unset = [tp for tp, offset in committed.items() if not offset and tp.topic not in changelogs]
    if unset:
        await consumer.seek_to_beginning(*unset)
    return committed


async def _no_commit(*args: Any, **kwargs: Any) -> bool:
    return False


def consumer_group(settings: Settings) -> str:
    """The app's id, which is also its Kafka consumer group: one per stack (topic prefix)."""
    return f"{settings.topic_prefix}loraledger-pipeline"


def build_app(settings: Settings, replicas: int = 1) -> PipelineApp:
    """A Faust app with nothing registered on it yet; its own consumer and producers
    authenticate as the settings' principal. The topics it creates (table changelogs) get
    `replicas` copies (`infra.kafka.clients.cluster_replication` says how many a cluster gives;
    the brokers' `min.insync.replicas` applies to them)."""
    return PipelineApp(
        consumer_group(settings),
        kafka_settings=settings,
        broker=[f"kafka://{server}" for server in settings.kafka_bootstrap.split(",")],
        processing_guarantee="exactly_once",
        store="memory://",  # tables are rebuilt from their changelog topics on start
        datadir=str(settings.home / "faust"),
        topic_partitions=8,
        topic_replication_factor=replicas,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        autodiscover=False,
        # A restarted worker rejoins its group after the old session expires; Faust's 60 s
        # default would stall every restart for a minute.
        broker_session_timeout=10,
    )


def registry_topic(app: faust.App, name: str, topic_prefix: str) -> faust.TopicT:
    """A registry topic under `topic_prefix`, read as raw bytes: agents decode once at the
    boundary so that an invalid value goes to the dead letters instead of crashing the agent."""
    spec = topic_spec(name)
    return app.topic(
        spec.broker_name(topic_prefix),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=spec.partitions,
        internal=False,
    )
