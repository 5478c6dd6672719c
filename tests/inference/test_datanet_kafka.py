"""`datanet create` and `datanet add` publish their events, and `datanet rebuild` into an empty
home makes the same datanets from the log alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from inference.datanets import DatanetStore
from loraledger.cli import app


@pytest.mark.integration
def test_the_store_rebuilds_from_the_log_alone(
    stack_env: dict[str, str], kafka_settings, tmp_path: Path
) -> None:
    env = {**stack_env, "LORALEDGER_HOME": str(tmp_path / "home")}
    runner = CliRunner()
    for name, description in [("water", "Safe drinking water."), ("crops", "")]:
        created = runner.invoke(
            app, ["datanet", "create", name, "--description", description], env=env
        )
        assert created.exit_code == 0, created.output
    for name, contributor, text in [("water", "ann", "Boil river water."),
                                    ("water", "bob", "Boil  river water."),
                                    ("crops", "bob", "Sow rye in May."),
                                    ("water", "bob", "Cover the well at night.")]:  # fmt: skip
        result = runner.invoke(
            app, ["datanet", "add", name, "--contributor", contributor, "--text", text], env=env
        )
        assert result.exit_code == 0, result.output
    local = DatanetStore(tmp_path / "home" / "datanets")

    fresh = {**env, "LORALEDGER_HOME": str(tmp_path / "fresh")}
    for _ in range(2):  # a second rebuild changes nothing
        result = runner.invoke(app, ["datanet", "rebuild"], env=fresh)
        assert result.exit_code == 0, result.output
    rebuilt = DatanetStore(tmp_path / "fresh" / "datanets")
    assert rebuilt.names() == ["crops", "water"]
    assert rebuilt.info("water").description == "Safe drinking water."
    for name in ("water", "crops"):
        assert rebuilt.rows(name) == local.rows(name)
        assert rebuilt.rejections(name) == local.rejections(name)
        assert rebuilt.snapshot(name).snapshot_hash == local.snapshot(name).snapshot_hash
    assert [o.reason for o in rebuilt.rejections("water")] == [
        "duplicate of a row already credited to ann"
    ]
