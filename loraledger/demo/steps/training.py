"""Step 4, the adapters: one LoRA adapter per datanet snapshot, trained only when its manifest
is missing or stale (training is deterministic)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console

from inference.adapter_store import AdapterManifest, AdapterStore
from inference.datanets import Snapshot
from inference.factory import AdapterSpec, TrainConfig, train_many
from inference.hashing import base_model_hash
from infra.settings import Settings
from loraledger.demo.options import DemoDatanet
from loraledger.demo.steps.datanets import PreparedDatanet
from loraledger.demo.ui import progress_bar


def adapter_id_for(spec: DemoDatanet) -> str:
    return f"demo-{spec.name}"


def owner_id_for(spec: DemoDatanet) -> str:
    return f"{spec.tag}-steward"


def adapter_is_current(
    manifest: AdapterManifest | None, snapshot: Snapshot, config: TrainConfig, base_hash: str
) -> bool:
    """Training is deterministic: the same snapshot, config and base give the same adapter. A
    manifest from before the adapter hash covered the config is retrained: it would be refused."""
    return (
        manifest is not None
        and manifest.adapter_hash is not None
        and manifest.snapshot_hash == snapshot.manifest.snapshot_hash
        and manifest.training_config == config.to_record()
        and manifest.base_model_hash == base_hash
    )


def describe_adapter(manifest: AdapterManifest, cached: Sequence[str]) -> str:
    """One line for the step's outcome."""
    state = "cached" if manifest.adapter_id in cached else "trained"
    return (f"{manifest.adapter_id} ({state}, loss "
            f"{manifest.first_loss:.2f}->{manifest.last_loss:.2f})")


def ensure_adapters(
    settings: Settings, datanets: Sequence[PreparedDatanet], config: TrainConfig,
    console: Console,
) -> tuple[list[AdapterManifest], list[str]]:
    """Train the adapters whose manifest is missing or stale; returns every manifest and the ids
    that were cached."""
    base_hash = base_model_hash(settings.base_model_dir)
    store = AdapterStore.from_settings(settings)
    stored = {manifest.adapter_id: manifest for manifest in store.manifests()}
    todo = [
        prepared for prepared in datanets
        if not adapter_is_current(stored.get(adapter_id_for(prepared.spec)), prepared.snapshot,
                                  config, base_hash)
    ]
    retrain = {adapter_id_for(p.spec) for p in todo}
    cached = [adapter_id_for(p.spec) for p in datanets if adapter_id_for(p.spec) not in retrain]
    if not todo:
        return [stored[adapter_id_for(p.spec)] for p in datanets], cached
    with progress_bar(console) as progress:
        task = progress.add_task("training adapters", total=len(todo) * config.steps)
        for number, prepared in enumerate(todo):
            adapter_id = adapter_id_for(prepared.spec)
            offset = number * config.steps

            def advance(step: int, total: int, loss: float, offset: int = offset,
                        adapter_id: str = adapter_id) -> None:
                progress.update(task, completed=offset + step,
                                description=f"training {adapter_id} loss {loss:.3f}")

            spec = AdapterSpec(adapter_id, owner_id_for(prepared.spec), config)
            train_many(prepared.snapshot, [spec], settings.base_model_dir,
                       settings.adapters_dir, overwrite=True, progress=advance)
    stored = {manifest.adapter_id: manifest for manifest in store.manifests()}
    return [stored[adapter_id_for(p.spec)] for p in datanets], cached
