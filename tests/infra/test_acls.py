"""The ACL table: each topic writable by its producers alone, and the group, transaction and
internal-topic names it grants matching the names the components use."""

from __future__ import annotations

from aiokafka import TopicPartition

from inference.worker.service import group_id, transactional_id
from infra.kafka.acls import (
    ATTRIBUTION_GROUP,
    ATTRIBUTION_TRANSACTIONS,
    PIPELINE_APP,
    PIPELINE_INTERNAL,
    TOPIC_READERS,
    TOPIC_WRITERS,
    WORKER_GROUP,
    WORKER_TRANSACTIONS,
    Operation,
    Resource,
    stack_acls,
)
from infra.settings import load_settings
from pipeline.agents import build_pipeline
from pipeline.attribution.agent import loop_config
from schemas.topics import TOPICS

PREFIX = "stack2."


def _writers(topic: str) -> set[str]:
    return {
        acl.principal
        for acl in stack_acls(PREFIX, list(TOPICS))
        if acl.resource is Resource.TOPIC and acl.operation is Operation.WRITE
        and (acl.name == PREFIX + topic or (acl.prefixed and (PREFIX + topic).startswith(acl.name)))
    }


def test_every_registry_topic_has_its_writers_and_nothing_else_is_listed():
    assert set(TOPIC_WRITERS) == set(TOPICS)
    assert set(TOPIC_READERS) <= set(TOPICS)


def test_each_topic_is_writable_by_its_producers_alone():
    assert _writers("requests") == {"client"}
    assert _writers("results") == {"worker"}
    assert _writers("attributions") == _writers("rewards") == {"processor"}
    assert _writers("governance") == {"client"}
    assert _writers("governance-decisions") == {"governance"}
    assert _writers("token-deltas") == {"worker"}
    assert _writers("workers") == {"worker"}  # and the admin, a super user, at `stack up`
    assert _writers("datanets") == {"client"}
    assert _writers("dead-letters") == {"client", "worker", "processor", "governance", "sink"}


def test_rules_stay_under_the_stack_prefix():
    acls = stack_acls(PREFIX, list(TOPICS))
    assert all(acl.name.startswith(PREFIX) for acl in acls)
    assert "admin" not in {acl.principal for acl in acls}  # the super user needs none
    # Kafka refuses an empty prefixed name: with no topic prefix, prefixed rules still name one.
    assert all(acl.name for acl in stack_acls("", list(TOPICS)) if acl.prefixed)


def test_granted_names_are_the_ones_the_components_use():
    settings = load_settings({"LORALEDGER_TOPIC_PREFIX": PREFIX})
    assert group_id(settings) == PREFIX + WORKER_GROUP
    assert transactional_id(settings, TopicPartition("x", 3)).startswith(
        PREFIX + WORKER_TRANSACTIONS)
    attribution = loop_config(settings)
    assert attribution.group_id == PREFIX + ATTRIBUTION_GROUP
    assert attribution.transactional_id(TopicPartition("x", 3)).startswith(
        PREFIX + ATTRIBUTION_TRANSACTIONS)
    app = build_pipeline(settings)
    assert app.conf.id == PREFIX + PIPELINE_APP
    assert f"{app.conf.id}-parameter-history-changelog".startswith(PREFIX + PIPELINE_INTERNAL)
