"""`datanet add` publishes first and applies what the log acknowledged: the local store is never
ahead of the contributions topic. The broker is replaced by a recorder here; the real topic is
covered by tests/inference/test_datanet_kafka.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from inference.datanets import DatanetStore
from infra.kafka import events as kafka_events
from loraledger.cli import app


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = {"LORALEDGER_HOME": str(tmp_path / "home")}
    # Only `add` is under test: the datanet is created without a broker.
    created = CliRunner().invoke(app, ["datanet", "create", "water", "--no-publish"], env=env)
    assert created.exit_code == 0, created.output
    return env


def _store(tmp_path: Path) -> DatanetStore:
    return DatanetStore(tmp_path / "home" / "datanets")


def _add(env: dict[str, str], tmp_path: Path) -> object:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "Boil river water."}\n{"text": "Cover the well."}\n')
    return CliRunner().invoke(
        app, ["datanet", "add", "water", "--contributor", "ann", "--file", str(rows)], env=env
    )


def test_nothing_is_applied_when_the_log_did_not_take_it(env, tmp_path, monkeypatch) -> None:
    def unreachable(settings, events) -> int:
        raise ConnectionError("broker down")

    monkeypatch.setattr(kafka_events, "publish_sync", unreachable)
    result = _add(env, tmp_path)
    assert result.exit_code == 1 and "could not publish" in result.output
    assert _store(tmp_path).rows("water") == []


def test_the_store_applies_exactly_the_published_events(env, tmp_path, monkeypatch) -> None:
    log: list = []

    def acknowledged(settings, events) -> int:
        log.extend(events)
        return len(log)

    monkeypatch.setattr(kafka_events, "publish_sync", acknowledged)
    result = _add(env, tmp_path)
    assert result.exit_code == 0, result.output
    store = _store(tmp_path)
    assert [row.row_id for row in store.rows("water")] == [event.row_id for event in log]
    rebuilt = DatanetStore(tmp_path / "rebuilt")
    rebuilt.create("water")
    for event in log:
        rebuilt.apply(event)
    assert rebuilt.rows("water") == store.rows("water")
