"""The secured broker refuses what a principal may not do: a forged result, activation or tally
from the client principal, a wrong password, an unauthenticated client, an anonymous request on
the controller port; and accepts each topic's rightful producer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from aiokafka.client import AIOKafkaClient
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAuthorizationFailedError

from infra.kafka.acls import Acl, Operation, Resource
from infra.kafka.broker import host_port
from infra.kafka.clients import make_producer
from infra.kafka.events import publish, read_topic
from infra.kafka.provisioning import CreateAcls
from infra.kafka.security import kafka_client_options, scram_enabled
from infra.settings import Settings
from schemas.events import (
    InferenceResult,
    ParameterChanges,
    Parameters,
    ParametersActivated,
    Proposal,
    ProposalTallied,
    Usage,
    Vote,
)
from schemas.topics import topic_name

pytestmark = pytest.mark.integration


@pytest.fixture
def secured(kafka_settings) -> Settings:
    if not scram_enabled(kafka_settings):
        pytest.fail("these tests need the secured broker: unset LORALEDGER_KAFKA_SECURITY")
    return kafka_settings


def forged_result() -> InferenceResult:
    return InferenceResult(
        request_id="req-forged", adapter_id="ad-1", status="ok", prompt="p", output_text="o",
        adapter_hash="0" * 64, worker_id="mallory",
        usage=Usage(prompt_tokens=2**32 - 1, completion_tokens=1),  # the schema's largest
    )


def forged_activation() -> ParametersActivated:
    return ParametersActivated(
        version=1, effective_epoch=0, created_at=datetime.now(UTC),
        parameters=Parameters(default_price_per_token=1000),
    )


def as_(settings: Settings, principal: str, events: list) -> int:
    return asyncio.run(publish(settings.as_principal(principal), events))


def logged(settings: Settings, topic: str) -> list:
    async def read() -> list:
        return [item.event async for item in read_topic(settings, topic, idle_timeout_s=1.0)]

    return asyncio.run(read())


def test_a_result_from_the_client_principal_is_refused(secured):
    with pytest.raises(TopicAuthorizationFailedError):
        as_(secured, "client", [forged_result()])
    assert logged(secured, "results") == []
    assert as_(secured, "worker", [forged_result()]) == 1
    assert [event.request_id for event in logged(secured, "results")] == ["req-forged"]


def test_an_activation_or_tally_from_the_client_principal_is_refused(secured):
    tally = ProposalTallied(proposal_id="p1", epoch=0, yes_weight=1, no_weight=0, passed=True)
    for decision in (forged_activation(), tally):
        with pytest.raises(TopicAuthorizationFailedError):
            as_(secured, "client", [decision])
    assert logged(secured, "governance-decisions") == []
    # The governance principal decides.
    assert as_(secured, "governance", [tally]) == 1
    assert logged(secured, "governance-decisions") == [tally]


def test_proposals_and_votes_from_the_client_principal_are_accepted(secured):
    proposal = Proposal(proposer_id="olga", epoch=3, changes=ParameterChanges(top_k=4))
    vote = Vote(proposal_id=proposal.proposal_id, voter_id="olga", support=True)
    assert as_(secured, "client", [proposal, vote]) == 2
    assert logged(secured, "governance") == [proposal, vote]
    # Nobody else proposes on a client's behalf.
    with pytest.raises(TopicAuthorizationFailedError):
        as_(secured, "worker", [proposal])


def test_attributions_and_rewards_are_the_processors_alone(secured):
    for principal in ("client", "worker", "governance", "sink"):
        producer_settings = secured.as_principal(principal)
        with pytest.raises(TopicAuthorizationFailedError):
            asyncio.run(_send_raw(producer_settings, "rewards"))
    asyncio.run(_send_raw(secured.as_principal("processor"), "rewards"))


async def _send_raw(settings: Settings, topic: str) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic_name(topic, settings.topic_prefix), b"{}", key=b"k")
    finally:
        await producer.stop()


async def _connects(settings: Settings, **options) -> bool:
    client = AIOKafkaClient(bootstrap_servers=settings.kafka_bootstrap,
                            request_timeout_ms=5000, **options)
    try:
        await asyncio.wait_for(client.bootstrap(), 20)
        return True
    except (KafkaError, TimeoutError):
        return False
    finally:
        await client.close()


def test_a_wrong_password_or_no_authentication_is_refused(secured):
    worker = kafka_client_options(secured.as_principal("worker"))
    assert asyncio.run(_connects(secured, **worker))
    wrong = {**worker, "sasl_plain_password": worker["sasl_plain_password"] + "x"}
    assert not asyncio.run(_connects(secured, **wrong))
    assert not asyncio.run(_connects(secured, security_protocol="PLAINTEXT"))


def test_the_controller_port_answers_no_anonymous_request(secured):
    """The local broker's controller listens on the next port; an unauthenticated client that
    reaches it must not be able to grant itself rights."""
    host, port = host_port(secured.kafka_bootstrap)
    grant = CreateAcls([Acl("ANONYMOUS", Resource.TOPIC, "*", Operation.WRITE)])

    async def attempt() -> None:
        conn = await create_conn(host, port + 1, request_timeout_ms=5000)
        try:
            await asyncio.wait_for(conn.send(grant), 10)
        finally:
            conn.close()

    with pytest.raises((KafkaConnectionError, ConnectionError, TimeoutError)):
        asyncio.run(attempt())
