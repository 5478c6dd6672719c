"""`loraledger generate`: run one request through the engine locally, no Kafka."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from infra.settings import load_settings
from schemas.events import ChatMessage
from schemas.ids import parse_adapter_id

console = Console()

NO_ADAPTER = "none"


def generate(
    prompt: Annotated[str, typer.Option("--prompt", help="Prompt text (needs tokenizer.json).")],
    adapter: Annotated[
        str, typer.Option("--adapter", help=f"Adapter id; '{NO_ADAPTER}' = the base model.")
    ] = NO_ADAPTER,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    model_dir: Annotated[
        Path | None,
        typer.Option("--model-dir", help="Base model checkpoint (default: LORALEDGER_BASE_MODEL)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    chat: Annotated[
        bool,
        typer.Option("--chat", help="Send the prompt as a user message through the chat template."),
    ] = False,
) -> None:
    """Generate a completion for PROMPT with one adapter (or the base model)."""
    # Imported here so other commands do not pay for loading torch.
    from inference.engine import Engine, EngineConfig, GenerationRequest
    from inference.tokenizer import NoChatTemplate

    try:
        adapter_id = None if adapter.lower() == NO_ADAPTER else parse_adapter_id(adapter)
    except ValueError as exc:
        _fail(str(exc))
    settings = load_settings()
    model_dir = model_dir or settings.base_model_dir
    if not (model_dir / "config.json").is_file():
        _fail(f"no model checkpoint in {model_dir}; build one or pass --model-dir")
    engine = Engine.from_model_dir(
        model_dir,
        settings.adapters_dir,
        device=settings.device,
        config=EngineConfig(max_batch_size=1, max_seq_len=2048),
    )
    if engine.codec is None:
        _fail(f"{model_dir} has no tokenizer.json, so text prompts cannot be encoded")
    try:
        prompt_ids = engine.encode([ChatMessage(role="user", content=prompt)] if chat else prompt)
    except NoChatTemplate:
        _fail("the base model has no chat template: drop --chat")
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        adapter_id=adapter_id,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    (result,) = engine.generate([request])
    engine.close()
    if as_json:
        payload = {
            "request_id": result.request_id,
            "adapter_id": result.adapter_id,
            "status": result.status,
            "error_code": result.error_code.value if result.error_code else None,
            "error_message": result.error_message,
            "output_text": result.output_text,
            "prompt_token_ids": result.prompt_ids,
            "output_token_ids": result.output_ids,
            "finish_reason": result.finish_reason,
            "usage": result.usage.model_dump(),
            "timings": result.timings.model_dump() if result.timings else None,
            "cache_tier": result.cache_tier.value,
            "adapter_hash": result.adapter_version,
            "base_model_hash": engine.base_hash,
        }
        typer.echo(json.dumps(payload, indent=2))
    elif result.status == "ok":
        typer.echo(result.output_text)
        timings = result.timings
        console.print(
            f"[dim]{result.usage.prompt_tokens} prompt + {result.usage.completion_tokens} "
            f"completion tokens, finish={result.finish_reason}, adapter tier "
            f"{result.cache_tier.value}"
            + (
                f", prefill {timings.prefill_ms:.0f} ms, decode {timings.decode_ms:.0f} ms"
                if timings
                else ""
            )
            + "[/dim]",
            highlight=False,
        )
    if result.status != "ok":
        code = result.error_code.value if result.error_code else "error"
        _fail(f"{code}: {result.error_message}")


def _fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
