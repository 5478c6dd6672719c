"""An adapter's attribution artifacts, loaded just in time and kept in an LRU cache.

What is read, and checked, per adapter of the adapter store (`inference.adapter_store`):
- its manifest: `adapter_hash` (the adapter's version), `index_hash`, and `owner_id` (who is
  paid the adapter owner's share of a fee; with no valid manifest the owner is None, and that
  share goes to the treasury);
- its config and weights: they must be the ones the manifest registered
  (`inference.adapter_store.check_integrity`);
- its attribution index: its hash must equal the manifest's `index_hash`.
The span and lexical indexes are built from the index's own examples table: the snapshot rows
the adapter was trained on, already covered by the index hash, so one hash pins every method's
inputs.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from inference.adapter_store import (
    AdapterError,
    AdapterManifest,
    AdapterStore,
    UnknownAdapter,
    check_integrity,
)
from inference.attribution_index import AttributionIndex
from pipeline.attribution.failures import AttributionFailure, FailureCode
from pipeline.attribution.lexical import LexicalIndex
from pipeline.attribution.spans import SpanIndex

DEFAULT_CAPACITY = 32

ContributorKey = tuple[str, str]  # (contributor_id, datanet_id)


@dataclass
class AdapterArtifacts:
    adapter_id: str
    adapter_hash: str  # over config and weights, equal to the manifest's adapter_hash
    index: AttributionIndex
    keys: list[ContributorKey]  # per example: who contributed it, to which datanet
    row_ids: list[str]  # per example
    owner_id: str | None = None
    _span_index: SpanIndex | None = field(default=None, repr=False)
    _lexical_index: LexicalIndex | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def index_hash(self) -> str:
        return self.index.hash

    @property
    def span_index(self) -> SpanIndex:
        """Built on first use: many adapters never need it when the mix is all gradient."""
        with self._lock:
            if self._span_index is None:
                self._span_index = SpanIndex(self.index.examples.column("text").to_pylist())
            return self._span_index

    @property
    def lexical_index(self) -> LexicalIndex:
        """Built on first use, like the span index."""
        with self._lock:
            if self._lexical_index is None:
                self._lexical_index = LexicalIndex(self.index.examples.column("text").to_pylist())
            return self._lexical_index

    def example_counts(self) -> Counter[ContributorKey]:
        return Counter(self.keys)


def read_manifest(store: AdapterStore, adapter_id: str) -> AdapterManifest:
    """The adapter's manifest; an invalid id, no manifest or an invalid one is an unknown
    adapter."""
    try:
        directory = store.adapter_dir(adapter_id)
        manifest = directory.read_manifest()
    except AdapterError as exc:
        raise AttributionFailure(FailureCode.UNKNOWN_ADAPTER, exc.reason) from None
    if manifest is None:
        raise AttributionFailure(
            FailureCode.UNKNOWN_ADAPTER,
            f"adapter {adapter_id!r} has no {directory.manifest_path.name}",
        )
    return manifest


def load_artifacts(store: AdapterStore, adapter_id: str) -> AdapterArtifacts:
    """Read and cross-check one adapter's manifest, weights hash and attribution index."""
    manifest = read_manifest(store, adapter_id)
    directory = store.adapter_dir(adapter_id)
    index_hash = manifest.index_hash
    try:
        files = directory.read_files()
        check_integrity(adapter_id, files, manifest)
    except UnknownAdapter as exc:
        raise AttributionFailure(FailureCode.UNKNOWN_ADAPTER, exc.reason) from None
    except AdapterError as exc:
        raise AttributionFailure(FailureCode.HASH_MISMATCH, exc.reason) from None
    actual = files.adapter_hash
    if index_hash is None:
        raise AttributionFailure(
            FailureCode.MISSING_INDEX, f"adapter {adapter_id!r} manifest records no index_hash"
        )
    try:
        index = AttributionIndex.load(directory.index_dir, expected_hash=index_hash)
    except FileNotFoundError as exc:
        raise AttributionFailure(FailureCode.MISSING_INDEX, str(exc)) from None
    except ValueError as exc:
        code = FailureCode.HASH_MISMATCH if "expected" in str(exc) else FailureCode.INVALID_INDEX
        raise AttributionFailure(code, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file must fail this record, not the agent
        raise AttributionFailure(
            FailureCode.INVALID_INDEX, f"attribution index of {adapter_id!r}: {exc}"
        ) from None
    examples = index.examples
    keys = list(
        zip(
            examples.column("contributor_id").to_pylist(),
            examples.column("datanet_id").to_pylist(),
            strict=True,
        )
    )
    return AdapterArtifacts(
        adapter_id,
        actual,
        index,
        keys,
        examples.column("row_id").to_pylist(),
        owner_id=manifest.owner_id,
    )


class ArtifactCache:
    """Least-recently-used cache of loaded adapters' artifacts. A result that names another
    adapter version than the cached one triggers one reload (the adapter may have been
    retrained); failures are not cached, so a fixed adapter is picked up on the next result."""

    def __init__(self, adapters_dir: Path, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("cache capacity must be >= 1")
        self.store = AdapterStore(adapters_dir)
        self.capacity = capacity
        self._entries: OrderedDict[str, AdapterArtifacts] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, adapter_id: str, adapter_hash: str | None = None) -> AdapterArtifacts:
        with self._lock:
            cached = self._entries.get(adapter_id)
            if cached is not None and adapter_hash in (None, cached.adapter_hash):
                self._entries.move_to_end(adapter_id)
                return cached
        artifacts = load_artifacts(self.store, adapter_id)
        with self._lock:
            self.loads += 1
            self._entries[adapter_id] = artifacts
            self._entries.move_to_end(adapter_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return artifacts

    def owner_of(self, adapter_id: str | None) -> str | None:
        """The adapter's owner from its manifest; None when the adapter or its owner is
        unknown, or for the base model alone (no adapter). Read even when the artifacts fail
        to load: a failed attribution still pays the owner their share."""
        if adapter_id is None:
            return None
        with self._lock:
            cached = self._entries.get(adapter_id)
        if cached is not None:
            return cached.owner_id
        try:
            return read_manifest(self.store, adapter_id).owner_id
        except AttributionFailure:
            return None
