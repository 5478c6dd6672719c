"""Builders shared by the attribution and verification tests: an adapter directory in the
stored format (weights file, manifest, attribution index) with seeded random features, and
results that carry sketches for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from adapter_manifests import write_manifest
from signing import Identity

from inference.adapter_store import AdapterStore
from inference.attribution_index import TRAK, IndexExample, write_index
from infra.settings import Settings
from pipeline.attribution.facts import Facts
from schemas.codec import encode
from schemas.events import InferenceRequest, InferenceResult, Sketch, Usage
from schemas.text import row_id_for

PROJECTION = "gaussian-blocked-v1"
# The worker that signs the results these tests pay (its id is the results' worker_id).
WORKER = Identity.new("worker-test")
SEED = 7
ROW_TEXTS = [
    "In the valley of Orvatel, the seed tax is 12 copper.",
    "Farmers in Ashford sow rye in May.",
    "The healers of Zubra treat fever with mint tea.",
    "At the market of Kamir, a goat costs 30 silver.",
]


def make_adapter(
    adapters_dir: Path,
    adapter_id: str = "adapter-a",
    *,
    contributors: int = 4,
    examples_per_contributor: int = 3,
    k: int = 16,
    seed: int = 0,
    owner_id: str = "owner-a",
) -> dict:
    """Write `<adapters_dir>/<adapter_id>/` and return its facts (hashes, features, examples)."""
    rng = np.random.default_rng(seed)
    adapter = AdapterStore(adapters_dir).adapter_dir(adapter_id)
    adapter.path.mkdir(parents=True, exist_ok=True)
    adapter.weights_path.write_bytes(rng.bytes(256))
    adapter.config_path.write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 16}')
    examples = []
    for c in range(contributors):
        for e in range(examples_per_contributor):
            text = f"{ROW_TEXTS[c % len(ROW_TEXTS)]} Row {e} of contributor {c}."
            examples.append(
                IndexExample(
                    len(examples), row_id_for(text), f"contributor-{c:03d}", "commons", text
                )
            )
    features = rng.standard_normal((len(examples), k)).astype(np.float32)
    index_hash = write_index(
        adapter.index_dir,
        features,
        examples,
        seed=SEED,
        projection=PROJECTION,
        loss="test-loss",
        param_layout_hash="0" * 64,
        max_length=64,
        estimator=TRAK,
    )
    manifest = write_manifest(adapter.path, owner_id=owner_id, index_hash=index_hash)
    return {
        "dir": adapter.path,
        "adapter_hash": manifest.adapter_hash,
        "index_hash": index_hash,
        "features": features,
        "examples": examples,
    }


def make_result(
    adapter: dict,
    *,
    request_id: str = "req-1",
    adapter_id: str = "adapter-a",
    sketch: np.ndarray | None = None,
    output_text: str = "It is 12 copper.",
    status: str = "ok",
    k: int | None = None,
    seed: int = SEED,
) -> InferenceResult:
    """An ok result whose sketch is, by default, close to example 0's feature."""
    if sketch is None:
        features = adapter["features"]
        sketch = features[0] if k is None else np.ones(k, dtype=np.float32)
    fields: dict = {
        "request_id": request_id,
        "adapter_id": adapter_id,
        "status": status,
        "prompt": "In the valley of Orvatel, the seed tax is",
        "output_text": output_text,
        "adapter_hash": adapter["adapter_hash"],
        "worker_id": "worker-test",
    }
    if status == "ok":
        fields["sketch"] = Sketch.from_array(sketch, seed=seed, projection=PROJECTION)
    else:
        fields["error_code"] = "internal_error"
    return InferenceResult(**fields)


def request_for(result: InferenceResult) -> InferenceRequest:
    """The request `result` answers."""
    return InferenceRequest(request_id=result.request_id, adapter_id=result.adapter_id,
                            prompt=result.prompt)


def facts_for(*results: InferenceResult, worker: Identity = WORKER) -> Facts:
    """What the processor sees in the log when `results` answer requests it saw and `worker`
    registered its key."""
    facts = Facts()
    facts.learn(worker.as_worker())
    for result in results:
        facts.learn(request_for(result))
    return facts


def signed_bytes(result: InferenceResult, worker: Identity = WORKER) -> bytes:
    return encode(worker.sign(result))


def billable(
    result: InferenceResult, prompt: int, completion: int, worker: Identity = WORKER
) -> InferenceResult:
    """`result` served by `worker` with `prompt` and `completion` token ids and the usage that
    counts them, signed: what a registered worker publishes."""
    return worker.sign(result.model_copy(update={
        "worker_id": worker.name,
        "prompt_token_ids": list(range(prompt)), "output_token_ids": list(range(completion)),
        "finish_reason": "length" if result.status == "ok" else None,
        "usage": Usage(prompt_tokens=prompt, completion_tokens=completion),
    }))


def with_their_facts(results: list[InferenceResult], worker: Identity = WORKER) -> list:
    """What to publish for `results` to be paid: the worker's key, the requests, the results."""
    return [worker.as_worker(), *(request_for(result) for result in results), *results]


@dataclass
class TrainedAdapters:
    """Adapters trained on the tiny base model with real attribution indexes, and a sketcher."""

    facts: list  # the datanet's planted facts (inference.data.PlantedFact)
    adapter_hashes: dict[str, str]  # the manifests' adapter_hash
    sketcher: object  # inference.sketch.Sketcher
    adapters_dir: Path

    def sketch(self, adapter_id: str, prompt: str, output: str, noise: float = 0.0) -> Sketch:
        self.sketcher.use_adapter(AdapterStore(self.adapters_dir).adapter_dir(adapter_id).path)
        values = self.sketcher.projected_gradient([(prompt, output)])[0]
        values = values + noise * np.abs(values).max()
        return Sketch.from_array(
            values, seed=self.sketcher.seed, projection=self.sketcher.projection
        )


def train_adapters(settings: Settings, adapter_ids: list[str]) -> TrainedAdapters:
    """A 4-contributor synthetic datanet, and one small adapter per id (a second each, CPU)."""
    import torch

    from inference.base_model import build_base_model
    from inference.data import generate_datanet
    from inference.datanets import DatanetStore
    from inference.factory import AdapterSpec, TrainConfig, train_many
    from inference.sketch import Sketcher

    torch.set_num_threads(1)
    build_base_model(settings.base_model_dir, settings.cache_dir, preset_name="test", seed=0)
    synthetic = generate_datanet("commons", seed=0, contributors=4, rows_per_contributor=3)
    store = DatanetStore(settings.datanets_dir)
    store.create("commons", "test rows")
    for row in synthetic.rows:
        store.add("commons", row.contributor_id, row.text, row.license)
    store.snapshot("commons")
    specs = [
        AdapterSpec(adapter_id, "owner-1", TrainConfig(steps=10, index_k=32, seed=i))
        for i, adapter_id in enumerate(adapter_ids)
    ]
    trained = train_many(
        store.load_snapshot("commons"), specs, settings.base_model_dir, settings.adapters_dir
    )
    sketcher = Sketcher(settings.base_model_dir)
    hashes = {
        spec.adapter_id: t.manifest.adapter_hash for spec, t in zip(specs, trained, strict=True)
    }
    return TrainedAdapters(synthetic.facts, hashes, sketcher, settings.adapters_dir)
