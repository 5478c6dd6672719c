"""Who may do what on the broker: the ACLs of one stack (one topic prefix).

The broker runs the KRaft StandardAuthorizer with `allow.everyone.if.no.acl.found=false`, so a
principal may do only what a rule below allows (the admin is a super user and needs none). Each
topic is writable by its producers alone:

    requests, contributions, adapters, datanets,    client (clients, gateways, CLIs)
      governance (proposals, votes, voter keys)
    results, token-deltas                           worker
    workers (WorkerRegistered)                      worker (`workers register`); the admin
                                                    registers the local worker at `stack up`
    attributions, rewards                           processor
    governance-decisions (tallies, activations)     governance
    dead-letters                                    every component

and readable by its consumers; the client principal reads every topic (the CLI's `verify`,
`replay`, `events tail` and `governance show`, and the gateway, which writes `requests` and
reads `results`, `token-deltas` and `adapters`). The processor reads `requests`, `workers` and
`attributions` to their ends before each batch, so it may read them. The pipeline's Faust app
authenticates as governance when the governance agent runs in it (its tables' changelogs hold
the parameter history, so only governance may write them) and as sink otherwise.

Topic rules are literal (the exact broker name); consumer groups, transactional ids and the
Faust app's internal topics are matched by prefix, under the stack's topic prefix, so several
stacks share one cluster without sharing rights.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from infra.kafka.security import CLIENT, GOVERNANCE, PROCESSOR, SINK, WORKER

# The names the components use for their groups and transactional ids, under the topic prefix
# (tests check them against the components).
WORKER_GROUP = "loraledger-worker"
WORKER_TRANSACTIONS = "loraledger-worker."
ATTRIBUTION_GROUP = "loraledger-attribution"
ATTRIBUTION_TRANSACTIONS = "loraledger-attribution."
PIPELINE_APP = "loraledger-pipeline"  # the Faust app id: its group
PIPELINE_INTERNAL = "loraledger-pipeline-"  # its changelogs, internal topics, transactions
FAUST_LEADER_TOPIC = "loraledger-pipeline-__assignor-__leader"
GROUPS = "loraledger-"

TOPIC_WRITERS: dict[str, tuple[str, ...]] = {
    "requests": (CLIENT,),
    "results": (WORKER,),
    "token-deltas": (WORKER,),
    "workers": (WORKER,),
    "attributions": (PROCESSOR,),
    "rewards": (PROCESSOR,),
    "contributions": (CLIENT,),
    "adapters": (CLIENT,),
    "datanets": (CLIENT,),
    "governance": (CLIENT,),
    "governance-decisions": (GOVERNANCE,),
    "dead-letters": (CLIENT, WORKER, PROCESSOR, GOVERNANCE, SINK),
}

# Besides the client, which reads every topic.
TOPIC_READERS: dict[str, tuple[str, ...]] = {
    "requests": (WORKER, PROCESSOR),
    "results": (PROCESSOR, GOVERNANCE, SINK),
    "workers": (PROCESSOR,),
    "attributions": (PROCESSOR, GOVERNANCE, SINK),
    "rewards": (GOVERNANCE, SINK),
    "governance": (GOVERNANCE, SINK),
    "governance-decisions": (GOVERNANCE, SINK),
}


class Resource(IntEnum):
    """Kafka's resource type codes."""

    TOPIC = 2
    GROUP = 3
    TRANSACTIONAL_ID = 5


class Operation(IntEnum):
    """Kafka's ACL operation codes."""

    READ = 3
    WRITE = 4
    CREATE = 5
    DESCRIBE = 8
    DESCRIBE_CONFIGS = 10


@dataclass(frozen=True)
class Acl:
    """Allow `principal` `operation` on the resource named `name` (or every name starting with
    it, when `prefixed`)."""

    principal: str
    resource: Resource
    name: str
    operation: Operation
    prefixed: bool = False

    @property
    def kafka_principal(self) -> str:
        return f"User:{self.principal}"


def _each(principals: tuple[str, ...], resource: Resource, name: str,
          operations: tuple[Operation, ...], prefixed: bool = False) -> list[Acl]:
    return [Acl(principal, resource, name, operation, prefixed)
            for principal in principals for operation in operations]


def stack_acls(prefix: str, topics: list[str]) -> list[Acl]:
    """Every rule for the stack whose topics are `topics` (logical names) under `prefix`."""
    rules: list[Acl] = []
    for topic in topics:
        name = f"{prefix}{topic}"
        rules += _each(TOPIC_WRITERS[topic], Resource.TOPIC, name, (Operation.WRITE,))
        rules += _each((CLIENT, *TOPIC_READERS.get(topic, ())), Resource.TOPIC, name,
                       (Operation.READ,))
    rules += _each((WORKER,), Resource.GROUP, prefix + WORKER_GROUP, (Operation.READ,))
    rules += _each((WORKER,), Resource.TRANSACTIONAL_ID, prefix + WORKER_TRANSACTIONS,
                   (Operation.WRITE, Operation.DESCRIBE), prefixed=True)
    rules += _each((PROCESSOR,), Resource.GROUP, prefix + ATTRIBUTION_GROUP, (Operation.READ,))
    rules += _each((PROCESSOR,), Resource.TRANSACTIONAL_ID, prefix + ATTRIBUTION_TRANSACTIONS,
                   (Operation.WRITE, Operation.DESCRIBE), prefixed=True)
    faust_app = (GOVERNANCE, SINK)
    internal_topic = (Operation.CREATE, Operation.READ, Operation.WRITE, Operation.DESCRIBE,
                      Operation.DESCRIBE_CONFIGS)
    rules += _each(faust_app, Resource.GROUP, prefix + PIPELINE_APP, (Operation.READ,))
    rules += _each(faust_app, Resource.TRANSACTIONAL_ID, prefix + PIPELINE_INTERNAL,
                   (Operation.WRITE, Operation.DESCRIBE), prefixed=True)
    rules += _each((GOVERNANCE,), Resource.TOPIC, prefix + PIPELINE_INTERNAL, internal_topic,
                   prefixed=True)
    rules += _each((SINK,), Resource.TOPIC, prefix + FAUST_LEADER_TOPIC, internal_topic)
    # Progress checks (the demo's, the tests') read the groups' committed offsets.
    rules += _each((CLIENT,), Resource.GROUP, prefix + GROUPS, (Operation.DESCRIBE,),
                   prefixed=True)
    return rules
