"""`loraledger serve`: the OpenAI-compatible HTTP gateway in front of Kafka."""

from __future__ import annotations

import logging

import typer
from aiohttp import web

from infra.settings import load_settings
from pipeline.gateway.app import GatewayConfig, build_app


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="Port to bind [LORALEDGER_GATEWAY_PORT]."
    ),
    timeout_s: float | None = typer.Option(
        None, "--timeout", min=0.001,
        help="Seconds to wait for a result before answering 504 [LORALEDGER_GATEWAY_TIMEOUT_S].",
    ),
    max_in_flight: int | None = typer.Option(
        None, "--max-in-flight", min=1,
        help="Requests held at once before answering 429 [LORALEDGER_GATEWAY_MAX_IN_FLIGHT].",
    ),
    base_model_name: str = typer.Option(
        "base", "--base-model-name", help="The name /v1/models lists the base model under."
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Serve /v1/completions, /v1/chat/completions and /v1/models: each request goes to
    `requests` as an ordinary (attributed, paid) request and is answered from `results`."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiokafka").setLevel(max(logging.ERROR, logging.getLogger().level))
    settings = load_settings()
    config = GatewayConfig.from_settings(
        settings, timeout_s=timeout_s, max_in_flight=max_in_flight,
        base_model_name=base_model_name,
    )
    web.run_app(
        build_app(settings, config),
        host=host,
        port=port or settings.gateway_port,
        access_log=None,
        print=lambda message: typer.echo(message, err=True),
    )


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
