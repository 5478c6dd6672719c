"""Attribution quality and cost on the tiny base model and a synthetic datanet with planted facts.

    python bench/attribution_eval.py [--task paraphrase|verbatim] [--quick] [--peers ...]
    python bench/attribution_eval.py --preset installed   # the checkpoint in LORALEDGER_BASE_MODEL

Two tasks on the same model and data generator: `paraphrase` (the default) asks about each
planted fact in other words and another order (`inference.data.paraphrase`), `verbatim` asks
with the fact's own prompt and completion, a copy of a training row.
Measures, for our methods (the gradient method on the attribution index stored beside the
adapter with its default `ekfac-projected` estimator, the same adapter re-indexed with the
former `trak` estimator, the span method, the lexical method, and the mix the processor
publishes) and for established methods on the same model and data (kronfluence EK-FAC, dattri
TRAK, BM25 by rank-bm25):
- LDS (linear datamodeling score): M adapters retrained on random halves of the datanet; for
  each query, the Spearman correlation over the M subsets between the method's predicted
  effect (sum of the subset's example scores) and the retrained adapter's actual -loss on the
  query's completion; the mean over queries, with a bootstrap 95 % interval over queries.
- fact tracing: for each query, the ranks of the training rows that state its fact, as
  recall@10 (share of those rows among the 10 best) and MRR (1 / rank of the first).
- planted-fact top-1: is the contributor with the largest weight (positive top-k scores summed
  per contributor, as the processor does; for the mix, the published weights) the one who
  planted the query's fact?
- cost: ms per query (ours: the processor's whole `attribute` on a result whose sketch the
  worker computed; the sketch's own cost is reported apart), set-up time (our index is built at
  training time).
A second table varies the lexical method's weight in the processor's mix.
Prints markdown tables and writes JSON (default `bench/results/attribution_eval.json`, or
`attribution_eval_verbatim.json` for the verbatim task). Peers need the `bench` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# One BLAS thread (torch gets `--threads`, default 1): a multi-threaded BLAS spinning on a shared
# machine made one query's index scoring 5x slower, and every method is timed on one footing.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from transformers import PreTrainedTokenizerBase  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.adapter_store import AdapterDir, AdapterStore  # noqa: E402
from inference.attribution_index import (  # noqa: E402
    TRAK,
    AttributionIndex,
    IndexExample,
    read_index_meta,
    write_index,
)
from inference.base_model import build_base_model, load_base_model  # noqa: E402
from inference.data import PlantedFact, generate_datanet, paraphrase  # noqa: E402
from inference.datanets import DatanetStore, Snapshot  # noqa: E402
from inference.factory import (  # noqa: E402
    LORA_TARGETS,
    TrainConfig,
    subset_specs,
    train_adapter,
    train_many,
)
from inference.influence_preconditioner import DEFAULT_DAMPING_RELATIVE  # noqa: E402
from inference.sketch import Sketcher, collate, encode_pair, per_example_loss  # noqa: E402
from infra.settings import load_settings  # noqa: E402
from pipeline.attribution.artifacts import ArtifactCache  # noqa: E402
from pipeline.attribution.attributor import attribute  # noqa: E402
from schemas.events import InferenceResult, Parameters, Sketch  # noqa: E402

Pair = tuple[str, str]

# task -> default sizes; `--quick` sizes are for smoke tests only.
SIZES = {
    "paraphrase": {"contributors": 20, "rows": 4, "facts": 5, "paraphrases": 2, "subsets": 50},
    "verbatim": {"contributors": 8, "rows": 6, "facts": 2, "paraphrases": 0, "subsets": 20},
    "quick": {"contributors": 6, "rows": 3, "facts": 2, "paraphrases": 2, "subsets": 6},
}
LEXICAL_WEIGHTS_PPM = (0, 100_000, 300_000, 500_000, 700_000, 1_000_000)
BOOTSTRAP_SAMPLES = 2000
INSTALLED = "installed"  # --preset: the installed base model instead of a built preset


@dataclass
class Setup:
    base_dir: Path
    adapters_dir: Path
    snapshot: Snapshot
    facts: list[PlantedFact]
    rows: list  # DatanetRow, index order
    full_dir: Path
    config: TrainConfig
    train_seconds: float
    index_seconds: float


def build_setup(work: Path, args: argparse.Namespace) -> Setup:
    settings = load_settings()
    if args.preset == INSTALLED:
        # The checkpoint `loraledger train` uses (LORALEDGER_BASE_MODEL), e.g. one imported
        # with `loraledger base-model import`.
        base_dir = settings.base_model_dir
    else:
        base_dir = build_base_model(
            work / "base-model", settings.cache_dir, preset_name=args.preset
        ).directory
    synthetic = generate_datanet(
        "commons",
        seed=args.seed,
        contributors=args.contributors,
        rows_per_contributor=args.rows,
        facts_per_contributor=args.facts,
        variants_per_fact=2,
    )
    store = DatanetStore(work / "datanets")
    store.create("commons", "synthetic rows with planted facts")
    for row in synthetic.rows:
        store.add("commons", row.contributor_id, row.text, row.license)
    store.snapshot("commons")
    snapshot = store.load_snapshot("commons")
    config = TrainConfig(
        steps=args.steps,
        index_k=args.k,
        seed=args.seed,
        index_lambda_relative=args.lambda_relative,
        index_damping_relative=args.damping_relative,
        target_modules=tuple(args.target_modules),
    )
    full = train_adapter(snapshot, "full", "owner", base_dir, work / "adapters", config)
    return Setup(
        base_dir,
        work / "adapters",
        snapshot,
        synthetic.facts,
        list(snapshot.rows),
        full.adapter_dir,
        config,
        full.train_seconds,
        full.index_seconds,
    )


def query_losses(
    base_dir: Path, adapter_dir: Path, queries: list[Pair], max_length: int
) -> np.ndarray:
    from peft import PeftModel

    base, tokenizer = load_base_model(base_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir), use_safetensors=True)
    model.eval()
    encoded = [encode_pair(tokenizer, p, c, max_length) for p, c in queries]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        return per_example_loss(model, *collate(encoded, pad)).numpy()


@dataclass(frozen=True)
class Query:
    prompt: str
    completion: str
    fact: PlantedFact

    @property
    def pair(self) -> Pair:
        return self.prompt, self.completion


def make_queries(facts: list[PlantedFact], paraphrases: int, seed: int) -> list[Query]:
    """The facts' own (prompt, completion) with no paraphrases, else `paraphrases` each."""
    if paraphrases == 0:
        return [Query(fact.prompt, fact.completion, fact) for fact in facts]
    return [
        Query(p.prompt, p.completion, fact)
        for fact in facts
        for p in paraphrase(fact, paraphrases, seed)
    ]


def lds_per_query(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """scores [Q, N], masks [M, N] (1 = in the subset), losses [M, Q] -> Spearman per query
    (NaN where either side is constant)."""
    predicted = masks @ scores.T  # [M, Q]
    return np.array(
        [spearmanr(predicted[:, q], -losses[:, q]).statistic for q in range(scores.shape[0])],
        dtype=np.float64,
    )


def mean_with_interval(values: np.ndarray, seed: int) -> tuple[float, float, float]:
    """Mean of the finite values and its bootstrap 95 % interval (percentiles)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(BOOTSTRAP_SAMPLES, values.size)).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def fact_rows(setup: Setup, queries: list[Query]) -> list[np.ndarray]:
    """Per query, the positions of the rows that state its fact."""
    return [
        np.array([i for i, row in enumerate(setup.rows) if q.fact.text in row.text])
        for q in queries
    ]


def fact_tracing(scores: np.ndarray, relevant: list[np.ndarray]) -> tuple[float, float]:
    """(recall@10, MRR) of the rows stating each query's fact, rows ranked by score (equal
    scores by position)."""
    recalls, reciprocal = [], []
    for q, rows in enumerate(relevant):
        order = np.lexsort((np.arange(scores.shape[1]), -scores[q]))
        rank = np.empty(order.size, dtype=np.int64)
        rank[order] = np.arange(1, order.size + 1)
        ranks = rank[rows]
        recalls.append(float(np.mean(ranks <= 10)))
        reciprocal.append(1.0 / float(ranks.min()))
    return float(np.mean(recalls)), float(np.mean(reciprocal))


def top1_from_scores(scores: np.ndarray, setup: Setup, queries: list[Query], top_k: int) -> float:
    hits = 0
    for q, query in enumerate(queries):
        order = np.argsort(-scores[q])[:top_k]
        totals: dict[str, float] = {}
        for i in order:
            if scores[q, i] > 0:
                contributor = setup.rows[i].contributor_id
                totals[contributor] = totals.get(contributor, 0.0) + float(scores[q, i])
        if totals and min(totals, key=lambda c: (-totals[c], c)) == query.fact.contributor_id:
            hits += 1
    return hits / len(queries)


@dataclass
class MethodResult:
    name: str
    scores: np.ndarray  # [Q, N]
    setup_s: float
    ms_per_query: float
    top1: float | None = None
    notes: str = ""


def trak_copy(setup: Setup, sketcher: Sketcher, lambda_relative: float) -> tuple[str, float]:
    """The full adapter copied as `full-trak` and re-indexed with the former `trak` estimator
    (same sketches, same examples); returns its id and the seconds the re-indexing took."""
    started = time.perf_counter()
    adapter_id = "full-trak"
    store = AdapterStore(setup.adapters_dir)
    full = AdapterDir(setup.full_dir)
    directory = store.adapter_dir(adapter_id)
    shutil.copytree(full.path, directory.path, dirs_exist_ok=True)
    shutil.rmtree(directory.index_dir)
    meta = read_index_meta(full.index_dir)
    examples = AttributionIndex.load(full.index_dir).examples.to_pylist()
    sketches = sketcher.projected_gradient([("", example["text"]) for example in examples])
    digest = write_index(
        directory.index_dir,
        sketches,
        [IndexExample(**example) for example in examples],
        seed=meta["seed"],
        projection=meta["projection"],
        loss=meta["loss"],
        param_layout_hash=meta["param_layout_hash"],
        max_length=meta["max_length"],
        lambda_relative=lambda_relative,
        estimator=TRAK,
    )
    copied = store.manifest(adapter_id)  # still the full adapter's
    directory.write_manifest(
        copied.model_copy(update={"adapter_id": adapter_id, "index_hash": digest})
    )
    return adapter_id, time.perf_counter() - started


def processor_run(
    setup: Setup,
    adapter_id: str,
    queries: list[Pair],
    sketches: np.ndarray,
    sketcher: Sketcher,
    repeat: int,
    parameters: Parameters | None = None,
) -> tuple[np.ndarray, float, list]:
    """The processor's own path: one `attribute` call per result, artifacts cached (as in
    steady state), default governance parameters unless given. Returns the index's scores
    [Q, N], ms per attribute() call, and the records."""
    store = AdapterStore(setup.adapters_dir)
    manifest = store.manifest(adapter_id)
    assert manifest.adapter_hash == store.adapter_dir(adapter_id).adapter_hash()
    cache = ArtifactCache(setup.adapters_dir)
    parameters = parameters or Parameters()
    results = [
        InferenceResult(
            request_id=f"q{q}",
            adapter_id=adapter_id,
            status="ok",
            prompt=prompt,
            output_text=completion,
            adapter_hash=manifest.adapter_hash,
            worker_id="bench",
            sketch=Sketch.from_array(
                sketches[q], seed=sketcher.seed, projection=sketcher.projection
            ),
        )
        for q, (prompt, completion) in enumerate(queries)
    ]
    artifacts = cache.get(adapter_id)  # load once; the processor keeps it cached
    started = time.perf_counter()
    records = []
    for _ in range(repeat):
        records = [attribute(result, parameters, cache) for result in results]
    assert all(record.status == "ok" for record in records), records[0].failure_reason
    attribution_ms = (time.perf_counter() - started) * 1000 / (len(results) * repeat)
    return artifacts.index.score(sketches), attribution_ms, records


def published_top1(records: list, queries: list[Query]) -> float:
    return sum(
        max(r.contributor_weights, key=lambda w: (w.ppm, w.contributor_id)).contributor_id
        == query.fact.contributor_id
        for r, query in zip(records, queries, strict=True)
    ) / len(records)


def mixed_scores(methods: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """Per-example scores of a mix of (scores [Q, N], weight): each method's scores normalised
    to unit absolute sum per query, weighted as the processor weights the methods."""

    def normalised(scores: np.ndarray) -> np.ndarray:
        totals = np.abs(scores).sum(axis=1, keepdims=True)
        return np.divide(scores, totals, out=np.zeros_like(scores), where=totals > 0)

    return sum(weight * normalised(scores) for scores, weight in methods)


def mix_of(
    gradient: np.ndarray, lexical: np.ndarray, span: np.ndarray, parameters: Parameters
) -> np.ndarray:
    lexical_share = parameters.lexical_weight_ppm / 1_000_000
    gradient_share = parameters.gradient_weight_ppm / 1_000_000
    return mixed_scores(
        [
            (gradient, (1 - lexical_share) * gradient_share),
            (lexical, lexical_share),
            (span, (1 - lexical_share) * (1 - gradient_share)),
        ]
    )


@dataclass
class Ours:
    methods: list[MethodResult]
    sketch_ms: float
    attribution_ms: float
    sweep: list[dict]


def ours(setup: Setup, queries: list[Query], args: argparse.Namespace) -> Ours:
    pairs = [q.pair for q in queries]
    sketcher = Sketcher(setup.base_dir, setup.full_dir)
    started = time.perf_counter()
    sketches = sketcher.projected_gradient(pairs)
    sketch_ms = (time.perf_counter() - started) * 1000 / len(queries)
    index = AttributionIndex.load(AdapterDir(setup.full_dir).index_dir)
    estimator, estimator_params = index.estimator, index.meta.get("estimator_params", {})
    scores, attribution_ms, records = processor_run(
        setup, "full", pairs, sketches, sketcher, args.repeat
    )
    old_id, old_setup_s = trak_copy(setup, sketcher, args.lambda_relative)
    old_scores, old_ms, _ = processor_run(setup, old_id, pairs, sketches, sketcher, args.repeat)

    artifacts = ArtifactCache(setup.adapters_dir).get("full")
    span_index = artifacts.span_index
    span_scores = np.zeros_like(scores)
    started = time.perf_counter()
    for q, (prompt, completion) in enumerate(pairs):
        for row, credit in span_index.row_credit(completion, context=prompt).items():
            span_scores[q, row] = credit
    span_ms = (time.perf_counter() - started) * 1000 / len(queries)
    lexical_index = artifacts.lexical_index
    defaults = Parameters()
    lexical_scores = np.zeros_like(scores)
    started = time.perf_counter()
    for q, (prompt, completion) in enumerate(pairs):
        for row, credit in lexical_index.row_credit(completion, defaults.top_k, prompt).items():
            lexical_scores[q, row] = credit
    lexical_ms = (time.perf_counter() - started) * 1000 / len(queries)
    ms_note = "ms: the processor's whole attribute() (every method + mix)"
    methods = [
        MethodResult(
            f"ours: gradient ({estimator[0]} v{estimator[1]} index)",
            scores,
            setup.index_seconds,
            attribution_ms,
            notes=f"{ms_note}; index built at training time ({estimator_params}); worker "
            f"sketch {sketch_ms:.2f} ms/query",
        ),
        MethodResult(
            "ours: gradient (previous trak v1 index)",
            old_scores,
            old_setup_s,
            old_ms,
            notes=f"{ms_note}; same adapter and sketches, lambda_relative {args.lambda_relative}",
        ),
        MethodResult(
            "ours: span method",
            span_scores,
            0.0,
            span_ms,
            notes="verbatim reuse of rows, matches may start in the prompt",
        ),
        MethodResult(
            "ours: lexical method (BM25 over the index's rows)",
            lexical_scores,
            0.0,
            lexical_ms,
            notes="the rows it credits: top-k by BM25 of prompt + output, near the best",
        ),
        MethodResult(
            f"ours: published mix (lexical {defaults.lexical_weight_ppm / 1e6:.0%}, gradient "
            f"{defaults.gradient_weight_ppm / 1e6:.0%} of the rest, span)",
            mix_of(scores, lexical_scores, span_scores, defaults),
            setup.index_seconds,
            attribution_ms,
            top1=published_top1(records, queries),
            notes="top-1 of the published contributor weights; LDS and tracing of the "
            f"per-example mix; {ms_note}",
        ),
    ]
    sweep = []
    for weight in LEXICAL_WEIGHTS_PPM:
        parameters = Parameters(lexical_weight_ppm=weight)
        _, _, weighted = processor_run(setup, "full", pairs, sketches, sketcher, 1, parameters)
        sweep.append(
            {
                "lexical_weight_ppm": weight,
                "scores": mix_of(scores, lexical_scores, span_scores, parameters),
                "planted_fact_top1": published_top1(weighted, queries),
            }
        )
    return Ours(methods, sketch_ms, attribution_ms, sweep)


def bm25_scores(setup: Setup, queries: list[Query]) -> MethodResult:
    """rank-bm25's Okapi BM25 over the training rows, lower-cased word tokens, the query being
    the prompt and completion together."""
    import re

    from rank_bm25 import BM25Okapi

    def tokens(text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())

    started = time.perf_counter()
    bm25 = BM25Okapi([tokens(row.text) for row in setup.rows])
    setup_s = time.perf_counter() - started
    started = time.perf_counter()
    scores = np.stack([bm25.get_scores(tokens(q.prompt + q.completion)) for q in queries])
    per_query_ms = (time.perf_counter() - started) * 1000 / len(queries)
    return MethodResult(
        "BM25 (rank-bm25 Okapi, prompt + completion)",
        scores.astype(np.float64),
        setup_s,
        per_query_ms,
        notes="the lexical retrieval baseline of fact tracing",
    )


def padded_examples(
    tokenizer: PreTrainedTokenizerBase, pairs: list[Pair], max_length: int
) -> list[dict[str, torch.Tensor]]:
    """Each pair encoded as the index encodes it, right-padded to `max_length`."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    items = []
    for prompt, completion in pairs:
        ids, mask, labels = collate([encode_pair(tokenizer, prompt, completion, max_length)], pad)
        width = max_length - ids.shape[1]
        items.append(
            {
                "input_ids": torch.nn.functional.pad(ids[0], (0, width), value=pad),
                "attention_mask": torch.nn.functional.pad(mask[0], (0, width), value=0),
                "labels": torch.nn.functional.pad(labels[0], (0, width), value=-100),
            }
        )
    return items


def lora_adapter_model(setup: Setup) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    from peft import PeftModel

    base, tokenizer = load_base_model(setup.base_dir)
    model = PeftModel.from_pretrained(
        base, str(setup.full_dir), is_trainable=True, use_safetensors=True
    )
    model.eval()
    return model, tokenizer


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: mean NLL over the labelled tokens, as `per_example_loss` computes it."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(targets.shape)
    return nll.sum(dim=1) / (targets != -100).sum(dim=1).clamp(min=1)


def dattri_trak_scores(setup: Setup, queries: list[Pair], args: argparse.Namespace) -> MethodResult:
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader

    model, tokenizer = lora_adapter_model(setup)
    max_length = setup.config.max_length
    lora_names = [name for name, param in model.named_parameters() if param.requires_grad]

    def loss(params: dict[str, torch.Tensor], item: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, _mask, labels = item
        # No attention mask: dattri vmaps over examples, and the model's mask handling
        # branches on its values. Padding sits at the right, so the causal mask alone keeps
        # it out of every labelled token's computation.
        logits = torch.func.functional_call(model, params, (ids[None],)).logits
        return completion_loss(logits, labels[None])[0]

    def probability(params: dict[str, torch.Tensor], item: tuple[torch.Tensor, ...]):  # noqa: ANN202
        return torch.exp(-loss(params, item))

    def loader(pairs: list[Pair]) -> DataLoader:
        items = padded_examples(tokenizer, pairs, max_length)
        rows = [(i["input_ids"], i["attention_mask"], i["labels"]) for i in items]
        return DataLoader(rows, batch_size=16)

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    attributor = TRAKAttributor(
        task,
        correct_probability_func=probability,
        projector_kwargs={"proj_dim": args.k, "device": "cpu"},
        layer_name=lora_names,
        device="cpu",
        regularization=args.dattri_regularization,
    )
    started = time.perf_counter()
    attributor.cache(loader([("", row.text) for row in setup.rows]))
    setup_s = time.perf_counter() - started
    started = time.perf_counter()
    scores = attributor.attribute(loader(queries)).numpy()  # [N, Q]
    per_query_ms = (time.perf_counter() - started) * 1000 / len(queries)
    return MethodResult(
        f"dattri TRAK (LoRA modules, k={args.k})",
        scores.T.astype(np.float64),
        setup_s,
        per_query_ms,
        notes=f"one checkpoint, regularization {args.dattri_regularization}; per query = query "
        "gradient, projection and scoring",
    )


def kronfluence_scores(
    setup: Setup, queries: list[Pair], work: Path, args: argparse.Namespace
) -> MethodResult:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from peft import PeftModel

    base, tokenizer = load_base_model(setup.base_dir)
    model = PeftModel.from_pretrained(base, str(setup.full_dir), use_safetensors=True)
    model.eval()
    max_length = setup.config.max_length

    def dataset(pairs: list[Pair]) -> list[dict[str, torch.Tensor]]:
        return padded_examples(tokenizer, pairs, max_length)

    lora_modules = [
        name
        for name, module in model.named_modules()
        if name.split(".")[-2:-1] in (["lora_A"], ["lora_B"])
        and isinstance(module, torch.nn.Linear)
    ]

    class LoraTask(Task):
        def compute_train_loss(self, batch, model, sample=False):  # noqa: ANN001
            losses = per_example_loss(
                model, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            return losses.sum()

        def compute_measurement(self, batch, model):  # noqa: ANN001
            losses = per_example_loss(
                model, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            return losses.sum()

        def get_influence_tracked_modules(self):  # noqa: ANN201
            return lora_modules

        def get_attention_mask(self, batch):  # noqa: ANN001, ANN201
            return batch["attention_mask"]

    task = LoraTask()
    model = prepare_model(model, task)
    analyzer = Analyzer(
        "bench", model, task, cpu=True, disable_tqdm=True, output_dir=str(work / "kronfluence")
    )
    train = dataset([("", row.text) for row in setup.rows])
    query = dataset(queries)
    started = time.perf_counter()
    analyzer.fit_all_factors(
        "ekfac", train, per_device_batch_size=16, factor_args=FactorArguments(strategy="ekfac")
    )
    setup_s = time.perf_counter() - started
    started = time.perf_counter()
    analyzer.compute_pairwise_scores(
        "scores",
        "ekfac",
        query,
        train,
        per_device_query_batch_size=len(query),
        per_device_train_batch_size=16,
        score_args=ScoreArguments(),
    )
    per_query_ms = (time.perf_counter() - started) * 1000 / len(queries)
    scores = analyzer.load_pairwise_scores("scores")["all_modules"].numpy()
    return MethodResult(
        "kronfluence EK-FAC (LoRA modules)",
        scores.astype(np.float64),
        setup_s,
        per_query_ms,
        notes="factors fitted once; per query = pairwise scoring of all train examples",
    )


def inference_throughput(setup: Setup, queries: list[Pair], new_tokens: int) -> float:
    """Requests per second of greedy generation with the adapter (one batch, this machine)."""
    from peft import PeftModel

    base, tokenizer = load_base_model(setup.base_dir)
    model = PeftModel.from_pretrained(base, str(setup.full_dir), use_safetensors=True)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer([p for p, _ in queries], return_tensors="pt", padding=True)
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return len(queries) / (time.perf_counter() - started)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="attribution-eval-"))
    started = time.perf_counter()
    setup = build_setup(work, args)
    queries = make_queries(setup.facts, args.paraphrases, args.seed)
    pairs = [q.pair for q in queries]
    print(f"setup: {len(setup.rows)} rows, {len(queries)} queries", file=sys.stderr)

    mine = ours(setup, queries, args)
    methods = list(mine.methods)
    peers: dict[str, Callable[[], MethodResult]] = {
        "bm25": lambda: bm25_scores(setup, queries),
        "kronfluence": lambda: kronfluence_scores(setup, pairs, work, args),
        "dattri": lambda: dattri_trak_scores(setup, pairs, args),
    }
    for peer in args.peers:
        print(f"peer: {peer}", file=sys.stderr)
        methods.append(peers[peer]())

    specs = subset_specs(setup.snapshot, args.subsets, "half", "owner", 0.5, setup.config)
    retrain_started = time.perf_counter()
    train_many(setup.snapshot, specs, setup.base_dir, setup.adapters_dir)
    retrain_s = time.perf_counter() - retrain_started
    position = {row.row_id: i for i, row in enumerate(setup.rows)}
    masks = np.zeros((len(specs), len(setup.rows)))
    losses = np.zeros((len(specs), len(queries)))
    for m, spec in enumerate(specs):
        masks[m, [position[row_id] for row_id in spec.row_ids]] = 1
        losses[m] = query_losses(
            setup.base_dir, setup.adapters_dir / spec.adapter_id, pairs, setup.config.max_length
        )
    relevant = fact_rows(setup, queries)
    top_k = Parameters().top_k

    def quality(scores: np.ndarray) -> dict:
        lds, low, high = mean_with_interval(lds_per_query(scores, masks, losses), args.seed)
        recall, mrr = fact_tracing(scores, relevant)
        return {"lds": lds, "lds_ci95": [low, high], "recall_at_10": recall, "mrr": mrr}

    rows = []
    for method in methods:
        top1 = method.top1
        if top1 is None:
            top1 = top1_from_scores(method.scores, setup, queries, top_k)
        rows.append(
            {
                "method": method.name,
                **quality(method.scores),
                "planted_fact_top1": top1,
                "setup_s": method.setup_s,
                "ms_per_query": method.ms_per_query,
                "notes": method.notes,
            }
        )
    sweep = [
        {
            "lexical_weight_ppm": entry["lexical_weight_ppm"],
            **quality(entry["scores"]),
            "planted_fact_top1": entry["planted_fact_top1"],
        }
        for entry in mine.sweep
    ]
    inference_rps = inference_throughput(setup, pairs, args.new_tokens)
    return {
        "config": {
            "task": args.task,
            "preset": args.preset,
            "contributors": args.contributors,
            "rows_per_contributor": args.rows,
            "facts_per_contributor": args.facts,
            "paraphrases_per_fact": args.paraphrases,
            "training_rows": len(setup.rows),
            "queries": len(queries),
            "subsets": args.subsets,
            "steps": args.steps,
            "k": args.k,
            "target_modules": args.target_modules,
            "lambda_relative": args.lambda_relative,
            "damping_relative": args.damping_relative,
            "threads": args.threads,
            "seed": args.seed,
            "bootstrap_samples": BOOTSTRAP_SAMPLES,
        },
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "methods": rows,
        "lexical_weight_sweep": sweep,
        "cost": {
            "sketch_ms_per_query": mine.sketch_ms,
            "attribution_ms_per_query": mine.attribution_ms,
            "attribution_requests_per_s": 1000.0 / mine.attribution_ms,
            "inference_requests_per_s": inference_rps,
            "inference_new_tokens": args.new_tokens,
            "retrain_seconds_all_subsets": retrain_s,
        },
        "total_seconds": time.perf_counter() - started,
    }


def baseline_ratios(report: dict) -> list[str]:
    """The published mix against kronfluence (LDS, time per query) and BM25 (MRR)."""
    by_name = {row["method"].split(" (")[0]: row for row in report["methods"]}
    mix = next(row for row in report["methods"] if row["method"].startswith("ours: published"))
    lines = []
    if "kronfluence EK-FAC" in by_name:
        peer = by_name["kronfluence EK-FAC"]
        lines.append(
            f"Published mix vs kronfluence EK-FAC: LDS {mix['lds']:.3f} vs {peer['lds']:.3f}, "
            f"{peer['ms_per_query'] / mix['ms_per_query']:.0f}x less time per query."
        )
    if "BM25" in by_name:
        peer = by_name["BM25"]
        lines.append(
            f"Published mix vs BM25: fact-tracing MRR {mix['mrr']:.3f} vs {peer['mrr']:.3f}."
        )
    return lines


def markdown(report: dict) -> str:
    lines = [
        "| method | LDS [95% CI] | recall@10 | MRR | planted-fact top-1 | set-up s | ms / query |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["methods"]:
        low, high = row["lds_ci95"]
        lines.append(
            f"| {row['method']} | {row['lds']:.3f} [{low:.3f}, {high:.3f}] | "
            f"{row['recall_at_10']:.2f} | {row['mrr']:.3f} | {row['planted_fact_top1']:.2f} | "
            f"{row['setup_s']:.2f} | {row['ms_per_query']:.2f} |"
        )
    lines += [
        "",
        "| lexical weight (ppm) | LDS [95% CI] | recall@10 | MRR | published top-1 |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["lexical_weight_sweep"]:
        low, high = row["lds_ci95"]
        lines.append(
            f"| {row['lexical_weight_ppm']:,} | {row['lds']:.3f} [{low:.3f}, {high:.3f}] | "
            f"{row['recall_at_10']:.2f} | {row['mrr']:.3f} | {row['planted_fact_top1']:.2f} |"
        )
    cost, config = report["cost"], report["config"]
    lines += [
        "",
        *baseline_ratios(report),
        f"{config['task']}: {config['queries']} queries, {config['training_rows']} rows, "
        f"{config['subsets']} retrained subsets ({cost['retrain_seconds_all_subsets']:.0f} s), "
        f"total {report['total_seconds']:.0f} s.",
        f"Attribution {cost['attribution_requests_per_s']:.0f} req/s vs inference "
        f"{cost['inference_requests_per_s']:.1f} req/s ({cost['inference_new_tokens']} new tokens, "
        f"one batch); worker sketch {cost['sketch_ms_per_query']:.2f} ms/query.",
    ]
    return "\n".join(lines)


def json_safe(value: object) -> object:
    """`value` with NaN as null: LDS is undefined where a method scores every row alike (the
    span method on paraphrases that share no span with any row)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["paraphrase", "verbatim"], default="paraphrase")
    parser.add_argument(
        "--quick", action="store_true", help="a few facts and subsets: a smoke test, not a result"
    )
    parser.add_argument(
        "--preset",
        default="test",
        help=f"base model preset (test: seconds), or {INSTALLED!r}: the base model installed in "
        "LORALEDGER_BASE_MODEL, as `loraledger train` uses (e.g. an imported checkpoint)",
    )
    parser.add_argument("--contributors", type=int, help="default: the task's size")
    parser.add_argument("--rows", type=int, help="ordinary rows per contributor")
    parser.add_argument("--facts", type=int, help="planted facts per contributor")
    parser.add_argument("--paraphrases", type=int, help="queries per fact (0: the fact itself)")
    parser.add_argument("--subsets", type=int, help="retrained halves for LDS")
    parser.add_argument("--steps", type=int, default=150, help="training steps per adapter")
    parser.add_argument("--k", type=int, default=2048, help="sketch dimensions")
    parser.add_argument(
        "--target-modules", nargs="+", default=list(LORA_TARGETS), choices=LORA_TARGETS
    )
    parser.add_argument(
        "--lambda-relative",
        type=float,
        default=100.0,
        help="damping of the former `trak` estimator, relative to the mean eigenvalue (large: "
        "close to a gradient dot product, which is what a datanet smaller than k needs)",
    )
    parser.add_argument(
        "--damping-relative",
        type=float,
        default=DEFAULT_DAMPING_RELATIVE,
        help="EK-FAC damping of the `ekfac-projected` index, relative to each layer's mean "
        "eigenvalue",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5, help="timing repeats of attribution")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument(
        "--peers",
        nargs="*",
        default=["bm25", "kronfluence", "dattri"],
        choices=["bm25", "kronfluence", "dattri"],
    )
    parser.add_argument(
        "--dattri-regularization",
        type=float,
        default=1e-3,
        help="dattri TRAK's ridge term (0 is singular when the datanet is smaller than k)",
    )
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="JSON report (default: bench/results/)")
    args = parser.parse_args(argv)
    sizes = SIZES["quick" if args.quick else args.task]
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.task == "verbatim" and args.paraphrases:
        parser.error("the verbatim task asks with the facts themselves: --paraphrases 0")
    report = run(args)
    print(markdown(report))
    suffix = "" if args.task == "paraphrase" else f"_{args.task}"
    out = Path(args.out or REPO / "bench" / "results" / f"attribution_eval{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
