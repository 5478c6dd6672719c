"""`produce`, `tail`, `stack status` and `schemas export` through the CLI, on the real broker."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from loraledger.cli import app
from loraledger.commands.events import parse_request_lines

runner = CliRunner()


def test_request_lines_report_their_numbers_and_keep_the_valid_ones():
    lines = [
        '{"adapter_id": "legal-eu", "prompt": "first"}',
        "",
        "{not json",
        '{"adapter_id": "../../etc/passwd", "prompt": "x"}',
        '{"adapter_id": "legal-eu", "prompt": "second", "max_new_tokens": 8}',
    ]
    requests, problems = parse_request_lines(lines)
    assert [request.prompt for request in requests] == ["first", "second"]
    assert [problem.split(":")[0] for problem in problems] == ["line 3", "line 4"]
    assert "invalid id" in problems[1]


def test_produce_refuses_bad_arguments_with_one_line():
    result = runner.invoke(app, ["produce", "--adapter", "../x", "--prompt", "hi"])
    assert result.exit_code == 2
    assert "invalid id" in result.output
    result = runner.invoke(app, ["produce", "--prompt", "hi"])
    assert result.exit_code == 2
    assert "--adapter" in result.output


def test_schemas_export_writes_files(tmp_path):
    result = runner.invoke(app, ["schemas", "export", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "InferenceResult.schema.json").exists()


@pytest.mark.integration
def test_produce_then_tail_through_the_broker(kafka_settings, stack_env, monkeypatch, tmp_path):
    for name in ("LORALEDGER_TOPIC_PREFIX", "KAFKA_BOOTSTRAP"):
        monkeypatch.setenv(name, stack_env[name])
    requests_file = tmp_path / "requests.jsonl"
    requests_file.write_text(
        '{"adapter_id": "farm-1", "prompt": "When to sow barley?"}\n'
        "oops\n"
        '{"adapter_id": "farm-2", "prompt": "How deep?", "seed": 3}\n'
    )
    sent = runner.invoke(app, ["produce", "--file", str(requests_file)])
    assert sent.exit_code == 0, sent.output
    assert "line 2" in sent.output and "sent 2 request(s)" in sent.output
    sent = runner.invoke(
        app, ["produce", "--adapter", "farm-1", "--prompt", "Rain?", "--count", "3"]
    )
    assert sent.exit_code == 0, sent.output

    tailed = runner.invoke(app, ["tail", "requests", "--limit", "10", "--json",
                                 "--idle-timeout", "2"])
    assert tailed.exit_code == 0, tailed.output
    events = [json.loads(line) for line in tailed.output.splitlines() if line.startswith("{")]
    prompts = sorted(event["prompt"] for event in events)
    assert prompts == ["How deep?", "Rain?", "Rain?", "Rain?", "When to sow barley?"]

    status = runner.invoke(app, ["stack", "status"])
    assert status.exit_code == 0, status.output
    assert f"{stack_env['LORALEDGER_TOPIC_PREFIX']}requests" in status.output


def test_request_lines_that_are_not_utf8_or_hostile_are_reported_and_skipped(tmp_path):
    requests_file = tmp_path / "requests.jsonl"
    requests_file.write_bytes(b"\n".join([
        b'{"adapter_id": "legal-eu", "prompt": "caf\xe9"}',
        b"[" * 100_000,
        b'{"adapter_id": "legal-eu", "prompt": "ok", "seed": ' + b"9" * 5000 + b"}",
        b'{"adapter_id": "legal-eu", "prompt": "fine"}',
    ]))  # fmt: skip
    requests, problems = parse_request_lines(requests_file.read_bytes().splitlines())
    assert [request.prompt for request in requests] == ["fine"]
    assert [problem.split(":")[0] for problem in problems] == ["line 1", "line 2", "line 3"]
    assert "not UTF-8" in problems[0] and "nests" in problems[1] and "4300 digits" in problems[2]
