"""OpenAI's completions API as ``phi serve`` speaks it: request models (pydantic, strict, unknown fields refused),
errors in OpenAI's JSON shape, and the legacy ``logprobs`` object and choices built from engine events.

Needs the ``serve`` extra (pydantic); ``phi_core`` itself never imports this module.
"""

from __future__ import annotations

import codecs
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from phi_core.engine import Ended, EngineEvent, PromptScores, Token, TopLogprobs
from phi_core.tokenizer import PhiTokenizer

MAX_LOGPROBS = 20
LOWEST_LOGPROB = -9999.0  # stands in for -inf, which JSON cannot carry (as vLLM)
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
LOGPROBS_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


class APIError(Exception):
    """An HTTP error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(Strict):
    """POST /v1/completions. Fields OpenAI defines that phi does not implement are accepted at their no-op values."""

    model: str
    prompt: PromptInput
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    suffix: str | None = None
    # Extensions, as vLLM and llama.cpp's server name them.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    return_tokens_as_token_ids: bool = False
    # phi's own: prompt lookup of up to this many tokens a step (0: off; omitted: phi serve --lookup). Greedy output
    # is unchanged, so it is a speed setting a client may choose per request (say, for an edit of a given text).
    lookup: int | None = Field(None, ge=0)

    def check_no_ops(self) -> None:
        """Refuse the OpenAI settings phi accepts only at their no-op values, naming them."""
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of is not supported (leave it out, or equal to n)", "best_of")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise APIError(400, f"{name} is not supported (use repetition_penalty)", name)
        if self.suffix:
            raise APIError(400, "suffix is not supported (Phi has no fill-in-the-middle)", "suffix")
        stops = self.stop_strings
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", "stop")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class TokenizeRequest(Strict):
    prompt: str
    model: str | None = None
    add_special_tokens: bool = True  # Phi's tokenizer adds none either way


class DetokenizeRequest(Strict):
    tokens: list[int]
    model: str | None = None


def parse(model: type[Strict], body: Any) -> Any:
    """``body`` validated as ``model``; a 400 naming the first bad parameter otherwise."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"][:1]) or None
        if error["type"] == "extra_forbidden":
            raise APIError(400, f"unknown parameter: {param}", param) from None
        if param == "prompt":
            message = "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
            raise APIError(400, message, "prompt") from None
        if error["type"] == "missing":
            raise APIError(400, f"{param} is required", param) from None
        raise APIError(400, f"{param}: {error['msg']}", param) from None


# Building choices from engine events --------------------------------------------------------------------------
class TextOffsets:
    """Character offset of each token in the text its bytes decode to (a split character counts where it ends)."""

    def __init__(self, tokenizer: PhiTokenizer, start: int = 0) -> None:
        self.tokenizer, self.position = tokenizer, start
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, token_id: int) -> int:
        offset = self.position
        self.position += len(self.decoder.decode(self.tokenizer.decode_bytes([token_id])))
        return offset


class Choice:
    """One choice of a completion: the OpenAI delta for each engine event (streaming), and the whole (not)."""

    def __init__(
        self,
        index: int,
        tokenizer: PhiTokenizer,
        prompt: list[int],
        prompt_text: str,
        echo: bool,
        logprobs: int | None,
        token_ids: bool,
    ) -> None:
        self.index, self.tokenizer, self.prompt = index, tokenizer, prompt
        self.prompt_text, self.echo, self.token_ids = prompt_text, echo, token_ids
        self.wants_logprobs = logprobs is not None
        self.parts: list[str] = []
        self.logprobs: dict[str, list[Any]] = {key: [] for key in LOGPROBS_KEYS}
        self.offsets = TextOffsets(tokenizer, len(prompt_text) if echo else 0)
        self.generated = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False

    def start(self) -> dict[str, Any] | None:
        """The echoed prompt, when it comes without log-probabilities (with them it comes with the scores)."""
        if not self.echo or self.wants_logprobs:
            return None
        self.parts.append(self.prompt_text)
        return self._delta(self.prompt_text, None)

    def add(self, event: EngineEvent) -> dict[str, Any] | None:
        """Record ``event``; the streaming delta it makes, if any."""
        if isinstance(event, PromptScores):  # asked for with echo only
            offsets = TextOffsets(self.tokenizer)
            block = self._block(self.prompt, event.logprobs, event.top, [offsets.next(t) for t in self.prompt])
            self.parts.append(self.prompt_text)
            return self._delta(self.prompt_text, block)
        if isinstance(event, Token):
            self.generated += 1
            self.parts.append(event.text)
            block = None
            if self.wants_logprobs:
                block = self._block([event.token_id], [event.logprob], [event.top], [self.offsets.next(event.token_id)])
            if event.finish_reason is not None:
                self.finish_reason = FINISH_REASONS[event.finish_reason]
            if not event.text and block is None and self.finish_reason is None:
                return None
            return self._delta(event.text, block)
        return self._end(event)

    def _end(self, event: Ended) -> dict[str, Any] | None:
        if event.reason == "length":
            self.finish_reason = "length"
            return self._delta("", None)
        if event.reason == "cancelled":
            self.cancelled = True
        else:
            self.error = event.message
        return None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled or self.error is not None

    def result(self) -> dict[str, Any]:
        logprobs = self.logprobs if self.wants_logprobs else None
        return {
            "index": self.index,
            "text": "".join(self.parts),
            "logprobs": logprobs,
            "finish_reason": self.finish_reason,
        }

    def _delta(self, text: str, block: dict[str, list[Any]] | None) -> dict[str, Any]:
        return {"index": self.index, "text": text, "logprobs": block, "finish_reason": self.finish_reason}

    def _block(
        self, ids: list[int], logprobs: list[float | None], tops: list[TopLogprobs | None], offsets: list[int]
    ) -> dict[str, list[Any]] | None:
        """The legacy logprobs object for ``ids`` (appended to the choice's own as well)."""
        if not self.wants_logprobs:
            return None
        block = {
            "tokens": [self._label(t) for t in ids],
            "token_logprobs": [None if lp is None else max(lp, LOWEST_LOGPROB) for lp in logprobs],
            "top_logprobs": [self._top(t, lp, top) for t, lp, top in zip(ids, logprobs, tops, strict=True)],
            "text_offset": offsets,
        }
        for key, values in block.items():
            self.logprobs[key].extend(values)
        return block

    def _label(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.token_ids else self.tokenizer.decode([token_id])

    def _top(self, token_id: int, logprob: float | None, top: TopLogprobs | None) -> dict[str, float] | None:
        """The likeliest tokens and the chosen one (as vLLM); a label two tokens share keeps the higher value."""
        if top is None or logprob is None:
            return None
        found: dict[str, float] = {}
        for candidate, value in [*top, (token_id, logprob)]:
            found.setdefault(self._label(candidate), max(value, LOWEST_LOGPROB))
        return found


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_object(
    request_id: str, created: int, model: str, choices: list[dict[str, Any]], usage_counts: dict[str, int] | None
) -> dict[str, Any]:
    """A completion, or (with usage None, choices holding deltas) one streamed chunk of it."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_counts,
        "system_fingerprint": None,
    }


def model_object(name: str, created: int, context: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "phi-toolkit", "max_model_len": context}
