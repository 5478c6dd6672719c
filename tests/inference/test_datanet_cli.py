"""The datanet, train and adapters commands end to end on a temporary home (no broker:
--no-publish)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from inference.datanets import DatanetStore
from loraledger.cli import app


@pytest.fixture
def env(tmp_path: Path, base_model_dir: Path) -> dict[str, str]:
    return {
        "LORALEDGER_HOME": str(tmp_path / "home"),
        "LORALEDGER_BASE_MODEL": str(base_model_dir),
        "LORALEDGER_CACHE": str(tmp_path / "cache"),
    }


def run(env: dict[str, str], *args: str) -> str:
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.output


def test_datanet_commands_then_train_and_list_adapters(
    env: dict[str, str], tmp_path: Path, small_datanet
) -> None:
    run(env, "datanet", "create", "farming", "--no-publish", "--description", "sowing calendars")
    run(env, "datanet", "add", "farming", "--contributor", "ann", "--no-publish",
        "--text", "Sow barley in April.")  # fmt: skip
    rows = tmp_path / "rows.jsonl"
    lines = [json.dumps({"text": r.text}).encode() for r in small_datanet.synthetic.rows[:12]]
    lines += [
        b'{"text": "caf\xe9"}',
        b"not json",
        json.dumps({"text": "Sow barley in April."}).encode(),
    ]
    rows.write_bytes(b"\n".join(lines) + b"\n")
    output = run(env, "datanet", "add", "farming", "--contributor", "bob", "--file", str(rows),
                 "--no-publish")  # fmt: skip
    assert "invalid UTF-8" in output and "not JSON" in output and "credited to ann" in output
    store = DatanetStore(Path(env["LORALEDGER_HOME"]) / "datanets")
    accepted = len(store.rows("farming"))
    assert accepted >= 2 and store.info("farming").rejected >= 3

    assert "farming@1" in run(env, "datanet", "snapshot", "farming")
    shown = run(env, "datanet", "show", "farming@1")
    assert f'"rows": {accepted}' in shown
    assert "farming" in run(env, "datanet", "list")

    run(env, "train", "--datanet", "farming@1", "--adapter-id", "farm-1", "--owner", "coop",
        "--steps", "3", "--rank", "2", "--k", "16", "--no-publish")  # fmt: skip
    assert "farm-1" in run(env, "adapters", "list")
    manifest = json.loads(run(env, "adapters", "show", "farm-1"))
    assert manifest["training_rows"] == accepted and manifest["rank"] == 2

    run(env, "train-batch", "--datanet", "farming", "--count", "2", "--prefix", "farm-b",
        "--owner", "coop", "--steps", "1", "--rank", "2", "--k", "8", "--no-publish")  # fmt: skip
    listing = run(env, "adapters", "list")
    assert "farm-b-0000" in listing and "farm-b-0001" in listing


def test_cli_errors_are_one_line(env: dict[str, str]) -> None:
    result = CliRunner().invoke(app, ["datanet", "show", "missing"], env=env)
    assert result.exit_code == 1 and "unknown datanet 'missing'" in result.output
    result = CliRunner().invoke(
        app, ["train", "--datanet", "missing", "--adapter-id", "a", "--owner", "o"], env=env
    )
    assert result.exit_code == 1 and "unknown datanet" in result.output
    result = CliRunner().invoke(app, ["adapters", "show", "nope"], env=env)
    assert result.exit_code == 1 and "unknown adapter" in result.output


def test_hostile_rows_are_refused_one_by_one_and_the_others_kept(tmp_path: Path) -> None:
    env = {"LORALEDGER_HOME": str(tmp_path / "home")}
    run(env, "datanet", "create", "market", "--no-publish")
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b"\n".join([
        b'{"text": "Salt costs two coins.", "license": 5}',
        b"[" * 100_000,
        b'{"text": "Rice costs one coin.", "count": ' + b"9" * 5000 + b"}",
        b'{"text": "[/red] is not markup"}',
        b'{"text": "Beans cost three coins.", "license": "MIT"}',
    ]) + b"\n")  # fmt: skip
    output = run(env, "datanet", "add", "market", "--contributor", "cy", "--file", str(rows),
                 "--no-publish")  # fmt: skip
    assert "invalid license identifier 5" in output
    assert "line 2: value nests 100000 levels deep" in output
    assert "line 3: value holds an integer of more than 4300 digits" in output
    assert "2 accepted, 3 rejected" in output
    store = DatanetStore(Path(env["LORALEDGER_HOME"]) / "datanets")
    assert sorted(row.text for row in store.rows("market")) == [
        "Beans cost three coins.", "[/red] is not markup"
    ]
