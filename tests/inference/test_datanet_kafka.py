"""`datanet add` publishes to the contributions topic, and folding that topic into an empty store
rebuilds the same datanet."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from inference.datanets import DatanetStore
from infra.kafka.events import read_topic
from loraledger.cli import app


async def _contributions(settings) -> list:
    return [decoded.event async for decoded in read_topic(settings, "contributions")]


@pytest.mark.integration
def test_the_store_rebuilds_from_the_contributions_topic(
    stack_env: dict[str, str], kafka_settings, tmp_path: Path
) -> None:
    env = {**stack_env, "LORALEDGER_HOME": str(tmp_path / "home")}
    runner = CliRunner()
    assert runner.invoke(app, ["datanet", "create", "water"], env=env).exit_code == 0
    for contributor, text in [("ann", "Boil river water."), ("bob", "Boil  river water."),
                              ("bob", "Cover the well at night.")]:  # fmt: skip
        result = runner.invoke(
            app, ["datanet", "add", "water", "--contributor", contributor, "--text", text], env=env
        )
        assert result.exit_code == 0, result.output
    local = DatanetStore(tmp_path / "home" / "datanets")

    events = asyncio.run(_contributions(kafka_settings))
    assert len(events) == 3
    rebuilt = DatanetStore(tmp_path / "rebuilt")
    rebuilt.create("water")
    for event in events:
        rebuilt.apply(event)
    assert rebuilt.rows("water") == local.rows("water")
    assert [o.reason for o in rebuilt.rejections("water")] == [
        "duplicate of a row already credited to ann"
    ]
    assert rebuilt.snapshot("water").snapshot_hash == local.snapshot("water").snapshot_hash
