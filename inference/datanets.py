"""Datanets: named, versioned datasets of rows contributed by many people.

A row is identified by the sha256 of its identity text (format characters such as zero-width
spaces dropped, NFKC, trimmed, every run of whitespace collapsed to one space; see
`schemas.text.identity_text`), so the same content is one row whoever sends it and however it
is typed, and it is credited to whoever sent it first. The row keeps its text in NFC
(`schemas.text.normalize_text`).

The store is a fold over `DatanetCreated` and `DatanetContribution` events: `apply(event)` in
log order gives the same state whether the events come from the CLI, from Python (`create`,
`add`) or from replaying the `datanets` and `contributions` topics (`rebuild`), and applying an
event twice changes nothing (the first creation of a name wins; a contribution id is
remembered). On disk, under `datanets/<name>/`:

- `datanet.json`        the datanet's description;
- `contributions.jsonl` append-only outcomes, one line per applied contribution: accepted rows
                        (with their normalized text) and rejections (with the reason). Reloading
                        the state is one pass over this file;
- `v<N>/rows.parquet` + `v<N>/manifest.json`  immutable snapshots.

One process writes a datanet at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import overload

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from schemas import DatanetContribution, DatanetCreated
from schemas.events import MAX_CONTRIBUTION_CHARS
from schemas.ids import check_id, is_valid_id
from schemas.text import ROW_ID_NORMALIZATION, normalize_text, row_id_for

DEFAULT_LICENSE = "CC-BY-4.0"
_LICENSE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]{0,63}$")
_VERSION_DIR_RE = re.compile(r"^v([1-9][0-9]*)$")

ROWS_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("datanet_id", pa.string()),
        ("contributor_id", pa.string()),
        ("license", pa.string()),
        ("text", pa.string()),
    ]
)


class ContributionStatus(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"


@dataclass(frozen=True)
class DatanetRow:
    row_id: str  # sha256 hex of the normalized text
    datanet_id: str
    contributor_id: str
    license: str
    text: str  # normalized


@dataclass(frozen=True)
class ContributionOutcome:
    status: ContributionStatus
    datanet_id: str
    contributor_id: str
    contribution_id: str | None
    row_id: str | None
    reason: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status is ContributionStatus.ACCEPTED


@dataclass(frozen=True)
class SnapshotManifest:
    datanet_id: str
    version: int
    rows: int
    contributors: list[str]  # sorted
    snapshot_hash: str  # see `snapshot_hash`
    normalization: str = ROW_ID_NORMALIZATION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SnapshotManifest:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Snapshot:
    manifest: SnapshotManifest
    rows: list[DatanetRow]  # sorted by row id
    directory: Path


@dataclass(frozen=True)
class DatanetInfo:
    datanet_id: str
    description: str
    rows: int
    rejected: int
    contributors: list[str]
    snapshots: list[int]


def snapshot_hash(row_ids: list[str]) -> str:
    """sha256 over the sorted row ids, one per line: the snapshot's content, independent of the
    order rows arrived in."""
    return hashlib.sha256("\n".join(sorted(row_ids)).encode("ascii")).hexdigest()


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`NAME` or `NAME@VERSION` (VERSION: a positive integer, optionally written vN)."""
    name, _, version = ref.partition("@")
    check_id(name, "datanet name")
    if not version:
        return name, None
    digits = version[1:] if version.startswith("v") else version
    if not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"invalid snapshot version {version!r} in {ref!r}: use NAME@N with N >= 1")
    return name, int(digits)


class _DatanetState:
    """What the fold keeps per datanet: accepted rows in arrival order, applied ids."""

    def __init__(self) -> None:
        self.rows: dict[str, DatanetRow] = {}
        self.outcomes: dict[str, ContributionOutcome] = {}
        self.rejected: list[ContributionOutcome] = []


class DatanetStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._states: dict[str, _DatanetState] = {}

    # --- datanets ---------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        return self.root / check_id(name, "datanet name")

    def exists(self, name: str) -> bool:
        return is_valid_id(name) and (self.root / name / "datanet.json").is_file()

    def _require(self, name: str) -> Path:
        if not self.exists(name):
            raise KeyError(f"unknown datanet {name!r}: create it with `loraledger datanet create`")
        return self.root / name

    def prepare_creation(self, name: str, description: str = "") -> DatanetCreated:
        """The event that creates datanet `name`, to publish and apply; refuses a name in use."""
        self._dir(name)
        if self.exists(name):
            raise FileExistsError(f"datanet {name!r} already exists")
        try:
            return DatanetCreated(datanet_id=name, description=description)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            raise ValueError(f"invalid datanet: {first['msg']}") from None

    def create(self, name: str, description: str = "") -> DatanetInfo:
        """Create a datanet locally: `prepare_creation`, then `apply`."""
        return self.apply(self.prepare_creation(name, description))

    def _apply_created(self, event: DatanetCreated) -> DatanetInfo:
        if self.exists(event.datanet_id):
            return self.info(event.datanet_id)  # a later creation of the name changes nothing
        directory = self._dir(event.datanet_id)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"datanet_id": event.datanet_id, "description": event.description}
        (directory / "contributions.jsonl").touch()
        # Written last: the datanet exists once its description does.
        _write_atomic(directory / "datanet.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return self.info(event.datanet_id)

    def rebuild(self, events: Iterable[DatanetCreated | DatanetContribution]) -> None:
        """Fold a log into the store: every creation, then every contribution, each in log
        order (they live on two topics; a contribution counts once its datanet exists)."""
        ordered = list(events)
        for event in ordered:
            if isinstance(event, DatanetCreated):
                self.apply(event)
        for event in ordered:
            if isinstance(event, DatanetContribution):
                self.apply(event)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if self.exists(p.name))

    def info(self, name: str) -> DatanetInfo:
        directory = self._require(name)
        meta = json.loads((directory / "datanet.json").read_text(encoding="utf-8"))
        state = self._state(name)
        return DatanetInfo(
            datanet_id=name,
            description=meta.get("description", ""),
            rows=len(state.rows),
            rejected=len(state.rejected),
            contributors=sorted({row.contributor_id for row in state.rows.values()}),
            snapshots=self.snapshot_versions(name),
        )

    def list(self) -> list[DatanetInfo]:
        return [self.info(name) for name in self.names()]

    # --- contributions ----------------------------------------------------------------------

    def rows(self, name: str) -> list[DatanetRow]:
        """Accepted rows in the order they were accepted."""
        self._require(name)
        return list(self._state(name).rows.values())

    def rejections(self, name: str) -> list[ContributionOutcome]:
        self._require(name)
        return list(self._state(name).rejected)

    def prepare(
        self,
        datanet: str,
        contributor_id: str,
        text: str | bytes,
        license: str = DEFAULT_LICENSE,
        contribution_id: str | None = None,
    ) -> DatanetContribution | ContributionOutcome:
        """Validate a contribution: the event to publish and apply, or a rejection saying why."""

        def refuse(reason: str, row_id: str | None = None) -> ContributionOutcome:
            return ContributionOutcome(
                ContributionStatus.REJECTED,
                datanet,
                contributor_id,
                contribution_id,
                row_id,
                reason,
            )

        if not is_valid_id(datanet):
            return refuse("invalid datanet id")
        if not is_valid_id(contributor_id):
            return refuse("invalid contributor id")
        if contribution_id is not None and not is_valid_id(contribution_id):
            return refuse("invalid contribution id")
        if not self.exists(datanet):
            return refuse("unknown datanet")
        if not (isinstance(license, str) and _LICENSE_RE.fullmatch(license)):
            return refuse(f"invalid license identifier {repr(license)[:70]}")
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                return refuse(f"invalid UTF-8 at byte {exc.start}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return refuse(f"invalid UTF-8: unpaired surrogate at character {exc.start}")
        normalized = normalize_text(text)
        if not normalized:
            return refuse("empty text")
        if len(text) > MAX_CONTRIBUTION_CHARS:
            return refuse(f"text too long: {len(text)} characters, limit {MAX_CONTRIBUTION_CHARS}")
        fields = {"datanet_id": datanet, "contributor_id": contributor_id, "text": text}
        if contribution_id is not None:
            fields["contribution_id"] = contribution_id
        try:
            return DatanetContribution(license=license, **fields)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            return refuse(f"invalid contribution: {first['msg']}", row_id_for(text))

    def add(
        self,
        datanet: str,
        contributor_id: str,
        text: str | bytes,
        license: str = DEFAULT_LICENSE,
        contribution_id: str | None = None,
    ) -> ContributionOutcome:
        """Validate and apply one contribution; a refusal is recorded when its datanet exists."""
        if self.exists(datanet) and contribution_id in self._state(datanet).outcomes:
            return self._state(datanet).outcomes[contribution_id]
        prepared = self.prepare(datanet, contributor_id, text, license, contribution_id)
        if isinstance(prepared, DatanetContribution):
            return self.apply(prepared)
        return self.record_rejection(prepared)

    def record_rejection(self, outcome: ContributionOutcome) -> ContributionOutcome:
        """Keep a refusal from `prepare` in its datanet's log (when the datanet exists)."""
        if outcome.accepted:
            raise ValueError("record_rejection takes a rejected outcome")
        if self.exists(outcome.datanet_id):
            return self._record(outcome.datanet_id, outcome)
        return outcome

    @overload
    def apply(self, event: DatanetCreated) -> DatanetInfo: ...

    @overload
    def apply(self, event: DatanetContribution) -> ContributionOutcome: ...

    def apply(
        self, event: DatanetCreated | DatanetContribution
    ) -> DatanetInfo | ContributionOutcome:
        """Fold one event into the store (idempotent: by name for a creation, by contribution
        id for a contribution)."""
        if isinstance(event, DatanetCreated):
            return self._apply_created(event)
        name = event.datanet_id
        if not self.exists(name):
            return ContributionOutcome(
                ContributionStatus.REJECTED,
                name,
                event.contributor_id,
                event.contribution_id,
                event.row_id,
                "unknown datanet",
            )
        state = self._state(name)
        if event.contribution_id in state.outcomes:
            return state.outcomes[event.contribution_id]
        existing = state.rows.get(event.row_id)
        if existing is not None:
            outcome = ContributionOutcome(
                ContributionStatus.REJECTED,
                name,
                event.contributor_id,
                event.contribution_id,
                event.row_id,
                f"duplicate of a row already credited to {existing.contributor_id}",
            )
            return self._record(name, outcome)
        row = DatanetRow(
            event.row_id, name, event.contributor_id, event.license, normalize_text(event.text)
        )
        outcome = ContributionOutcome(
            ContributionStatus.ACCEPTED,
            name,
            event.contributor_id,
            event.contribution_id,
            event.row_id,
        )
        return self._record(name, outcome, row)

    def _record(
        self,
        name: str,
        outcome: ContributionOutcome,
        row: DatanetRow | None = None,
    ) -> ContributionOutcome:
        state = self._state(name)
        record = {
            "status": outcome.status.value,
            "contribution_id": outcome.contribution_id,
            "contributor_id": outcome.contributor_id,
            "row_id": outcome.row_id,
            "reason": outcome.reason,
        }
        if row is not None:
            record |= {"license": row.license, "text": row.text}
        line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
        with (self.root / name / "contributions.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(line)
        self._fold(state, outcome, row)
        return outcome

    @staticmethod
    def _fold(
        state: _DatanetState,
        outcome: ContributionOutcome,
        row: DatanetRow | None,
    ) -> None:
        if row is not None:
            state.rows[row.row_id] = row
        else:
            state.rejected.append(outcome)
        if outcome.contribution_id is not None:
            state.outcomes[outcome.contribution_id] = outcome

    def _state(self, name: str) -> _DatanetState:
        state = self._states.get(name)
        if state is None:
            state = self._load_state(name)
            self._states[name] = state
        return state

    def _load_state(self, name: str) -> _DatanetState:
        path = self.root / name / "contributions.jsonl"
        state = _DatanetState()
        if not path.exists():
            return state
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            # A crash mid-append left a partial last line: drop it so the next append starts clean.
            with path.open("r+b") as handle:
                handle.truncate(len(complete))
        for line in complete.decode("utf-8").splitlines():
            record = json.loads(line)
            status = ContributionStatus(record["status"])
            outcome = ContributionOutcome(
                status,
                name,
                record["contributor_id"],
                record["contribution_id"],
                record["row_id"],
                record["reason"],
            )
            row = None
            if status is ContributionStatus.ACCEPTED:
                row = DatanetRow(
                    record["row_id"],
                    name,
                    record["contributor_id"],
                    record["license"],
                    record["text"],
                )
            self._fold(state, outcome, row)
        return state

    # --- snapshots --------------------------------------------------------------------------

    def snapshot_versions(self, name: str) -> list[int]:
        directory = self._require(name)
        versions = []
        for child in directory.iterdir():
            match = _VERSION_DIR_RE.match(child.name)
            if match and (child / "manifest.json").is_file():
                versions.append(int(match.group(1)))
        return sorted(versions)

    def snapshot(self, name: str) -> SnapshotManifest:
        """Freeze the current rows as the next version; if nothing changed since the latest
        snapshot, return that one instead of writing an identical copy."""
        directory = self._require(name)
        rows = sorted(self._state(name).rows.values(), key=lambda row: row.row_id)
        if not rows:
            raise ValueError(f"datanet {name!r} has no rows to snapshot")
        digest = snapshot_hash([row.row_id for row in rows])
        versions = self.snapshot_versions(name)
        if versions:
            latest = self.manifest(name, versions[-1])
            if latest.snapshot_hash == digest:
                return latest
        version = (versions[-1] if versions else 0) + 1
        manifest = SnapshotManifest(
            datanet_id=name,
            version=version,
            rows=len(rows),
            contributors=sorted({row.contributor_id for row in rows}),
            snapshot_hash=digest,
        )
        final = directory / f"v{version}"
        staging = directory / f".v{version}.staging"
        staging.mkdir(exist_ok=True)
        table = pa.Table.from_pylist([asdict(row) for row in rows], schema=ROWS_SCHEMA)
        pq.write_table(table, staging / "rows.parquet")
        (staging / "manifest.json").write_text(manifest.to_json(), encoding="utf-8")
        for path in staging.iterdir():
            path.chmod(0o444)
        os.replace(staging, final)
        return manifest

    def manifest(self, name: str, version: int | None = None) -> SnapshotManifest:
        directory = self._require(name)
        if version is None:
            versions = self.snapshot_versions(name)
            if not versions:
                raise KeyError(
                    f"datanet {name!r} has no snapshot: run `loraledger datanet snapshot`"
                )
            version = versions[-1]
        path = directory / f"v{version}" / "manifest.json"
        if not path.is_file():
            raise KeyError(f"datanet {name!r} has no snapshot v{version}")
        return SnapshotManifest.from_json(path.read_text(encoding="utf-8"))

    def load_snapshot(self, name: str, version: int | None = None) -> Snapshot:
        """Read a snapshot and check that its rows match the manifest's hash."""
        manifest = self.manifest(name, version)
        directory = self.root / name / f"v{manifest.version}"
        table = pq.read_table(directory / "rows.parquet", schema=ROWS_SCHEMA)
        rows = [DatanetRow(**record) for record in table.to_pylist()]
        if snapshot_hash([row.row_id for row in rows]) != manifest.snapshot_hash:
            raise ValueError(f"snapshot {name}@{manifest.version} does not match its manifest hash")
        return Snapshot(manifest, rows, directory)


def _write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)
