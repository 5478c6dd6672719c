"""`loraledger demo` end to end on the real broker, small: the test base model preset, two
adapters, twenty requests; then again, to see every slow step skipped."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import ledger_probe
import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
SMALL_DEMO = ["--requests", "20", "--adapters", "2", "--base-preset", "test",
              "--train-steps", "20", "--timeout", "300"]


def _demo(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loraledger.cli", "demo", *SMALL_DEMO, *extra],
        cwd=REPO_ROOT, env={**env, "COLUMNS": "200"}, capture_output=True, text=True,
        timeout=600,
    )


@pytest.mark.integration
@pytest.mark.slow
def test_demo_runs_end_to_end_then_skips_cached_steps(kafka_settings, stack_env, tmp_path):
    env = {**stack_env, "LORALEDGER_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}

    first = _demo(env)
    assert first.returncode == 0, first.stderr[-2000:] + first.stdout[-2000:]
    out = first.stdout
    assert "a broker already answers" in out  # the shared broker: reused, left running
    assert re.search(r"inference and attribution: 20 requests, \d+ errors", out)
    assert "Usage per adapter" in out and "demo-valley-law" in out
    assert "demo-village-health" in out
    assert re.search(r"(law|health)-contributor-\d{3}", out)
    assert "verify: match" in out
    fee, paid = re.search(r"fee ([\d,]+) µ, paid out ([\d,]+) µ", out).groups()
    assert fee == paid and fee != "0"

    second = _demo(env)
    assert second.returncode == 0, second.stderr[-2000:] + second.stdout[-2000:]
    out = second.stdout
    assert "base model: cached" in out
    assert out.count("(cached)") == 2  # both datanets
    assert out.count("(cached, loss") == 2  # both adapters
    assert "verify: match" in out
    # The children are gone: nothing holds the embedded ClickHouse directory any more. Read it
    # from a fresh process (this one may already hold another embedded directory).
    count = subprocess.run(
        ledger_probe.command("counts"), cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert count.returncode == 0, count.stderr[-2000:]
    assert json.loads(count.stdout.strip().splitlines()[-1])["inference_results"][1] == 40
