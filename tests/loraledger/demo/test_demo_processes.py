"""The demo's child processes: stopped gently, a failed one reported with its last line."""

from __future__ import annotations

import pytest

from loraledger.demo.processes import Service


def test_service_stop_terminates_and_reports_a_failed_child(tmp_path, monkeypatch):
    monkeypatch.setattr("loraledger.demo.processes.cli_command",
                        lambda *args: ["sleep", "60"])
    service = Service("sleeper", [], tmp_path / "sleeper.log", {})
    service.check_alive()
    assert service.stop(grace_s=10) is not None
    assert service.process.poll() is not None
    assert service.exit_warning() is None  # stopped by our SIGTERM: nothing to report
    monkeypatch.setattr("loraledger.demo.processes.cli_command",
                        lambda *args: ["ls", str(tmp_path / "missing")])
    failing = Service("crasher", [], tmp_path / "crasher.log", {})
    failing.process.wait()
    with pytest.raises(RuntimeError, match=r"the crasher exited with code 2: ls: .*missing"):
        failing.check_alive()
    failing.stop()
    assert failing.exit_warning() == (
        f"the crasher exited with code 2 (log: {tmp_path / 'crasher.log'})"
    )
