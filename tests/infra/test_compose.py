"""docker-compose.yml stays in step with the code: every command a service of the project's
image runs exists in the CLI, and every variable it sets is one the code reads."""

from __future__ import annotations

from pathlib import Path

import typer.main
import yaml

from infra.settings import ENV_VARS
from loraledger.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _project_services() -> dict[str, dict]:
    return {
        name: service
        for name, service in _compose()["services"].items()
        if service.get("image", "").startswith("loraledger")
    }


def _resolve(words: list[str]):
    # typer ships its own click, so commands are recognised by shape, not by class.
    command = typer.main.get_command(app)
    for word in words:
        if word.startswith("-"):
            break
        assert hasattr(command, "commands"), f"{word!r} follows a command with no subcommands"
        sub = command.commands.get(word)
        assert sub is not None, f"`loraledger {' '.join(words)}`: no command {word!r}"
        command = sub
    return command


def test_the_project_image_runs_the_worker_pipeline_and_init():
    assert {"init", "worker", "pipeline"} <= set(_project_services())
    assert {"kafka", "clickhouse"} <= set(_compose()["services"])


def test_every_service_command_exists_in_the_cli():
    for name, service in _project_services().items():
        command = service["command"]
        assert command[0] == "loraledger", name
        resolved = _resolve(command[1:])
        options = {opt for param in resolved.params for opt in getattr(param, "opts", [])}
        for word in command[1:]:
            if word.startswith("--") and word != "--help":
                assert word in options, f"service {name}: {resolved.name} has no option {word}"


def test_every_variable_a_service_sets_is_read_by_the_code():
    for name, service in _project_services().items():
        for variable in service.get("environment", {}):
            assert variable in ENV_VARS, f"service {name} sets {variable}, which no code reads"


def test_the_worker_reserves_a_gpu():
    devices = _compose()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_the_cluster_profile_runs_three_secured_voting_nodes_of_one_cluster():
    single = _compose()["services"]["kafka"]
    nodes = {name: service for name, service in _compose()["services"].items()
             if "cluster" in service.get("profiles", [])}
    assert sorted(nodes) == ["kafka-1", "kafka-2", "kafka-3"]
    envs = [nodes[name]["environment"] for name in sorted(nodes)]
    assert [env["KAFKA_NODE_ID"] for env in envs] == [1, 2, 3]
    assert len({env["KAFKA_CLUSTER_ID"] for env in envs}) == 1
    assert {env["KAFKA_CONTROLLER_QUORUM_VOTERS"] for env in envs} == {
        "1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093"}
    assert [env["KAFKA_ADVERTISED_HOST"] for env in envs] == [f"kafka-{n}" for n in (1, 2, 3)]
    assert {(env["KAFKA_REPLICAS"], env["KAFKA_MIN_INSYNC_REPLICAS"]) for env in envs} == {(3, 2)}
    # Secured as the single node is: the same script, the admin's password from .env, and only
    # the settings the script reads.
    script = (ROOT / "infra" / "kafka" / "compose-broker.sh").read_text()
    for name, node in nodes.items():
        assert node["command"] == single["command"], name
        assert node["environment"]["KAFKA_ADMIN_PASSWORD"] == single["environment"][
            "KAFKA_ADMIN_PASSWORD"], name
        assert any(volume.endswith(":/loraledger/compose-broker.sh:ro")
                   for volume in node["volumes"]), name
        for variable in node["environment"]:
            assert f"${{{variable}" in script, f"{name} sets {variable}, which the script ignores"
    assert "--command-config /tmp/admin.properties" in nodes["kafka-1"]["healthcheck"]["test"][1]
    # Provisioning waits for the cluster's nodes when the profile runs them.
    waits = _compose()["services"]["init"]["depends_on"]
    assert all(waits[name] == {"condition": "service_healthy", "required": False}
               for name in nodes)


def test_published_ports_listen_on_the_loopback_interface_only():
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"service {name} publishes {port} widely"


def test_clickhouse_needs_a_password_and_the_services_give_it():
    clickhouse = _compose()["services"]["clickhouse"]["environment"]
    assert clickhouse["CLICKHOUSE_USER"] == "loraledger"
    assert clickhouse["CLICKHOUSE_PASSWORD"].startswith("${CLICKHOUSE_PASSWORD:?")
    for name, service in _project_services().items():
        url = service["environment"]["CLICKHOUSE_URL"]
        assert url.startswith("http://loraledger:${CLICKHOUSE_PASSWORD"), name


def test_the_broker_is_secured_and_each_service_holds_only_its_principals():
    kafka = _compose()["services"]["kafka"]
    script = (ROOT / "infra" / "kafka" / "compose-broker.sh").read_text()
    assert kafka["command"][-1].endswith("compose-broker.sh")
    assert "allow.everyone.if.no.acl.found=false" in script
    assert "StandardAuthorizer" in script and "super.users=User:admin\n" in script
    assert "PLAINTEXT://" not in script
    mounted = {
        name: {volume.split(":")[1].removeprefix("/credentials/")
               for volume in service["volumes"] if ":/credentials/" in volume}
        for name, service in _project_services().items()
    }
    assert mounted == {
        "init": {"client", "worker", "processor", "governance", "sink"},
        "worker": {"worker"},
        "pipeline": {"processor", "governance"},
        "gateway": {"client"},
        "cli": {"client"},
    }
    # The admin's password reaches only the broker and the init job, from the environment.
    assert _project_services()["init"]["environment"]["LORALEDGER_PRINCIPAL"] == "admin"
