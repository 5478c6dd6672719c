"""The demo's child processes: `loraledger` commands run with this process's settings, each
logging to its own file and stopped gently."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from infra.settings import Settings
from loraledger.demo.errors import DemoError

REPO_ROOT = Path(__file__).resolve().parents[2]


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "loraledger.cli", *args]


def child_env(settings: Settings) -> dict[str, str]:
    """The children see exactly this process's settings, and one CPU thread each: they share
    the machine with each other."""
    env = dict(os.environ)
    env.update({
        "LORALEDGER_HOME": str(settings.home),
        "KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "LORALEDGER_TOPIC_PREFIX": settings.topic_prefix,
        "CLICKHOUSE_URL": settings.clickhouse_url,
        "LORALEDGER_BASE_MODEL": str(settings.base_model_dir),
        "LORALEDGER_CACHE": str(settings.cache_dir),
        "LORALEDGER_DEVICE": settings.device,
        "LORALEDGER_KAFKA_SECURITY": settings.kafka_security,
        "LORALEDGER_CREDENTIALS_DIR": str(settings.credentials_dir),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # their logs, not progress bars
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    })
    return env


class Service:
    """A child process (worker or pipeline) logging to a file, stopped gently."""

    def __init__(
        self, name: str, args: Sequence[str], log_path: Path, env: dict[str, str]
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.killed = False  # True when it ignored SIGTERM for the whole grace period
        self._log: TextIO = log_path.open("w")
        self.process = subprocess.Popen(
            cli_command(*args), stdout=self._log, stderr=subprocess.STDOUT,
            # The run directory: whatever a child writes relative to its cwd stays there.
            stdin=subprocess.DEVNULL, env=env, cwd=log_path.parent,
        )

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise DemoError(f"the {self.name} exited with code {code}: {self.last_line()} "
                            f"(log: {self.log_path})")

    def last_line(self) -> str:
        self._log.flush()
        lines = [line for line in self.log_path.read_text().splitlines() if line.strip()]
        return lines[-1].strip() if lines else "no output"

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def exit_warning(self) -> str | None:
        """After `stop`: what went wrong with how it ended, if anything."""
        if self.killed:
            return f"the {self.name} did not stop on SIGTERM and was killed (log: {self.log_path})"
        if self.process.returncode not in (0, -signal.SIGTERM):
            return (f"the {self.name} exited with code {self.process.returncode} "
                    f"(log: {self.log_path})")
        return None


@contextmanager
def running_services(services: list[Service]) -> Iterator[list[Service]]:
    try:
        yield services
    finally:
        for service in reversed(services):
            service.stop()
