"""`run_demo`: the steps in order, each timed and reported, with the worker and the pipeline
running around the requests."""

from __future__ import annotations

import asyncio
import shutil
import time

from rich.console import Console

from inference.adapter_store import AdapterStore
from inference.datanets import DatanetStore
from infra.clickhouse_client import get_client
from infra.kafka.broker import stop_broker
from infra.kafka.events import publish_sync
from infra.kafka.security import WORKER
from infra.keys import worker_registration
from infra.ledger_server.process import ledger_paths, stop_ledger
from infra.ledger_server.process import running_pid as ledger_pid
from infra.settings import Settings
from infra.stack import uses_local_ledger
from loraledger.demo.errors import DemoError
from loraledger.demo.options import DATANETS, DemoOptions
from loraledger.demo.processes import Service, child_env, running_services
from loraledger.demo.steps.base_model import ensure_base_model
from loraledger.demo.steps.collection import run_requests
from loraledger.demo.steps.datanets import prepare_datanet
from loraledger.demo.steps.ledger_check import check_ledger, wait_for_pipeline_commits
from loraledger.demo.steps.stack import broker_note, plan_broker, stack_up_in_subprocess
from loraledger.demo.steps.trace import build_trace
from loraledger.demo.steps.training import adapter_id_for, describe_adapter, ensure_adapters
from loraledger.demo.steps.workload import make_requests
from loraledger.demo.summary import DemoSummary
from loraledger.demo.ui import StepLog
from pipeline import queries
from pipeline.verify import verify_request

DEMO_WORKER_ID = "demo-worker"
SINK_WAIT_S = 30.0  # for the pipeline to commit past this run's events before it stops


def reset_demo_state(settings: Settings) -> None:
    """--fresh: forget the demo's datanets and adapters (the base model is rebuilt only when its
    preset changes: it is deterministic, so a rebuild would give the same weights)."""
    adapters = AdapterStore.from_settings(settings)
    for spec in DATANETS:
        shutil.rmtree(settings.datanets_dir / spec.name, ignore_errors=True)
        shutil.rmtree(adapters.adapter_dir(adapter_id_for(spec)).path, ignore_errors=True)


def run_demo(settings: Settings, options: DemoOptions, console: Console) -> DemoSummary:
    """Run every step; raises DemoError (or the failing piece's own error) on the first failure.
    The worker and pipeline always stop; the broker stops only if this run started it."""
    started = time.monotonic()
    settings.home.mkdir(parents=True, exist_ok=True)
    log_dir = settings.home / "demo-logs"
    log_dir.mkdir(exist_ok=True)
    if options.fresh:
        reset_demo_state(settings)
    steps = StepLog(console)
    plan = plan_broker(settings)
    # The ledger server, like the broker, is stopped at the end only if this run starts it.
    ledger_started_here = (uses_local_ledger(settings)
                           and ledger_pid(ledger_paths(settings)) is None)
    env = child_env(settings)
    try:
        with steps.step("stack") as outcome:
            note = broker_note(plan, settings, options.keep_running)
            stack_up_in_subprocess(plan, log_dir, env)
            outcome.append(note)

        with steps.step("base model") as outcome:
            source = ensure_base_model(settings, options.base_preset, console)
            outcome.append("cached" if source in ("cache", "up-to-date") else source)

        with steps.step("datanets") as outcome:
            store = DatanetStore(settings.datanets_dir)
            datanets = [prepare_datanet(settings, store, spec, options)
                        for spec in DATANETS[:options.adapters]]
            outcome.extend(prepared.describe() for prepared in datanets)

        with steps.step("adapters") as outcome:
            manifests, cached = ensure_adapters(settings, datanets, options.train, console)
            publish_sync(settings, [manifest.registration_event() for manifest in manifests])
            # The worker's key, registered as the worker (`workers register`): only the worker
            # and the admin may write `workers`.
            publish_sync(settings.as_principal(WORKER),
                         [worker_registration(settings.home, DEMO_WORKER_ID)])
            outcome.extend(describe_adapter(manifest, cached) for manifest in manifests)

        requests = make_requests(datanets, options)
        services = [
            Service("worker", ["worker", "--worker-id", DEMO_WORKER_ID, "--threads", "1",
                               "--log-level", "warning"], log_dir / "worker.log", env),
            # "error": a level both the command and Faust's own option parser accept.
            Service("pipeline", ["pipeline", "--log-level", "error"], log_dir / "pipeline.log",
                    env),
        ]
        with running_services(services), steps.step("inference and attribution") as outcome:
            collected = asyncio.run(
                run_requests(settings, requests, services, options.wait_timeout_s, console)
            )
            if not asyncio.run(wait_for_pipeline_commits(
                settings, collected.last_offsets, SINK_WAIT_S
            )):
                console.print(f"[yellow]the pipeline had not committed past this run's events "
                              f"after {SINK_WAIT_S:.0f}s; the ledger check below catches up")
            errors = sum(1 for result in collected.results.values() if result.status != "ok")
            outcome.append(f"{len(requests)} requests, {errors} errors, "
                           f"{sum(len(e) for e in collected.rewards.values())} reward entries")
        for service in services:
            warning = service.exit_warning()
            if warning:
                console.print(f"[yellow]{warning}")

        with steps.step("ledger") as outcome:
            client = get_client(settings)
            request_ids = [request.request_id for request in requests]
            ledger = check_ledger(client, collected, request_ids)
            outcome.append(ledger.describe())
            usage = queries.usage(client)
            rewards = queries.rewards(client)

        with steps.step("trace and verify") as outcome:
            trace = build_trace(client, collected, requests, datanets)
            report = verify_request(settings, trace.request.request_id)
            outcome.append(f"{trace.request.request_id}: {report.status}")
        if not report.ok:
            raise DemoError(f"verify of {trace.request.request_id} says {report.status}: "
                            f"{report.message or report.difference}")
        return DemoSummary(note, steps.done, len(requests), errors, ledger, usage,
                           rewards, trace, report, time.monotonic() - started)
    finally:
        if plan.started_here and not options.keep_running:
            stop_broker(settings)
        if ledger_started_here and not options.keep_running:
            stop_ledger(settings)
