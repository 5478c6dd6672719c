"""`loraledger base-model build | import`, `loraledger train`, `loraledger train-batch` and
`loraledger adapters list | show | plan`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from inference.adapter_store import AdapterError, AdapterManifest, AdapterStore
from inference.base_model import PRESETS, build_base_model
from inference.datanets import DatanetStore, Snapshot, parse_ref
from inference.factory import TrainConfig, subset_specs, train_adapter, train_many
from infra.settings import Settings, load_settings
from loraledger.commands.checkpoint import adapters_plan, import_base_model

console = Console()
err_console = Console(stderr=True)
base_model_app = typer.Typer(
    help="The base model every adapter is trained on.", no_args_is_help=True
)
adapters_app = typer.Typer(help="Trained adapters in the local store.", no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]error[/red] {message}")
    return typer.Exit(1)


@contextmanager
def _progress(description: str) -> Iterator[Progress]:
    # One progress bar per command: silence transformers' own loading and saving bars.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        yield progress


@base_model_app.command("build")
def build(
    preset: str = typer.Option("default", "--preset", help=f"One of: {', '.join(PRESETS)}."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the corpus, init and data order."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a cached build exists."),
) -> None:
    """Build (or reuse) the base model and put it in LORALEDGER_BASE_MODEL."""
    settings = load_settings()
    if preset not in PRESETS:
        raise _fail(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    with _progress("pretraining") as progress:
        task = progress.add_task("pretraining", total=PRESETS[preset].steps, loss="-")

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, loss=f"{loss:.3f}")

        try:
            info = build_base_model(
                settings.base_model_dir, settings.cache_dir, preset, seed, force, on_step
            )
        except FileExistsError as exc:
            raise _fail(str(exc)) from None
    console.print(f"base model ({info.source}) in {info.directory}, weights {info.weights_hash}")


def _snapshot(settings: Settings, ref: str) -> Snapshot:
    try:
        name, version = parse_ref(ref)
        return DatanetStore(settings.datanets_dir).load_snapshot(name, version)
    except (KeyError, ValueError) as exc:
        raise _fail(str(exc).strip("'\"")) from None


def _publish(settings: Settings, manifests: list[AdapterManifest]) -> None:
    from infra.kafka.events import publish_sync

    try:
        publish_sync(settings, [m.registration_event() for m in manifests])
    except Exception as exc:  # the adapters are saved; only the announcement failed
        raise _fail(
            f"adapters saved but not announced: Kafka at {settings.kafka_bootstrap} failed "
            f"({type(exc).__name__}); start it with `loraledger stack up` and retrain, or pass "
            "--no-publish"
        ) from None
    console.print(f"published {len(manifests)} AdapterRegistered event(s)")


def _config(
    rank: int, steps: int, lr: float, seed: int, batch_size: int, k: int,
    estimator: str = TrainConfig.index_estimator,
) -> TrainConfig:  # fmt: skip
    try:
        return TrainConfig(rank=rank, alpha=2.0 * rank, steps=steps, lr=lr, seed=seed,
                           batch_size=batch_size, index_k=k, index_estimator=estimator)  # fmt: skip
    except ValueError as exc:
        raise _fail(str(exc)) from None


def train(
    datanet: str = typer.Option(..., "--datanet", help="NAME or NAME@VERSION (default: latest)."),
    adapter_id: str = typer.Option(..., "--adapter-id", help="Id of the new adapter."),
    owner: str = typer.Option(..., "--owner", help="Owner credited for the adapter."),
    rank: int = typer.Option(8, "--rank", help="LoRA rank (alpha = 2 x rank)."),
    steps: int = typer.Option(TrainConfig.steps, "--steps", help="Optimizer steps."),
    lr: float = typer.Option(TrainConfig.lr, "--lr", help="Learning rate."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of LoRA init and data order."),
    batch_size: int = typer.Option(TrainConfig.batch_size, "--batch-size", help="Rows per step."),
    k: int = typer.Option(TrainConfig.index_k, "--k", help="Attribution sketch dimensions."),
    estimator: str = typer.Option(
        TrainConfig.index_estimator, "--index-estimator",
        help="ekfac-projected, or trak (far cheaper on large models).",
    ),
    publish: bool = typer.Option(True, "--publish/--no-publish", help="Announce on `adapters`."),
) -> None:
    """Fine-tune a LoRA adapter on a datanet snapshot and build its attribution index."""
    settings = load_settings()
    snapshot = _snapshot(settings, datanet)
    config = _config(rank, steps, lr, seed, batch_size, k, estimator)
    with _progress(f"training {adapter_id}") as progress:
        task = progress.add_task(f"training {adapter_id}", total=config.steps, loss="-")

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, loss=f"{loss:.3f}")

        try:
            result = train_adapter(
                snapshot, adapter_id, owner, settings.base_model_dir, settings.adapters_dir,
                config, progress=on_step,
            )  # fmt: skip
        except (FileExistsError, FileNotFoundError, ValueError) as exc:
            raise _fail(str(exc)) from None
    m = result.manifest
    console.print(
        f"adapter {adapter_id}: loss {m.first_loss:.3f} -> {m.last_loss:.3f}, "
        f"{m.training_rows} rows, train {result.train_seconds:.1f}s, "
        f"index {result.index_seconds:.1f}s, weights {m.weights_hash[:12]}, "
        f"index {str(m.index_hash)[:12]}"
    )
    if publish:
        _publish(settings, [m])


def train_batch(
    datanet: str = typer.Option(..., "--datanet", help="NAME or NAME@VERSION (default: latest)."),
    count: int = typer.Option(..., "--count", min=1, help="How many adapters."),
    prefix: str = typer.Option(..., "--prefix", help="Adapter ids are PREFIX-0000, PREFIX-0001..."),
    owner: str = typer.Option(..., "--owner", help="Owner credited for the adapters."),
    fraction: float = typer.Option(0.5, "--fraction", help="Share of rows each adapter sees."),
    rank: int = typer.Option(4, "--rank", help="LoRA rank (alpha = 2 x rank)."),
    steps: int = typer.Option(10, "--steps", help="Optimizer steps per adapter."),
    lr: float = typer.Option(TrainConfig.lr, "--lr", help="Learning rate."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the subsets, init and order."),
    batch_size: int = typer.Option(TrainConfig.batch_size, "--batch-size", help="Rows per step."),
    k: int = typer.Option(TrainConfig.index_k, "--k", help="Attribution sketch dimensions."),
    publish: bool = typer.Option(True, "--publish/--no-publish", help="Announce on `adapters`."),
) -> None:
    """Train many small adapters, each on a seeded random subset of the snapshot's rows."""
    settings = load_settings()
    snapshot = _snapshot(settings, datanet)
    config = _config(rank, steps, lr, seed, batch_size, k)
    try:
        specs = subset_specs(snapshot, count, prefix, owner, fraction, config)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    manifests: list[AdapterManifest] = []
    with _progress("adapters") as progress:
        task = progress.add_task("adapters", total=count, loss="-")
        try:
            train_many(
                snapshot, specs, settings.base_model_dir, settings.adapters_dir,
                on_adapter=lambda r: (
                    manifests.append(r.manifest),
                    progress.update(task, advance=1, loss=f"{r.manifest.last_loss:.3f}"),
                ),
            )  # fmt: skip
        except (FileExistsError, FileNotFoundError, ValueError) as exc:
            raise _fail(str(exc)) from None
    console.print(
        f"trained {len(manifests)} adapters {specs[0].adapter_id}..{specs[-1].adapter_id}"
    )
    if publish:
        _publish(settings, manifests)


@adapters_app.command("list")
def adapters_list() -> None:
    """Adapters in the local store."""
    table = Table("adapter", "owner", "rank", "datanet", "rows", "weights", "index")
    try:
        manifests = AdapterStore.from_settings(load_settings()).manifests()
    except AdapterError as exc:
        raise _fail(exc.reason) from None
    for m in manifests:
        table.add_row(
            m.adapter_id, m.owner_id, str(m.rank), f"{m.datanet_id}@{m.snapshot_version}",
            str(m.training_rows), m.weights_hash[:12], str(m.index_hash)[:12],
        )  # fmt: skip
    console.print(table)


@adapters_app.command("show")
def adapters_show(adapter_id: str = typer.Argument(..., help="Adapter id.")) -> None:
    """An adapter's manifest."""
    try:
        manifest = AdapterStore.from_settings(load_settings()).manifest(adapter_id)
    except AdapterError as exc:
        raise _fail(exc.reason) from None
    console.print_json(manifest.to_json())


def register(app: typer.Typer) -> None:
    base_model_app.command("import")(import_base_model)
    adapters_app.command("plan")(adapters_plan)
    app.add_typer(base_model_app, name="base-model")
    app.add_typer(adapters_app, name="adapters")
    app.command("train")(train)
    app.command("train-batch")(train_batch)
