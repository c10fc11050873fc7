"""``phi serve``: OpenAI's completions API over HTTP, on the continuous-batching engine.

The socket is bound first and HTTP answers from its own thread while the model loads: ``/health`` says 503 until
the model is ready, then 200. Request handlers never run the model: they validate, tokenize, hand requests to the
:class:`Engine` and relay its events (through the event loop, as they come) as JSON or server-sent events.

Starlette, uvicorn and pydantic come with the ``serve`` extra. Without it this module still imports (``phi_core``
never needs them) and :func:`serve` says how to install them.

SIGINT, SIGTERM and SIGHUP stop new requests (503), let the running ones finish for up to ``shutdown_timeout``
seconds, cancel the rest, and return normally: ``phi serve`` exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from phi_core.engine import Engine, EngineClosed, EngineEvent, EngineFull, EngineRequest, RequestHandle, Token, is_last
from phi_core.errors import PhiError
from phi_core.generation import GenerationParams
from phi_core.generation_config import GenerationDefaults, GenerationOverrides, resolve_generation
from phi_core.metrics import ServerMetrics
from phi_core.model import PhiForCausalLM
from phi_core.prompt_format import BUILT_IN_FORMATS, PromptFormat, checkpoint_format, choose_format, special_tokens
from phi_core.tokenizer import ENDOFTEXT, PhiTokenizer

try:  # the serve extra
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    from phi_core.chat_api import ChatCompletionRequest, chat_chunks, chat_object
    from phi_core.openai_protocol import (
        APIError,
        Choice,
        CompletionRequest,
        DetokenizeRequest,
        TokenizeRequest,
        completion_object,
        parse,
        usage,
    )
except ImportError:
    HAVE_SERVE_EXTRA = False
else:
    HAVE_SERVE_EXTRA = True

log = logging.getLogger("phi.serve")
access_log = logging.getLogger("phi.serve.access")  # one line per request; --quiet turns it off
INSTALL_HINT = "phi serve needs the serve extra: pip install 'phi-toolkit[serve]'"
KNOWN_PATHS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
    "/metrics",
)
Handler = Callable[["Request"], Awaitable["Response"]]


@dataclass(frozen=True)
class ServeSettings:
    """What ``phi serve`` was asked for. ``name`` is the model id clients send (default: ``source`` as given)."""

    source: str = "tiny"
    revision: str | None = None
    dtype: str = "auto"
    attn: str = "sdpa"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_tokens_default: int | None = None
    shutdown_timeout: float = 10.0
    quiet: bool = False
    name: str | None = None
    threads: int | None = None  # torch's CPU threads (None: torch's default, one per core)
    chat_format: str | None = None  # /v1/chat/completions: a built-in format or a .jinja file (None: the model's own)
    lookup: int = 0  # prompt lookup of up to this many tokens for requests that omit their own (0: off)


class ModelService:
    """The served model: its name, and once loaded, its engine, tokenizer and generation defaults. ``lookup``: the
    prompt lookup of requests that do not ask for their own."""

    def __init__(
        self,
        name: str,
        max_batch: int = 8,
        max_queue: int = 64,
        max_tokens_default: int | None = None,
        lookup: int = 0,
    ) -> None:
        self.name, self.created = name, int(time.time())
        self.max_batch, self.max_queue, self.max_tokens_default = max_batch, max_queue, max_tokens_default
        self.lookup = lookup
        self.engine: Engine | None = None
        self.tokenizer: PhiTokenizer | None = None
        self.defaults = GenerationDefaults()
        # How /v1/chat/completions renders messages: the checkpoint's template when it has one (set at load).
        self.prompt_format: PromptFormat = BUILT_IN_FORMATS["chat"]
        self.special_tokens: dict[str, str] = {}
        self.failure: str | None = None
        self.metrics = ServerMetrics(
            waiting=lambda: self.engine.waiting if self.engine else 0,
            running=lambda: self.engine.running if self.engine else 0,
            proposed=lambda: self.engine.proposed_tokens if self.engine else 0,
            accepted=lambda: self.engine.accepted_tokens if self.engine else 0,
        )

    def attach(self, model: PhiForCausalLM, tokenizer: PhiTokenizer, defaults: GenerationDefaults) -> None:
        """Start serving ``model`` (loaded elsewhere): from now on /health answers 200."""
        self.defaults, self.tokenizer = defaults, tokenizer
        # The engine's own lookup stays 0: each request carries its lookup, the default resolved here (_generation),
        # so that a request's "lookup": 0 turns off a server-wide --lookup.
        self.engine = Engine(model, tokenizer, self.max_batch, self.max_queue)

    def ready(self) -> tuple[Engine, PhiTokenizer]:
        if self.engine is None or self.tokenizer is None:
            raise APIError(503, "the model is still loading; retry when GET /health answers 200", code="loading")
        return self.engine, self.tokenizer

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            message = f"The model `{name}` does not exist (this server serves `{self.name}`)."
            raise APIError(404, message, "model", code="model_not_found")


# Running the server -------------------------------------------------------------------------------------------
Loader = Callable[[], tuple[PhiForCausalLM, PhiTokenizer, GenerationDefaults]]


def serve(settings: ServeSettings, load: Loader | None = None) -> None:
    """Run the server until SIGINT/SIGTERM; raises PhiError if it cannot listen or the model cannot be loaded.

    ``load`` gives the model, tokenizer and generation defaults (default: ``settings.source`` through
    :func:`phi_core.load_model`; the serving benchmark passes random weights).

    HTTP runs in a thread of its own from the start (so /health answers 503 during the load) and the model loads
    in this one, the main thread, which then only waits. Loading in a helper thread that then ends left every
    later decode step of the engine thread 10-100x slower on a busy 2-core machine (torch's OpenMP pool, measured:
    20 ms against 0.4-5 s for 16 tokens of the embedded model)."""
    if not HAVE_SERVE_EXTRA:
        raise PhiError(INSTALL_HINT)
    _configure_log(settings.quiet)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    service = ModelService(
        settings.name or settings.source,
        settings.max_batch,
        settings.max_queue,
        settings.max_tokens_default,
        settings.lookup,
    )
    sock = _bind(settings.host, settings.port)
    config = uvicorn.Config(
        create_app(service, settings.api_key),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )
    server = uvicorn.Server(config)  # off the main thread, it leaves signals alone: _Signals has them
    host, port = sock.getsockname()[:2]
    log.info("phi serve: listening on http://%s:%d, loading %s", _url_host(host), port, settings.source)
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="phi-http", daemon=True)
    with _Signals(server, service) as signals:
        http.start()
        try:
            try:
                if load is None:
                    service.prompt_format, service.special_tokens = _chat_format(settings)
                _load(service, load or functools.partial(_load_checkpoint, settings))
            finally:
                signals.loading = False
        except _StopLoading:
            pass
        except Exception as exc:  # reported as one line once the server is down
            service.failure = str(exc) if isinstance(exc, PhiError) else f"{type(exc).__name__}: {exc}"
            server.should_exit = True
        try:
            while http.is_alive():
                http.join(0.2)
        finally:  # anything unexpected on the way out still closes the server
            server.should_exit = True
    if service.failure:
        raise PhiError(service.failure)
    if not server.started and not signals.received:
        raise PhiError(f"the HTTP server on {host}:{port} failed to start")
    log.info("phi serve: stopped")


def _load(service: ModelService, load: Loader) -> None:
    started = time.perf_counter()
    model, tokenizer, defaults = load()
    service.attach(model, tokenizer, defaults)
    seconds = time.perf_counter() - started
    log.info("phi serve: ready in %.1f s (%s); model id %r", seconds, model.precision.describe(), service.name)


class _StopLoading(BaseException):
    """A signal arrived while the model was loading: stop loading and shut down."""


class _Signals:
    """SIGINT, SIGTERM or SIGHUP while serving: take no more requests, let uvicorn finish the running ones within
    its graceful timeout, and return normally (uvicorn itself would re-raise the signal after shutting down, ending
    the process by it). A second Ctrl-C stops waiting; a signal during the load stops the load. Signals the parent
    left ignored stay ignored, as everywhere in phi (`nohup`, background jobs of a script)."""

    def __init__(self, server: Any, service: ModelService) -> None:
        self.server, self.service = server, service
        self.loading, self.received = True, False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, _frame: Any) -> None:
        if self.received:
            self.server.force_exit = self.server.force_exit or signum == signal.SIGINT
            return
        self.received = True
        timeout = self.server.config.timeout_graceful_shutdown
        log.info("phi serve: %s, finishing requests (at most %s s)", signal.Signals(signum).name, timeout)
        if self.service.engine is not None:
            self.service.engine.stop_accepting()
        self.server.should_exit = True
        if self.loading:
            raise _StopLoading()


def _load_checkpoint(settings: ServeSettings) -> tuple[PhiForCausalLM, PhiTokenizer, GenerationDefaults]:
    from phi_core.checkpoint import resolve_source
    from phi_core.generation_config import generation_defaults
    from phi_core.loading import load_model, load_tokenizer

    source, revision = settings.source, settings.revision
    model = load_model(source, "causal-lm", settings.dtype, settings.attn, settings.device, revision)
    assert isinstance(model, PhiForCausalLM)
    defaults = generation_defaults(resolve_source(source, revision, weights=False))
    return model, load_tokenizer(source, revision), defaults


def _chat_format(settings: ServeSettings) -> tuple[PromptFormat, dict[str, str]]:
    """The format chat requests are rendered in: ``--format``, else the checkpoint's template, else ``chat``."""
    from phi_core.checkpoint import resolve_source

    folder = resolve_source(settings.source, settings.revision, weights=False)
    name = settings.chat_format
    own = checkpoint_format(folder) if name is None else choose_format(name, folder)
    return own or BUILT_IN_FORMATS["chat"], special_tokens(folder)


def _configure_log(quiet: bool) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)
    access_log.setLevel(logging.WARNING if quiet else logging.INFO)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (so port 0 gets a port to report at once)."""
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it a keep-alive
    # response written in two pieces waits 40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise PhiError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# The application ----------------------------------------------------------------------------------------------
def create_app(service: ModelService, api_key: str | None = None) -> Any:
    """The ASGI application serving ``service`` (``api_key``: required as a bearer token on /v1 routes)."""
    if not HAVE_SERVE_EXTRA:
        raise PhiError(INSTALL_HINT)

    def authorized(handler: Handler) -> Handler:
        async def checked(request: Request) -> Response:
            if api_key is not None and not _key_matches(request.headers.get("authorization", ""), api_key):
                raise APIError(401, "Incorrect API key provided.", kind="authentication_error", code="invalid_api_key")
            return await handler(request)

        return checked

    async def completions(request: Request) -> Response:
        return await _completions(request, service)

    async def chat_completions(request: Request) -> Response:
        return await _chat_completions(request, service)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_object(service)]})

    async def model(request: Request) -> Response:
        service.check_model(request.path_params["name"])
        return JSONResponse(_model_object(service))

    async def health(request: Request) -> Response:
        if service.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def tokenize(request: Request) -> Response:
        body = parse(TokenizeRequest, await _json_body(request))
        service.check_model(body.model)
        engine, tokenizer = service.ready()
        ids = tokenizer.encode(body.prompt)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": engine.context})

    async def detokenize(request: Request) -> Response:
        body = parse(DetokenizeRequest, await _json_body(request))
        service.check_model(body.model)
        engine, tokenizer = service.ready()
        vocab = engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
        return JSONResponse({"prompt": tokenizer.decode(body.tokens)})

    async def tokenizer_info(request: Request) -> Response:
        engine, tokenizer = service.ready()
        specials = {"eos_token": ENDOFTEXT, "bos_token": ENDOFTEXT, "unk_token": ENDOFTEXT, "pad_token": None}
        return JSONResponse(
            {
                "tokenizer_class": "CodeGenTokenizer",
                **specials,
                "model_max_length": engine.context,
                "vocab_size": len(tokenizer),
                "chat_template": None,
            }
        )

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        path = request.url.path
        message = {404: f"no route {path}", 405: f"{request.method} is not allowed on {path}"}
        error = APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)))
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("phi serve: internal error on %s", request.url.path, exc_info=exc)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if service.engine is not None:  # after uvicorn's grace period: cancel what is left
            await asyncio.to_thread(service.engine.shutdown)

    routes = [
        Route("/v1/completions", authorized(completions), methods=["POST"]),
        Route("/v1/chat/completions", authorized(chat_completions), methods=["POST"]),
        Route("/v1/models", authorized(models), methods=["GET"]),
        Route("/v1/models/{name:path}", authorized(model), methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {APIError: api_error, HTTPException: http_error, Exception: server_error}
    return _AccessLog(Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan), service)


def _key_matches(header: str, api_key: str) -> bool:
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


def _model_object(service: ModelService) -> dict[str, Any]:
    context = service.engine.context if service.engine else None
    created, name = service.created, service.name
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "phi",
        "max_model_len": context,
        "chat_format": service.prompt_format.name,  # how /v1/chat/completions renders messages
    }


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None


class _AccessLog:
    """ASGI middleware: one line per request on stderr, and the request counter of /metrics."""

    def __init__(self, app: Any, service: ModelService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        scope.setdefault("state", {})

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            label = path if path in KNOWN_PATHS else "/v1/models/{name}" if path.startswith("/v1/models/") else "other"
            self.service.metrics.requests.inc(1, label, str(status))
            client = scope.get("client") or ("-", 0)
            detail = scope["state"].get("log", "")
            seconds = time.perf_counter() - started
            access_log.info(
                '%s:%s "%s %s" %d %.3fs%s', client[0], client[1], scope["method"], path, status, seconds, detail
            )


# Completions --------------------------------------------------------------------------------------------------
@dataclass
class _Completion:
    """A validated completion request: its prompts and one engine request per choice (prompt-major)."""

    body: CompletionRequest
    prompts: list[list[int]]
    texts: list[str]
    requests: list[EngineRequest]


async def _completions(request: Request, service: ModelService) -> Response:
    arrived = time.perf_counter()
    body = parse(CompletionRequest, await _json_body(request))
    run = _start(request, service, body, arrived)
    if body.stream:
        return StreamingResponse(run.stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return JSONResponse(await run.collect(request))


async def _chat_completions(request: Request, service: ModelService) -> Response:
    """The conversation rendered through the served model's prompt format, run as a completion, answered in the
    chat shape."""
    arrived = time.perf_counter()
    chat = parse(ChatCompletionRequest, await _json_body(request))
    service.check_model(chat.model)
    run = _start(request, service, chat.as_completion(service.prompt_format, service.special_tokens), arrived)
    if chat.stream:
        chunks = chat_chunks(run.stream())
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return JSONResponse(chat_object(await run.collect(request)))


def _start(request: Request, service: ModelService, body: CompletionRequest, arrived: float) -> _Run:
    """Check ``body`` and hand its choices to the engine."""
    body.check_no_ops()
    service.check_model(body.model)
    engine, tokenizer = service.ready()
    plan = _plan(body, service, engine, tokenizer)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    try:
        handles = engine.submit(plan.requests, [_sink(loop, events, i) for i in range(len(plan.requests))])
    except EngineFull as exc:
        raise APIError(429, f"{exc}; retry later", code="queue_full") from None
    except EngineClosed as exc:
        raise APIError(503, str(exc), code="shutting_down") from None
    except ValueError as exc:
        raise APIError(400, str(exc), "prompt") from None
    return _Run(service, plan, tokenizer, handles, events, arrived, request.scope["state"])


def _sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int) -> Callable[[EngineEvent], None]:
    """Hands the engine thread's events for choice ``index`` to the event loop."""

    def deliver(event: EngineEvent) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (index, event))

    return deliver


def _plan(body: CompletionRequest, service: ModelService, engine: Engine, tokenizer: PhiTokenizer) -> _Completion:
    """One engine request per prompt and choice; choice ``j`` of a seeded request samples with seed + j."""
    prompts, texts = _prompt_ids(body.prompt, tokenizer, engine.model.config.vocab_size)
    requests = []
    for prompt in prompts:
        params, score_only = _generation(body, service, len(prompt), engine.context)
        for choice in range(body.n):
            seed = None if body.seed is None else (body.seed + choice) % 2**64
            sampling = dataclasses.replace(params.sampling, seed=seed)
            requests.append(
                EngineRequest(
                    prompt,
                    dataclasses.replace(params, sampling=sampling),
                    logprobs=body.logprobs,
                    prompt_logprobs=body.logprobs if body.echo else None,
                    score_only=score_only,
                )
            )
    return _Completion(body, prompts, texts, requests)


def _prompt_ids(prompt: Any, tokenizer: PhiTokenizer, vocab: int) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt (a string, strings, token ids, or lists of token ids)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompt]
    for index, row in enumerate(ids):
        if not row:
            raise APIError(400, f"prompt {index} is empty", "prompt")
        if any(not 0 <= t < vocab for t in row):
            raise APIError(400, f"prompt {index}: token ids must be in [0, {vocab})", "prompt")
    texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompt]
    return ids, texts


def _generation(
    body: CompletionRequest, service: ModelService, prompt_tokens: int, context: int
) -> tuple[GenerationParams, bool]:
    """The request's settings over the checkpoint's defaults (resolved as ``phi generate`` resolves its flags), and
    whether it only scores the prompt. An omitted max_tokens shrinks to fit the context; a given one must fit. An
    omitted lookup is the server's ``--lookup``."""
    max_tokens = body.max_tokens if body.max_tokens is not None else service.max_tokens_default
    overrides = GenerationOverrides(
        temperature=body.temperature,
        top_k=0 if body.top_k == -1 else body.top_k,
        top_p=body.top_p,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        max_new_tokens=max_tokens or None,
    )
    try:
        params = resolve_generation(overrides, service.defaults, body.stop_strings, body.ignore_eos).params
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    params = dataclasses.replace(params, lookup=service.lookup if body.lookup is None else body.lookup)
    if max_tokens == 0:
        if prompt_tokens > context:
            raise APIError(400, _too_long(prompt_tokens, 0, context), "prompt")
        return params, True
    wanted = params.new_token_limit(prompt_tokens)
    if prompt_tokens + wanted > context:
        if body.max_tokens is not None or prompt_tokens >= context:
            raise APIError(
                400, _too_long(prompt_tokens, wanted, context), "max_tokens" if prompt_tokens < context else "prompt"
            )
        params = dataclasses.replace(params, max_new_tokens=context - prompt_tokens, max_length=None)
    return params, False


def _too_long(prompt_tokens: int, new_tokens: int, context: int) -> str:
    return (
        f"This model's maximum context length is {context} tokens; the request needs {prompt_tokens + new_tokens} "
        f"({prompt_tokens} in the prompt, {new_tokens} for the completion). Shorten the prompt or max_tokens."
    )


class _Run:
    """One completion request in flight: its choices, built from engine events, as JSON or as SSE chunks."""

    def __init__(
        self,
        service: ModelService,
        plan: _Completion,
        tokenizer: PhiTokenizer,
        handles: list[RequestHandle],
        events: asyncio.Queue,
        arrived: float,
        state: dict[str, Any],
    ) -> None:
        self.service, self.plan, self.handles, self.events = service, plan, handles, events
        self.arrived, self.state = arrived, state
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        body = plan.body
        self.choices = [
            Choice(
                i, tokenizer, plan.prompts[p], plan.texts[p], body.echo, body.logprobs, body.return_tokens_as_token_ids
            )
            for i, p in enumerate(index // body.n for index in range(len(handles)))
        ]
        self.last_token: dict[int, float] = {}
        service.metrics.prompt_tokens.inc(sum(len(p) for p in plan.prompts))

    async def collect(self, request: Request) -> dict[str, Any]:
        """Wait for every choice (cancelling them all if the client goes away) and build the completion."""
        watcher = asyncio.create_task(self._cancel_on_disconnect(request))
        for choice in self.choices:
            choice.start()
        try:
            async for index, event in self._events():
                self.choices[index].add(event)
        finally:
            watcher.cancel()
            self._finish()
        self._raise_failure()
        choices = [choice.result() for choice in self.choices]
        return completion_object(self.id, self.created, self.plan.body.model, choices, self._usage())

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events: a chunk per text delta, the usage if asked for, then ``[DONE]``."""
        body = self.plan.body
        try:
            for choice in self.choices:
                if (delta := choice.start()) is not None:
                    yield _sse(completion_object(self.id, self.created, body.model, [delta], None))
            async for index, event in self._events():
                if (delta := self.choices[index].add(event)) is not None:
                    yield _sse(completion_object(self.id, self.created, body.model, [delta], None))
            try:
                self._raise_failure()
            except APIError as exc:
                yield _sse(exc.body())
            else:
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield _sse(completion_object(self.id, self.created, body.model, [], self._usage()))
            yield "data: [DONE]\n\n"
        finally:
            self._finish()

    async def _events(self) -> AsyncIterator[tuple[int, EngineEvent]]:
        left = len(self.handles)
        while left:
            index, event = await self.events.get()
            if isinstance(event, Token):
                self._time_token(index)
            left -= is_last(event)
            yield index, event

    def _time_token(self, index: int) -> None:
        now, metrics = time.perf_counter(), self.service.metrics
        previous = self.last_token.get(index)
        if previous is None:
            metrics.time_to_first_token.observe(now - self.arrived)
        else:
            metrics.inter_token.observe(now - previous)
        metrics.generation_tokens.inc()
        self.last_token[index] = now

    async def _cancel_on_disconnect(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for handle in self.handles:
            handle.cancel()

    def _finish(self) -> None:
        for handle in self.handles:
            handle.cancel()  # nothing for finished ones; the others leave at the next step
        self.service.metrics.request_seconds.observe(time.perf_counter() - self.arrived)
        counts = self._usage()
        self.state["log"] = f" prompt={counts['prompt_tokens']} completion={counts['completion_tokens']}"
        if len(self.choices) > 1:
            self.state["log"] += f" choices={len(self.choices)}"

    def _raise_failure(self) -> None:
        for choice in self.choices:
            if choice.error is not None:
                raise APIError(500, choice.error)
        if any(choice.cancelled for choice in self.choices):
            raise APIError(503, "the request was cancelled: the server is shutting down", code="shutting_down")

    def _usage(self) -> dict[str, int]:
        return usage(sum(len(p) for p in self.plan.prompts), sum(c.generated for c in self.choices))


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
