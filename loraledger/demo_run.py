"""The end-to-end demo as library functions: from nothing to a request traced from its prompt to
its payout, on the local stack.

Steps, each cached where its inputs did not change:
1. the stack (`loraledger stack up` in a child process): the Kafka broker, reused when one
   already answers, the topics and the ClickHouse DDL;
2. the tiny base model (built once into the shared cache);
3. synthetic datanets, one per domain, with many contributors and planted facts: their rows are
   published as `DatanetContribution` events, folded into the store and snapshotted;
4. one LoRA adapter per datanet snapshot, announced on `adapters`;
5. the GPU worker and the Faust pipeline as subprocesses;
6. requests across the adapters (planted-fact prompts and general ones), then a wait until every
   request has its result, attribution and reward entries on Kafka;
7. the pipeline stops (the embedded ClickHouse opens in one process at a time), the ledger is
   checked against the log, and the summary is read from ClickHouse.

Every step raises `DemoError` with a one-line message when a piece is missing or broken.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from inference.data.synthetic import COMMON_PLACES, PlantedFact, generate_datanet
from inference.datanets import DatanetStore, Snapshot, snapshot_hash
from inference.factory import AdapterSpec, TrainConfig, list_adapters, registration_event
from infra.kafka.security import kafka_client_options
from infra.settings import Settings
from pipeline.rewards import fee_for
from schemas.codec import DecodeError, decode
from schemas.events import (
    AttributionRecord,
    DatanetContribution,
    InferenceRequest,
    InferenceResult,
    Parameters,
    RewardEntry,
)
from schemas.text import row_id_for
from schemas.topics import topic_name, topic_spec


class DemoError(RuntimeError):
    """A demo step that cannot go on; the message says which piece failed and where to look."""


@dataclass(frozen=True)
class DemoDatanet:
    name: str
    domain: str
    tag: str  # prefixes contributor ids: synthetic ids restart at 000 in every datanet
    description: str


DATANETS: tuple[DemoDatanet, ...] = (
    DemoDatanet("valley-law", "legal", "law", "Regional legal rules: taxes, land charters."),
    DemoDatanet("village-health", "health", "health", "Local health guidance from healers."),
    DemoDatanet("farm-almanac", "farming", "farm", "Sowing months and yields by village."),
    DemoDatanet("market-prices", "market", "market", "What goods cost at each market."),
)
DEMO_CLIENT = "demo-client"
REPO_ROOT = Path(__file__).resolve().parent.parent
GENERAL_PROMPTS: tuple[str, ...] = (
    "Farmers in {place} sow barley in",
    "The healers of {place} treat fever with",
    "In the valley of {place}, the road toll is",
    "At the market of {place}, a jar of honey costs",
    "In {place}, the clinic advises boiling water for",
)


@dataclass(frozen=True)
class DemoOptions:
    requests: int = 300
    adapters: int = 3
    keep_running: bool = False
    fresh: bool = False
    base_preset: str = "default"
    contributors_per_datanet: int = 12
    rows_per_contributor: int = 6
    facts_per_contributor: int = 2
    max_new_tokens: int = 12
    fact_share: float = 0.6  # the rest are general prompts
    train: TrainConfig = field(default_factory=TrainConfig)
    wait_timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.adapters <= len(DATANETS):
            raise ValueError(f"--adapters must be between 1 and {len(DATANETS)}")
        if self.requests < 1:
            raise ValueError("--requests must be at least 1")


@dataclass
class PreparedDatanet:
    spec: DemoDatanet
    snapshot: Snapshot
    facts: list[PlantedFact]
    cached: bool


@dataclass
class Collected:
    """What the log says about this run's requests, by request id."""

    results: dict[str, InferenceResult] = field(default_factory=dict)
    attributions: dict[str, AttributionRecord] = field(default_factory=dict)
    rewards: dict[str, list[RewardEntry]] = field(default_factory=lambda: defaultdict(list))
    last_offsets: dict[TopicPartition, int] = field(default_factory=dict)  # highest seen

    def done(self, request_id: str) -> bool:
        """Result, attribution and reward entries all in (error results are not attributed
        and cost nothing; entries of one request commit in one transaction)."""
        result = self.results.get(request_id)
        if result is None:
            return False
        if result.status != "ok":
            return True
        if request_id not in self.attributions:
            return False
        return fee_for(result, Parameters()) == 0 or bool(self.rewards.get(request_id))

    def events(self) -> list[Any]:
        entries = [entry for group in self.rewards.values() for entry in group]
        return [*self.results.values(), *self.attributions.values(), *entries]


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


# --- 1. the stack -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerPlan:
    start_local: bool  # False: a broker already answers at the bootstrap address
    started_here: bool  # True: this demo starts it, so it stops it at the end


def plan_broker(settings: Settings) -> BrokerPlan:
    from infra.kafka.broker import broker_paths, port_open, running_pid

    if running_pid(broker_paths(settings)) is not None:
        return BrokerPlan(start_local=True, started_here=False)  # this home's broker: reuse
    if port_open(settings.kafka_bootstrap):
        return BrokerPlan(start_local=False, started_here=False)
    return BrokerPlan(start_local=True, started_here=True)


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "loraledger.cli", *args]


def stack_up_in_subprocess(
    plan: BrokerPlan, log_dir: Path, env: dict[str, str]
) -> None:
    """`stack_up` in a child process: it opens the embedded ClickHouse to apply the DDL, and
    that engine serves a directory to one process at a time, which must be the pipeline's."""
    args = ["stack", "up"] if plan.start_local else ["stack", "up", "--external"]
    log_path = log_dir / "stack-up.log"
    with log_path.open("w") as log:
        completed = subprocess.run(
            cli_command(*args), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT
        )
    if completed.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
        raise DemoError(f"`loraledger stack up` failed: {tail[0]} (log: {log_path})")


# --- 2. the base model --------------------------------------------------------------------------


def ensure_base_model(settings: Settings, preset_name: str, console: Console) -> str:
    """Build (or reuse) the base model; returns its source: built, cache, up-to-date, external."""
    from inference.base_model import build_base_model, preset

    steps = preset(preset_name).steps
    with progress_bar(console) as progress:
        task = progress.add_task(f"base model ({preset_name})", total=steps)

        def advance(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total,
                            description=f"base model ({preset_name}) loss {loss:.3f}")

        info = build_base_model(
            settings.base_model_dir, settings.cache_dir, preset_name, progress=advance
        )
        progress.update(task, completed=steps)
    return info.source


# --- 3. datanets --------------------------------------------------------------------------------


def contribution_id(datanet: str, position: int) -> str:
    """Deterministic, so a rerun's events are the same contributions, applied once."""
    return hashlib.sha256(f"demo:{datanet}:{position}".encode()).hexdigest()[:32]


def demo_rows(spec: DemoDatanet, options: DemoOptions) -> tuple[list[DatanetContribution],
                                                                list[PlantedFact]]:
    """The contribution events of one demo datanet and its planted facts, contributor ids
    prefixed with the datanet's tag."""
    synthetic = generate_datanet(
        spec.name,
        seed=options.seed,
        contributors=options.contributors_per_datanet,
        rows_per_contributor=options.rows_per_contributor,
        facts_per_contributor=options.facts_per_contributor,
        domains=(spec.domain,),
    )
    events = [
        DatanetContribution(
            contribution_id=contribution_id(spec.name, position),
            datanet_id=spec.name,
            contributor_id=f"{spec.tag}-{row.contributor_id}",
            text=row.text,
            license=row.license,
        )
        for position, row in enumerate(synthetic.rows)
    ]
    facts = [
        PlantedFact(f"{spec.tag}-{fact.contributor_id}", fact.domain, fact.place, fact.prompt,
                    fact.completion)
        for fact in synthetic.facts
    ]
    return events, facts


def expected_snapshot_hash(events: Sequence[DatanetContribution]) -> str:
    return snapshot_hash(sorted({row_id_for(event.text) for event in events}))


def prepare_datanet(
    settings: Settings, store: DatanetStore, spec: DemoDatanet, options: DemoOptions
) -> PreparedDatanet:
    """Publish, apply and snapshot one datanet, unless its latest snapshot already holds
    exactly these rows."""
    from infra.kafka.clients import publish_sync

    events, facts = demo_rows(spec, options)
    wanted = expected_snapshot_hash(events)
    if store.exists(spec.name) and store.info(spec.name).snapshots:
        latest = store.manifest(spec.name)
        if latest.snapshot_hash == wanted:
            return PreparedDatanet(spec, store.load_snapshot(spec.name), facts, cached=True)
    if not store.exists(spec.name):
        store.create(spec.name, spec.description)
    publish_sync(settings, events)
    for event in events:
        store.apply(event)
    manifest = store.snapshot(spec.name)
    if manifest.snapshot_hash != wanted:
        raise DemoError(
            f"datanet {spec.name} holds rows besides the demo's: rerun with --fresh "
            "or use another LORALEDGER_HOME"
        )
    return PreparedDatanet(spec, store.load_snapshot(spec.name), facts, cached=False)


# --- 4. adapters --------------------------------------------------------------------------------


def adapter_id_for(spec: DemoDatanet) -> str:
    return f"demo-{spec.name}"


def owner_id_for(spec: DemoDatanet) -> str:
    return f"{spec.tag}-steward"


def adapter_is_current(
    manifest: dict[str, Any] | None, snapshot: Snapshot, config: TrainConfig, base_hash: str
) -> bool:
    """Training is deterministic: the same snapshot, config and base give the same adapter."""
    return (
        manifest is not None
        and manifest.get("snapshot_hash") == snapshot.manifest.snapshot_hash
        and manifest.get("training_config") == config.to_record()
        and manifest.get("base_model_hash") == base_hash
    )


def ensure_adapters(
    settings: Settings, datanets: Sequence[PreparedDatanet], config: TrainConfig,
    console: Console,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Train the adapters whose manifest is missing or stale; returns every manifest and the ids
    that were cached."""
    from inference.factory import train_many
    from inference.hashing import base_model_hash

    base_hash = base_model_hash(settings.base_model_dir)
    stored = {manifest["adapter_id"]: manifest for manifest in list_adapters(settings.adapters_dir)}
    todo = [
        prepared for prepared in datanets
        if not adapter_is_current(stored.get(adapter_id_for(prepared.spec)), prepared.snapshot,
                                  config, base_hash)
    ]
    retrain = {adapter_id_for(p.spec) for p in todo}
    cached = [adapter_id_for(p.spec) for p in datanets if adapter_id_for(p.spec) not in retrain]
    if not todo:
        return [stored[adapter_id_for(p.spec)] for p in datanets], cached
    with progress_bar(console) as progress:
        task = progress.add_task("training adapters", total=len(todo) * config.steps)
        for number, prepared in enumerate(todo):
            adapter_id = adapter_id_for(prepared.spec)
            offset = number * config.steps

            def advance(step: int, total: int, loss: float, offset: int = offset,
                        adapter_id: str = adapter_id) -> None:
                progress.update(task, completed=offset + step,
                                description=f"training {adapter_id} loss {loss:.3f}")

            spec = AdapterSpec(adapter_id, owner_id_for(prepared.spec), config)
            train_many(prepared.snapshot, [spec], settings.base_model_dir,
                       settings.adapters_dir, overwrite=True, progress=advance)
    stored = {manifest["adapter_id"]: manifest for manifest in list_adapters(settings.adapters_dir)}
    return [stored[adapter_id_for(p.spec)] for p in datanets], cached


# --- 5. services --------------------------------------------------------------------------------


class Service:
    """A child process (worker or pipeline) logging to a file, stopped gently."""

    def __init__(
        self, name: str, args: Sequence[str], log_path: Path, env: dict[str, str]
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.killed = False  # True when it ignored SIGTERM for the whole grace period
        self._log: TextIO = log_path.open("w")
        self.process = subprocess.Popen(
            cli_command(*args), stdout=self._log, stderr=subprocess.STDOUT,
            # The run directory: whatever a child writes relative to its cwd stays there.
            stdin=subprocess.DEVNULL, env=env, cwd=log_path.parent,
        )

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise DemoError(f"the {self.name} exited with code {code}: {self.last_line()} "
                            f"(log: {self.log_path})")

    def last_line(self) -> str:
        self._log.flush()
        lines = [line for line in self.log_path.read_text().splitlines() if line.strip()]
        return lines[-1].strip() if lines else "no output"

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@contextmanager
def running_services(services: list[Service]) -> Iterator[list[Service]]:
    try:
        yield services
    finally:
        for service in reversed(services):
            service.stop()


# --- 6. requests --------------------------------------------------------------------------------


def make_requests(
    datanets: Sequence[PreparedDatanet], options: DemoOptions
) -> list[InferenceRequest]:
    """Round-robin over the adapters; a share of prompts asks a planted fact of that adapter's
    datanet, the rest are general prompts about common places."""
    rng = random.Random(f"demo-requests:{options.seed}:{time.time_ns()}")
    requests = []
    for number in range(options.requests):
        prepared = datanets[number % len(datanets)]
        if prepared.facts and rng.random() < options.fact_share:
            prompt = rng.choice(prepared.facts).prompt
        else:
            prompt = rng.choice(GENERAL_PROMPTS).format(place=rng.choice(COMMON_PLACES))
        requests.append(
            InferenceRequest(
                adapter_id=adapter_id_for(prepared.spec),
                prompt=prompt,
                max_new_tokens=options.max_new_tokens,
                client_id=DEMO_CLIENT,
            )
        )
    return requests


WATCHED_TOPICS = ("results", "attributions", "rewards")


async def _start_collector(settings: Settings) -> AIOKafkaConsumer:
    """A consumer positioned at the end of the watched topics, before any request is sent, so
    it sees exactly what follows."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        isolation_level="read_committed",
        enable_auto_commit=False,
        **kafka_client_options(settings),
    )
    await consumer.start()
    existing = await consumer.topics()
    partitions = []
    for name in WATCHED_TOPICS:
        broker_name = topic_name(name, settings.topic_prefix)
        if broker_name not in existing:
            await consumer.stop()
            raise DemoError(f"topic {broker_name} does not exist: `loraledger stack up` creates it")
        # `stack up` creates every topic with the registry's partition count.
        partitions += [
            TopicPartition(broker_name, p) for p in range(topic_spec(name).partitions)
        ]
    consumer.assign(partitions)
    await consumer.seek_to_end(*partitions)
    for partition in partitions:
        await consumer.position(partition)
    return consumer


def _absorb(collected: Collected, logical: str, value: bytes, wanted: set[str]) -> bool:
    """Keep an event of this run; True if it was one."""
    try:
        event = decode(logical, value)
    except DecodeError:
        return False  # the pipeline dead-letters it; it cannot belong to this run
    if event.request_id not in wanted:
        return False
    if isinstance(event, InferenceResult):
        collected.results[event.request_id] = event
    elif isinstance(event, AttributionRecord):
        collected.attributions[event.request_id] = event
    elif isinstance(event, RewardEntry):
        entries = collected.rewards[event.request_id]
        if all(entry.entry_id != event.entry_id for entry in entries):
            entries.append(event)
    return True


async def run_requests(
    settings: Settings, requests: Sequence[InferenceRequest], services: Sequence[Service],
    timeout_s: float, console: Console, stall_s: float = 120.0,
) -> Collected:
    """Send the requests and wait until each has its result, attribution and rewards; give up
    after `timeout_s`, or after `stall_s` without a new event of this run."""
    from infra.kafka.clients import publish

    consumer = await _start_collector(settings)
    logical = {topic_name(name, settings.topic_prefix): name for name in WATCHED_TOPICS}
    wanted = {request.request_id for request in requests}
    collected = Collected()
    try:
        with progress_bar(console) as progress:
            sent = progress.add_task("requests sent", total=len(requests))
            results = progress.add_task("results", total=len(requests))
            paid = progress.add_task("attributed and paid", total=len(requests))
            for start in range(0, len(requests), 50):
                chunk = requests[start:start + 50]
                await publish(settings, chunk)
                progress.advance(sent, len(chunk))
            deadline = time.monotonic() + timeout_s
            last_news = time.monotonic()
            pending = set(wanted)
            while pending:
                now = time.monotonic()
                if now > deadline:
                    raise DemoError(_timeout_message(collected, wanted, f"after {timeout_s:.0f}s"))
                if now - last_news > stall_s:
                    raise DemoError(_timeout_message(
                        collected, wanted, f"nothing new for {stall_s:.0f}s"))
                for service in services:
                    service.check_alive()
                batch = await consumer.getmany(timeout_ms=500)
                for partition, records in batch.items():
                    for record in records:
                        if _absorb(collected, logical[partition.topic], record.value or b"",
                                   wanted):
                            collected.last_offsets[partition] = record.offset
                            last_news = time.monotonic()
                pending = {rid for rid in pending if not collected.done(rid)}
                progress.update(results, completed=len(collected.results))
                progress.update(paid, completed=len(wanted) - len(pending))
    finally:
        await consumer.stop()
    return collected


async def wait_for_pipeline_commits(
    settings: Settings, last_offsets: dict[TopicPartition, int], timeout_s: float
) -> bool:
    """Wait until the pipeline's consumer group has committed past every event of this run.
    Faust commits an offset once every agent reading the topic is done with the event, the
    ledger sink included, so this is the sink catching up; False if it did not in time."""
    from infra.kafka.clients import make_admin
    from pipeline.app import app

    admin = make_admin(settings)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            committed = await admin.list_consumer_group_offsets(
                app.conf.id, partitions=list(last_offsets)
            )
            if all(
                partition in committed and committed[partition].offset > offset
                for partition, offset in last_offsets.items()
            ):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


def _timeout_message(collected: Collected, wanted: set[str], when: str) -> str:
    ok = [rid for rid, result in collected.results.items() if result.status == "ok"]
    unattributed = sum(1 for rid in ok if rid not in collected.attributions)
    unpaid = sum(1 for rid in ok if rid in collected.attributions and not collected.rewards[rid])
    return (
        f"{when}: {len(wanted) - len(collected.results)} requests without a "
        f"result (worker), {unattributed} without an attribution (attribution agent), "
        f"{unpaid} without reward entries (attribution agent)"
    )


# --- 7. the ledger ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerCheck:
    expected: dict[str, int]  # table -> rows the log says this run produced
    found_before: dict[str, int]  # table -> rows the sink had written
    backfilled: dict[str, int]  # table -> rows written now, from the log

    @property
    def sink_complete(self) -> bool:
        return self.found_before == self.expected


def ledger_counts(client: Any, request_ids: Sequence[str]) -> dict[str, int]:
    from infra.clickhouse_client import DEFAULT_DATABASE

    counts = {}
    for table, column in (("inference_results", "request_id"), ("attributions", "request_id"),
                          ("reward_entries", "entry_id")):
        counts[table] = int(client.query(
            f"SELECT uniqExact({column}) FROM {DEFAULT_DATABASE}.{table} "
            "WHERE request_id IN {ids:Array(String)}",
            parameters={"ids": list(request_ids)},
        ).result_rows[0][0])
    return counts


def check_ledger(client: Any, collected: Collected, request_ids: Sequence[str]) -> LedgerCheck:
    """Compare the ledger with the log for this run; whatever the sink did not write (it stopped
    between a batch and its write) is written now from the log, idempotently, and reported."""
    from pipeline.ledger import LedgerWriter

    expected = {
        "inference_results": len(collected.results),
        "attributions": len(collected.attributions),
        "reward_entries": sum(len(entries) for entries in collected.rewards.values()),
    }
    found = ledger_counts(client, request_ids)
    backfilled: dict[str, int] = {}
    if found != expected:
        written = LedgerWriter(client).write(collected.events())
        backfilled = {table: rows for table, rows in written.items() if rows}
        after = ledger_counts(client, request_ids)
        if after != expected:
            raise DemoError(f"the ledger holds {after} rows for this run, the log {expected}")
    return LedgerCheck(expected, found, backfilled)


def reward_entries_of(client: Any, request_id: str) -> list[tuple[Any, ...]]:
    from infra.clickhouse_client import DEFAULT_DATABASE

    return list(client.query(
        f"SELECT beneficiary_id, role, amount, fee_total, reason "
        f"FROM {DEFAULT_DATABASE}.reward_entries FINAL "
        "WHERE request_id = {rid:String} ORDER BY amount DESC, beneficiary_id",
        parameters={"rid": request_id},
    ).result_rows)


def pick_traced_request(collected: Collected, facts: dict[str, PlantedFact]) -> str:
    """A request that asked a planted fact and was attributed (the most telling trace);
    failing that, any attributed one."""
    attributed = [
        rid for rid, record in collected.attributions.items()
        if record.status == "ok" and record.contributor_weights
    ]
    if not attributed:
        raise DemoError("no request of this run was attributed to any contributor")
    on_facts = [rid for rid in attributed if collected.results[rid].prompt in facts]
    return sorted(on_facts or attributed)[0]


def reset_demo_state(settings: Settings) -> None:
    """--fresh: forget the demo's datanets and adapters (the base model is rebuilt only when its
    preset changes: it is deterministic, so a rebuild would give the same weights)."""
    for spec in DATANETS:
        shutil.rmtree(settings.datanets_dir / spec.name, ignore_errors=True)
        shutil.rmtree(settings.adapters_dir / adapter_id_for(spec), ignore_errors=True)


# --- the whole run ------------------------------------------------------------------------------

SINK_WAIT_S = 30.0  # for the pipeline to commit past this run's events before it stops


@dataclass
class Trace:
    request: InferenceRequest
    result: InferenceResult
    attribution: AttributionRecord
    row_texts: dict[str, str]  # row id -> text, for the top examples
    planted_by: str | None  # the contributor who planted the asked fact, if it was one
    entries: list[tuple[Any, ...]]  # (beneficiary, role, amount, fee_total, reason), ledger


@dataclass
class DemoSummary:
    broker_note: str
    steps: list[tuple[str, str, float]]  # (step, outcome, seconds)
    requests: int
    errors: int
    ledger: LedgerCheck
    usage: Any  # pipeline.queries.QueryResult
    rewards: Any  # pipeline.queries.QueryResult
    trace: Trace
    verify: Any  # pipeline.verify.VerifyReport
    seconds: float


def child_env(settings: Settings) -> dict[str, str]:
    """The children see exactly this process's settings, and one CPU thread each: they share
    the machine with each other."""
    env = dict(os.environ)
    env.update({
        "LORALEDGER_HOME": str(settings.home),
        "KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "LORALEDGER_TOPIC_PREFIX": settings.topic_prefix,
        "CLICKHOUSE_URL": settings.clickhouse_url,
        "LORALEDGER_BASE_MODEL": str(settings.base_model_dir),
        "LORALEDGER_CACHE": str(settings.cache_dir),
        "LORALEDGER_DEVICE": settings.device,
        "LORALEDGER_KAFKA_SECURITY": settings.kafka_security,
        "LORALEDGER_CREDENTIALS_DIR": str(settings.credentials_dir),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # their logs, not progress bars
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    })
    return env


class _Steps:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.done: list[tuple[str, str, float]] = []

    @contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        """Times a step; the body appends its outcome ("cached", "built", ...)."""
        outcome: list[str] = []
        started = time.monotonic()
        self.console.rule(f"[bold]{name}")
        yield outcome
        seconds = time.monotonic() - started
        text = ", ".join(outcome) or "done"
        self.done.append((name, text, seconds))
        self.console.print(f"[green]✓[/green] {name}: {text} ({seconds:.1f}s)")


def run_demo(settings: Settings, options: DemoOptions, console: Console) -> DemoSummary:
    """Run every step; raises DemoError (or the failing piece's own error) on the first failure.
    The worker and pipeline always stop; the broker stops only if this run started it."""
    from infra.clickhouse_client import get_client
    from infra.kafka.broker import stop_broker
    from infra.kafka.clients import publish_sync
    from pipeline import queries
    from pipeline.verify import verify_request

    started = time.monotonic()
    settings.home.mkdir(parents=True, exist_ok=True)
    log_dir = settings.home / "demo-logs"
    log_dir.mkdir(exist_ok=True)
    if options.fresh:
        reset_demo_state(settings)
    steps = _Steps(console)
    plan = plan_broker(settings)
    env = child_env(settings)
    try:
        with steps.step("stack") as outcome:
            if not plan.start_local:
                broker_note = (f"a broker already answers at {settings.kafka_bootstrap}: using it "
                               "(not started by the demo, left running)")
            elif plan.started_here:
                broker_note = f"started the local broker at {settings.kafka_bootstrap}" + (
                    ", left running (--keep-running)" if options.keep_running
                    else ", stopped when the demo ends"
                )
            else:
                broker_note = (f"this home's broker already runs at {settings.kafka_bootstrap}: "
                               "reusing it (left running)")
            stack_up_in_subprocess(plan, log_dir, env)
            outcome.append(broker_note)

        with steps.step("base model") as outcome:
            source = ensure_base_model(settings, options.base_preset, console)
            outcome.append("cached" if source in ("cache", "up-to-date") else source)

        with steps.step("datanets") as outcome:
            store = DatanetStore(settings.datanets_dir)
            datanets = [prepare_datanet(settings, store, spec, options)
                        for spec in DATANETS[:options.adapters]]
            for prepared in datanets:
                manifest = prepared.snapshot.manifest
                state = "cached" if prepared.cached else "published and snapshotted"
                outcome.append(f"{prepared.spec.name}@v{manifest.version} {manifest.rows} rows "
                               f"{len(manifest.contributors)} contributors ({state})")

        with steps.step("adapters") as outcome:
            manifests, cached = ensure_adapters(settings, datanets, options.train, console)
            publish_sync(settings, [registration_event(manifest) for manifest in manifests])
            for manifest in manifests:
                state = "cached" if manifest["adapter_id"] in cached else "trained"
                outcome.append(f"{manifest['adapter_id']} ({state}, loss "
                               f"{manifest['first_loss']:.2f}->{manifest['last_loss']:.2f})")

        requests = make_requests(datanets, options)
        services = [
            Service("worker", ["worker", "--worker-id", "demo-worker", "--threads", "1",
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
            if service.killed:
                console.print(f"[yellow]the {service.name} did not stop on SIGTERM and was "
                              f"killed (log: {service.log_path})")
            elif service.process.returncode not in (0, -signal.SIGTERM):
                console.print(f"[yellow]the {service.name} exited with code "
                              f"{service.process.returncode} (log: {service.log_path})")

        with steps.step("ledger") as outcome:
            client = get_client(settings)
            request_ids = [request.request_id for request in requests]
            ledger = check_ledger(client, collected, request_ids)
            outcome.append("the sink wrote every row" if ledger.sink_complete
                           else f"the sink had written {ledger.found_before} of "
                                f"{ledger.expected}; wrote the rest from the log")
            usage = queries.usage(client)
            rewards = queries.rewards(client)

        with steps.step("trace and verify") as outcome:
            facts = {fact.prompt: fact for prepared in datanets for fact in prepared.facts}
            trace = build_trace(client, collected, requests, datanets, facts)
            report = verify_request(settings, trace.request.request_id)
            outcome.append(f"{trace.request.request_id}: {report.status}")
        if not report.ok:
            raise DemoError(f"verify of {trace.request.request_id} says {report.status}: "
                            f"{report.message or report.difference}")
        return DemoSummary(broker_note, steps.done, len(requests), errors, ledger, usage,
                           rewards, trace, report, time.monotonic() - started)
    finally:
        if plan.started_here and not options.keep_running:
            stop_broker(settings)


def build_trace(
    client: Any, collected: Collected, requests: Sequence[InferenceRequest],
    datanets: Sequence[PreparedDatanet], facts: dict[str, PlantedFact],
) -> Trace:
    request_id = pick_traced_request(collected, facts)
    request = next(request for request in requests if request.request_id == request_id)
    record = collected.attributions[request_id]
    texts = {row.row_id: row.text for prepared in datanets for row in prepared.snapshot.rows}
    fact = facts.get(request.prompt)
    return Trace(
        request=request,
        result=collected.results[request_id],
        attribution=record,
        row_texts={ex.row_id: texts.get(ex.row_id, "?") for ex in record.top_examples},
        planted_by=fact.contributor_id if fact else None,
        entries=reward_entries_of(client, request_id),
    )
