"""Provisioning a secured broker as its admin: the principals' SCRAM credentials and the ACLs of
a stack (`infra.kafka.acls`). Both are idempotent: running them again changes nothing but the
stored salts.

aiokafka's admin client has neither call, so they go through its client with the Kafka
protocol's own requests (AlterUserScramCredentials, CreateAcls, DescribeAcls).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterable

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import for_code
from aiokafka.protocol.admin import (
    CreateAclsRequest_v1,
    CreateAclsResponse_v1,
    DescribeAclsRequest_v1,
    DescribeAclsResponse_v1,
)
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactBytes,
    CompactString,
    Int8,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from infra.kafka.acls import Acl, stack_acls
from infra.kafka.security import ADMIN, PRINCIPALS, kafka_client_options, password_for
from infra.settings import Settings
from schemas.topics import TOPICS

SCRAM_SHA_512 = 2  # Kafka's code for the mechanism
SCRAM_ITERATIONS = 8192
_LITERAL, _PREFIXED = 3, 4
_ALLOW = 3
_ANY_HOST = "*"


class ProvisioningError(RuntimeError):
    """The broker refused a provisioning request."""


class _AlterUserScramCredentialsResponse(Response):
    API_KEY = 51
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("results", CompactArray(
            ("user", CompactString("utf-8")),
            ("error_code", Int16),
            ("error_message", CompactString("utf-8")),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


class _AlterUserScramCredentialsStruct(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 51
    API_VERSION = 0
    RESPONSE_TYPE = _AlterUserScramCredentialsResponse
    SCHEMA = Schema(
        ("deletions", CompactArray(
            ("name", CompactString("utf-8")),
            ("mechanism", Int8),
            ("tags", TaggedFields),
        )),
        ("upsertions", CompactArray(
            ("name", CompactString("utf-8")),
            ("mechanism", Int8),
            ("iterations", Int32),
            ("salt", CompactBytes),
            ("salted_password", CompactBytes),
            ("tags", TaggedFields),
        )),
        ("tags", TaggedFields),
    )


class _AlterUserScramCredentials(Request[_AlterUserScramCredentialsStruct]):
    API_KEY = 51

    def __init__(self, passwords: dict[str, str]) -> None:
        self._passwords = passwords

    def build(
        self, request_struct_class: type[_AlterUserScramCredentialsStruct]
    ) -> _AlterUserScramCredentialsStruct:
        upsertions = []
        for name, password in self._passwords.items():
            salt = os.urandom(32)
            # SCRAM's Hi(): PBKDF2 with the mechanism's hash; the broker derives the rest.
            salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, SCRAM_ITERATIONS)
            upsertions.append((name, SCRAM_SHA_512, SCRAM_ITERATIONS, salt, salted, {}))
        return request_struct_class([], upsertions, {})


class CreateAcls(Request[CreateAclsRequest_v1]):
    API_KEY = 30

    def __init__(self, acls: list[Acl]) -> None:
        self._acls = acls

    def build(self, request_struct_class: type[CreateAclsRequest_v1]) -> CreateAclsRequest_v1:
        return request_struct_class([
            (int(acl.resource), acl.name, _PREFIXED if acl.prefixed else _LITERAL,
             acl.kafka_principal, _ANY_HOST, int(acl.operation), _ALLOW)
            for acl in self._acls
        ])


class _DescribeAcl(Request[DescribeAclsRequest_v1]):
    """The filter that matches exactly one rule."""

    API_KEY = 29

    def __init__(self, acl: Acl) -> None:
        self._acl = acl

    def build(self, request_struct_class: type[DescribeAclsRequest_v1]) -> DescribeAclsRequest_v1:
        acl = self._acl
        return request_struct_class(
            int(acl.resource), acl.name, _PREFIXED if acl.prefixed else _LITERAL,
            acl.kafka_principal, _ANY_HOST, int(acl.operation), _ALLOW,
        )


def _raise_for(code: int, message: str | None, what: str) -> None:
    if code:
        error = for_code(code)
        raise ProvisioningError(f"{what}: {error.__name__}: {message or error.description}")


async def _admin_client(settings: Settings) -> AIOKafkaClient:
    client = AIOKafkaClient(
        bootstrap_servers=settings.kafka_bootstrap,
        request_timeout_ms=15_000,
        **kafka_client_options(settings.as_principal(ADMIN)),
    )
    await client.bootstrap()
    return client


async def upsert_scram_users(settings: Settings, principals: Iterable[str] = PRINCIPALS) -> None:
    """Set each principal's SCRAM-SHA-512 credential to its password (admin's own included:
    a broker formatted without it gets it here)."""
    passwords = {principal: password_for(settings, principal) for principal in principals}
    client = await _admin_client(settings)
    try:
        response: _AlterUserScramCredentialsResponse = await client.send(
            client.get_random_node(), _AlterUserScramCredentials(passwords)
        )
    finally:
        await client.close()
    for user, code, message, _tags in response.results:
        _raise_for(code, message, f"setting the credentials of {user}")


async def provision_acls(
    settings: Settings, topics: Iterable[str] | None = None, timeout_s: float = 30.0
) -> int:
    """Create the ACLs of the stack under the settings' topic prefix (for the registry's topics,
    or `topics`) and wait until the broker enforces them; returns how many rules there are."""
    acls = stack_acls(settings.topic_prefix, list(topics or TOPICS))
    client = await _admin_client(settings)
    try:
        node = client.get_random_node()
        created: CreateAclsResponse_v1 = await client.send(node, CreateAcls(acls))
        for code, message in created.creation_responses:
            _raise_for(code, message, "creating the ACLs")
        # The broker applies the rules from the metadata log in order: once it reports the
        # last one, it enforces them all.
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            found: DescribeAclsResponse_v1 = await client.send(node, _DescribeAcl(acls[-1]))
            _raise_for(found.error_code, found.error_message, "reading the ACLs back")
            if found.resources:
                return len(acls)
            if asyncio.get_running_loop().time() > deadline:
                raise ProvisioningError(f"the broker did not apply the ACLs within {timeout_s}s")
            await asyncio.sleep(0.1)
    finally:
        await client.close()


async def provision(settings: Settings) -> int:
    """Credentials and ACLs for the settings' stack; returns the number of ACL rules."""
    await upsert_scram_users(settings)
    return await provision_acls(settings)
