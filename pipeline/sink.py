"""The ClickHouse sink agent: results, attributions, reward entries and governance events into
the ledger, in batches.

The sink never drops an event. A failed write (the ledger's disk full, the server away) is
retried with a capped backoff for as long as the process runs, and the agent does not take
the next batch meanwhile: Faust acknowledges a batch only when the loop body has returned, so
an offset never commits past an event that is not written. Letting the exception escape
instead would end the agent, and Faust would acknowledge the batch on the way out.

The sink cannot join the Kafka transaction, so it is idempotent instead: LedgerWriter inserts
only rows whose deterministic ids are not stored yet, so a batch redelivered after a crash
(written, but its offsets not committed) or written again after a failure part-way adds
nothing. Undecodable values are skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import faust

from infra.clickhouse_client import DEFAULT_DATABASE, apply_ddl, get_client
from infra.settings import Settings
from pipeline.ledger import LEDGER_EVENTS, LedgerWriter
from schemas.codec import DecodeError, decode
from schemas.topics import topic_name

log = logging.getLogger(__name__)

SINK_TOPICS = (
    "results", "attributions", "rewards", "governance", "governance-decisions",
)
BATCH_SIZE = 1000
BATCH_WITHIN_S = 1.0
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 30.0  # the wait between two attempts never grows past this

T = TypeVar("T")


async def until_done(
    call: Callable[[], T],
    what: str,
    *,
    first_delay_s: float = RETRY_FIRST_DELAY_S,
    max_delay_s: float = RETRY_MAX_DELAY_S,
) -> T:
    """`call()` in a worker thread (the embedded engine's calls block, and the event loop must
    keep answering the broker) until it returns, doubling the wait after each failure up to
    `max_delay_s`, with one warning per failure. Only cancellation ends it early."""
    delay = first_delay_s
    attempt = 1
    while True:
        try:
            return await asyncio.to_thread(call)
        except Exception as exc:
            log.warning("%s failed (attempt %d), retrying in %.3g s: %s",
                        what, attempt, delay, str(exc).splitlines()[0] if str(exc) else exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay_s)
        attempt += 1


def _writer(settings: Settings) -> LedgerWriter:
    client = get_client(settings)
    apply_ddl(client, DEFAULT_DATABASE)
    return LedgerWriter(client, DEFAULT_DATABASE)


def register(app: faust.App, settings: Settings) -> None:
    """Declare the sink's channel and agent on `app`."""
    logical = {topic_name(name, settings.topic_prefix): name for name in SINK_TOPICS}
    channel = app.topic(
        *logical,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )

    @app.agent(channel, name="ledger-sink")
    async def sink(stream: faust.StreamT) -> None:
        writer = await until_done(partial(_writer, settings), "opening the ledger")
        async for batch in stream.take_events(BATCH_SIZE, within=BATCH_WITHIN_S):
            events = []
            for event in batch:
                try:
                    decoded = decode(logical[event.message.topic], event.value)
                except DecodeError:
                    # Skipped, not dead-lettered: the processors reading these topics do that
                    # (attribution: results; governance: rewards and both governance topics),
                    # and one dead letter per bad value is enough. No processor reads
                    # attributions: a bad one did not come from the attribution processor, and
                    # is skipped too.
                    continue
                if isinstance(decoded, LEDGER_EVENTS):
                    events.append(decoded)
            if events:
                await until_done(partial(writer.write, events),
                                 f"writing {len(events)} events to the ledger")
