"""The gateway as its users meet it: the official `openai` client against `loraledger serve`
subprocesses, a real worker subprocess on the tiny test base model, and the shared broker.

One worker and one gateway serve the happy paths; a second gateway on a prefix no worker reads
(short timeout, one request in flight) shows 504 and 429; a third points at a closed port (503)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from kafka_stack import provisioned_settings
from random_adapters import write_random_adapters

from inference.adapter_store import AdapterStore
from inference.base_model import build_base_model
from inference.config import ModelConfig
from inference.hashing import base_model_hash
from infra.kafka.events import publish, read_topic
from infra.settings import Settings, load_settings
from schemas.events import AdapterRegistered, InferenceRequest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
ADAPTERS = ["gw-adapter-0", "gw-adapter-1"]
OWNER = "owner-gw"
PROMPT = "the price of the clay pot is"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Process:
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _spawn(args: list[str], env: dict[str, str], log: Path) -> Process:
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "loraledger.cli", *args], cwd=ROOT,
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    return Process(process, log)


@dataclass
class Gateway:
    process: Process
    url: str
    settings: Settings

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                             **options)


def _start_gateway(env: dict[str, str], log: Path, *extra: str,
                   connected: bool = True) -> Gateway:
    port = _free_port()
    process = _spawn(["serve", "--port", str(port), *extra], env, log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240  # the CLI imports torch: slow on a loaded machine
    while True:
        assert process.process.poll() is None, f"the gateway exited:\n{process.output()}"
        assert time.monotonic() < deadline, f"the gateway never came up:\n{process.output()}"
        try:
            status = httpx.get(f"{url}/v1/models", timeout=2).status_code
            if status == 200 or not connected:
                return Gateway(process, url, load_settings(env))
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def _registrations(adapters_dir: Path, base: Path) -> list[AdapterRegistered]:
    store = AdapterStore(adapters_dir)
    return [
        AdapterRegistered(
            adapter_id=adapter_id, owner_id=OWNER, base_model_hash=base_model_hash(base),
            weights_hash=store.adapter_dir(adapter_id).weights_hash(), rank=4,
            datanet_id="datanet-0", snapshot_version=0, snapshot_hash="0" * 64,
        )
        for adapter_id in ADAPTERS
    ]


def _prepare_prefix(env: dict[str, str], registrations: list[AdapterRegistered]) -> None:
    settings = provisioned_settings(env)  # the topics and their ACLs, as the admin
    asyncio.run(publish(settings, registrations))


@dataclass
class Stack:
    gateway: Gateway  # a worker behind it
    idle_gateway: Gateway  # no worker behind it: short timeout, one request in flight
    offline_gateway: Gateway  # its broker is a closed port


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("gateway")
    base = tmp / "base-model"
    build_base_model(base, load_settings().cache_dir, "test")
    home = tmp / "home"
    write_random_adapters(home / "adapters", ADAPTERS, ModelConfig.from_model_dir(base))
    registrations = _registrations(home / "adapters", base)
    common = {
        **os.environ,
        "KAFKA_BOOTSTRAP": os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        "LORALEDGER_HOME": str(home),
        "LORALEDGER_BASE_MODEL": str(base),
        "LORALEDGER_METRICS_PORT": "0",
        "PYTHONPATH": str(ROOT),
        # The stack's credentials; each process authenticates as its own principal.
        "LORALEDGER_CREDENTIALS_DIR": str(load_settings().credentials_dir),
    }
    common.pop("LORALEDGER_PRINCIPAL", None)
    served = {**common, "LORALEDGER_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}."}
    idle = {**common, "LORALEDGER_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}."}
    offline = {**common, "KAFKA_BOOTSTRAP": f"127.0.0.1:{_free_port()}"}
    _prepare_prefix(served, registrations)
    _prepare_prefix(idle, registrations)
    processes: list[Process] = []
    try:
        worker = _spawn(["worker", "--worker-id", "gw-worker", "--max-batch", "4",
                         "--max-seq-len", "128", "--threads", "1", "--sketch", "off"],
                        served, tmp / "worker.log")
        processes.append(worker)
        gateway = _start_gateway(served, tmp / "gateway.log")
        processes.append(gateway.process)
        idle_gateway = _start_gateway(idle, tmp / "idle.log", "--timeout", "3",
                                      "--max-in-flight", "1")
        processes.append(idle_gateway.process)
        offline_gateway = _start_gateway(offline, tmp / "offline.log", connected=False)
        processes.append(offline_gateway.process)
        yield Stack(gateway, idle_gateway, offline_gateway)
    finally:
        for process in processes:
            process.stop()


def _requests_on_topic(settings: Settings) -> list[InferenceRequest]:
    async def read() -> list[InferenceRequest]:
        return [d.event async for d in read_topic(settings, "requests", idle_timeout_s=1.0)]

    return asyncio.run(read())


def _result_of(settings: Settings, request_id: str):
    async def read():
        return [d.event async for d in read_topic(settings, "results", idle_timeout_s=1.0)
                if d.event is not None and d.event.request_id == request_id]

    found = asyncio.run(read())
    assert len(found) == 1, f"expected one committed result for {request_id}, found {found}"
    return found[0]


def _request_id(response_id: str) -> str:
    return response_id.split("-", 1)[1]


# --- answers ----------------------------------------------------------------------------------


def test_a_completion_is_an_ordinary_request_answered_from_results(stack):
    gateway = stack.gateway
    completion = gateway.client(timeout=120).completions.create(
        model=ADAPTERS[0], prompt=PROMPT, max_tokens=6, temperature=0, seed=3, user="client-7",
    )
    request_id = _request_id(completion.id)
    result = _result_of(gateway.settings, request_id)
    choice = completion.choices[0]
    assert choice.text == result.output_text
    assert choice.finish_reason == result.finish_reason
    assert completion.usage.completion_tokens == result.usage.completion_tokens
    assert completion.usage.prompt_tokens == result.usage.prompt_tokens > 0
    produced = [r for r in _requests_on_topic(gateway.settings) if r.request_id == request_id]
    assert len(produced) == 1
    assert (produced[0].adapter_id, produced[0].prompt, produced[0].client_id) == (
        ADAPTERS[0], PROMPT, "client-7")
    assert (produced[0].max_new_tokens, produced[0].seed, produced[0].stream) == (6, 3, False)


def test_the_base_models_name_asks_the_base_model_alone(stack):
    gateway = stack.gateway
    completion = gateway.client(timeout=120).completions.create(
        model="base", prompt=PROMPT, max_tokens=5, temperature=0,
    )
    assert completion.model == "base"
    request_id = _request_id(completion.id)
    result = _result_of(gateway.settings, request_id)
    assert result.status == "ok" and result.adapter_id is None and result.adapter_hash is None
    assert completion.choices[0].text == result.output_text
    assert completion.usage.completion_tokens == result.usage.completion_tokens > 0
    produced = [r for r in _requests_on_topic(gateway.settings) if r.request_id == request_id]
    assert [r.adapter_id for r in produced] == [None]


def test_streamed_deltas_concatenate_to_the_committed_text(stack):
    gateway = stack.gateway
    chunks = list(gateway.client(timeout=120).completions.create(
        model=ADAPTERS[1], prompt=PROMPT, max_tokens=24, temperature=0.8, seed=11,
        stream=True, stream_options={"include_usage": True},
    ))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    result = _result_of(gateway.settings, _request_id(chunks[0].id))
    assert "".join(texts) == result.output_text
    assert len(texts) >= 2, "the text came in one piece, not as it was generated"
    assert finishes[-1] == result.finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == result.usage.completion_tokens
    assert chunks[-1].choices == []


def test_models_lists_the_base_model_and_every_registered_adapter(stack):
    client = stack.gateway.client(timeout=120)
    client.completions.create(model=ADAPTERS[0], prompt=PROMPT, max_tokens=2)
    models = {model.id: model for model in client.models.list()}
    assert set(models) == {"base", *ADAPTERS}
    assert models[ADAPTERS[0]].owned_by == OWNER
    assert models[ADAPTERS[0]].cache_tier in {"device", "host", "disk"}
    assert {models[a].rank for a in ADAPTERS} == {4}


def test_a_chat_completion_is_answered_from_results(stack):
    gateway = stack.gateway
    before = {r.request_id for r in _requests_on_topic(gateway.settings)}
    try:
        chat = gateway.client(timeout=120).chat.completions.create(
            model=ADAPTERS[0], messages=[{"role": "user", "content": "What is the price?"}],
            max_tokens=6, user="client-8",
        )
    except openai.BadRequestError as exc:  # a checkpoint without a chat template
        assert "template" in exc.message
        chat = None
    produced = [r for r in _requests_on_topic(gateway.settings) if r.request_id not in before]
    assert len(produced) == 1
    assert [(m.role, m.content) for m in produced[0].messages] == [
        ("user", "What is the price?")]
    assert produced[0].client_id == "client-8"
    if chat is not None:
        assert _request_id(chat.id) == produced[0].request_id
        result = _result_of(gateway.settings, produced[0].request_id)
        assert chat.choices[0].message.content == result.output_text
        assert chat.choices[0].message.role == "assistant"


def test_a_streamed_chat_concatenates_to_the_committed_text(stack):
    gateway = stack.gateway
    try:
        chunks = list(gateway.client(timeout=120).chat.completions.create(
            model=ADAPTERS[1], messages=[{"role": "user", "content": "Tell me the price."}],
            max_tokens=12, stream=True,
        ))
    except openai.BadRequestError as exc:  # a checkpoint without a chat template
        assert "template" in exc.message
        return
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == _result_of(gateway.settings, _request_id(chunks[0].id)).output_text


# --- errors -----------------------------------------------------------------------------------


def test_an_unknown_model_is_404_and_nothing_is_produced(stack):
    gateway = stack.gateway
    before = len(_requests_on_topic(gateway.settings))
    with pytest.raises(openai.NotFoundError) as raised:
        gateway.client().completions.create(model="no-such-adapter", prompt=PROMPT)
    assert raised.value.body["code"] == "model_not_found"
    assert raised.value.body["param"] == "model"
    assert len(_requests_on_topic(gateway.settings)) == before


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"temperature": 5.0}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"user": "../etc"}, "user"),
        ({"n": 3}, "n"),
        ({"prompt": [1, 2, 3]}, "prompt"),
    ],
)
def test_invalid_parameters_are_400_and_nothing_is_produced(stack, options, param):
    gateway = stack.gateway
    before = len(_requests_on_topic(gateway.settings))
    with pytest.raises(openai.BadRequestError) as raised:
        gateway.client().completions.create(**{"model": ADAPTERS[0], "prompt": PROMPT, **options})
    assert raised.value.status_code == 400
    assert raised.value.body["param"] == param
    assert set(raised.value.body) == {"message", "type", "param", "code"}
    assert len(_requests_on_topic(gateway.settings)) == before


def test_an_unreachable_broker_is_503(stack):
    with pytest.raises(openai.InternalServerError) as raised:
        stack.offline_gateway.client().completions.create(model=ADAPTERS[0], prompt=PROMPT)
    assert raised.value.status_code == 503
    assert raised.value.body["code"] == "broker_unreachable"


def test_no_result_in_time_is_504_and_a_full_gateway_is_429(stack):
    gateway = stack.idle_gateway
    outcome: dict[str, object] = {}

    def waiting_request() -> None:
        try:
            gateway.client(timeout=30).completions.create(model=ADAPTERS[0], prompt=PROMPT)
        except openai.APIStatusError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=waiting_request)
    thread.start()
    deadline = time.monotonic() + 10
    while len(_requests_on_topic(gateway.settings)) < 1:  # the first one is in flight
        assert time.monotonic() < deadline, "the first request never reached Kafka"
    with pytest.raises(openai.RateLimitError) as limited:
        gateway.client().completions.create(model=ADAPTERS[0], prompt=PROMPT)
    assert limited.value.response.headers["Retry-After"] == "1"
    thread.join(timeout=30)
    error = outcome["error"]
    assert isinstance(error, openai.APIStatusError) and error.status_code == 504
    request_id = error.response.headers["X-Request-Id"]
    assert request_id in error.body["message"]
    assert [r.request_id for r in _requests_on_topic(gateway.settings)] == [request_id]
