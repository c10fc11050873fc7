"""Prompts in, completions out: prompt formats, batching, context fitting and per-prompt timing.

This is what ``phi generate`` calls: it yields every token as it is generated (for streaming) and one
:class:`Completion` per prompt, in input order, as each batch finishes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from phi_core.batching import batches
from phi_core.errors import PhiError
from phi_core.generation import FinishReason, GenerationParams, Timing, TokenEvent, fit_prompt, generate
from phi_core.generation_config import GenerationOverrides, ResolvedGeneration, generation_defaults, resolve_generation
from phi_core.model import PhiForCausalLM
from phi_core.prompt_format import BUILT_IN_FORMATS, PromptFormat, choose_format, special_tokens
from phi_core.speculative import Draft, RowStats
from phi_core.tokenizer import PhiTokenizer


@dataclass(frozen=True)
class CompletionSetup:
    """How a checkpoint's prompts are wrapped and generated: the prompt format, the special tokens its template
    sees, the generation settings (the checkpoint's defaults under the caller's overrides, each with its
    origin), and speculative decoding (prompt lookup of up to ``lookup`` tokens, or a ``draft`` model)."""

    prompt_format: PromptFormat
    special_tokens: dict[str, str]
    generation: ResolvedGeneration
    lookup: int = 0
    draft: Draft | None = None

    @property
    def params(self) -> GenerationParams:
        return replace(self.generation.params, lookup=self.lookup, draft=self.draft)

    @property
    def speculation(self) -> str | None:
        """What proposes tokens (``lookup 8``, ``draft int8 copy, 4 tokens``), None without speculation."""
        if self.lookup:
            return f"prompt lookup, up to {self.lookup} tokens"
        if self.draft is not None:
            return f"draft {self.draft.name}, up to {self.draft.tokens} tokens"
        return None


def completion_setup(
    folder: Path,
    overrides: GenerationOverrides,
    format_name: str | None = None,
    stop: tuple[str, ...] = (),
    ignore_eos: bool = False,
    lookup: int = 0,
    draft: Draft | None = None,
) -> CompletionSetup:
    """The setup for completing prompts with the checkpoint in ``folder`` (its template, tokens and defaults), with
    speculative decoding by prompt ``lookup`` or a ``draft`` model (:mod:`phi_core.speculative`) when given."""
    generation = resolve_generation(overrides, generation_defaults(folder), stop=stop, ignore_eos=ignore_eos)
    return CompletionSetup(choose_format(format_name, folder), special_tokens(folder), generation, lookup, draft)


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
    speculation: RowStats | None = None  # tokens proposed and accepted, with speculative decoding

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
    prompt_format: PromptFormat = BUILT_IN_FORMATS["code"],
    truncate: bool = False,
    special: Mapping[str, str] | None = None,
) -> Iterator[PromptToken | Completion]:
    """Generate for every prompt, ``batch_size`` at a time; yield tokens as they come and completions per batch.

    Each prompt is one user message rendered through ``prompt_format`` (whose stop strings end the turn)."""
    params = replace(params, stop=(*params.stop, *prompt_format.stop))
    for chunk in batches(len(prompts), batch_size):
        texts = [_rendered(prompts[i], i, prompt_format, special) for i in chunk]
        yield from _complete_batch(model, tokenizer, texts, [prompts[i] for i in chunk], chunk.start, params, truncate)


def _rendered(prompt: str, index: int, prompt_format: PromptFormat, special: Mapping[str, str] | None) -> str:
    if not prompt.strip():
        raise PhiError(f"prompt {index + 1} is empty")
    return prompt_format.render_prompt(prompt, special)


def _complete_batch(
    model: PhiForCausalLM,
    tokenizer: PhiTokenizer,
    texts: list[str],
    prompts: list[str],
    start: int,
    params: GenerationParams,
    truncate: bool,
) -> Iterator[PromptToken | Completion]:
    context = model.config.max_position_embeddings
    encoded = []
    for text in texts:
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
            speculation=None if timing.speculation is None else timing.speculation[row],
        )
