"""The chaos scenario: a three-node cluster of its own (tests/support/kafka_cluster.py), two
`loraledger worker` and two `loraledger pipeline` processes (every processor, the ledger sink
among them, writing to the cluster's ledger server), and a steady stream of requests across
many random adapters. While the stream runs, faults come in turn:

1. `broker-kill`: SIGKILL the node leading partition 0 of `requests`, restart it once another
   node leads that partition;
2. `worker-kill`: SIGKILL a worker, restart it with the same id;
3. `pipeline-kill`: SIGKILL a pipeline instance, start another;
4. `worker-stop`: SIGSTOP the other worker for longer than the group's session timeout, until
   the first worker owns every partition (its producers fenced the stopped one's), then
   SIGCONT it.

Each phase (and a steady one before the faults) runs from its start until the fault is
repaired and every request sent before the repair is paid. After the last one the stream
reaches its count, drains, every group commits past everything, and the processes stop with
SIGTERM. `chaos_run` yields the run with the cluster still up, for checks of the log and the
ledger; `ChaosRun.figures` gives, per phase, the throughput of payments and the latency from
sending a request to its payment being readable (read_committed).

Run by bench/chaos.py, which reports the figures of each phase."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from adapter_manifests import write_manifest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from kafka_cluster import BROKERS, REPO, leader_of, three_node_cluster
from pipeline_process import OWNS_PARTITIONS, group_unconsumed
from random_adapters import write_random_adapters

from inference.adapter_store import AdapterStore
from inference.attribution_index import index_hash
from inference.base_model import build_base_model
from inference.config import ModelConfig
from inference.hashing import base_model_hash
from inference.worker.service import group_id as worker_group
from infra.kafka.broker import broker_nodes, running_pid
from infra.kafka.clients import make_producer
from infra.kafka.events import publish, send_event
from infra.kafka.security import kafka_client_options
from infra.keys import worker_registration
from infra.settings import Settings, load_settings
from infra.stack import under_replicated_partitions
from pipeline.app import consumer_group
from schemas.codec import decode
from schemas.events import InferenceRequest
from schemas.topics import TOPICS, topic_name

FAULTS = ("broker-kill", "worker-kill", "pipeline-kill", "worker-stop")
WORKER_IDS = ("chaos-w1", "chaos-w2")
PIPELINES = 2
OWNERS = 5  # adapter owners, paid the owner's share
WORKER_OWNS = re.compile(r"owns partitions \[([\d, ]*)\]")
FENCED = "was fenced by its new owner"
FAULT_EXIT = re.compile(r"Crashed reason=\w+|ProducerFenced")
POLL_S = 0.5


@dataclass(frozen=True)
class ChaosConfig:
    requests: int = 2000  # at least this many; the stream runs on until the faults are over
    adapters: int = 56
    indexed: int = 4  # adapters with an attribution index: their results carry sketches
    rate: float = 16.0  # requests offered per second
    max_new_tokens: int = 4
    steady_requests: int = 200  # the steady phase: while this many are sent
    warm_paid: int = 50  # payments seen before the steady phase starts
    session_timeout_ms: int = 6000  # the workers' group
    deadline_s: float = 240.0  # liveness bound of each wait, for a loaded machine


@dataclass
class Phase:
    name: str
    started: float
    ended: float = 0.0


@dataclass(frozen=True)
class PhaseFigures:
    name: str
    seconds: float
    sent: int  # requests sent during the phase
    paid_per_s: float  # payments that became readable during the phase, per second
    p50_ms: float  # send to payment readable, of the requests sent during the phase
    p99_ms: float


class ServiceExited(AssertionError):
    pass


class Service:
    """One `loraledger` process of the scenario; each start gets a log file of its own."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.args, self.env, self.log_dir = name, args, env, log_dir
        self.process: subprocess.Popen | None = None
        self.log = log_dir / f"{name}.log"
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.log = self.log_dir / f"{self.name}-{self.starts}.log"
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "loraledger.cli", *self.args], env=self.env, cwd=REPO,
                stdout=out, stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def excerpt(self) -> str:
        """The log from its first traceback (where a crash starts), else its tail."""
        text = self.output()
        start = text.find("Traceback (most recent call last)")
        return text[start:start + 6000] if start >= 0 else text[-4000:]

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise ServiceExited(f"{self.name} exited ({self.process.returncode}):\n"
                                f"{self.excerpt()}")

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.process is not None
        self.process.wait(timeout=30)

    def terminate(self, bound_s: float = 60.0) -> int | None:
        """SIGTERM (after SIGCONT, in case it is stopped) and its exit code; SIGKILL and None
        when it is still running after `bound_s`."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(bound_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


def worker_service(env: dict[str, str], worker_id: str, log_dir: Path,
                   config: ChaosConfig) -> Service:
    return Service(worker_id, [
        "worker", "--worker-id", worker_id, "--max-batch", "16", "--max-seq-len", "128",
        "--threads", "1", "--session-timeout-ms", str(config.session_timeout_ms),
        "--log-level", "info",
    ], env, log_dir)


def pipeline_service(env: dict[str, str], number: int, log_dir: Path) -> Service:
    return Service(f"pipeline-{number}", ["pipeline", "-l", "info"], env, log_dir)


def owned_partitions(worker: Service) -> list[int] | None:
    """The partitions a worker said last that it owns; None before it said any."""
    found = WORKER_OWNS.findall(worker.output())
    if not found:
        return None
    return [int(p) for p in found[-1].split(",") if p.strip()]


def prepare_adapters(home: Path, base: Path, config: ChaosConfig) -> list:
    """The tiny base model, random adapters (some indexed) with manifests that name their
    owner, and the AdapterRegistered events that announce them."""
    build_base_model(base, load_settings().cache_dir, "test")
    ids = [f"chaos-{i:03d}" for i in range(config.adapters)]
    indexed = set(ids[:config.indexed])
    write_random_adapters(home / "adapters", ids, ModelConfig.from_model_dir(base),
                          indexed=sorted(indexed))
    store, base_hash = AdapterStore(home / "adapters"), base_model_hash(base)
    registrations = []
    for number, adapter_id in enumerate(ids):
        directory = store.adapter_dir(adapter_id)
        fields = {"index_hash": index_hash(directory.index_dir)} if adapter_id in indexed else {}
        manifest = write_manifest(directory.path, owner_id=f"owner-{number % OWNERS}",
                                  base_model_hash=base_hash, **fields)
        registrations.append(manifest.registration_event())
    return registrations


class Stream:
    """Requests at a steady rate, round-robin over the adapters, until told it has sent
    enough; when each was sent."""

    def __init__(self, settings: Settings, adapters: list[str], config: ChaosConfig) -> None:
        self.settings, self.adapters, self.config = settings, adapters, config
        self.sent: dict[str, float] = {}

    async def run(self, enough: Callable[[], bool]) -> None:
        producer = make_producer(self.settings)
        await producer.start()
        deliveries = []
        started = time.monotonic()
        try:
            number = 0
            while not (number >= self.config.requests and enough()):
                await asyncio.sleep(max(0.0, started + number / self.config.rate
                                        - time.monotonic()))
                request = InferenceRequest(
                    adapter_id=self.adapters[number % len(self.adapters)],
                    prompt=f"order {number}: the price of the clay pot is",
                    max_new_tokens=self.config.max_new_tokens, seed=number,
                )
                self.sent[request.request_id] = time.monotonic()
                deliveries.append(await send_event(producer, self.settings, request))
                number += 1
            await asyncio.gather(*deliveries)
        finally:
            await producer.stop()


class Progress:
    """Reads `results` and `attributions` as they commit: when each request was first
    answered and first paid.

    aiokafka's consumer can stall for good on a partition whose leader died (its fetcher keeps
    asking the dead node), so a consumer that has read nothing for `STALL_S` is replaced by a
    new one that goes on from the same positions."""

    STALL_S = 3.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.answered: dict[str, float] = {}
        self.paid: dict[str, float] = {}
        self._next: dict[TopicPartition, int] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._read_until_quiet(stop)
            except KafkaError:  # no node answered the new consumer yet: try again
                await asyncio.sleep(POLL_S)

    async def _read_until_quiet(self, stop: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap, isolation_level="read_committed",
            enable_auto_commit=False, auto_offset_reset="earliest",
            **kafka_client_options(self.settings),
        )
        await consumer.start()
        try:
            partitions = [TopicPartition(topic_name(name), partition)
                          for name in ("results", "attributions")
                          for partition in range(TOPICS[name].partitions)]
            consumer.assign(partitions)
            for tp in partitions:
                if tp in self._next:
                    consumer.seek(tp, self._next[tp])
            last_read = time.monotonic()
            while not stop.is_set() and time.monotonic() - last_read < self.STALL_S:
                batch = await consumer.getmany(timeout_ms=300)
                now = time.monotonic()
                for tp, records in batch.items():
                    last_read = now
                    logical = "results" if tp.topic == topic_name("results") else "attributions"
                    seen = self.answered if logical == "results" else self.paid
                    for record in records:
                        seen.setdefault(decode(logical, record.value).request_id, now)
                    self._next[tp] = records[-1].offset + 1
        finally:
            # Stopping a consumer whose fetch from a dead node is pending raises the fetch
            # task's CancelledError (nothing cancels this task: it ends on `stop`).
            with contextlib.suppress(asyncio.CancelledError):
                await consumer.stop()


@dataclass
class ChaosRun:
    """What a run did: when each request was sent, answered and paid, the phases, and the
    cluster it ran on (still up while `chaos_run` yields it)."""

    config: ChaosConfig
    env: dict[str, str]
    settings: Settings  # the admin's
    sent: dict[str, float]
    answered: dict[str, float]
    paid: dict[str, float]
    phases: list[Phase]
    took_over: bool = False  # the stopped worker's partitions all went to the other one
    fenced: list[str] = field(default_factory=list)  # the woken worker's fence warnings
    restarts: list[str] = field(default_factory=list)  # pipeline instances that exited fenced
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    seconds: float = 0.0  # from the first request sent to the last one paid
    drained: bool = False  # every consumer group committed past everything before the stop
    undrained: list[str] = field(default_factory=list)  # else the partitions behind, and where

    def figures(self) -> list[PhaseFigures]:
        figures = []
        for phase in self.phases:
            seconds = phase.ended - phase.started
            latencies = sorted(
                (self.paid[request_id] - sent) * 1000
                for request_id, sent in self.sent.items()
                if phase.started <= sent < phase.ended
            )
            paid = sum(phase.started <= at < phase.ended for at in self.paid.values())
            figures.append(PhaseFigures(
                phase.name, seconds, len(latencies), paid / seconds,
                _percentile(latencies, 0.5), _percentile(latencies, 0.99),
            ))
        return figures


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Scenario:
    def __init__(self, env: dict[str, str], settings: Settings, adapters: list[str],
                 log_dir: Path, config: ChaosConfig) -> None:
        self.env, self.settings, self.config = env, settings, config
        self.workers = [worker_service(env, wid, log_dir, config) for wid in WORKER_IDS]
        self.pipelines = [pipeline_service(env, n, log_dir) for n in range(1, PIPELINES + 1)]
        self.stream = Stream(settings, adapters, config)
        self.progress = Progress(settings)
        self.phases: list[Phase] = []
        self.took_over = False  # the other worker owned every partition while one was stopped
        self.fenced: list[str] = []
        self.restarts: list[str] = []  # pipeline instances started again after a fence
        self._down: set[str] = set()  # services a fault has taken down on purpose
        self.undrained: list[str] = []  # partitions a group had not committed past, last seen

    @property
    def services(self) -> list[Service]:
        return [*self.workers, *self.pipelines]

    async def wait_for(self, condition: Callable[[], object], what: str,
                       tasks: tuple[asyncio.Task, ...] = (), required: bool = True) -> bool:
        """Poll `condition` until it holds (True); fail when a service exits unasked, a task
        fails, or the deadline passes (then False instead when not `required`)."""
        deadline = time.monotonic() + self.config.deadline_s
        while True:
            outcome = condition()
            if inspect.isawaitable(outcome):
                outcome = await outcome
            if outcome:
                return True
            if not required and time.monotonic() >= deadline:
                return False
            for service in self.services:
                if service.name not in self._down:
                    self._supervise(service)
            for task in tasks:
                if task.done():
                    task.result()
            assert time.monotonic() < deadline, (
                f"timed out waiting until {what}: {len(self.stream.sent)} requests sent, "
                f"{len(self.progress.answered)} answered, {len(self.progress.paid)} paid")
            await asyncio.sleep(POLL_S)

    def _supervise(self, service: Service) -> None:
        """A pipeline instance whose transactional producer was fenced exits by design (Faust
        ends an exactly-once app on ProducerFenced; the broker fences a transaction left open
        past its timeout, which a starved machine can do): like a supervisor, start it again
        and record why. Any other exit fails the run."""
        try:
            service.check_alive()
        except ServiceExited as exited:
            if service not in self.pipelines or "ProducerFenced" not in str(exited):
                raise
            self.restarts.append(f"{service.name}: {FAULT_EXIT.search(str(exited)).group(0)}")
            service.start()

    async def run(self) -> ChaosRun:
        for service in self.services:
            service.start()
        for worker in self.workers:
            await self.wait_for(lambda w=worker: owned_partitions(w) is not None,
                                f"{worker.name} joins")
        for instance in self.pipelines:
            await self.wait_for(lambda i=instance: OWNS_PARTITIONS.search(i.output()),
                                f"{instance.name} joins")
        faults_over = asyncio.Event()
        stop_progress = asyncio.Event()
        progress = asyncio.create_task(self.progress.run(stop_progress))
        stream = asyncio.create_task(self.stream.run(faults_over.is_set))
        tasks = (progress, stream)
        try:
            await self.wait_for(lambda: len(self.progress.paid) >= self.config.warm_paid,
                                "the first requests are paid", tasks)
            steady = Phase("steady", time.monotonic())
            until = len(self.stream.sent) + self.config.steady_requests
            await self.wait_for(lambda: len(self.stream.sent) >= until,
                                "the steady phase is sent", tasks)
            steady.ended = time.monotonic()
            self.phases.append(steady)
            for name, fault in zip(FAULTS, (self.kill_broker, self.kill_worker,
                                            self.kill_pipeline, self.stop_worker), strict=True):
                phase = Phase(name, time.monotonic())
                await fault(tasks)
                repaired = time.monotonic()
                await self.wait_for(lambda r=repaired: self._paid_up_to(r),
                                    f"the requests sent before {name} was repaired are paid",
                                    tasks)
                phase.ended = time.monotonic()
                self.phases.append(phase)
            faults_over.set()
            await self.wait_for(stream.done, "the stream has sent every request", tasks)
            await self.wait_for(lambda: self.progress.paid.keys() >= self.stream.sent.keys(),
                                "every request is paid", tasks)
            # Not required: a run whose pipeline group stalls still reports its figures, and
            # says so (see `ChaosRun.drained`).
            drained = await self.wait_for(self._groups_done, "every group commits past everything",
                                          tasks, required=False)
        finally:
            faults_over.set()
            stop_progress.set()
            await asyncio.gather(progress, stream, return_exceptions=True)
        exit_codes = {service.name: service.terminate() for service in self.services}
        first = min(self.stream.sent.values())
        return ChaosRun(
            self.config, self.env, self.settings, self.stream.sent, self.progress.answered,
            self.progress.paid, self.phases, self.took_over, self.fenced, self.restarts,
            exit_codes,
            max(self.progress.paid.values()) - first, drained, self.undrained,
        )

    def _paid_up_to(self, moment: float) -> bool:
        return all(request_id in self.progress.paid
                   for request_id, sent in self.stream.sent.items() if sent < moment)

    async def _groups_done(self) -> bool:
        # The sink and governance commit with the pipeline's group; the workers with theirs.
        def behind() -> list[str]:
            return [
                *group_unconsumed(self.settings, worker_group(self.settings), "requests"),
                *group_unconsumed(self.settings, consumer_group(self.settings),
                                  "results", "attributions", "rewards"),
            ]

        self.undrained = await asyncio.to_thread(behind)
        return not self.undrained

    async def kill_broker(self, tasks: tuple[asyncio.Task, ...]) -> None:
        """SIGKILL the leader of a partition the stream writes to; restart it once another node
        leads, and wait until no partition lacks a replica."""
        topic = topic_name("requests")
        victim = await leader_of(self.settings, topic, 0)
        node = broker_nodes(self.settings, BROKERS)[victim - 1]
        pid = running_pid(node.paths)
        assert pid is not None, f"node {victim} has no pid"
        os.kill(pid, signal.SIGKILL)
        await self.wait_for(lambda: running_pid(node.paths) is None, "the node dies", tasks)

        async def led_elsewhere() -> bool:
            try:
                return await leader_of(self.settings, topic, 0) != victim
            except KafkaError:  # metadata from a cluster that is electing: ask again
                return False

        await self.wait_for(led_elsewhere, "another node leads the partition", tasks)
        # `stack up` again starts only the missing node. (Run as a command of its own, the node
        # is not a child of this process, which would have to reap it when it is stopped.)
        restart = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loraledger.cli", "stack", "up", "--brokers", str(BROKERS),
            env=self.env, cwd=REPO, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await restart.communicate()
        assert restart.returncode == 0, output.decode(errors="replace")

        async def replicated() -> bool:
            try:
                return await under_replicated_partitions(self.settings) == []
            except KafkaError:
                return False

        await self.wait_for(replicated, "the restarted node catches up", tasks)

    async def kill_worker(self, tasks: tuple[asyncio.Task, ...]) -> None:
        """SIGKILL a worker and start it again with the same id (static membership: it gets
        its partitions back and fences its former self)."""
        worker = self.workers[0]
        self._down.add(worker.name)
        worker.kill()
        worker.start()
        self._down.discard(worker.name)
        await self.wait_for(lambda: bool(owned_partitions(worker)),
                            f"the restarted {worker.name} owns partitions", tasks)

    async def kill_pipeline(self, tasks: tuple[asyncio.Task, ...]) -> None:
        """SIGKILL a pipeline instance mid-transaction and start another."""
        instance = self.pipelines[0]
        self._down.add(instance.name)
        instance.kill()
        instance.start()
        self._down.discard(instance.name)
        await self.wait_for(lambda: OWNS_PARTITIONS.search(instance.output()),
                            f"the new {instance.name} owns partitions", tasks)

    async def stop_worker(self, tasks: tuple[asyncio.Task, ...]) -> None:
        """SIGSTOP a worker past its session timeout, until the other worker owns every
        partition: the other started a producer for each of the stopped one's partitions,
        which fenced the stopped one's. Then SIGCONT it: a commit it had under way is refused
        (its fence warnings are kept), and it rejoins the group."""
        stopped, other = self.workers[1], self.workers[0]
        partitions = list(range(TOPICS["requests"].partitions))
        self._down.add(stopped.name)
        stopped.signal(signal.SIGSTOP)
        # Stopped until the group has expired its session and given all its partitions away.
        await self.wait_for(lambda: owned_partitions(other) == partitions,
                            f"{other.name} owns every partition", tasks)
        self.took_over = True
        before = len(stopped.output())
        stopped.signal(signal.SIGCONT)
        self._down.discard(stopped.name)
        await self.wait_for(
            lambda: any(match.group(1) for match in WORKER_OWNS.finditer(stopped.output(), before)),
            f"{stopped.name} wakes and rejoins", tasks)
        self.fenced = [line for line in stopped.output()[before:].splitlines() if FENCED in line]


@contextlib.contextmanager
def chaos_run(workdir: Path, config: ChaosConfig | None = None) -> Iterator[ChaosRun]:
    """Run the scenario in `workdir` (its home, base model and logs); yield the run with the
    cluster still up. The processes are stopped before, the cluster after."""
    config = config or ChaosConfig()
    home, logs = workdir / "home", workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = workdir / "base-model"
    registrations = prepare_adapters(home, base, config)
    adapters = [event.adapter_id for event in registrations]
    with three_node_cluster(home) as (env, settings):
        env = {**env, "LORALEDGER_BASE_MODEL": str(base), "LORALEDGER_METRICS_PORT": "0"}
        asyncio.run(publish(settings, [
            *registrations, *(worker_registration(home, wid) for wid in WORKER_IDS)]))
        scenario = Scenario(env, settings, adapters, logs, config)
        try:
            run = asyncio.run(scenario.run())
        finally:
            for service in scenario.services:
                service.terminate(bound_s=30.0)
        yield run
