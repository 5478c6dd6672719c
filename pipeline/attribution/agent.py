"""The attribution processor: `results` -> `attributions`, `rewards` (and `dead-letters`),
exactly once.

It runs inside the pipeline's Faust worker as a task (`register`), but delivers through its
own transactional consume -> produce loop (`pipeline.attribution.loop` says why Faust's
exactly-once mode cannot cover it). A result's attribution record and its reward entries are
computed together (`pipeline.attribution.processing`) and committed in one transaction with
the result's offset, so every attributed request is paid exactly once, with no join between
topics and no table to recover. Consumer group `<prefix>loraledger-attribution`; one
transactional id per input partition (`pipeline.attribution.loop`), so any number of pipeline
instances share the work. It authenticates as the processor principal, the only one the broker
lets write `attributions` and `rewards`.

Before each batch it reads `requests`, `workers` and `attributions` up to their ends (a
`TopicFollower` each, read from the beginning at start, so the state survives restarts): a
result is paid only against facts in the log (`pipeline.attribution.facts`). A result's request
was written before the worker could read it, so once `requests` is read to its end a result
whose request is still missing has none: it is refused then, not held back.

Parameters come from the `ParameterSource` it is given, those of each result's epoch. When
that is governance's (a Faust table), the processor starts only once the source is ready, that
is once Faust has recovered its tables: a result attributed and priced before that would get
the defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from aiokafka import ConsumerRecord

from infra.kafka.clients import ensure_topics
from infra.kafka.events import Outgoing
from infra.kafka.follower import TopicFollower
from infra.kafka.security import PROCESSOR
from infra.settings import Settings
from pipeline.app import PipelineApp
from pipeline.attribution.artifacts import ArtifactCache
from pipeline.attribution.facts import Facts
from pipeline.attribution.loop import LoopConfig, run_transactional_loop
from pipeline.attribution.parameters import ParameterSource
from pipeline.attribution.processing import Origin, process_result
from schemas.topics import LOG_APPEND_TIME_TYPE

log = logging.getLogger(__name__)

RESTART_DELAY_S = 5.0
# What a result is checked against before it is paid.
FACT_TOPICS = ("requests", "workers", "attributions")


def broker_time(record: ConsumerRecord) -> datetime | None:
    """When the broker appended `record`; None when the time it carries is its producer's."""
    if record.timestamp_type != LOG_APPEND_TIME_TYPE:
        return None
    return datetime.fromtimestamp(record.timestamp / 1000, UTC)


def loop_config(settings: Settings) -> LoopConfig:
    group = f"{settings.topic_prefix}loraledger-attribution"
    return LoopConfig(source="results", group_id=group)


async def run_attribution(
    settings: Settings, parameters: ParameterSource, stop: asyncio.Event | None = None
) -> None:
    """Attribute results until `stop` is set (or the task is cancelled)."""
    settings = settings.acting_as(PROCESSOR)
    cache = ArtifactCache(settings.adapters_dir)
    facts = Facts()
    await ensure_topics(settings, FACT_TOPICS)
    follower = TopicFollower(settings, FACT_TOPICS, facts.learn)

    async def prepare() -> None:
        facts.pending.clear()  # the previous batch is committed (and read back) or aborted
        await follower.catch_up()

    def handle(record: ConsumerRecord) -> list[Outgoing]:
        return process_result(
            record.value,
            origin=Origin(record.topic, record.partition, record.offset, broker_time(record)),
            facts=facts,
            cache=cache,
            pricing=parameters.parameters_for_epoch,
            epoch_seconds=settings.epoch_seconds,
        )

    await follower.start()
    try:
        await run_transactional_loop(
            settings, loop_config(settings), handle, stop=stop, prepare=prepare
        )
    finally:
        await follower.stop()


class AttributionTask:
    """The processor as a task of the Faust worker, and the stop hook that ends it first."""

    def __init__(self, settings: Settings, parameters: ParameterSource) -> None:
        self.settings = settings
        self.parameters = parameters
        # Set when the worker stops; the processor then finishes its open transaction and
        # returns.
        self._stop_requested = asyncio.Event()
        self._started = asyncio.Event()
        self._stopped = asyncio.Event()

    async def _parameters_ready(self) -> bool:
        """Wait until the parameter source is ready; False when the worker stops first."""
        ready = asyncio.ensure_future(self.parameters.ready())
        stopping = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            stopping.cancel()
        return not self._stop_requested.is_set()

    async def run(self) -> None:
        """Keep the processor running through broker outages; stop for good when the worker
        stops."""
        self._started.set()
        try:
            if not await self._parameters_ready():
                return
            while not self._stop_requested.is_set():
                try:
                    await run_attribution(self.settings, self.parameters, self._stop_requested)
                    return
                except Exception:
                    log.exception(
                        "attribution processor failed; restarting in %.0f s", RESTART_DELAY_S
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop_requested.wait(), RESTART_DELAY_S)
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        """Runs before Faust stops its consumer: the open transaction commits, then the loop's
        consumer and producer close."""
        self._stop_requested.set()
        if self._started.is_set():
            await self._stopped.wait()


def register(app: PipelineApp, settings: Settings, parameters: ParameterSource) -> None:
    """Run the processor as a task of `app`'s worker, priced and computed with `parameters`."""
    task = AttributionTask(settings, parameters)

    @app.task
    async def attribution_processor() -> None:
        await task.run()

    app.stop_first(task.stop)
