"""`phi serve`: an OpenAI-compatible completions server on the continuous-batching engine."""

from __future__ import annotations

from typing import Annotated

import typer

from phi_cli.options import (
    AttnOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    LookupOpt,
    ModelOpt,
    RevisionOpt,
    model_choice,
    silence_notices,
)

SERVER = "Server"


def serve_command(
    model: ModelOpt = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every interface).", rich_help_panel=SERVER)
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).", rich_help_panel=SERVER)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="PHI_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on /v1 routes.",
            rich_help_panel=SERVER,
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests decoded together.", rich_help_panel=SERVER)] = 8,
    max_queue: Annotated[
        int, typer.Option(min=0, help="Requests waiting for a row; beyond it new ones get 429.", rich_help_panel=SERVER)
    ] = 64,
    max_tokens_default: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="max_tokens of requests that omit it.",
            show_default="the checkpoint's generation_config.json, else 128",
            rich_help_panel=SERVER,
        ),
    ] = None,
    served_model_name: Annotated[
        str | None,
        typer.Option(help="The model id clients send.", show_default="--model as given", rich_help_panel=SERVER),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="CPU threads for the model (fewer than cores on a busy machine).",
            show_default="one per core",
            rich_help_panel=SERVER,
        ),
    ] = None,
    shutdown_timeout: Annotated[
        float,
        typer.Option(min=0.0, help="Seconds SIGINT/SIGTERM waits for running requests.", rich_help_panel=SERVER),
    ] = 10.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-request log lines on stderr.")] = False,
    lookup: LookupOpt = 0,
    chat_format: FormatOpt = None,
    revision: RevisionOpt = None,
    dtype: DtypeOpt = None,
    attn: AttnOpt = "sdpa",
    device: DeviceOpt = None,
) -> None:
    """Serve a model over HTTP with OpenAI's completions and chat completions API (one log line per request on stderr).

    phi serve

    phi serve --model microsoft/phi-2 --port 8080 --api-key secret

    phi serve --lookup 8    (prompt lookup for requests that do not send their own "lookup")

    curl localhost:8000/v1/completions -d '{"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 32}'
    """
    from phi_core.server import ServeSettings, serve

    silence_notices(quiet)
    choice = model_choice("causal-lm", model, revision, dtype, attn, device)
    settings = ServeSettings(
        source=choice.source,
        revision=choice.revision,
        dtype=choice.dtype,
        attn=choice.attn,
        device=choice.device,
        host=host,
        port=port,
        api_key=api_key or None,
        max_batch=max_batch,
        max_queue=max_queue,
        max_tokens_default=max_tokens_default,
        shutdown_timeout=shutdown_timeout,
        quiet=quiet,
        name=served_model_name,
        threads=threads,
        chat_format=chat_format,
        lookup=lookup,
    )
    serve(settings)
