"""The ClickHouse sink agent: results, attributions, reward entries and governance events into
the ledger, in batches.

The sink cannot join the Kafka transaction, so it is idempotent instead: LedgerWriter inserts
only rows whose deterministic ids are not stored yet, so a batch redelivered after a crash
(written, but its offsets not committed) adds nothing. Undecodable values are skipped.
"""

from __future__ import annotations

import asyncio

import faust

from infra.clickhouse_client import DEFAULT_DATABASE, apply_ddl, get_client
from infra.settings import Settings
from pipeline.ledger import LEDGER_EVENTS, LedgerWriter
from schemas.codec import DecodeError, decode
from schemas.topics import topic_name

SINK_TOPICS = (
    "results", "attributions", "rewards", "governance", "governance-decisions",
)
BATCH_SIZE = 1000
BATCH_WITHIN_S = 1.0


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
        writer = await asyncio.to_thread(_writer, settings)
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
                # The embedded engine's calls block; keep the event loop answering the broker.
                await asyncio.to_thread(writer.write, events)
