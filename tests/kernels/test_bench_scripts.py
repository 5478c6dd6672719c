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


def test_multi_lora_bench_reports_ratios_with_flop_ceilings(tmp_path: Path) -> None:
    out = tmp_path / "multi_lora.json"
    result = run_script(
        "bench/multi_lora.py",
        *("--adapters", "9", "--requests", "6", "--batch", "3", "--steps", "2"),
        *("--switch-requests", "1", "--min-new", "2", "--max-new", "4", "--device-slots", "4"),
        *("--extra-shapes", "default", "--extra-adapters", "6", "--extra-requests", "4"),
        *("--extra-max-new", "3", "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["shapes"]) == {"main", "default"}
    assert report["shapes"]["default"]["model"]["hidden_size"] == 128
    for shape in report["shapes"].values():
        assert 0.0 < shape["flop_ceiling_b_over_a"] < 1.0
        assert shape["b_engine_multi_lora"] > 0
    assert report["engine_runs"]["b"]["errors"] == 0
    assert "FLOP ceiling" in result.stdout and "| (d) peft" in result.stdout


def test_multi_lora_flop_count_follows_the_pool_layout() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import multi_lora
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from inference.config import LORA_TARGETS, ModelConfig

    config = ModelConfig.from_preset("tiny")
    shapes = [config.projection_shape(t) for t in LORA_TARGETS]
    per_rank_unfused = config.num_layers * sum(i + o for i, o in shapes)
    assert multi_lora.lora_macs_per_token(config, LORA_TARGETS, 8) == 8 * per_rank_unfused
    assert multi_lora.lora_macs_per_token(config, ("q_proj",), 4) == (
        config.num_layers * 4 * sum(config.projection_shape("q_proj"))
    )


@pytest.mark.slow
def test_real_model_bench_reports_the_four_configurations(tmp_path: Path, smollm2_dir) -> None:
    out = tmp_path / "real_model.json"
    result = run_script(
        "bench/real_model.py",
        *("--steps", "2", "--batch", "2", "--adapters", "2", "--prompt-len", "8"),
        *("--repeats", "2", "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["decode_tokens_per_s_median"]) == {"a", "b", "c", "d"}
    assert all(value > 0 for value in report["decode_tokens_per_s_median"].values())
    ratios = {"(b)/(a)", "(b)/(c)", "(a)/(d)"}
    assert set(report["ratios_median_of_rounds"]) == set(report["targets"]) == ratios
    assert all(len(values) == 2 for values in report["ratios_per_round"].values())
    assert "| (b)/(c) |" in result.stdout


def test_cpu_products_bench_times_every_layout_against_transformers(tmp_path: Path) -> None:
    out = tmp_path / "cpu_products.json"
    result = run_script(
        "bench/cpu_products.py",
        *("--layers", "2", "--vocab", "2048", "--repeats", "2", "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = {row["path"]: row for row in report["rows"]}
    assert {"transformers", "this engine", "read ceiling"} <= set(rows)
    assert rows["transformers"]["ratios_per_round"] == [1.0, 1.0]
    assert all(row["gb_per_s"] > 0 and len(row["ratios_per_round"]) == 2 for row in rows.values())
    assert all(row["error"] < 1e-4 for name, row in rows.items() if name != "read ceiling")
    assert report["products_per_pass"] == 2 * 4 + 1
    assert "| this engine |" in result.stdout


def test_cpu_products_bench_refuses_a_product_that_differs_from_float64() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from cpu_products import check_against_reference
    finally:
        sys.path.remove(str(ROOT / "bench"))

    weights = [torch.randn(6, 4)]
    inputs = {4: torch.randn(3, 4)}
    good = {"right": [lambda x: x @ weights[0].T]}
    assert check_against_reference(good, weights, inputs)["right"] < 1e-6
    wrong = {"off by one percent": [lambda x: x @ weights[0].T * 1.01]}
    with pytest.raises(SystemExit, match="off by one percent: products differ from float64"):
        check_against_reference(wrong, weights, inputs)
