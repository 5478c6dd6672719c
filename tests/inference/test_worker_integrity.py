"""Bad adapters against the real worker and broker: each fails its own requests with an error
result while the other adapters' requests are served, and SIGTERM drains while an adapter's
disk read is stuck. The worker runs as a subprocess (`stuck_load_worker.py`: the real worker,
whose reads of `stuck-*` adapters never return)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from random_adapters import write_random_adapter, write_random_adapters

from inference.adapter_store import AdapterDir
from inference.base_model import build_base_model
from inference.config import ModelConfig
from infra.kafka.events import publish
from infra.kafka.security import kafka_client_options
from infra.settings import Settings, load_settings
from schemas.codec import decode
from schemas.events import ErrorCode, InferenceRequest, InferenceResult
from schemas.topics import TOPICS, topic_name

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "support" / "stuck_load_worker.py"
GOOD = ["good-0", "good-1", "good-2"]
LOAD_TIMEOUT_S = 3.0
DEADLINE_S = 120.0


@pytest.fixture
def stack(stack_env, kafka_settings, tmp_path) -> tuple[dict[str, str], Settings]:
    home = tmp_path / "home"
    base = tmp_path / "base-model"
    build_base_model(base, load_settings().cache_dir, "test")
    config = ModelConfig.from_model_dir(base)
    adapters = home / "adapters"
    write_random_adapters(adapters, GOOD, config)
    # Finite weights whose product overflows float32: the logits become inf and NaN.
    write_random_adapter(adapters, "overflows", config, seed=1, scale=1e20)
    huge = AdapterDir(write_random_adapter(adapters, "alpha-huge", config, seed=2))
    huge.config_path.write_text(
        json.dumps({**json.loads(huge.config_path.read_text()), "lora_alpha": 1e38})
    )
    outside = write_random_adapter(tmp_path / "elsewhere", "linked", config, seed=3)
    os.symlink(outside, adapters / "linked")
    for seed, adapter_id in enumerate(["stuck-a", "stuck-b"], start=4):
        write_random_adapter(adapters, adapter_id, config, seed=seed)
    env = {
        **stack_env,
        "LORALEDGER_HOME": str(home),
        "LORALEDGER_BASE_MODEL": str(base),
        "LORALEDGER_METRICS_PORT": "0",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'support'}",
    }
    return env, load_settings(env)


class _Worker:
    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.log_path = log_dir / "worker.log"
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(DRIVER), "w-integrity", str(LOAD_TIMEOUT_S)],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for_line(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.process.poll() is None, f"the worker exited:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in the log:\n{self.output()[-3000:]}"
            await asyncio.sleep(0.2)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()


class _Results:
    """A read-committed reader of every partition of `results`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.by_request: dict[str, InferenceResult] = {}
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **kafka_client_options(settings),
        )

    async def start(self) -> None:
        await self.consumer.start()
        topic = topic_name("results", self.settings.topic_prefix)
        partitions = [TopicPartition(topic, p) for p in range(TOPICS["results"].partitions)]
        self.consumer.assign(partitions)
        await self.consumer.seek_to_beginning(*partitions)

    async def wait_for(self, request_ids: set[str], worker: _Worker, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not request_ids <= set(self.by_request):
            assert worker.process.poll() is None or time.monotonic() < deadline, worker.output()
            assert time.monotonic() < deadline, (
                f"{len(request_ids - set(self.by_request))} results missing:\n"
                f"{worker.output()[-3000:]}"
            )
            batch = await self.consumer.getmany(timeout_ms=300)
            for records in batch.values():
                for record in records:
                    result = decode("results", record.value)
                    assert result.request_id not in self.by_request, "a duplicated result"
                    self.by_request[result.request_id] = result


def _requests(adapter_id: str, count: int) -> list[InferenceRequest]:
    return [
        InferenceRequest(adapter_id=adapter_id, prompt=f"{adapter_id} {i}: the pot costs",
                         max_new_tokens=6, seed=i)  # fmt: skip
        for i in range(count)
    ]


def test_bad_adapters_fail_only_their_requests_and_sigterm_drains_a_stuck_load(stack, tmp_path):
    env, settings = stack
    good = [r for adapter_id in GOOD for r in _requests(adapter_id, 3)]
    bad = {
        adapter_id: _requests(adapter_id, 2)
        for adapter_id in ("overflows", "alpha-huge", "linked", "stuck-a")
    }
    expected = {
        "overflows": (ErrorCode.INTERNAL, "non-finite logits"),
        "alpha-huge": (ErrorCode.ADAPTER_REFUSED, "lora_alpha must be a finite number"),
        "linked": (ErrorCode.ADAPTER_REFUSED, "its directory is a symbolic link"),
        "stuck-a": (ErrorCode.ADAPTER_REFUSED, f"did not load within {LOAD_TIMEOUT_S:g} s"),
    }
    # Bad requests in the middle of the stream.
    requests = good[:4] + [r for rs in bad.values() for r in rs] + good[4:]

    async def scenario() -> None:
        worker = _Worker(env, tmp_path)
        results = _Results(settings)
        try:
            await worker.wait_for_line("owns partitions [", 90)
            await results.start()
            await publish(settings, requests)
            await results.wait_for({r.request_id for r in requests}, worker, DEADLINE_S)
            for request in good:
                served = results.by_request[request.request_id]
                assert served.status == "ok", served.error_message
                assert served.adapter_hash == AdapterDir(
                    settings.adapters_dir / request.adapter_id
                ).adapter_hash()
            for adapter_id, adapter_requests in bad.items():
                code, reason = expected[adapter_id]
                for request in adapter_requests:
                    failed = results.by_request[request.request_id]
                    assert failed.status == "error" and failed.error_code is code, failed
                    assert reason in failed.error_message, failed.error_message
                    assert failed.usage.total_tokens == 0

            # SIGTERM while a read never returns: the worker answers what it consumed and exits.
            stuck = _requests("stuck-b", 1)
            await publish(settings, stuck)
            await worker.wait_for_line("stuck read of stuck-b began", 60)
            worker.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            while worker.process.poll() is None:
                assert time.monotonic() - started < 60, "SIGTERM did not stop the worker"
                await asyncio.sleep(0.2)
            assert worker.process.returncode == 0, worker.output()[-3000:]
            assert "stopped after draining" in worker.output()
            await results.wait_for({stuck[0].request_id}, worker, 30)
            drained = results.by_request[stuck[0].request_id]
            assert drained.status == "error" and drained.error_code is ErrorCode.ADAPTER_REFUSED
        finally:
            await results.consumer.stop()
            worker.close()

    asyncio.run(scenario())
