"""OpenAI's chat completions API on top of the completions machinery of ``phi serve``: the messages are rendered
through the served model's prompt format (:mod:`phi_core.prompt_format`, the renderer of ``phi chat``), run as a
completion, and the answer is reshaped into ``chat.completion`` objects and ``chat.completion.chunk`` deltas.

Needs the ``serve`` extra (pydantic); ``phi_core`` itself never imports this module.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from phi_core.openai_protocol import MAX_LOGPROBS, APIError, CompletionRequest, StreamOptions, Strict
from phi_core.prompt_format import PromptFormat, PromptFormatError


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; ``name`` and other per-message fields OpenAI allows are accepted and not used."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(Strict):
    """POST /v1/chat/completions. Fields phi does not implement are accepted at their no-op values, as in
    /v1/completions."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions, as vLLM names them
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    lookup: int | None = Field(None, ge=0)  # phi's own, as in /v1/completions

    def as_completion(self, prompt_format: PromptFormat, special: Mapping[str, str]) -> CompletionRequest:
        """The completion that answers this conversation: its rendered text, cued for the assistant's turn, stopping
        at the format's end of turn as well as at the request's own stop strings."""
        messages = [{"role": _role(m.role), "content": m.text()} for m in self.messages]
        try:
            prompt = prompt_format.render(messages, True, special)
        except PromptFormatError as exc:
            raise APIError(400, str(exc), "messages") from None
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return CompletionRequest(
            model=self.model,
            prompt=prompt,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            n=self.n,
            stream=self.stream,
            stream_options=self.stream_options,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            stop=[*stop, *prompt_format.stop] or None,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias,
            user=self.user,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            ignore_eos=self.ignore_eos,
            lookup=self.lookup,
        )


def chat_object(completion: dict[str, Any]) -> dict[str, Any]:
    """A finished completion as a ``chat.completion``."""
    choices = [
        {
            "index": choice["index"],
            "message": {"role": "assistant", "content": choice["text"]},
            "logprobs": _chat_logprobs(choice.get("logprobs")),
            "finish_reason": choice["finish_reason"],
        }
        for choice in completion["choices"]
    ]
    return {**_header(completion, "chat.completion"), "choices": choices, "usage": completion["usage"]}


async def chat_chunks(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The completion's server-sent events as ``chat.completion.chunk`` events: the first delta of each choice
    carries the assistant role; usage, errors and ``[DONE]`` pass through in the chat shape."""
    started: set[int] = set()
    async for event in events:
        payload = event.removeprefix("data: ").strip()
        if payload == "[DONE]" or "error" in (data := json.loads(payload)):
            yield event
            continue
        choices = []
        for choice in data["choices"]:
            delta: dict[str, Any] = {"content": choice["text"]}
            if choice["index"] not in started:
                started.add(choice["index"])
                delta = {"role": "assistant", **delta}
            logprobs = _chat_logprobs(choice.get("logprobs"))
            choices.append(
                {
                    "index": choice["index"],
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": choice["finish_reason"],
                }
            )
        chunk = {**_header(data, "chat.completion.chunk"), "choices": choices}
        if data.get("usage") is not None:
            chunk["usage"] = data["usage"]
        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


def _role(role: str) -> str:
    return "system" if role == "developer" else role  # OpenAI's newer name for the system message


def _header(completion: dict[str, Any], kind: str) -> dict[str, Any]:
    request_id = completion["id"].replace("cmpl-", "chatcmpl-", 1)
    return {"id": request_id, "object": kind, "created": completion["created"], "model": completion["model"]}


def _chat_logprobs(legacy: dict[str, Any] | None) -> dict[str, Any] | None:
    """The legacy ``logprobs`` object (tokens, token_logprobs, top_logprobs) in the chat shape."""
    if legacy is None:
        return None
    content = []
    tops = legacy.get("top_logprobs") or [None] * len(legacy["tokens"])
    for token, logprob, top in zip(legacy["tokens"], legacy["token_logprobs"], tops, strict=True):
        alternatives = [_entry(t, lp) for t, lp in (top or {}).items()]
        content.append({**_entry(token, logprob), "top_logprobs": alternatives})
    return {"content": content}


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", errors="surrogatepass"))}
