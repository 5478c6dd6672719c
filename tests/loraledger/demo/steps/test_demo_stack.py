"""The stack step: which broker a run uses."""

from __future__ import annotations

import socket

from infra.settings import load_settings
from loraledger.demo.steps.stack import plan_broker


def test_plan_broker_uses_a_broker_that_already_answers(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        settings = load_settings({"LORALEDGER_HOME": str(tmp_path),
                                  "KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"})
        plan = plan_broker(settings)
        assert not plan.start_local and not plan.started_here
    plan = plan_broker(settings)  # nothing listens now: the demo starts and stops its own
    assert plan.start_local and plan.started_here
