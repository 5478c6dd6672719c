"""Step 1, the stack: reuse a broker that already answers or start the local one, then
`loraledger stack up` for the topics and the ClickHouse DDL."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from infra.kafka.broker import broker_paths, port_open, running_pid
from infra.settings import Settings
from loraledger.demo.errors import DemoError
from loraledger.demo.processes import REPO_ROOT, cli_command


@dataclass(frozen=True)
class BrokerPlan:
    start_local: bool  # False: a broker already answers at the bootstrap address
    started_here: bool  # True: this demo starts it, so it stops it at the end


def plan_broker(settings: Settings) -> BrokerPlan:
    if running_pid(broker_paths(settings)) is not None:
        return BrokerPlan(start_local=True, started_here=False)  # this home's broker: reuse
    if port_open(settings.kafka_bootstrap):
        return BrokerPlan(start_local=False, started_here=False)
    return BrokerPlan(start_local=True, started_here=True)


def broker_note(plan: BrokerPlan, settings: Settings, keep_running: bool) -> str:
    """Which broker the run uses and whether it is left running, for the step and summary."""
    if not plan.start_local:
        return (f"a broker already answers at {settings.kafka_bootstrap}: using it "
                "(not started by the demo, left running)")
    if plan.started_here:
        return f"started the local broker at {settings.kafka_bootstrap}" + (
            ", left running (--keep-running)" if keep_running else ", stopped when the demo ends"
        )
    return (f"this home's broker already runs at {settings.kafka_bootstrap}: "
            "reusing it (left running)")


def stack_up_in_subprocess(
    plan: BrokerPlan, log_dir: Path, env: dict[str, str]
) -> None:
    """`stack_up` in a child process, its output in a log: a failure shows as one line."""
    args = ["stack", "up"] if plan.start_local else ["stack", "up", "--external"]
    log_path = log_dir / "stack-up.log"
    with log_path.open("w") as log:
        completed = subprocess.run(
            cli_command(*args), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT
        )
    if completed.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
        raise DemoError(f"`loraledger stack up` failed: {tail[0]} (log: {log_path})")
