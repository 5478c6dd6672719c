"""`loraledger base-model import` (a released checkpoint as the base model) and
`loraledger adapters plan` (the device slots the worker allocates for it)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from infra.settings import load_settings

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]error[/red] {message}", highlight=False)
    return typer.Exit(1)


def import_base_model(
    source: Path = typer.Argument(
        ..., help="A Hugging Face checkpoint directory (safetensors) or a .gguf file."
    ),
) -> None:
    """Install a checkpoint as the base model (LORALEDGER_BASE_MODEL) that the worker, training
    and verification use, with its tokenizer and chat template."""
    from transformers.utils import logging as transformers_logging

    from inference.checkpoint_import import ImportRefused, import_checkpoint

    transformers_logging.disable_progress_bar()
    settings = load_settings()
    try:
        info = import_checkpoint(source, settings.base_model_dir, settings.cache_dir)
    except (ImportRefused, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    origin = "safetensors" if info.source_format == "safetensors" else "GGUF, dequantized"
    if info.from_cache:
        origin += ", conversion cached"
    console.print(
        f"base model: {info.architecture}, {info.parameters:,} parameters, weights "
        f"{info.weights_hash}, chat template {'yes' if info.has_chat_template else 'no'} "
        f"({origin}) in {info.directory}",
        highlight=False,
    )


def adapters_plan(
    adapter_memory: int | None = typer.Option(
        None, "--adapter-memory", min=1,
        help="Bytes of device memory for adapter slots (default: sized from the model).",
    ),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda [LORALEDGER_DEVICE]."),
) -> None:
    """The device slots per rank class that a worker allocates for the base model."""
    import torch

    from inference.config import LoraServingConfig, ModelConfig
    from inference.slot_plan import SlotBudgetTooSmall, plan_slots

    settings = load_settings()
    device = device or settings.device
    try:
        model_config = ModelConfig.from_model_dir(settings.base_model_dir)
        serving = LoraServingConfig(device_budget_bytes=adapter_memory)
        # As the worker's adapter cache decides: projections are fused on the CPU only.
        fuse = device == "cpu" if serving.fuse_projections is None else serving.fuse_projections
        plan = plan_slots(model_config, serving, torch.float32, fuse)
    except (FileNotFoundError, ValueError, SlotBudgetTooSmall) as exc:
        raise _fail(str(exc)) from None
    table = Table("rank class", "slots", "bytes per slot", "bytes")
    for rank_class in plan.classes:
        table.add_row(
            str(rank_class.rank), str(rank_class.slots), f"{rank_class.bytes_per_slot:,}",
            f"{rank_class.bytes:,}",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"{plan.total_bytes:,} bytes of {plan.budget_bytes:,} ({plan.budget_source}), float32 on "
        f"{device}, {model_config.num_layers} layers",
        highlight=False,
    )
