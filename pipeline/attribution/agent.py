"""The attribution processor: `results` -> `attributions`, `rewards` (and `dead-letters`),
exactly once.

It runs inside the pipeline's Faust worker as a task (`register`), but delivers through its
own transactional consume -> produce loop (`pipeline.attribution.loop` says why Faust's
exactly-once mode cannot cover it). A result's attribution record and its reward entries are
computed together (`pipeline.attribution.processing`) and committed in one transaction with
the result's offset, so every attributed request is paid exactly once, with no join between
topics and no table to recover. Consumer group `<prefix>loraledger-attribution`;
transactional id `<prefix>loraledger-attribution-<worker id>`, so run one attribution worker
per LORALEDGER_WORKER_ID. It authenticates as the processor principal, the only one the broker
lets write `attributions` and `rewards`.

Parameters come from the `ParameterSource` it is given. When that is governance's (a Faust
table), the processor starts only once the source is ready, that is once Faust has recovered
its tables: a result priced before that would be paid with the defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import ConsumerRecord
from aiokafka.errors import ProducerFenced

from infra.kafka.events import Outgoing
from infra.kafka.security import PROCESSOR
from infra.settings import Settings
from pipeline.app import PipelineApp
from pipeline.attribution.artifacts import ArtifactCache
from pipeline.attribution.loop import LoopConfig, run_transactional_loop
from pipeline.attribution.parameters import ParameterSource
from pipeline.attribution.processing import process_result

log = logging.getLogger(__name__)

RESTART_DELAY_S = 5.0


def loop_config(settings: Settings) -> LoopConfig:
    group = f"{settings.topic_prefix}loraledger-attribution"
    return LoopConfig(
        source="results", group_id=group, transactional_id=f"{group}-{settings.worker_id}"
    )


async def run_attribution(
    settings: Settings, parameters: ParameterSource, stop: asyncio.Event | None = None
) -> None:
    """Attribute results until `stop` is set (or the task is cancelled)."""
    settings = settings.acting_as(PROCESSOR)
    cache = ArtifactCache(settings.adapters_dir)

    def handle(record: ConsumerRecord) -> list[Outgoing]:
        return process_result(
            record.value,
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            parameters=parameters.current_parameters(),
            cache=cache,
            pricing=parameters.parameters_for_epoch,
            epoch_seconds=settings.epoch_seconds,
        )

    await run_transactional_loop(settings, loop_config(settings), handle, stop=stop)


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
        stops or when a newer worker with the same worker id has fenced this one (two would
        fight over one transactional id)."""
        self._started.set()
        try:
            if not await self._parameters_ready():
                return
            while not self._stop_requested.is_set():
                try:
                    await run_attribution(self.settings, self.parameters, self._stop_requested)
                    return
                except ProducerFenced:
                    log.error(
                        "attribution stopped: another worker with id %s took over",
                        self.settings.worker_id,
                    )
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
