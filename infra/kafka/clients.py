"""The one place Kafka clients are built: producers, consumers, admin clients, and the
registry's topics. Everything above asks these builders, so every client of the system has
the same delivery settings."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from infra.kafka.security import kafka_client_options
from infra.settings import Settings
from schemas.codec import MAX_VALUE_BYTES
from schemas.topics import TOPICS, topic_name


def make_admin(settings: Settings, **options: Any) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **kafka_client_options(settings), **options
    )


def make_producer(settings: Settings, transactional_id: str | None = None) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_idempotence=True,
        acks="all",
        transactional_id=transactional_id,
        max_request_size=MAX_VALUE_BYTES,
        **kafka_client_options(settings),
    )


def make_consumer(
    settings: Settings,
    topics: Iterable[str],
    group_id: str | None,
    *,
    from_beginning: bool = True,
    **options: Any,
) -> AIOKafkaConsumer:
    """A read-committed consumer of logical topics; offsets are committed by the caller,
    after the work (or inside a transaction)."""
    return AIOKafkaConsumer(
        *(topic_name(name, settings.topic_prefix) for name in topics),
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
        **kafka_client_options(settings),
        **options,
    )


MAX_REPLICAS = 3


@dataclass(frozen=True)
class Replication:
    """How a topic is replicated on a cluster of some size: up to three copies, and writes with
    acks=all need all but one of them, so one broker can be down without stopping producers."""

    replicas: int
    min_in_sync: int

    @classmethod
    def for_brokers(cls, brokers: int) -> Replication:
        replicas = max(1, min(MAX_REPLICAS, brokers))
        return cls(replicas, max(1, replicas - 1))

    def topic_config(self) -> dict[str, str]:
        return {"min.insync.replicas": str(self.min_in_sync)} if self.replicas > 1 else {}


async def cluster_replication(settings: Settings) -> Replication:
    """The replication the cluster at KAFKA_BOOTSTRAP can give, from its metadata."""
    admin = make_admin(settings)
    await admin.start()
    try:
        return await _replication(admin)
    finally:
        await admin.close()


async def _replication(admin: AIOKafkaAdminClient) -> Replication:
    return Replication.for_brokers(len((await admin.describe_cluster())["brokers"]))


async def ensure_topics(settings: Settings, names: Iterable[str] | None = None) -> list[str]:
    """Create the registry's topics under the settings' prefix, replicated as the cluster
    allows (`Replication`); returns the ones created."""
    specs = [TOPICS[name] for name in (names or TOPICS)]
    admin = make_admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        replication = await _replication(admin)
        wanted = [
            NewTopic(
                spec.broker_name(settings.topic_prefix),
                num_partitions=spec.partitions,
                replication_factor=replication.replicas,
                topic_configs=spec.topic_config() | replication.topic_config(),
            )
            for spec in specs
            if spec.broker_name(settings.topic_prefix) not in existing
        ]
        if wanted:
            # Another process may create them between our listing and our request.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
        return [topic.name for topic in wanted]
    finally:
        await admin.close()
