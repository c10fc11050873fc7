"""Text generation: one prefill, then one token per step, yielded as it is chosen.

The same generator serves the CLI, streaming and the benchmarks. Prompts of a batch are left-padded; each row
finishes on its own (end of text, a stop string, or the length limit) and is then dropped from the batch, so
it stops costing compute. Sampling is a chain of small pure functions that take an explicit
``torch.Generator``. With ``lookup`` or ``draft`` set, a pass checks proposed tokens too and may yield several per
row (:mod:`phi_core.speculative`); greedy output is the same, sampled output has the same distribution.
"""

from __future__ import annotations

import codecs
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from phi_core.errors import PhiError
from phi_core.model import PhiForCausalLM
from phi_core.speculative import (
    Draft,
    Pick,
    Proposal,
    RowCache,
    RowStats,
    Speculator,
    accept_greedy,
    accept_sampled,
)
from phi_core.tokenizer import PhiTokenizer

FinishReason = Literal["eos", "stop", "length"]


# Sampling ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature == 0`` is greedy (argmax); filters apply in the order
    repetition penalty, temperature, top-k, top-p, min-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):  # nan passes every comparison below
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the row: positive logits divided, negative multiplied."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Mask all but the ``k`` largest logits of each row (``k == 0``: keep all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def keep_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def next_token_distribution(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities the sampler draws from, after every filter (``temperature > 0`` only)."""
    logits = penalize_repetition(logits.float(), seen, params.repetition_penalty)
    logits = logits / params.temperature
    logits = keep_min_p(keep_top_p(keep_top_k(logits, params.top_k), params.top_p), params.min_p)
    return torch.softmax(logits, dim=-1)


def choose_tokens(
    logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    """One token id per row of ``logits`` (rows, vocab)."""
    if params.temperature == 0.0:
        return penalize_repetition(logits.float(), seen, params.repetition_penalty).argmax(dim=-1)
    probs = next_token_distribution(logits, seen, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# Text assembly ----------------------------------------------------------------------------------------------
class TextStream:
    """Turns one row's tokens into printable text deltas.

    Bytes of a character split over several tokens are held until the character is complete, and text that
    could be the start of a stop string is held until it is known not to be one.
    """

    def __init__(self, tokenizer: PhiTokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text safe to show now, whether a stop string was reached)."""
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([token_id]))
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what was held back (an unfinished character becomes U+FFFD)."""
        self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        search_from = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._emit(len(self.text)), True
        return self._emit(len(self.text) if final else len(self.text) - self._held_suffix()), False

    def _held_suffix(self) -> int:
        """Length of the longest end of the text that a stop string starts with."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if stop.startswith(self.text[-size:]):
                    longest = size
                    break
        return longest

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta


# The generator ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationParams:
    """When to stop, how to sample, and whether to compute each token's log-probability (a log-sum-exp over the
    vocabulary per row and step: a few percent of a small model's step, so off where nobody reads it)."""

    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    logprobs: bool = True
    # transformers' max_length: prompt and new tokens together, per row (at least one new token is generated).
    max_length: int | None = None
    # Ids that end a row (a chat fine-tune may end turns on its own token); None: the tokenizer's end of text.
    eos_token_ids: tuple[int, ...] | None = None
    # Speculative decoding (phi_core.speculative), one or the other: prompt lookup proposing up to this many tokens
    # a step, or a draft model.
    lookup: int = 0
    draft: Draft | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.lookup < 0:
            raise ValueError(f"lookup must be >= 0, got {self.lookup}")
        if self.lookup and self.draft is not None:
            raise ValueError("prompt lookup and a draft model cannot both propose: choose one")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError(f"max_length must be positive, got {self.max_length}")

    def new_token_limit(self, prompt_tokens: int) -> int:
        """How many tokens a row with ``prompt_tokens`` may generate."""
        if self.max_length is None:
            return self.max_new_tokens
        return max(1, min(self.max_new_tokens, self.max_length - prompt_tokens))


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one prompt (``row`` indexes the prompts as given)."""

    row: int
    token_id: int
    logprob: float | None  # None unless GenerationParams.logprobs
    text: str
    finish_reason: FinishReason | None


@dataclass
class Timing:
    """Wall-clock seconds of the prefill and of all decode steps (filled in as generation runs), and with speculative
    decoding each prompt's proposed and accepted tokens."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    speculation: list[RowStats] | None = None


def fit_prompt(ids: list[int], max_new_tokens: int, context: int, truncate: bool) -> list[int]:
    """The prompt, cut from the left to fit ``context`` when ``truncate``; otherwise an error if too long."""
    room = context - max_new_tokens
    if len(ids) <= room:
        return ids
    if truncate and room > 0:
        return ids[len(ids) - room :]
    raise PhiError(
        f"prompt ({len(ids)} tokens) + max new tokens ({max_new_tokens}) exceeds the model's context of "
        f"{context} tokens (use --truncate left to keep the end of the prompt)"
    )


def generate(
    model: PhiForCausalLM,
    tokenizer: PhiTokenizer | None,
    prompts: list[list[int]],
    params: GenerationParams,
    timing: Timing | None = None,
) -> Iterator[TokenEvent]:
    """Yield the generated tokens of every prompt, step by step, until each row has finished.

    Without a ``tokenizer`` (benchmarks) no text is produced, stop strings cannot apply, and the end of text is
    the config's ``eos_token_id``.
    """
    if not prompts or any(not p for p in prompts):
        raise PhiError("every prompt needs at least one token")
    if tokenizer is None and params.stop:
        raise ValueError("stop strings need a tokenizer")
    timing = timing if timing is not None else Timing()
    limits = [params.new_token_limit(len(prompt)) for prompt in prompts]
    speculator = None
    if params.lookup or params.draft is not None:
        speculator = Speculator(model, prompts, max(limits), params.lookup, params.draft)
        timing.speculation = speculator.stats
    batch = _Batch.start(model, prompts, max(limits) + (speculator.room if speculator else 0))
    generator = torch.Generator(device="cpu")
    if params.sampling.seed is not None:
        generator.manual_seed(params.sampling.seed)
    else:
        generator.seed()
    streams = [TextStream(tokenizer, params.stop) if tokenizer else _SilentStream() for _ in prompts]
    eos = end_of_text_ids(params, tokenizer, model)
    track_seen = params.sampling.repetition_penalty != 1.0  # only the repetition penalty reads batch.seen
    counts = [0] * len(prompts)
    started = time.perf_counter()
    logits = batch.prefill(model)[:, None]
    if speculator is not None:
        speculator.prefill()
    timing.prefill_s = time.perf_counter() - started
    decode_started = time.perf_counter()
    proposal: Proposal | None = None
    accepted: list[int] | None = None
    while True:
        scores = logits.float()  # (rows, 1, vocab), or (rows, 1 + k, vocab) when the pass checked a proposal
        # NaN or +inf anywhere in a row shows in its log-sum-exp and in its maximum alike.
        normalizer = torch.logsumexp(scores, dim=-1) if params.logprobs else scores.amax(dim=-1)
        if proposal is None:
            check_finite(normalizer, model)
            tokens = choose_tokens(scores[:, 0].cpu(), batch.seen.cpu(), params.sampling, generator)[:, None]
            yielded = [1] * len(batch.rows)
        else:
            tokens, kept = check_proposal(scores.cpu(), proposal, batch.seen.cpu(), params.sampling, generator)
            checked = torch.arange(tokens.shape[1], device=normalizer.device) <= kept[:, None].to(normalizer.device)
            check_finite(normalizer[checked], model)
            batch.keep_checked(kept + 1, proposal, track_seen)
            accepted, yielded = kept.tolist(), (kept + 1).tolist()
        tokens = tokens.to(logits.device)
        if params.logprobs:
            logprobs = (scores.gather(2, tokens[..., None]).squeeze(-1) - normalizer).tolist()
        token_rows = tokens.tolist()
        finished, emitted = [], []
        for slot, row in enumerate(batch.rows):
            emitted.append([])
            for column in range(yielded[slot]):
                token = token_rows[slot][column]
                counts[row] += 1
                emitted[slot].append(token)
                reason, text = advance_stream(streams[row], token, eos, params.ignore_eos, limits[row] - counts[row])
                yield TokenEvent(row, token, logprobs[slot][column] if params.logprobs else None, text, reason)
                if reason is not None:
                    finished.append(slot)
                    break
        if speculator is not None:
            speculator.accepted(proposal, accepted, emitted)
        if len(finished) == len(batch.rows):
            break
        live = batch.drop(finished)
        last = torch.tensor([emitted[s][-1] for s in live], device=logits.device)
        if track_seen:
            batch.see(last)
        if speculator is None:
            logits = batch.step(model, last, None)
            continue
        if finished:
            speculator.keep_rows(live, torch.tensor(live))
        rooms = [limits[row] - counts[row] - 1 for row in batch.rows]
        proposal = speculator.propose(rooms, batch.seen if track_seen else None, _picker(params.sampling, generator))
        with speculator.clock:
            logits = batch.step(model, last, proposal)
        speculator.observe(logits.shape[0] * logits.shape[1], speculator.clock.seconds)
    timing.decode_s = time.perf_counter() - decode_started


def check_proposal(
    scores: torch.Tensor, proposal: Proposal, seen: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a proposal against the logits (rows, 1 + k, vocab) of the pass that read it: (tokens (rows, 1 + k), kept
    (rows,)); row ``r`` yields ``tokens[r, : kept[r] + 1]``, the proposed tokens it kept and one of the model's own.

    Each position is scored as plain decoding would score it there: the repetition penalty sees the row's tokens and
    the proposed ones before the position."""
    drafted, counts = proposal.tokens, proposal.counts
    seen_at = seen[:, None].expand(-1, scores.shape[1], -1)
    if params.repetition_penalty != 1.0:
        seen_at = seen_at.clone()
        rows = torch.arange(len(drafted))
        for column in range(1, scores.shape[1]):
            seen_at[:, column] |= seen_at[:, column - 1]
            seen_at[rows, column, drafted[:, column - 1]] = True
    if params.temperature == 0.0:
        targets = penalize_repetition(scores, seen_at, params.repetition_penalty).argmax(dim=-1)
        return targets, accept_greedy(targets, drafted, counts)
    probs = next_token_distribution(scores, seen_at, params)
    return accept_sampled(probs, drafted, counts, proposal.probs, generator)


def _picker(params: SamplingParams, generator: torch.Generator) -> Pick:
    """How a draft picks each token: as the model would (greedy, or sampled with the same settings)."""

    def pick(logits: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, seen = logits.float().cpu(), seen.cpu()
        if params.temperature == 0.0:
            return penalize_repetition(logits, seen, params.repetition_penalty).argmax(dim=-1), None
        probs = next_token_distribution(logits, seen, params)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1), probs

    return pick


class _SilentStream:
    """Stands in for a :class:`TextStream` when there is no tokenizer: no text, no stop strings."""

    def push(self, token_id: int) -> tuple[str, bool]:
        return "", False

    def finish(self) -> str:
        return ""


def end_of_text_ids(params: GenerationParams, tokenizer: PhiTokenizer | None, model: PhiForCausalLM) -> frozenset[int]:
    """The ids that end a row: the parameters' own list, else the tokenizer's (or the config's) end of text."""
    if params.eos_token_ids is not None:
        return frozenset(params.eos_token_ids)
    eos = tokenizer.eos_token_id if tokenizer else model.config.eos_token_id
    return frozenset() if eos is None else frozenset({eos})


def advance_stream(
    stream: TextStream | _SilentStream, token: int, eos: frozenset[int], ignore_eos: bool, left: int
) -> tuple[FinishReason | None, str]:
    """Feed one token to its row's text stream (``left`` more tokens allowed after it); return (finish reason or
    None, text to show)."""
    if token in eos and not ignore_eos:
        return "eos", stream.finish()
    text, stopped = stream.push(token)
    if stopped:
        return "stop", text
    if left <= 0:
        return "length", text + stream.finish()
    return None, text


def check_finite(summary: torch.Tensor, model: PhiForCausalLM) -> None:
    """Stop on NaN/inf logits, seen in each row's log-sum-exp or maximum (``summary``)."""
    if bool(torch.isfinite(summary).all()):
        return
    precision = model.precision
    if precision.weights == "float32":
        raise PhiError("the model's logits are NaN/inf in float32: the checkpoint's weights may be damaged")
    raise PhiError(
        f"the model's logits overflowed to NaN/inf with {precision.weights} weights; run with --dtype float32"
    )


@dataclass
class _Batch:
    """The rows still generating: their prompt row numbers, padded prompt ids, seen tokens, and cache rows."""

    rows: list[int]
    prompt_ids: torch.Tensor
    seen: torch.Tensor  # (rows, vocab) bool, for the repetition penalty
    lanes: RowCache
    since: int = 0  # the cache column the last proposal was written from

    @classmethod
    def start(cls, model: PhiForCausalLM, prompts: list[list[int]], room: int) -> _Batch:
        lanes, ids = RowCache.start(model, prompts, room)
        seen = torch.zeros((len(prompts), model.config.vocab_size), dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            seen[i, torch.tensor(prompt)] = True
        return cls(rows=list(range(len(prompts))), prompt_ids=ids, seen=seen.to(model.device), lanes=lanes)

    def prefill(self, model: PhiForCausalLM) -> torch.Tensor:
        return self.lanes.prefill(model, self.prompt_ids)

    def see(self, tokens: torch.Tensor) -> None:
        """Record ``tokens`` (one per row) as seen by the repetition penalty."""
        self.seen[torch.arange(len(tokens), device=tokens.device), tokens] = True

    def step(self, model: PhiForCausalLM, tokens: torch.Tensor, proposal: Proposal | None) -> torch.Tensor:
        """Run the rows' newest ``tokens`` (and a proposal to check after them): logits (rows, 1 + k, vocab)."""
        if proposal is None:
            return self.lanes.feed(model, tokens[:, None], last_only=True)
        k = proposal.tokens.shape[1]
        self.lanes.reserve(k + 1)
        self.since = self.lanes.cache.length
        fed = torch.cat((tokens[:, None], proposal.tokens.to(tokens.device)), dim=1)
        valid = torch.arange(k + 1) <= proposal.counts[:, None]
        return self.lanes.feed(model, fed, None if bool(valid.all()) else valid.to(tokens.device))

    def keep_checked(self, kept: torch.Tensor, proposal: Proposal, track_seen: bool) -> None:
        """Keep, of the last pass's tokens, each row's first ``kept[row]`` (its newest token and the proposed ones it
        accepted): the rest leave the cache, and the accepted ones join the seen tokens."""
        self.lanes.rollback(self.since, kept.to(self.lanes.mask.device))
        if track_seen:
            drafted = proposal.tokens
            taken = torch.arange(drafted.shape[1]) < (kept - 1)[:, None]
            rows = torch.arange(len(drafted))[:, None].expand_as(drafted)
            self.seen[rows[taken].to(self.seen.device), drafted[taken].to(self.seen.device)] = True

    def drop(self, slots: list[int]) -> list[int]:
        """Remove finished rows (by their slot in the current batch); the slots kept, in order."""
        keep = [s for s in range(len(self.rows)) if s not in set(slots)]
        if not slots:
            return keep
        index = torch.tensor(keep, device=self.seen.device)
        self.rows = [self.rows[s] for s in keep]
        self.seen = self.seen.index_select(0, index)
        self.lanes.keep_rows(index)
        return keep
