"""A multi-turn conversation with one model, keeping the KV cache between turns.

Each turn renders the whole conversation through its :class:`~phi_core.prompt_format.PromptFormat`, finds how much
of that token sequence the cache already holds (the previous turns, and the reply the model itself wrote), rewinds
the cache to that shared prefix and pre-fills only the rest. A conversation that outgrows the context loses its
oldest turns (the system message stays), which changes the prefix and so pre-fills it anew.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phi_core.cache import KVCache
from phi_core.errors import PhiError
from phi_core.generation import (
    GenerationParams,
    TextStream,
    TokenEvent,
    advance_stream,
    choose_tokens,
    end_of_text_ids,
)
from phi_core.generation_config import GenerationOverrides, generation_defaults, resolve_generation
from phi_core.model import PhiForCausalLM
from phi_core.prompt_format import PromptFormat, choose_format, special_tokens
from phi_core.tokenizer import PhiTokenizer

log = logging.getLogger("phi_core")


@dataclass
class TurnStats:
    """What one turn cost: tokens pre-filled, tokens the cache already held, tokens generated."""

    prefilled: int = 0
    reused: int = 0
    generated: int = 0
    dropped_turns: int = 0


@dataclass
class Conversation:
    """The messages so far and the model state behind them. ``reply`` streams the assistant's next turn."""

    model: PhiForCausalLM
    tokenizer: PhiTokenizer
    prompt_format: PromptFormat
    params: GenerationParams
    special_tokens: dict[str, str] = field(default_factory=dict)
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    keep_cache: bool = True  # False pre-fills every turn from the start (what a stateless API call costs)
    last_turn: TurnStats = field(default_factory=TurnStats)
    _cache: KVCache | None = None
    _cached: list[int] = field(default_factory=list)  # the tokens whose keys and values the cache holds
    _generator: torch.Generator = field(default_factory=lambda: torch.Generator(device="cpu"))

    def __post_init__(self) -> None:
        if self.params.sampling.seed is not None:
            self._generator.manual_seed(self.params.sampling.seed)
        else:
            self._generator.seed()

    def reset(self, system: str | None = None) -> None:
        """Forget every turn (the cache is kept: the next turn still reuses whatever prefix it shares)."""
        self.messages = []
        self.system = system

    def reply(self, text: str) -> Iterator[TokenEvent]:
        """Add the user's ``text`` and stream the reply. The reply joins the history when the stream ends, however
        it ends: finished, or closed early (Ctrl-C) with the part shown so far."""
        if not text.strip():
            raise PhiError("the message is empty")
        self.messages.append({"role": "user", "content": text})
        try:
            ids, dropped = self._fit_prompt()
        except PhiError:
            self.messages.pop()  # a message that cannot be answered does not stay in the history
            raise
        self.last_turn = TurnStats(dropped_turns=dropped)
        shown: list[str] = []
        try:
            logits = self._prefill(ids)
            for event in self._decode(logits):
                shown.append(event.text)
                yield event
        finally:
            self.messages.append({"role": "assistant", "content": "".join(shown).strip()})

    def rendered(self, messages: list[dict[str, str]] | None = None) -> str:
        """The conversation (``messages``, or the current one) as the model reads it, cued for the reply."""
        return self.prompt_format.render(self._with_system(messages or self.messages), True, self.special_tokens)

    def _with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def _fit_prompt(self) -> tuple[list[int], int]:
        """The rendered conversation's tokens, dropping the oldest turns while it leaves no room for a reply."""
        context = self.model.config.max_position_embeddings
        dropped = 0
        while True:
            ids = self.tokenizer.encode(self.rendered())
            if len(ids) + self.params.max_new_tokens <= context:
                break
            if len(self.messages) <= 1:
                raise PhiError(
                    f"the message ({len(ids)} tokens) + max new tokens ({self.params.max_new_tokens}) does not fit "
                    f"the model's context of {context} tokens"
                )
            drop = 2 if self.messages[0]["role"] == "user" and len(self.messages) > 2 else 1
            del self.messages[:drop]
            dropped += drop
        if dropped:
            log.warning("note: the conversation outgrew the context; dropped the oldest %d message(s)", dropped)
        return ids, dropped

    def _prefill(self, ids: list[int]) -> torch.Tensor:
        """Rewind the cache to the prefix it shares with ``ids`` and run the rest (at least one token, for the
        next token's logits)."""
        if self._cache is None:
            self._cache = self.model.new_cache(1, self.model.config.max_position_embeddings)
        shared = _shared_prefix(self._cached, ids) if self.keep_cache else 0
        shared = min(shared, len(ids) - 1)
        self._cache.truncate(shared)
        self._cached = self._cached[:shared]
        new = ids[shared:]
        self.last_turn.reused, self.last_turn.prefilled = shared, len(new)
        with torch.no_grad():
            logits = self.model(torch.tensor([new], device=self.model.device), cache=self._cache, last_only=True)
        self._cached.extend(new)
        return logits.logits[0, -1]

    def _decode(self, logits: torch.Tensor) -> Iterator[TokenEvent]:
        params = self.params
        stream = TextStream(self.tokenizer, (*params.stop, *self.prompt_format.stop))
        eos = end_of_text_ids(params, self.tokenizer, self.model)
        limit = params.new_token_limit(len(self._cached))
        seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool)
        seen[torch.tensor(self._cached)] = True
        for count in range(1, limit + 1):
            token = int(choose_tokens(logits.float().cpu()[None], seen[None], params.sampling, self._generator)[0])
            reason, text = advance_stream(stream, token, eos, params.ignore_eos, limit - count)
            self.last_turn.generated = count
            yield TokenEvent(0, token, None, text, reason)
            if reason is not None:
                return
            seen[token] = True
            with torch.no_grad():
                step = torch.tensor([[token]], device=self.model.device)
                logits = self.model(step, cache=self._cache, last_only=True).logits[0, -1]
            self._cached.append(token)


def open_conversation(
    model: PhiForCausalLM,
    tokenizer: PhiTokenizer,
    folder: Path,
    overrides: GenerationOverrides,
    format_name: str | None = None,
    system: str | None = None,
    stop: tuple[str, ...] = (),
) -> Conversation:
    """A conversation with the checkpoint in ``folder``: its own chat template (or ``format_name``, a built-in
    format or a ``.jinja`` file), its special tokens, and its generation defaults under ``overrides``."""
    prompt_format = choose_format(format_name, folder)
    params = resolve_generation(overrides, generation_defaults(folder), stop=stop).params
    return Conversation(model, tokenizer, prompt_format, params, special_tokens(folder), system)


def _shared_prefix(first: list[int], second: list[int]) -> int:
    count = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        count += 1
    return count
