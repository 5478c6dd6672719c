"""The attribution query sketch on results: which results get one, and computing them with the
projection recorded in each adapter's attribution index: the results of every adapter whose
index uses the factored projection in one batched pass (`BatchedSketcher`), those of an
adapter indexed before it one pass per adapter (`Sketcher`)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from inference.adapter_store import AdapterStore
from inference.attribution_index import meta_path, read_index_meta
from inference.batched_sketch import BatchedSketcher
from inference.factored_projection import FACTORED_KIND
from inference.sketch import Sketcher
from inference.tokenizer import Prompt
from schemas.events import Sketch

log = logging.getLogger("loraledger.worker")


class SketchMode(StrEnum):
    ALWAYS = "always"
    SAMPLED = "sampled"
    OFF = "off"


@dataclass(frozen=True)
class SketchPolicy:
    mode: SketchMode = SketchMode.ALWAYS
    rate: float = 1.0  # fraction of requests sketched in sampled mode

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"sketch rate must lie in [0, 1], got {self.rate}")

    def wants(self, request_id: str) -> bool:
        """Whether this request is sketched. Sampling hashes the request id, so a replayed
        request gets the same answer on any worker."""
        if self.mode is SketchMode.OFF:
            return False
        if self.mode is SketchMode.ALWAYS:
            return True
        digest = hashlib.sha256(request_id.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.rate


@dataclass(frozen=True)
class SketchJob:
    key: str  # the caller's handle, returned with the sketch
    adapter_id: str
    prompt: Prompt
    completion: str


SketcherFactory = Callable[[], Sketcher]
BatchedSketcherFactory = Callable[[], BatchedSketcher]


class SketchAttacher:
    """Computes sketches for finished generations. The base models for gradients are loaded on
    first use."""

    def __init__(
        self,
        store: AdapterStore,
        make_sketcher: SketcherFactory,
        make_batched: BatchedSketcherFactory,
    ) -> None:
        self.store = store
        self._make_sketcher = make_sketcher
        self._make_batched = make_batched
        self._sketcher: Sketcher | None = None
        self._batched: BatchedSketcher | None = None

    def has_index(self, adapter_id: str) -> bool:
        try:
            return meta_path(self.store.adapter_dir(adapter_id).index_dir).is_file()
        except Exception:
            return False

    def compute(self, jobs: Sequence[SketchJob]) -> dict[str, Sketch]:
        """Sketches by job key. A job whose adapter has no index, whose completion is empty or
        whose computation fails gets none (the failure is logged, the result still goes out)."""
        by_adapter: dict[str, list[SketchJob]] = {}
        for job in jobs:
            if job.completion and self.has_index(job.adapter_id):
                by_adapter.setdefault(job.adapter_id, []).append(job)
        factored: dict[str, list[SketchJob]] = {}
        per_adapter: dict[str, list[SketchJob]] = {}
        for adapter_id, group in by_adapter.items():
            try:
                projection = read_index_meta(self._index_dir(adapter_id)).get("projection")
            except Exception as exc:
                _log_failure(len(group), adapter_id, exc)
                continue
            if projection == FACTORED_KIND:
                factored[adapter_id] = group
            else:
                per_adapter[adapter_id] = group
        sketches = self._batched_sketches(factored)
        # The adapter the sketcher holds goes first: switching adapters is the costly part.
        current = self._sketcher.adapter_dir if self._sketcher is not None else None
        ordered = sorted(
            per_adapter.items(), key=lambda item: self.store.adapter_dir(item[0]).path != current
        )
        for adapter_id, group in ordered:
            try:
                sketcher = self._ensure_sketcher()
                sketcher.use_adapter(self.store.adapter_dir(adapter_id).path)
                values = sketcher.projected_gradient([(j.prompt, j.completion) for j in group])
            except Exception as exc:  # a broken index must not hold back the results
                _log_failure(len(group), adapter_id, exc)
                continue
            for job, row in zip(group, values, strict=True):
                sketches[job.key] = Sketch.from_array(
                    row, seed=sketcher.seed, projection=sketcher.projection
                )
        return sketches

    def _index_dir(self, adapter_id: str) -> Path:
        return self.store.adapter_dir(adapter_id).index_dir

    def _batched_sketches(self, groups: dict[str, list[SketchJob]]) -> dict[str, Sketch]:
        """One pass over the jobs of every readable adapter: an adapter that cannot be read is
        left out (logged), and the others go through without it."""
        if not groups:
            return {}
        try:
            if self._batched is None:
                self._batched = self._make_batched()
        except Exception as exc:  # the results still go out, without sketches
            _log_failure(sum(map(len, groups.values())), "(any of the batch)", exc)
            return {}
        batched = self._batched
        readable: list[tuple[SketchJob, Path, int]] = []  # (job, adapter directory, seed)
        for adapter_id, group in groups.items():
            path = self.store.adapter_dir(adapter_id).path
            try:
                seed = batched.adapter(path).projector.seed
            except Exception as exc:
                _log_failure(len(group), adapter_id, exc)
                continue
            readable += [(job, path, seed) for job in group]
        if not readable:
            return {}
        try:
            values = batched.sketch(
                [(path, job.prompt, job.completion) for job, path, _ in readable]
            )
        except Exception as exc:  # the results still go out, without sketches
            _log_failure(len(readable), "(any of the batch)", exc)
            return {}
        return {
            job.key: Sketch.from_array(row, seed=seed, projection=batched.projection)
            for (job, _, seed), row in zip(readable, values, strict=True)
        }

    def _ensure_sketcher(self) -> Sketcher:
        if self._sketcher is None:
            self._sketcher = self._make_sketcher()
        return self._sketcher


def _log_failure(count: int, adapter_id: str, exc: Exception) -> None:
    log.warning(
        "no sketch for %d result(s) of adapter %s: %s",
        count,
        adapter_id,
        str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
    )
