"""The ledger's disk fills up under a running pipeline: the sink retries, its offsets stay put,
and once space returns every result, attribution and reward entry is in the ledger exactly once,
one result at the bounds of the schema among them (refused payment: its usage counts no token
ids); `loraledger replay` rebuilds the same ledger.

The ledger lives on a small tmpfs of its own, filled with a ballast file: a real "no space left
on device" for the embedded engine only. Mounting needs root; the mount is removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import ledger_probe
import pipeline_process
import pytest
from attribution_support import WORKER, billable, make_adapter, make_result, request_for

from infra.kafka.events import publish
from infra.settings import Settings, load_settings
from schemas.events import MAX_TOKENS, InferenceResult, Usage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ADAPTER = "ad-1"


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "32m") -> Iterator[Path]:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting the ledger's small filesystem needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(directory: Path) -> Path:
    """Write a ballast file until the filesystem has not one page left."""
    ballast = directory / "ballast"
    with ballast.open("wb", buffering=0) as out:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096):
            try:
                while True:
                    out.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return ballast


def probe(env: dict[str, str], cwd: Path, *args: str):
    done = subprocess.run(ledger_probe.command(*args), env=env, cwd=cwd, check=True,
                          capture_output=True, text=True, timeout=180)
    return json.loads(done.stdout.strip().splitlines()[-1])


def results(adapter: dict, first: int, count: int) -> list[InferenceResult]:
    """Results signed by the registered worker, with token ids their usage recounts."""
    return [billable(make_result(adapter, request_id=f"req-{index:03d}", adapter_id=ADAPTER),
                     10 + index % 30, 3)
            for index in range(first, first + count)]


def publish_answered(settings: Settings, results: list[InferenceResult]) -> None:
    """The worker's key and the requests `results` answer, acknowledged before the results
    are sent."""
    asyncio.run(publish(settings, [WORKER.as_worker(),
                                   *(request_for(result) for result in results)]))
    asyncio.run(publish(settings, results))


def test_a_full_disk_under_the_ledger_loses_nothing_once_space_returns(
    kafka_settings, stack_env, tmp_path
):
    settings = kafka_settings
    with small_filesystem(tmp_path / "ledger") as ledger_dir:
        home = tmp_path / "home"
        home.mkdir()
        env = {**stack_env, "CLICKHOUSE_URL": f"chdb://{ledger_dir / 'clickhouse'}",
               "PYTHONPATH": str(REPO), "LORALEDGER_HOME": str(home)}
        probe(env, tmp_path, "apply-ddl")
        adapter = make_adapter(load_settings(env).adapters_dir, ADAPTER)
        before, during = results(adapter, 0, 5), results(adapter, 5, 40)
        # One result at the schema's bounds: the most tokens a result may count. No worker
        # could send that many token ids, so it is not paid, but the ledger keeps it.
        during[-1] = WORKER.sign(during[-1].model_copy(update={
            "usage": Usage(prompt_tokens=MAX_TOKENS, completion_tokens=MAX_TOKENS)}))
        everything = {result.request_id for result in [*before, *during]}
        payable = everything - {during[-1].request_id}
        log = tmp_path / "pipeline.log"

        def sink_failures() -> int:
            return log.read_text().count("events to the ledger failed")

        def paid() -> set[str]:
            return {entry.request_id
                    for entry in pipeline_process.committed_events(settings, "rewards")}

        pipeline = pipeline_process.start(env, log)
        try:
            publish_answered(settings, before)
            pipeline_process.wait_until(
                lambda: pipeline_process.consumed(settings, "results"),
                "the first results are in the ledger", log)
            ballast = fill(ledger_dir)
            publish_answered(settings, during)
            # Everything else goes on: the results are attributed and paid.
            pipeline_process.wait_until(lambda: paid() >= payable, "every request is paid",
                                        log)
            pipeline_process.wait_until(lambda: sink_failures() >= 3,
                                        "the sink has retried a failed write", log)
            assert not pipeline_process.consumed(settings, "results"), (
                "offsets committed past results that are not written")
            ballast.unlink()
            pipeline_process.wait_until(
                lambda: pipeline_process.consumed(settings, "results", "attributions",
                                                  "rewards"),
                "the sink has written everything", log)
            assert pipeline_process.stop(pipeline) == 0
        finally:
            pipeline_process.kill(pipeline)

        assert "Traceback" not in log.read_text()
        assert paid() == payable
        entries = {entry.entry_id
                   for entry in pipeline_process.committed_events(settings, "rewards")}
        attributions = pipeline_process.committed_events(settings, "attributions")
        assert probe(env, tmp_path, "counts") == {
            "inference_results": [len(everything)] * 2,
            "attributions": [len(attributions)] * 2,
            "reward_entries": [len(entries)] * 2,
        }
        subprocess.run([sys.executable, "-m", "loraledger.cli", "replay", "--into", "rebuilt"],
                       env=env, cwd=tmp_path, check=True, capture_output=True, timeout=300)
        report = probe(env, tmp_path, "compare", "rebuilt")
        assert all(report["equal"].values()), report["equal"]
        assert report["rows"]["inference_results"] == len(everything)
