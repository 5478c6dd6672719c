"""The attribution processor: `results` -> `attributions`, `rewards` (and `dead-letters`),
exactly once.

It runs inside the pipeline's Faust worker as a task, but delivers through its own
transactional consume -> produce loop (`pipeline.attribution.loop` says why Faust's
exactly-once mode cannot cover it). A result's attribution record and its reward entries are
computed together (`pipeline.attribution.processing`) and committed in one transaction with
the result's offset, so every attributed request is paid exactly once, with no join between
topics and no table to recover. Consumer group `<prefix>loraledger-attribution`;
transactional id `<prefix>loraledger-attribution-<worker id>`, so run one attribution worker
per LORALEDGER_WORKER_ID. It authenticates as the processor principal, the only one the broker
lets write `attributions` and `rewards`.

When the governance agent runs in the same worker, fees are priced with its parameter history
(a Faust table), so the processor starts only once Faust has recovered its tables: a result
priced before that would be paid with the defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import ConsumerRecord
from aiokafka.errors import ProducerFenced

from infra.kafka.security import PROCESSOR
from infra.settings import Settings
from pipeline.app import app, settings
from pipeline.attribution.artifacts import ArtifactCache
from pipeline.attribution.loop import LoopConfig, run_transactional_loop
from pipeline.attribution.parameters import (
    current_parameters,
    governance_in_worker,
    parameters_for_epoch,
)
from pipeline.attribution.processing import Outgoing, process_result

log = logging.getLogger(__name__)


def loop_config(settings: Settings) -> LoopConfig:
    group = f"{settings.topic_prefix}loraledger-attribution"
    return LoopConfig(
        source="results", group_id=group, transactional_id=f"{group}-{settings.worker_id}"
    )


async def run_attribution(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Attribute results until `stop` is set (or the task is cancelled)."""
    settings = settings.acting_as(PROCESSOR)
    cache = ArtifactCache(settings.adapters_dir)

    def handle(record: ConsumerRecord) -> list[Outgoing]:
        return process_result(
            record.value,
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            parameters=current_parameters(),
            cache=cache,
            pricing=parameters_for_epoch,
            epoch_seconds=settings.epoch_seconds,
        )

    await run_transactional_loop(settings, loop_config(settings), handle, stop=stop)


RESTART_DELAY_S = 5.0

# Set when the worker stops; the processor then finishes its open transaction and returns.
_stop_requested = asyncio.Event()
_started = asyncio.Event()
_stopped = asyncio.Event()


async def _tables_recovered() -> bool:
    """Wait for Faust's first table recovery when governance's tables price the fees; False
    when the worker stops first."""
    if not governance_in_worker():
        return True
    recovered = asyncio.ensure_future(app.tables.recovery.completed.wait())
    stopping = asyncio.ensure_future(_stop_requested.wait())
    try:
        await asyncio.wait({recovered, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        recovered.cancel()
        stopping.cancel()
    return not _stop_requested.is_set()


@app.task
async def attribution_processor() -> None:
    """Keep the processor running through broker outages; stop for good when the worker stops
    or when a newer worker with the same worker id has fenced this one (two would fight over
    one transactional id)."""
    _started.set()
    try:
        if not await _tables_recovered():
            return
        while not _stop_requested.is_set():
            try:
                await run_attribution(settings, stop=_stop_requested)
                return
            except ProducerFenced:
                log.error(
                    "attribution stopped: another worker with id %s took over", settings.worker_id
                )
                return
            except Exception:
                log.exception(
                    "attribution processor failed; restarting in %.0f s", RESTART_DELAY_S
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_stop_requested.wait(), RESTART_DELAY_S)
    finally:
        _stopped.set()


@app.stop_first
async def stop_attribution() -> None:
    """Runs before Faust stops its consumer: the open transaction commits, then the loop's
    consumer and producer close."""
    _stop_requested.set()
    if _started.is_set():
        await _stopped.wait()
