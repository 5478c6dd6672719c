"""The ledger server as a background process of the local stack: `loraledger stack up` starts
it, `stack down` stops it; its pid file and log live under $LORALEDGER_HOME/ledger."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from infra.kafka.broker import StackError, port_open
from infra.settings import LEDGER_HOST, Settings

# `python -m infra.ledger_server` must run this copy of the code: start it from the directory
# holding the `infra` package.
_CODE_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class LedgerPaths:
    root: Path

    @property
    def pid_file(self) -> Path:
        return self.root / "ledger.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "ledger.log"


def ledger_paths(settings: Settings) -> LedgerPaths:
    return LedgerPaths(settings.home / "ledger")


def running_pid(paths: LedgerPaths) -> int | None:
    try:
        pid = int(paths.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def ledger_answers(settings: Settings, timeout_s: float = 2.0) -> bool:
    """Whether the local ledger server answers its ping."""
    try:
        with urllib.request.urlopen(f"{settings.ledger_url}/ping", timeout=timeout_s) as reply:
            return reply.read() == b"Ok.\n"
    except (OSError, urllib.error.URLError):
        return False


def _last_log_line(paths: LedgerPaths) -> str:
    try:
        lines = paths.log_file.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "no output"
    return lines[-1] if lines else "no output"


def start_ledger(settings: Settings, timeout_s: float = 60.0) -> int:
    """Start the ledger server in the background (unless it runs) and wait until it answers."""
    paths = ledger_paths(settings)
    pid = running_pid(paths)
    if pid is not None:
        return pid
    address = f"{LEDGER_HOST}:{settings.ledger_port}"
    if port_open(address):
        raise StackError(f"something else already listens on {address}: stop it, or set "
                         "LORALEDGER_LEDGER_PORT to a free port")
    paths.root.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "LORALEDGER_HOME": str(settings.home),
        "LORALEDGER_LEDGER_PORT": str(settings.ledger_port),
        "LORALEDGER_LEDGER_PASSWORD": settings.ledger_password,
    }
    with paths.log_file.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "infra.ledger_server"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=_CODE_ROOT,
            env=env,
            start_new_session=True,  # the server outlives the command that started it
        )
    paths.pid_file.write_text(str(process.pid))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            paths.pid_file.unlink(missing_ok=True)
            raise StackError(f"the ledger server exited with {process.returncode}: "
                             f"{_last_log_line(paths)}")
        if ledger_answers(settings):
            return process.pid
        time.sleep(0.3)
    raise StackError(f"the ledger server did not answer within {timeout_s:.0f}s; see "
                     f"{paths.log_file}")


def stop_ledger(settings: Settings, timeout_s: float = 30.0) -> bool:
    """Stop the ledger server (SIGTERM, then SIGKILL after the timeout). False if none ran."""
    paths = ledger_paths(settings)
    pid = running_pid(paths)
    if pid is None:
        paths.pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if this process started it
        if running_pid(paths) is None:
            break
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
    paths.pid_file.unlink(missing_ok=True)
    return True
