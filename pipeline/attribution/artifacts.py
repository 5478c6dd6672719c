"""An adapter's attribution artifacts, loaded just in time and kept in an LRU cache.

What is read, and checked, per adapter (`<adapters_dir>/<adapter_id>/`):
- `manifest.json`: `weights_hash` (the adapter's version), `index_hash`, and `owner_id` (who
  is paid the adapter owner's share of a fee; absent or invalid -> None, and that share goes
  to the treasury);
- `adapter_model.safetensors`: its sha256 must equal the manifest's `weights_hash`;
- `attribution_index/`: its hash must equal the manifest's `index_hash`.
The span index is built from the index's own examples table: the snapshot rows the adapter was
trained on, already covered by the index hash, so one hash pins both methods' inputs.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from inference.attribution_index import AttributionIndex
from inference.hashing import adapter_weights_hash
from pipeline.attribution.failures import AttributionFailure, FailureCode
from pipeline.attribution.spans import SpanIndex
from schemas.ids import is_valid_id

INDEX_DIR = "attribution_index"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT_CAPACITY = 32

ContributorKey = tuple[str, str]  # (contributor_id, datanet_id)


@dataclass
class AdapterArtifacts:
    adapter_id: str
    adapter_hash: str  # sha256 of the weights, equal to the manifest's weights_hash
    index: AttributionIndex
    keys: list[ContributorKey]  # per example: who contributed it, to which datanet
    row_ids: list[str]  # per example
    owner_id: str | None = None
    _span_index: SpanIndex | None = field(default=None, repr=False)
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

    def example_counts(self) -> Counter[ContributorKey]:
        return Counter(self.keys)


def adapter_dir(adapters_dir: Path, adapter_id: str) -> Path:
    if not is_valid_id(adapter_id):
        raise AttributionFailure(FailureCode.UNKNOWN_ADAPTER, f"invalid adapter id {adapter_id!r}")
    return Path(adapters_dir) / adapter_id


def read_manifest(adapters_dir: Path, adapter_id: str) -> dict:
    directory = adapter_dir(adapters_dir, adapter_id)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise AttributionFailure(
            FailureCode.UNKNOWN_ADAPTER, f"adapter {adapter_id!r} has no {MANIFEST_FILE}"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise AttributionFailure(
            FailureCode.UNKNOWN_ADAPTER, f"adapter {adapter_id!r} manifest unreadable: {exc}"
        ) from None
    if not isinstance(manifest, dict):
        raise AttributionFailure(
            FailureCode.UNKNOWN_ADAPTER, f"adapter {adapter_id!r} manifest is not an object"
        )
    return manifest


def manifest_owner(manifest: dict) -> str | None:
    owner = manifest.get("owner_id")
    return owner if isinstance(owner, str) and is_valid_id(owner) else None


def load_artifacts(adapters_dir: Path, adapter_id: str) -> AdapterArtifacts:
    """Read and cross-check one adapter's manifest, weights hash and attribution index."""
    manifest = read_manifest(adapters_dir, adapter_id)
    directory = adapter_dir(adapters_dir, adapter_id)
    weights_hash, index_hash = manifest.get("weights_hash"), manifest.get("index_hash")
    if not weights_hash or not (directory / WEIGHTS_FILE).is_file():
        raise AttributionFailure(
            FailureCode.UNKNOWN_ADAPTER, f"adapter {adapter_id!r} has no weights or weights_hash"
        )
    actual = adapter_weights_hash(directory)
    if actual != weights_hash:
        raise AttributionFailure(
            FailureCode.HASH_MISMATCH,
            f"adapter {adapter_id!r} weights hash {actual[:12]}… differs from its manifest's "
            f"{str(weights_hash)[:12]}…",
        )
    if not index_hash:
        raise AttributionFailure(
            FailureCode.MISSING_INDEX, f"adapter {adapter_id!r} manifest records no index_hash"
        )
    try:
        index = AttributionIndex.load(directory / INDEX_DIR, expected_hash=index_hash)
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
        owner_id=manifest_owner(manifest),
    )


class ArtifactCache:
    """Least-recently-used cache of loaded adapters' artifacts. A result that names another
    adapter version than the cached one triggers one reload (the adapter may have been
    retrained); failures are not cached, so a fixed adapter is picked up on the next result."""

    def __init__(self, adapters_dir: Path, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("cache capacity must be >= 1")
        self.adapters_dir = Path(adapters_dir)
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
        artifacts = load_artifacts(self.adapters_dir, adapter_id)
        with self._lock:
            self.loads += 1
            self._entries[adapter_id] = artifacts
            self._entries.move_to_end(adapter_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return artifacts

    def owner_of(self, adapter_id: str) -> str | None:
        """The adapter's owner from its manifest; None when the adapter or its owner is
        unknown. Read even when the artifacts fail to load: a failed attribution still pays
        the owner their share."""
        with self._lock:
            cached = self._entries.get(adapter_id)
        if cached is not None:
            return cached.owner_id
        try:
            return manifest_owner(read_manifest(self.adapters_dir, adapter_id))
        except AttributionFailure:
            return None
