"""The commands that make and register keys, and the vote that signs with one: what they
publish verifies against what they registered."""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner

from infra.kafka.events import read_topic
from loraledger.cli import app
from schemas.codec import parse_object
from schemas.events import Vote, VoterKeyRegistered, WorkerRegistered
from schemas.signatures import signature_problem

pytestmark = pytest.mark.integration


async def _logged(settings, topic: str) -> list:
    return [(d.event, parse_object(d.record.value))
            async for d in read_topic(settings, topic, idle_timeout_s=1.0) if d.event is not None]


def test_a_cli_vote_is_signed_with_the_registered_key(kafka_settings, stack_env, tmp_path):
    env = {**stack_env, "LORALEDGER_HOME": str(tmp_path)}
    runner = CliRunner()
    refused = runner.invoke(app, ["governance", "vote", "p1", "--voter", "alice", "--yes"],
                            env=env)
    assert refused.exit_code == 2 and "governance keygen" in refused.output
    for args in (["governance", "keygen", "--voter", "alice"],
                 ["governance", "register-key", "--voter", "alice"],
                 ["governance", "vote", "p1", "--voter", "alice", "--yes"],
                 ["workers", "register", "--worker-id", "gpu-7"]):
        done = runner.invoke(app, args, env=env)
        assert done.exit_code == 0, done.output

    governance = asyncio.run(_logged(kafka_settings, "governance"))
    (key,) = [event for event, _ in governance if isinstance(event, VoterKeyRegistered)]
    (vote, payload), = [(e, p) for e, p in governance if isinstance(e, Vote)]
    assert (key.voter_id, vote.voter_id) == ("alice", "alice")
    assert signature_problem(payload, key.public_key) is None
    (worker, _), = asyncio.run(_logged(kafka_settings, "workers"))
    assert isinstance(worker, WorkerRegistered) and worker.worker_id == "gpu-7"
    assert (tmp_path / "keys" / "workers" / "gpu-7.ed25519").is_file()
