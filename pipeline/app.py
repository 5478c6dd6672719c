"""The one Faust app. Agents live in their own modules and register on it when imported
(`pipeline.agents` imports them all); topics and tables are declared next to their agents."""

from __future__ import annotations

import faust

from infra.settings import load_settings

settings = load_settings()

app = faust.App(
    f"{settings.topic_prefix}loraledger-pipeline",
    broker=[f"kafka://{server}" for server in settings.kafka_bootstrap.split(",")],
    processing_guarantee="exactly_once",
    store="memory://",  # tables are rebuilt from their changelog topics on start
    datadir=str(settings.home / "faust"),
    topic_partitions=8,
    topic_replication_factor=1,
    consumer_auto_offset_reset="earliest",
    web_enabled=False,
    autodiscover=False,
    # A restarted worker rejoins its group after the old session expires; Faust's 60 s default
    # would stall every restart for a minute.
    broker_session_timeout=10,
)


def topic(name: str) -> faust.TopicT:
    """A registry topic under this stack's prefix, read as raw bytes: agents decode once at the
    boundary so that an invalid value goes to the dead letters instead of crashing the agent."""
    from schemas.topics import topic_spec

    spec = topic_spec(name)
    return app.topic(
        spec.broker_name(settings.topic_prefix),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=spec.partitions,
        internal=False,
    )
