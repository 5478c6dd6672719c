"""Attribution quality and cost on the tiny base model and a synthetic datanet with planted facts.

    python bench/attribution_eval.py [--subsets 20] [--peers kronfluence]

Measures, for our method (the TRAK index stored beside the adapter, the span method, and the
mix the processor publishes) and for established libraries on the same model and data:
- LDS (linear datamodeling score): M adapters retrained on random halves of the datanet; for
  each query (a planted fact's prompt and completion), the Spearman correlation over the M
  subsets between the method's predicted effect (sum of the subset's example scores) and the
  retrained adapter's actual -loss on the query; averaged over queries.
- planted-fact top-1: for each fact, is the contributor with the largest weight (positive
  top-k influence summed per contributor, as the processor does) the one who planted it?
- cost: ms per query for attribution (ours: the processor's `attribute` on a result whose sketch
  the worker computed; the sketch's own cost is reported apart), set-up time (our index is built
  at training time), and attribution throughput against inference throughput on this machine.
Prints a markdown table and writes JSON (default `bench/results/attribution_eval.json`).
Peers need the `bench` extra (kronfluence, scipy).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.attribution_index import AttributionIndex  # noqa: E402
from inference.base_model import build_base_model, load_base_model  # noqa: E402
from inference.data import generate_datanet  # noqa: E402
from inference.datanets import DatanetStore, Snapshot  # noqa: E402
from inference.factory import TrainConfig, subset_specs, train_adapter, train_many  # noqa: E402
from inference.sketch import Sketcher, collate, encode_pair, per_example_loss  # noqa: E402
from infra.settings import load_settings  # noqa: E402
from pipeline.attribution.artifacts import ArtifactCache  # noqa: E402
from pipeline.attribution.engine import attribute  # noqa: E402
from schemas.events import InferenceResult, Parameters, Sketch  # noqa: E402

Pair = tuple[str, str]


@dataclass
class Setup:
    base_dir: Path
    adapters_dir: Path
    snapshot: Snapshot
    facts: list  # PlantedFact
    rows: list  # DatanetRow, index order
    full_dir: Path
    config: TrainConfig
    train_seconds: float
    index_seconds: float


def build_setup(work: Path, args: argparse.Namespace) -> Setup:
    settings = load_settings()
    info = build_base_model(work / "base-model", settings.cache_dir, preset_name=args.preset)
    synthetic = generate_datanet(
        "commons",
        seed=args.seed,
        contributors=args.contributors,
        rows_per_contributor=args.rows,
        facts_per_contributor=2,
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
    )
    full = train_adapter(snapshot, "full", "owner", info.directory, work / "adapters", config)
    return Setup(
        info.directory,
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


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> float:
    """scores [Q, N], masks [M, N] (1 = in the subset), losses [M, Q] -> mean Spearman."""
    predicted = masks @ scores.T  # [M, Q]
    values = []
    for q in range(scores.shape[0]):
        rho = spearmanr(predicted[:, q], -losses[:, q]).statistic
        if np.isfinite(rho):
            values.append(rho)
    return float(np.mean(values)) if values else float("nan")


def top1_from_scores(scores: np.ndarray, setup: Setup, top_k: int) -> float:
    hits = 0
    for q, fact in enumerate(setup.facts):
        order = np.argsort(-scores[q])[:top_k]
        totals: dict[str, float] = {}
        for i in order:
            if scores[q, i] > 0:
                contributor = setup.rows[i].contributor_id
                totals[contributor] = totals.get(contributor, 0.0) + float(scores[q, i])
        if totals and min(totals, key=lambda c: (-totals[c], c)) == fact.contributor_id:
            hits += 1
    return hits / len(setup.facts)


@dataclass
class MethodResult:
    name: str
    scores: np.ndarray  # [Q, N]
    setup_s: float
    ms_per_query: float
    top1: float | None = None
    notes: str = ""


def ours(
    setup: Setup, queries: list[Pair], args: argparse.Namespace
) -> tuple[list[MethodResult], dict]:
    index = AttributionIndex.load(setup.full_dir / "attribution_index")
    sketcher = Sketcher(setup.base_dir, setup.full_dir)
    started = time.perf_counter()
    sketches = sketcher.projected_gradient(queries)
    sketch_ms = (time.perf_counter() - started) * 1000 / len(queries)
    scores = index.score(sketches)

    # The processor's own path: one `attribute` call per result, artifacts cached (as in steady
    # state), default governance parameters (gradient 80%, span 20%, top-16).
    manifest = json.loads((setup.full_dir / "manifest.json").read_text())
    cache = ArtifactCache(setup.adapters_dir)
    parameters = Parameters()
    results = [
        InferenceResult(
            request_id=f"q{q}",
            adapter_id="full",
            status="ok",
            prompt=prompt,
            output_text=completion,
            adapter_hash=manifest["weights_hash"],
            worker_id="bench",
            sketch=Sketch.from_array(
                sketches[q], seed=sketcher.seed, projection=sketcher.projection
            ),
        )
        for q, (prompt, completion) in enumerate(queries)
    ]
    cache.get("full")  # load once; the processor keeps it cached
    span_index = cache.get("full").span_index
    started = time.perf_counter()
    records = []
    for _ in range(args.repeat):
        records = [attribute(result, parameters, cache) for result in results]
    attribution_ms = (time.perf_counter() - started) * 1000 / (len(results) * args.repeat)
    top1_mix = sum(
        max(r.contributor_weights, key=lambda w: (w.ppm, w.contributor_id)).contributor_id
        == fact.contributor_id
        for r, fact in zip(records, setup.facts, strict=True)
    ) / len(records)

    span_scores = np.zeros_like(scores)
    started = time.perf_counter()
    for q, (prompt, completion) in enumerate(queries):
        for row, credit in span_index.row_credit(completion, context=prompt).items():
            span_scores[q, row] = credit
    span_ms = (time.perf_counter() - started) * 1000 / len(queries)
    trak = MethodResult(
        "ours: TRAK index (gradient method)",
        scores,
        setup.index_seconds,
        attribution_ms,
        notes=f"ms: the processor's whole attribute() (gradient + span + mix); index built "
        f"at training time; worker sketch {sketch_ms:.2f} ms/query",
    )
    span = MethodResult(
        "ours: span method",
        span_scores,
        0.0,
        span_ms,
        notes="verbatim reuse of rows, matches may start in the prompt",
    )
    extra = {
        "sketch_ms_per_query": sketch_ms,
        "attribution_ms_per_query": attribution_ms,
        "planted_fact_top1_published_weights": top1_mix,
    }
    return [trak, span], extra


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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_length = setup.config.max_length

    def dataset(pairs: list[Pair]) -> list[dict[str, torch.Tensor]]:
        items = []
        for prompt, completion in pairs:
            encoded = encode_pair(tokenizer, prompt, completion, max_length)
            ids, mask, labels = collate([encoded], pad)
            width = max_length - ids.shape[1]
            items.append(
                {
                    "input_ids": torch.nn.functional.pad(ids[0], (0, width), value=pad),
                    "attention_mask": torch.nn.functional.pad(mask[0], (0, width), value=0),
                    "labels": torch.nn.functional.pad(labels[0], (0, width), value=-100),
                }
            )
        return items

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
    queries = [(fact.prompt, fact.completion) for fact in setup.facts]
    print(f"setup: {len(setup.rows)} rows, {len(queries)} queries", file=sys.stderr)

    methods, extra = ours(setup, queries, args)
    peers: dict[str, Callable[[], MethodResult]] = {
        "kronfluence": lambda: kronfluence_scores(setup, queries, work, args),
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
            setup.base_dir, setup.adapters_dir / spec.adapter_id, queries, setup.config.max_length
        )
    for method in methods:
        method.top1 = top1_from_scores(method.scores, setup, Parameters().top_k)
    inference_rps = inference_throughput(setup, queries, args.new_tokens)
    attribution_rps = 1000.0 / extra["attribution_ms_per_query"]
    rows = [
        {
            "method": method.name,
            "lds": lds(method.scores, masks, losses),
            "planted_fact_top1": method.top1,
            "setup_s": method.setup_s,
            "ms_per_query": method.ms_per_query,
            "notes": method.notes,
        }
        for method in methods
    ]
    return {
        "config": {
            "preset": args.preset,
            "contributors": args.contributors,
            "rows_per_contributor": args.rows,
            "training_rows": len(setup.rows),
            "queries": len(queries),
            "subsets": args.subsets,
            "steps": args.steps,
            "k": args.k,
            "lambda_relative": args.lambda_relative,
            "threads": args.threads,
            "seed": args.seed,
        },
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "methods": rows,
        "published_weights_top1": extra["planted_fact_top1_published_weights"],
        "cost": {
            "sketch_ms_per_query": extra["sketch_ms_per_query"],
            "attribution_ms_per_query": extra["attribution_ms_per_query"],
            "attribution_requests_per_s": attribution_rps,
            "inference_requests_per_s": inference_rps,
            "inference_new_tokens": args.new_tokens,
            "retrain_seconds_all_subsets": retrain_s,
        },
        "total_seconds": time.perf_counter() - started,
    }


def markdown(report: dict) -> str:
    lines = [
        "| method | LDS | planted-fact top-1 | set-up s | ms / query | notes |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in report["methods"]:
        lines.append(
            f"| {row['method']} | {row['lds']:.3f} | {row['planted_fact_top1']:.2f} | "
            f"{row['setup_s']:.2f} | {row['ms_per_query']:.2f} | {row['notes']} |"
        )
    cost = report["cost"]
    lines += [
        "",
        f"Published weights (processor, default parameters): planted-fact top-1 = "
        f"{report['published_weights_top1']:.2f}",
        f"Attribution {cost['attribution_requests_per_s']:.0f} req/s vs inference "
        f"{cost['inference_requests_per_s']:.1f} req/s ({cost['inference_new_tokens']} new tokens, "
        f"one batch); worker sketch {cost['sketch_ms_per_query']:.2f} ms/query.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="test", help="base model preset (test: seconds)")
    parser.add_argument("--contributors", type=int, default=8)
    parser.add_argument("--rows", type=int, default=6, help="ordinary rows per contributor")
    parser.add_argument("--subsets", type=int, default=20, help="retrained halves for LDS")
    parser.add_argument("--steps", type=int, default=150, help="training steps per adapter")
    parser.add_argument("--k", type=int, default=2048, help="sketch dimensions")
    parser.add_argument(
        "--lambda-relative",
        type=float,
        default=100.0,
        help="TRAK damping relative to the mean eigenvalue (large: close to a gradient dot "
        "product, which is what a datanet smaller than k needs)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5, help="timing repeats of attribution")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--peers", nargs="*", default=["kronfluence"], choices=["kronfluence"])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "attribution_eval.json"))
    args = parser.parse_args(argv)
    report = run(args)
    print(markdown(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
