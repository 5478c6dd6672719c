"""The attribution index stored beside an adapter: one feature row per training example, scored
against a query's sketch q (the projected gradient R g_q, R: [k, P]), and the map example -> row ->
contributor -> datanet.

Files in `<adapter>/attribution_index/`:
- `features.safetensors`: `features` [N, k] float32, and for the `trak` estimator only
  `preconditioner` [k, k] float32;
- `examples.parquet`: example_index, row_id, contributor_id, datanet_id, text;
- `index.json`: k, seed, projection kind, loss definition, parameter layout hash, estimator
  name, version and parameters, max length.

Estimators (name, version), both read by this code:
- ("ekfac-projected", "1"), the default of `TrainConfig`: row i is w_i = (R S R^T)^-1 R S H^-1
  g_i, so that q . w_i is the best linear estimate, from the query's sketch alone, of the
  EK-FAC influence g_q^T H^-1 g_i (H over the training texts, S a prior over query-like
  gradients; see `inference.influence_preconditioner`). No k x k matrix is stored.
- ("trak", "1"): row i is phi_i, `preconditioner` P = (Phi^T Phi + lambda I)^-1 in float64;
  score q^T P phi_i.
An index of any other estimator is refused on load, with its name in the error.

The index hash is `sha256_files` over the three files in that order. Nothing is pickled.
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

TRAK = ("trak", "1")
EKFAC_PROJECTED = ("ekfac-projected", "1")
ESTIMATORS = (TRAK, EKFAC_PROJECTED)
FEATURES_FILE = "features.safetensors"
EXAMPLES_FILE = "examples.parquet"
META_FILE = "index.json"
INDEX_FILES = (FEATURES_FILE, EXAMPLES_FILE, META_FILE)  # in the order the index hash reads
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
    estimator: tuple[str, str],
    lambda_relative: float = DEFAULT_LAMBDA_RELATIVE,
    estimator_params: dict[str, float] | None = None,
) -> str:
    """Write the three index files; returns the index hash.

    `estimator` has no default here: the caller says which one its `features` are for (the
    ModelFactory's is `TrainConfig.index_estimator`, `ekfac-projected` unless configured).
    `trak`: `features` are the examples' sketches; the preconditioner is computed here with
    `lambda_relative`. `ekfac-projected`: `features` are already the scoring rows w_i
    (`influence_preconditioner.ekfac_projected_features`), `estimator_params` records how."""
    if features.ndim != 2 or features.shape[0] != len(examples):
        raise ValueError(f"features {features.shape} do not match {len(examples)} examples")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator}; known: {ESTIMATORS}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    features = np.ascontiguousarray(features, dtype=np.float32)
    tensors = {"features": features}
    # A `trak` index.json keeps the fields it always had, so its hash is what it was.
    params: dict[str, Any] = {"estimator_params": dict(sorted((estimator_params or {}).items()))}
    if estimator == TRAK:
        inverse, lam = preconditioner(features, lambda_relative)
        tensors["preconditioner"] = np.ascontiguousarray(inverse)
        params = {"lambda": lam, "lambda_relative": lambda_relative}
    save_file(tensors, str(directory / FEATURES_FILE))
    table = pa.Table.from_pylist([asdict(e) for e in examples], schema=EXAMPLES_SCHEMA)
    pq.write_table(table, directory / EXAMPLES_FILE)
    meta = {
        **params,
        "estimator": estimator[0],
        "estimator_version": estimator[1],
        "examples": len(examples),
        "k": int(features.shape[1]),
        "loss": loss,
        "max_length": max_length,
        "param_layout_hash": param_layout_hash,
        "projection": projection,
        "seed": seed,
    }
    meta_path(directory).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return index_hash(directory)


def index_hash(directory: Path) -> str:
    return sha256_files([Path(directory) / name for name in INDEX_FILES])


def meta_path(directory: Path) -> Path:
    """The index's metadata file: present once the index is complete (it is written last)."""
    return Path(directory) / META_FILE


def read_index_meta(directory: Path) -> dict[str, Any]:
    path = meta_path(directory)
    if not path.is_file():
        raise FileNotFoundError(f"no attribution index in {directory}")
    return json.loads(path.read_text())


class AttributionIndex:
    def __init__(
        self,
        directory: Path,
        features: np.ndarray,
        preconditioner: np.ndarray | None,
        examples: pa.Table,
        meta: dict[str, Any],
        hash: str,
    ) -> None:
        self.directory = directory
        self.features = features  # [N, k] float32
        self.preconditioner = preconditioner  # [k, k] float32, `trak` only
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
        meta = read_index_meta(directory)
        estimator = (meta.get("estimator"), meta.get("estimator_version"))
        if estimator not in ESTIMATORS:
            raise ValueError(
                f"attribution index in {directory} uses estimator {estimator[0]!r} version "
                f"{estimator[1]!r}, which this code cannot score; re-index the adapter"
            )
        tensors = load_file(str(directory / FEATURES_FILE))
        examples = pq.read_table(directory / EXAMPLES_FILE, schema=EXAMPLES_SCHEMA)
        features, inverse = tensors["features"], tensors.get("preconditioner")
        k = meta["k"]
        shapes_ok = features.shape == (examples.num_rows, k) and (
            inverse.shape == (k, k) if estimator == TRAK else inverse is None
        )
        if not shapes_ok:
            raise ValueError(f"attribution index in {directory} has inconsistent shapes")
        return cls(directory, features, inverse, examples, meta, digest)

    @property
    def estimator(self) -> tuple[str, str]:
        return (self.meta["estimator"], self.meta["estimator_version"])

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    def __len__(self) -> int:
        return self.examples.num_rows

    def score(self, query_sketch: np.ndarray) -> np.ndarray:
        """Scores q . w_i (`ekfac-projected`) or q^T P phi_i (`trak`), float64: [N] for a
        query [k], [B, N] for queries [B, k].
        Float64 keeps a query's scores the same, to rounding far below any ranking gap,
        whether it is scored alone or in a batch."""
        query = np.asarray(query_sketch, dtype=np.float64)
        if query.shape[-1] != self.k or query.ndim not in (1, 2):
            raise ValueError(
                f"query sketch has shape {query.shape}, expected [{self.k}] or [B, {self.k}]"
            )
        if self._transformed is None:
            self._transformed = self.features.astype(np.float64)
            if self.preconditioner is not None:
                # P is symmetric, so Phi P holds every P phi_i as a row.
                self._transformed = self._transformed @ self.preconditioner.astype(np.float64)
        return query @ self._transformed.T
