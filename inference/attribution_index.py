"""The attribution index stored beside an adapter: one projected gradient per training example,
the TRAK preconditioner, and the map example -> row -> contributor -> datanet.

Files in `<adapter>/attribution_index/`:
- `features.safetensors`: `features` [N, k] float32 (row i = sketch of example i) and
  `preconditioner` [k, k] float32 = (Phi^T Phi + lambda I)^-1, computed in float64;
- `examples.parquet`: example_index, row_id, contributor_id, datanet_id, text;
- `index.json`: k, seed, projection kind, lambda, loss definition, parameter layout hash,
  estimator name and version, max length.

The index hash is `sha256_files` over the three files in that order. Nothing is pickled.
TRAK score of a query sketch q against example i: q^T P phi_i.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import load_file, save_file

from inference.hashing import sha256_files

ESTIMATOR_NAME = "trak"
ESTIMATOR_VERSION = "1"
INDEX_FILES = ("features.safetensors", "examples.parquet", "index.json")
# lambda = DEFAULT_LAMBDA_RELATIVE * mean eigenvalue of Phi^T Phi: scale-free damping that keeps
# the inverse well defined when there are fewer examples than dimensions.
DEFAULT_LAMBDA_RELATIVE = 1.0

EXAMPLES_SCHEMA = pa.schema(
    [
        ("example_index", pa.int64()),
        ("row_id", pa.string()),
        ("contributor_id", pa.string()),
        ("datanet_id", pa.string()),
        ("text", pa.string()),
    ]
)


@dataclass(frozen=True)
class IndexExample:
    example_index: int
    row_id: str
    contributor_id: str
    datanet_id: str
    text: str


def preconditioner(features: np.ndarray, lambda_relative: float) -> tuple[np.ndarray, float]:
    """((Phi^T Phi + lambda I)^-1 as float32, lambda) for features Phi [N, k]."""
    phi = features.astype(np.float64)
    gram = phi.T @ phi
    k = gram.shape[0]
    scale = float(np.trace(gram)) / k
    lam = lambda_relative * scale if scale > 0 else lambda_relative
    inverse = np.linalg.inv(gram + lam * np.eye(k))
    inverse = (inverse + inverse.T) / 2  # exactly symmetric, whatever the rounding
    return inverse.astype(np.float32), lam


def write_index(
    directory: Path,
    features: np.ndarray,
    examples: list[IndexExample],
    *,
    seed: int,
    projection: str,
    loss: str,
    param_layout_hash: str,
    max_length: int,
    lambda_relative: float = DEFAULT_LAMBDA_RELATIVE,
) -> str:
    """Write the three index files; returns the index hash."""
    if features.ndim != 2 or features.shape[0] != len(examples):
        raise ValueError(f"features {features.shape} do not match {len(examples)} examples")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    features = np.ascontiguousarray(features, dtype=np.float32)
    inverse, lam = preconditioner(features, lambda_relative)
    save_file(
        {"features": features, "preconditioner": np.ascontiguousarray(inverse)},
        str(directory / "features.safetensors"),
    )
    table = pa.Table.from_pylist([asdict(e) for e in examples], schema=EXAMPLES_SCHEMA)
    pq.write_table(table, directory / "examples.parquet")
    meta = {
        "estimator": ESTIMATOR_NAME,
        "estimator_version": ESTIMATOR_VERSION,
        "examples": len(examples),
        "k": int(features.shape[1]),
        "lambda": lam,
        "lambda_relative": lambda_relative,
        "loss": loss,
        "max_length": max_length,
        "param_layout_hash": param_layout_hash,
        "projection": projection,
        "seed": seed,
    }
    (directory / "index.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return index_hash(directory)


def index_hash(directory: Path) -> str:
    return sha256_files([Path(directory) / name for name in INDEX_FILES])


def read_index_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no attribution index in {directory}")
    return json.loads(path.read_text())


class AttributionIndex:
    def __init__(
        self,
        directory: Path,
        features: np.ndarray,
        preconditioner: np.ndarray,
        examples: pa.Table,
        meta: dict[str, Any],
        hash: str,
    ) -> None:
        self.directory = directory
        self.features = features  # [N, k] float32
        self.preconditioner = preconditioner  # [k, k] float32
        self.examples = examples  # arrow table, EXAMPLES_SCHEMA, row i = example i
        self.meta = meta
        self.hash = hash
        self._transformed: np.ndarray | None = None

    @classmethod
    def load(cls, directory: Path, expected_hash: str | None = None) -> AttributionIndex:
        """Load an index; refuse it when `expected_hash` is given and does not match."""
        directory = Path(directory)
        missing = [name for name in INDEX_FILES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"attribution index in {directory} lacks {', '.join(missing)}")
        digest = index_hash(directory)
        if expected_hash is not None and digest != expected_hash:
            raise ValueError(
                f"attribution index in {directory} has hash {digest[:12]}…, expected "
                f"{expected_hash[:12]}…: the files changed since the adapter was registered"
            )
        tensors = load_file(str(directory / "features.safetensors"))
        examples = pq.read_table(directory / "examples.parquet", schema=EXAMPLES_SCHEMA)
        meta = read_index_meta(directory)
        features, inverse = tensors["features"], tensors["preconditioner"]
        k = meta["k"]
        if features.shape != (examples.num_rows, k) or inverse.shape != (k, k):
            raise ValueError(f"attribution index in {directory} has inconsistent shapes")
        return cls(directory, features, inverse, examples, meta, digest)

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    def __len__(self) -> int:
        return self.examples.num_rows

    def score(self, query_sketch: np.ndarray) -> np.ndarray:
        """TRAK scores q^T P phi_i, float64: [N] for a query [k], [B, N] for queries [B, k].
        Float64 keeps a query's scores the same, to rounding far below any ranking gap,
        whether it is scored alone or in a batch."""
        query = np.asarray(query_sketch, dtype=np.float64)
        if query.shape[-1] != self.k or query.ndim not in (1, 2):
            raise ValueError(
                f"query sketch has shape {query.shape}, expected [{self.k}] or [B, {self.k}]"
            )
        if self._transformed is None:
            # P is symmetric, so Phi P holds every P phi_i as a row.
            self._transformed = self.features.astype(np.float64) @ self.preconditioner.astype(
                np.float64
            )
        return query @ self._transformed.T
