"""Step 3, the datanets: one synthetic datanet per demo domain, published as
`DatanetContribution` events, folded into the store and snapshotted, unless its latest snapshot
already holds exactly these rows."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from inference.data.synthetic import PlantedFact, generate_datanet
from inference.datanets import DatanetStore, Snapshot, snapshot_hash
from infra.kafka.events import publish_sync
from infra.settings import Settings
from loraledger.demo.errors import DemoError
from loraledger.demo.options import DemoDatanet, DemoOptions
from schemas.events import DatanetContribution
from schemas.text import row_id_for


@dataclass
class PreparedDatanet:
    spec: DemoDatanet
    snapshot: Snapshot
    facts: list[PlantedFact]
    cached: bool

    def describe(self) -> str:
        """One line for the step's outcome."""
        manifest = self.snapshot.manifest
        state = "cached" if self.cached else "published and snapshotted"
        return (f"{self.spec.name}@v{manifest.version} {manifest.rows} rows "
                f"{len(manifest.contributors)} contributors ({state})")


def contribution_id(datanet: str, position: int) -> str:
    """Deterministic, so a rerun's events are the same contributions, applied once."""
    return hashlib.sha256(f"demo:{datanet}:{position}".encode()).hexdigest()[:32]


def demo_rows(spec: DemoDatanet, options: DemoOptions) -> tuple[list[DatanetContribution],
                                                                list[PlantedFact]]:
    """The contribution events of one demo datanet and its planted facts, contributor ids
    prefixed with the datanet's tag."""
    synthetic = generate_datanet(
        spec.name,
        seed=options.seed,
        contributors=options.contributors_per_datanet,
        rows_per_contributor=options.rows_per_contributor,
        facts_per_contributor=options.facts_per_contributor,
        domains=(spec.domain,),
    )
    events = [
        DatanetContribution(
            contribution_id=contribution_id(spec.name, position),
            datanet_id=spec.name,
            contributor_id=f"{spec.tag}-{row.contributor_id}",
            text=row.text,
            license=row.license,
        )
        for position, row in enumerate(synthetic.rows)
    ]
    facts = [
        PlantedFact(f"{spec.tag}-{fact.contributor_id}", fact.domain, fact.place, fact.prompt,
                    fact.completion)
        for fact in synthetic.facts
    ]
    return events, facts


def expected_snapshot_hash(events: Sequence[DatanetContribution]) -> str:
    return snapshot_hash(sorted({row_id_for(event.text) for event in events}))


def prepare_datanet(
    settings: Settings, store: DatanetStore, spec: DemoDatanet, options: DemoOptions
) -> PreparedDatanet:
    """Publish, apply and snapshot one datanet, unless its latest snapshot already holds
    exactly these rows."""
    events, facts = demo_rows(spec, options)
    wanted = expected_snapshot_hash(events)
    if store.exists(spec.name) and store.info(spec.name).snapshots:
        latest = store.manifest(spec.name)
        if latest.snapshot_hash == wanted:
            return PreparedDatanet(spec, store.load_snapshot(spec.name), facts, cached=True)
    if not store.exists(spec.name):
        creation = store.prepare_creation(spec.name, spec.description)
        publish_sync(settings, [creation])
        store.apply(creation)
    publish_sync(settings, events)
    for event in events:
        store.apply(event)
    manifest = store.snapshot(spec.name)
    if manifest.snapshot_hash != wanted:
        raise DemoError(
            f"datanet {spec.name} holds rows besides the demo's: rerun with --fresh "
            "or use another LORALEDGER_HOME"
        )
    return PreparedDatanet(spec, store.load_snapshot(spec.name), facts, cached=False)
