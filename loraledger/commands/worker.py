"""`loraledger worker`: serve inference requests from Kafka on this machine's device."""

from __future__ import annotations

import asyncio
import logging

import typer
from rich.console import Console

from inference.slot_plan import SlotBudgetTooSmall
from inference.worker.backend import BackendConfig
from inference.worker.service import WorkerConfig, run_worker
from inference.worker.sketching import SketchMode, SketchPolicy
from infra.settings import load_settings

err_console = Console(stderr=True)


def worker(
    worker_id: str | None = typer.Option(
        None, "--worker-id", help="Identity credited as compute operator [LORALEDGER_WORKER_ID]."
    ),
    device: str | None = typer.Option(
        None, "--device", help="cpu or cuda [LORALEDGER_DEVICE]."
    ),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Sequences decoded at once."),
    max_seq_len: int = typer.Option(
        256, "--max-seq-len", min=2, help="Prompt plus completion tokens per sequence."
    ),
    adapter_memory: int | None = typer.Option(
        None, "--adapter-memory", min=1,
        help="Bytes of device memory for adapter slots (default: sized from the model).",
    ),
    sketch: str = typer.Option(
        "always", "--sketch", help="Attach attribution sketches: always, sampled or off."
    ),
    sketch_rate: float = typer.Option(
        0.1, "--sketch-rate", min=0.0, max=1.0, help="Fraction sketched with --sketch sampled."
    ),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", min=0, help="Prometheus port, 0 for none [LORALEDGER_METRICS_PORT]."
    ),
    threads: int = typer.Option(
        0, "--threads", min=0, help="CPU threads for torch (0: torch's default)."
    ),
    session_timeout_ms: int = typer.Option(
        10_000, "--session-timeout-ms", min=1000,
        help="How long the group waits on a silent worker before moving its partitions.",
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Consume `requests`, generate with the requested adapters, and produce `results`
    exactly once. SIGTERM drains: in-flight requests finish and commit before exit."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # aiokafka narrates every coordinator step at info; its warnings are what matter here.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    settings = load_settings()
    device = device or settings.device
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise typer.BadParameter(f"unknown device {device!r}: use cpu or cuda")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if sketch not in set(SketchMode):
        raise typer.BadParameter(f"unknown sketch mode {sketch!r}: use always, sampled or off")
    mode = SketchMode(sketch)
    try:
        config = WorkerConfig(
            worker_id=worker_id or settings.worker_id,
            device=device,
            backend=BackendConfig(
                max_batch=max_batch, max_seq_len=max_seq_len, adapter_memory_bytes=adapter_memory
            ),
            sketch=SketchPolicy(mode, sketch_rate if mode is SketchMode.SAMPLED else 1.0),
            metrics_port=settings.metrics_port if metrics_port is None else metrics_port,
            session_timeout_ms=session_timeout_ms,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        asyncio.run(run_worker(settings, config))
    except (FileNotFoundError, SlotBudgetTooSmall) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
