"""Step 2, the base model: built once into the shared cache, reused while its preset holds."""

from __future__ import annotations

from rich.console import Console

from inference.base_model import build_base_model, preset
from infra.settings import Settings
from loraledger.demo.ui import progress_bar


def ensure_base_model(settings: Settings, preset_name: str, console: Console) -> str:
    """Build (or reuse) the base model; returns its source: built, cache, up-to-date, external."""
    steps = preset(preset_name).steps
    with progress_bar(console) as progress:
        task = progress.add_task(f"base model ({preset_name})", total=steps)

        def advance(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total,
                            description=f"base model ({preset_name}) loss {loss:.3f}")

        info = build_base_model(
            settings.base_model_dir, settings.cache_dir, preset_name, progress=advance
        )
        progress.update(task, completed=steps)
    return info.source
