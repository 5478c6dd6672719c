"""The benchmark scripts still run end to end (tiny settings; their timings are not checked)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_cpu_bench_writes_rows_that_match_the_reference(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    result = run_script("bench/kernels_cpu.py", "--reps", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(row["matches_reference"] for row in rows)
    assert "| decode |" in result.stdout


def test_gpu_bench_dry_run_checks_kernels_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    result = run_script("bench/kernels_gpu.py", "--dry-run-cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["dry_run_cpu"] is True
    assert {row["kernel"] for row in report["rows"]} == {"sgmv", "bgmv"}
    assert all(row["matches_reference"] for row in report["rows"])


def test_gpu_bench_without_cuda_says_so(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible, so the script runs instead of refusing")
    result = run_script("bench/kernels_gpu.py", "--out", str(tmp_path / "gpu.json"))
    assert result.returncode == 2
    assert "needs a CUDA device" in result.stderr
    assert not (tmp_path / "gpu.json").exists()
