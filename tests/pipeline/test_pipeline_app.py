"""The pipeline's Faust app is built from the settings it is given, with the processors asked
for; nothing is registered at import."""

from __future__ import annotations

from typer.testing import CliRunner

from infra.settings import load_settings
from loraledger.cli import app as cli
from pipeline.agents import Processor, build_pipeline
from pipeline.app import consumer_group

GOVERNANCE_TABLES = [
    "earned-entries", "open-proposals", "parameter-history", "used-proposal-ids", "voter-keys",
]


def _settings(tmp_path, prefix: str):
    return load_settings({"LORALEDGER_HOME": str(tmp_path), "LORALEDGER_TOPIC_PREFIX": prefix})


def test_every_processor_by_default_under_the_settings_given(tmp_path):
    settings = _settings(tmp_path, "p1.")
    app = build_pipeline(settings)
    assert app.conf.id == consumer_group(settings) == "p1.loraledger-pipeline"
    assert app.conf.datadir == tmp_path / "faust"
    assert sorted(app.agents.keys()) == ["governance", "governance-earnings", "ledger-sink"]
    assert sorted(app.tables.keys()) == GOVERNANCE_TABLES
    assert len(app._stop_hooks) == 1  # the attribution task ends first


def test_a_worker_runs_only_the_processors_asked_for(tmp_path):
    attribution = build_pipeline(_settings(tmp_path, "p2."), [Processor.ATTRIBUTION])
    assert list(attribution.agents.keys()) == []
    assert list(attribution.tables.keys()) == []
    assert len(attribution._stop_hooks) == 1
    governance = build_pipeline(_settings(tmp_path, "p3."), [Processor.GOVERNANCE])
    assert sorted(governance.agents.keys()) == ["governance", "governance-earnings"]
    assert sorted(governance.tables.keys()) == GOVERNANCE_TABLES
    assert governance._stop_hooks == []


def test_the_app_authenticates_as_governance_when_governance_runs_in_it_else_as_the_sink(tmp_path):
    def principal(processors, env=None):
        settings = load_settings({"LORALEDGER_HOME": str(tmp_path), **(env or {})})
        return build_pipeline(settings, processors).kafka_settings.principal

    assert principal(list(Processor)) == "governance"
    assert principal([Processor.GOVERNANCE]) == "governance"
    assert principal([Processor.SINK]) == principal([Processor.ATTRIBUTION]) == "sink"
    # LORALEDGER_PRINCIPAL chooses one for the whole process.
    assert principal([Processor.SINK], {"LORALEDGER_PRINCIPAL": "admin"}) == "admin"


def test_the_command_refuses_an_unknown_processor():
    result = CliRunner().invoke(cli, ["pipeline", "--processor", "rewards"])
    assert result.exit_code == 2
    assert "rewards" in result.output
