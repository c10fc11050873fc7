"""Prompts in, completions out: prompt formats, batching, context fitting and per-prompt timing.

This is what ``phi generate`` calls: it yields every token as it is generated (for streaming) and one
:class:`Completion` per prompt, in input order, as each batch finishes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from phi_core.batching import batches
from phi_core.errors import PhiError
from phi_core.generation import FinishReason, GenerationParams, Timing, TokenEvent, fit_prompt, generate
from phi_core.model import PhiForCausalLM
from phi_core.tokenizer import PhiTokenizer


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt is wrapped, and the stop string that ends the model's turn (base Phi-2 never stops)."""

    template: str
    stop: tuple[str, ...]


PROMPT_FORMATS = {
    "code": PromptFormat("{prompt}", ()),
    "instruct": PromptFormat("Instruct: {prompt}\nOutput:", ("\nInstruct:",)),
    "chat": PromptFormat("Alice: {prompt}\nBob:", ("\nAlice:",)),
}


@dataclass(frozen=True)
class Completion:
    """The finished result for one prompt (``index`` is its position in the input)."""

    index: int
    prompt: str
    completion: str
    tokens: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass(frozen=True)
class PromptToken:
    """A token of the prompt at ``index``, as it is generated."""

    index: int
    event: TokenEvent


def complete(
    model: PhiForCausalLM,
    tokenizer: PhiTokenizer,
    prompts: Sequence[str],
    params: GenerationParams,
    batch_size: int = 8,
    prompt_format: str = "code",
    truncate: bool = False,
) -> Iterator[PromptToken | Completion]:
    """Generate for every prompt, ``batch_size`` at a time; yield tokens as they come and completions per batch."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r} (choose one of {', '.join(PROMPT_FORMATS)})")
    fmt = PROMPT_FORMATS[prompt_format]
    params = replace(params, stop=(*params.stop, *fmt.stop))
    for chunk in batches(len(prompts), batch_size):
        batch = [prompts[i] for i in chunk]
        yield from _complete_batch(model, tokenizer, batch, fmt, chunk.start, params, truncate)


def _complete_batch(
    model: PhiForCausalLM,
    tokenizer: PhiTokenizer,
    prompts: list[str],
    fmt: PromptFormat,
    start: int,
    params: GenerationParams,
    truncate: bool,
) -> Iterator[PromptToken | Completion]:
    context = model.config.max_position_embeddings
    encoded = []
    for offset, prompt in enumerate(prompts):
        if not prompt.strip():
            raise PhiError(f"prompt {start + offset + 1} is empty")
        text = fmt.template.format(prompt=prompt)
        ids = tokenizer.encode(text)
        encoded.append(fit_prompt(ids, params.new_token_limit(len(ids)), context, truncate))
    timing = Timing()
    tokens: list[list[int]] = [[] for _ in prompts]
    pieces: list[list[str]] = [[] for _ in prompts]
    finished: dict[int, tuple[FinishReason, float]] = {}
    began = time.perf_counter()
    for event in generate(model, tokenizer, encoded, params, timing):
        tokens[event.row].append(event.token_id)
        pieces[event.row].append(event.text)
        if event.finish_reason is not None:
            finished[event.row] = (event.finish_reason, time.perf_counter() - began - timing.prefill_s)
        yield PromptToken(start + event.row, event)
    for row, prompt in enumerate(prompts):
        reason, decode_s = finished[row]
        yield Completion(
            index=start + row,
            prompt=prompt,
            completion="".join(pieces[row]),
            tokens=tokens[row],
            finish_reason=reason,
            prompt_tokens=len(encoded[row]),
            prefill_s=timing.prefill_s,
            decode_s=decode_s,
        )
