"""Continuous batching: one thread owns the model and decodes every running request together, a token a step.

A request joins the running batch at the next step. Its prompt is prefilled alone (batch 1, so its first token is
the one it gets alone) and its keys and values are copied into a free row of the batch's cache, left-padded to the
batch's common length (the batch is padded instead when the newcomer is longer). Every row keeps its own mask row,
positions, sampling parameters, ``torch.Generator``, stop strings and length limit, so its tokens do not depend on
its neighbours. A row leaves when it finishes or is cancelled: the last row moves into its slot, so the live rows
are always the first rows of the cache and a step costs what they cost.

Nothing else touches the model: :meth:`Engine.submit` queues requests and returns handles, and each request's
events (:class:`PromptScores`, :class:`Token`, :class:`Ended`) come back through its sink, a queue by default.
Sampling, stop strings and text deltas are :mod:`phi_core.generation`'s, as in ``phi generate``.

Prompt lookup (a request's ``params.lookup``, else the engine's ``lookup``): a step also reads the tokens that
followed each row's last n-gram earlier in its prompt and output, and a row keeps those its sampling accepts
(:mod:`phi_core.speculative`); rows keep different counts, and the columns a row rejected stay as holes its mask
hides until the cache runs out of room and the rows' columns are moved together.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from phi_core.cache import KVCache
from phi_core.errors import PhiError
from phi_core.generation import (
    FinishReason,
    GenerationParams,
    TextStream,
    advance_stream,
    check_finite,
    check_proposal,
    choose_tokens,
    end_of_text_ids,
)
from phi_core.model import PhiForCausalLM
from phi_core.speculative import Acceptance, Clock, Planner, PromptLookup, Proposal, StepCosts
from phi_core.tokenizer import PhiTokenizer

log = logging.getLogger("phi_core")
TopLogprobs = list[tuple[int, float]]  # (token id, log-probability), likeliest first


@dataclass(frozen=True)
class EngineRequest:
    """One sequence to generate: prompt ids, its own generation parameters (stop strings, length limit, sampling and
    seed), and what to report besides the tokens. ``logprobs``/``prompt_logprobs`` = N asks for each new/prompt
    token's log-probability with the N likeliest alternatives; ``score_only`` generates nothing."""

    prompt: list[int]
    params: GenerationParams
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    score_only: bool = False

    @property
    def new_token_limit(self) -> int:
        return 0 if self.score_only else self.params.new_token_limit(len(self.prompt))


@dataclass(frozen=True)
class PromptScores:
    """Each prompt token's log-probability given the tokens before it, and the likeliest there (None for the first)."""

    logprobs: list[float | None]
    top: list[TopLogprobs | None]


@dataclass(frozen=True)
class Token:
    """A new token, the text it completes (held back text of a split character or a possible stop string comes
    later), and its log-probability under the model's own distribution (before any sampling filter)."""

    token_id: int
    text: str
    logprob: float | None
    top: TopLogprobs | None
    finish_reason: FinishReason | None


@dataclass(frozen=True)
class Ended:
    """The request ended with no further token: scored only (``length``), cancelled, or failed (``message``)."""

    reason: Literal["length", "cancelled", "error"]
    message: str = ""


EngineEvent = PromptScores | Token | Ended
Sink = Callable[[EngineEvent], None]


def is_last(event: EngineEvent) -> bool:
    return isinstance(event, Ended) or (isinstance(event, Token) and event.finish_reason is not None)


class EngineFull(PhiError):
    """Too many requests are waiting (``max_queue``)."""


class EngineClosed(PhiError):
    """The engine takes no more requests (it is shutting down)."""


class RequestHandle:
    """A submitted request: its events arrive through the sink given to :meth:`Engine.submit`, or else in
    ``events``; :meth:`cancel` makes it leave at the next step."""

    def __init__(self, engine: Engine, request: EngineRequest, sink: Sink | None) -> None:
        self.request = request
        self.events: queue.Queue[EngineEvent] = queue.Queue()
        self._sink = sink or self.events.put
        self._engine = engine
        self.cancelled = False
        self.finished = False

    def cancel(self) -> None:
        self._engine.cancel(self)

    def stream(self, timeout: float | None = None) -> Iterator[EngineEvent]:
        """The events (of a handle submitted without a sink) as they come, up to the last one."""
        while True:
            event = self.events.get(timeout=timeout)
            yield event
            if is_last(event):
                return

    def emit(self, event: EngineEvent) -> None:
        try:
            self._sink(event)
        except Exception:  # a consumer that went away must not stop the engine
            log.warning("dropped an event of a request whose consumer failed", exc_info=True)


class Engine:
    """Decodes up to ``max_batch`` requests together; up to ``max_queue`` more wait for a row (more are refused)."""

    def __init__(
        self,
        model: PhiForCausalLM,
        tokenizer: PhiTokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        lookup: int = 0,
    ) -> None:
        if max_batch <= 0 or max_queue < 0:
            raise ValueError(f"max_batch must be positive and max_queue >= 0, got {max_batch} and {max_queue}")
        if lookup < 0:
            raise ValueError(f"lookup must be >= 0, got {lookup}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.lookup = lookup  # prompt lookup for requests that do not ask for their own
        # Prompt lookup's tokens since the start, over every request: proposed and checked, and those kept (what
        # phi serve's /metrics reports; written by the model thread only).
        self.proposed_tokens, self.accepted_tokens = 0, 0
        self._planner = Planner(0, 1, StepCosts(), uses_draft=False)
        self._clock = Clock(model.device)
        self.context = model.config.max_position_embeddings
        self._waiting: deque[RequestHandle] = deque()
        self._active = 0  # submitted and not finished
        self._lock = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._batch = _RunningBatch(model, max_batch)
        self._thread = threading.Thread(target=self._run, name="phi-engine", daemon=True)
        self._thread.start()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def waiting(self) -> int:
        """Requests queued for a row."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests holding a row (or being prefilled for one)."""
        with self._lock:
            return self._active - len(self._waiting)

    def submit(self, requests: list[EngineRequest], sinks: list[Sink | None] | None = None) -> list[RequestHandle]:
        """Queue ``requests``, all or none: raises ValueError for an invalid one, :class:`EngineFull` when they do
        not fit in the queue, :class:`EngineClosed` after :meth:`stop_accepting`."""
        for request in requests:
            self.check(request)
        handles = [RequestHandle(self, r, s) for r, s in zip(requests, sinks or [None] * len(requests), strict=True)]
        with self._lock:
            if not self._accepting:
                raise EngineClosed("the server is shutting down")
            capacity = self.max_batch + self.max_queue
            if len(handles) > capacity:
                raise EngineFull(f"{len(handles)} sequences at once; this server takes at most {capacity}")
            if self._active + len(handles) > capacity:
                raise EngineFull(f"the queue is full ({self.max_queue} waiting at most)")
            self._waiting.extend(handles)
            self._active += len(handles)
            self._lock.notify_all()
        return handles

    def check(self, request: EngineRequest) -> None:
        """Raise ValueError if the engine cannot run ``request``."""
        prompt, vocab = request.prompt, self.model.config.vocab_size
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if request.params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if request.params.draft is not None:
            raise ValueError("the serving engine speculates by prompt lookup, not with a draft model")
        total = len(prompt) + request.new_token_limit
        if total > self.context:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) and the tokens to generate ({request.new_token_limit}) exceed "
                f"the model's context of {self.context} tokens"
            )
        for name in ("logprobs", "prompt_logprobs"):
            count = getattr(request, name)
            if count is not None and not 0 <= count <= self.model.config.vocab_size:
                raise ValueError(f"{name} must be between 0 and the vocabulary size, got {count}")

    def run(self, requests: list[EngineRequest], timeout: float | None = None) -> Iterator[tuple[int, EngineEvent]]:
        """Submit ``requests`` and yield (index, event) as events come, until every request has ended; leaving the
        loop early cancels the ones still going."""
        merged: queue.Queue[tuple[int, EngineEvent]] = queue.Queue()
        sinks: list[Sink | None] = [lambda e, i=i: merged.put((i, e)) for i in range(len(requests))]
        handles = self.submit(requests, sinks)
        left = len(handles)
        try:
            while left:
                index, event = merged.get(timeout=timeout)
                left -= is_last(event)
                yield index, event
        finally:
            for handle in handles:
                handle.cancel()

    def cancel(self, handle: RequestHandle) -> None:
        """Make ``handle`` leave: at once if it is still waiting, else at the next step."""
        with self._lock:
            if handle.finished or handle.cancelled:
                return
            handle.cancelled = True
            if handle in self._waiting:
                self._waiting.remove(handle)
            else:
                self._lock.notify_all()
                return
        self._finish(handle, Ended("cancelled"))

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Take no more requests, let the running and waiting ones finish for up to ``grace_s`` seconds, cancel the
        rest, and end the thread."""
        deadline = time.monotonic() + grace_s
        with self._lock:
            self._accepting = False
            while self._active and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(left)
            self._stopping = True
            self._lock.notify_all()
        self._thread.join()

    # The model thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while (joining := self._next_joining()) is not None:
                try:
                    self._admit(joining)
                    self._leave_if(lambda row: row.handle.cancelled, Ended("cancelled"))
                    if self._batch.rows:
                        self._step()
                except Exception as exc:  # the model itself failed: the running rows end, the engine goes on
                    log.exception("engine step failed")
                    self._end_all(Ended("error", f"the model failed: {exc}"))
            self._end_all(Ended("cancelled", "the server shut down"))

    def _next_joining(self) -> list[RequestHandle] | None:
        """Wait for work; the waiting requests that fit in the batch now, or None once stopping."""
        with self._lock:
            while not (self._stopping or self._waiting or self._batch.rows):
                self._lock.wait()
            if self._stopping:
                return None
            free = self.max_batch - len(self._batch.rows)
            return [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]

    def _end_all(self, event: Ended) -> None:
        """End every running and waiting request with ``event``, and start from an empty batch."""
        with self._lock:
            left = list(self._waiting)
            self._waiting.clear()
        for handle in [row.handle for row in self._batch.rows] + left:
            self._finish(handle, event)
        self._batch = _RunningBatch(self.model, self.max_batch)

    def _admit(self, handles: list[RequestHandle]) -> None:
        """Prefill each newcomer alone, report its prompt scores and first token, and add it to the batch unless that
        token finished it. Identical prompts admitted together share one prefill (``n`` > 1)."""
        prefilled: dict[tuple[tuple[int, ...], bool], tuple[KVCache, torch.Tensor]] = {}
        for handle in handles:
            request = handle.request
            if handle.cancelled:
                self._finish(handle, Ended("cancelled"))
                continue
            try:
                scored = request.prompt_logprobs is not None
                key = (tuple(request.prompt), scored)
                if key not in prefilled:
                    prefilled[key] = self._prefill(request.prompt, scored)
                cache, logits = prefilled[key]
                if scored:
                    handle.emit(_prompt_scores(request.prompt, logits, request.prompt_logprobs or 0, self.model))
                if request.score_only:
                    self._finish(handle, Ended("length"))
                    continue
                row = _Row.start(handle, self.model, self.tokenizer, self.lookup)
                if not self._choose(row, logits[:, -1]):
                    self._batch.join(row, cache)
            except Exception as exc:  # this request fails; the others go on
                if not isinstance(exc, PhiError):
                    log.exception("prefill failed")
                self._finish(handle, Ended("error", str(exc)))

    def _prefill(self, prompt: list[int], all_positions: bool) -> tuple[KVCache, torch.Tensor]:
        """The prompt's cache (one row) and logits: every position's when scoring the prompt, else the last."""
        cache = self.model.new_cache(1, len(prompt))
        ids = torch.tensor([prompt], device=self.model.device)
        return cache, self.model(ids, cache=cache, last_only=not all_positions).logits

    def _step(self) -> None:
        rows = self._batch.rows
        proposal = self._propose()
        with self._clock:
            logits = self._batch.step(proposal).float().cpu()  # (rows, 1 + proposed, vocab)
        width = logits.shape[1]
        self._planner.costs.observe_model(len(rows) * width, self._clock.seconds)
        wanted = [row.handle.request.logprobs is not None for row in rows for _ in range(width)]
        normalizers = _normalizers(logits.flatten(0, 1), wanted).view(len(rows), width)
        done, kept = [], []
        for slot, row in enumerate(rows):
            kept.append(1)
            try:
                if proposal is None or not int(proposal.counts[slot]):
                    finished = self._choose(row, logits[slot : slot + 1, 0], normalizers[slot : slot + 1, 0])
                else:
                    kept[slot], finished = self._check(row, logits[slot : slot + 1], normalizers[slot], proposal, slot)
            except PhiError as exc:
                self._finish(row.handle, Ended("error", str(exc)))
                finished = True
            if finished:
                done.append(slot)
        if proposal is not None:
            self._batch.keep(kept)
        self._batch.leave(done)

    def _propose(self) -> Proposal | None:
        """Tokens for the rows that look them up to propose this step, as many as pays (None: a plain step)."""
        rows = self._batch.rows
        if not any(row.lookup is not None for row in rows):
            return None
        candidates = [
            [] if row.lookup is None else row.lookup.propose(0, min(row.most, row.limit - row.count - 1))
            for row in rows
        ]
        self._planner.rows = [row.acceptance for row in rows]
        self._planner.most = max(row.most for row in rows)
        k = self._planner.plan([len(c) for c in candidates])
        if k == 0:
            return None
        tokens = torch.zeros((len(rows), k), dtype=torch.long)
        for slot, proposed in enumerate(candidates):
            tokens[slot, : min(k, len(proposed))] = torch.tensor(proposed[:k], dtype=torch.long)
        return Proposal(tokens, torch.tensor([min(k, len(c)) for c in candidates]))

    def _check(
        self, row: _Row, logits: torch.Tensor, normalizers: torch.Tensor, proposal: Proposal, slot: int
    ) -> tuple[int, bool]:
        """Check the tokens proposed for ``row`` against its (1, 1 + k, vocab) logits with its own sampling, and report
        the ones it keeps and one of its own; (columns it keeps, whether it finished)."""
        request = row.handle.request
        mine = Proposal(proposal.tokens[slot : slot + 1], proposal.counts[slot : slot + 1])
        tokens, accepted = check_proposal(logits, mine, row.seen, request.params.sampling, row.generator)
        count, proposed = int(accepted[0]) + 1, int(mine.counts[0])
        row.acceptance.record(proposed, count - 1)
        check_finite(normalizers[:count], self.model)
        finished, reported = False, 0
        for column, token in enumerate(tokens[0, :count].tolist()):
            reported += 1
            if finished := self._report(row, token, logits[:, column], normalizers[column : column + 1]):
                break
        self.proposed_tokens += proposed
        self.accepted_tokens += min(reported, count - 1)  # a row that finishes mid-proposal reports fewer
        return count, finished

    def _choose(self, row: _Row, logits: torch.Tensor, normalizer: torch.Tensor | None = None) -> bool:
        """Pick ``row``'s next token from its (1, vocab) logits and report it; whether it finished the row.
        ``normalizer``: the row's log-sum-exp if it wants log-probabilities, else its maximum (computed here if not
        given), which shows NaN or inf anywhere in the row."""
        request, scores = row.handle.request, logits.float().cpu()
        wanted = request.logprobs is not None
        if normalizer is None:
            normalizer = _normalizers(scores, [wanted])
        check_finite(normalizer, self.model)
        token = int(choose_tokens(scores, row.seen, request.params.sampling, row.generator)[0])
        return self._report(row, token, scores, normalizer)

    def _report(self, row: _Row, token: int, scores: torch.Tensor, normalizer: torch.Tensor) -> bool:
        """Report ``row``'s next ``token``, chosen from its (1, vocab) ``scores``; whether it finished the row."""
        request = row.handle.request
        wanted = request.logprobs is not None
        logprob, top = None, None
        if wanted:
            logprobs = scores[0] - normalizer[0]
            logprob, top = float(logprobs[token]), _top(logprobs[None], request.logprobs or 0)[0]
        if request.params.sampling.repetition_penalty != 1.0:
            row.seen[0, token] = True
        row.count += 1
        if row.lookup is not None:
            row.lookup.extend(0, [token])
        reason, text = advance_stream(row.stream, token, row.eos, request.params.ignore_eos, row.limit - row.count)
        row.pending = token
        event = Token(token, text, logprob, top, reason)
        if reason is not None:
            self._finish(row.handle, event)
        else:
            row.handle.emit(event)
        return reason is not None

    def _leave_if(self, predicate: Callable[[_Row], bool], event: Ended) -> None:
        slots = [slot for slot, row in enumerate(self._batch.rows) if predicate(row)]
        for slot in slots:
            self._finish(self._batch.rows[slot].handle, event)
        self._batch.leave(slots)

    def _finish(self, handle: RequestHandle, event: EngineEvent) -> None:
        with self._lock:
            if handle.finished:
                return
            handle.finished = True
            self._active -= 1
            self._lock.notify_all()
        handle.emit(event)


@dataclass
class _Row:
    """A running request's sampling state: its generator, seen tokens, text stream and the token it feeds next; with
    prompt lookup of up to ``most`` tokens, its tokens so far and its recent acceptance."""

    handle: RequestHandle
    stream: TextStream
    generator: torch.Generator
    seen: torch.Tensor
    eos: frozenset[int]
    limit: int
    count: int = 0
    pending: int = -1
    most: int = 0
    lookup: PromptLookup | None = None
    acceptance: Acceptance = field(default_factory=Acceptance)

    @classmethod
    def start(cls, handle: RequestHandle, model: PhiForCausalLM, tokenizer: PhiTokenizer, lookup: int = 0) -> _Row:
        request = handle.request
        params = request.params
        generator = torch.Generator(device="cpu")
        if params.sampling.seed is not None:
            generator.manual_seed(params.sampling.seed)
        else:
            generator.seed()
        seen = torch.zeros((1, 1), dtype=torch.bool)  # read only by the repetition penalty
        if params.sampling.repetition_penalty != 1.0:
            seen = torch.zeros((1, model.config.vocab_size), dtype=torch.bool)
            seen[0, torch.tensor(request.prompt)] = True
        return cls(
            handle=handle,
            stream=TextStream(tokenizer, params.stop),
            generator=generator,
            seen=seen,
            eos=end_of_text_ids(params, tokenizer, model),
            limit=request.new_token_limit,
            most=params.lookup or lookup,
            lookup=PromptLookup([request.prompt]) if params.lookup or lookup else None,
        )


class _RunningBatch:
    """The rows being decoded: one KV cache whose first ``len(rows)`` rows are live, all of one common length
    (left-padded), with a mask row and the next position of each."""

    def __init__(self, model: PhiForCausalLM, max_rows: int) -> None:
        self.model, self.max_rows = model, max_rows
        self.rows: list[_Row] = []
        self.cache = KVCache.wrapping([], [], 0)
        self.mask = torch.zeros((0, 0), dtype=torch.bool, device=model.device)
        self.positions = torch.zeros(0, dtype=torch.long, device=model.device)
        self.fed = 0  # columns the last step fed

    @property
    def capacity(self) -> tuple[int, int]:
        return (self.mask.shape[0], self.mask.shape[1])

    def join(self, row: _Row, prefilled: KVCache) -> None:
        """Copy a newcomer's prefilled cache into the next free row, right-aligned with the others."""
        size, length = prefilled.length, self.cache.length
        self._make_room(len(self.rows) + 1, max(size, length) + 1, shift=max(0, size - length))
        slot, column = len(self.rows), self.cache.length - size
        self.cache.write_row(slot, prefilled, column)
        self.mask[slot].zero_()
        self.mask[slot, column : self.cache.length] = True
        self.positions[slot] = size
        self.rows.append(row)

    def step(self, proposal: Proposal | None = None) -> torch.Tensor:
        """Feed every row its pending token, and after it the tokens proposed for it; logits (rows, 1 + k, vocab)
        (then :meth:`keep` says how many of the columns each row keeps)."""
        count, length = len(self.rows), self.cache.length
        width = 1 if proposal is None else 1 + proposal.tokens.shape[1]
        self._make_room(count, length + width)
        length = self.cache.length  # compaction may have moved it
        device = self.model.device
        tokens = torch.tensor([[row.pending] for row in self.rows], device=device)
        positions = self.positions[:count, None]
        if proposal is None:
            self.mask[:count, length] = True
        else:
            tokens = torch.cat((tokens, proposal.tokens.to(device)), dim=1)
            valid = torch.arange(width) <= proposal.counts[:, None]
            self.mask[:count, length : length + width] = valid.to(device)
            positions = positions + torch.arange(width, device=device)
        logits = self.model(
            tokens,
            attention_mask=self.mask[:count, : length + width],
            cache=self.cache.first_rows(count),
            positions=positions,
            last_only=proposal is None,
        ).logits
        self.cache.advance(width)
        self.fed = width
        if proposal is None:
            self.positions[:count] += 1
        return logits

    def keep(self, kept: list[int]) -> None:
        """After a step over proposed tokens: row ``slot`` keeps the first ``kept[slot]`` columns fed to it, the rest
        become holes its mask hides, and the cache ends after the last column a row kept."""
        count, length = len(self.rows), self.cache.length
        start = length - self.fed
        for slot, columns in enumerate(kept):
            self.mask[slot, start + columns : length] = False
        self.positions[:count] += torch.tensor(kept, device=self.positions.device)
        self.cache.truncate(start + max(kept))

    def leave(self, slots: list[int]) -> None:
        """Remove rows: the last live row moves into each freed slot."""
        for slot in sorted(slots, reverse=True):
            last = len(self.rows) - 1
            if slot != last:
                self.cache.write_row(slot, self.cache, 0, source_row=last)
                self.mask[slot] = self.mask[last]
                self.positions[slot] = self.positions[last]
                self.rows[slot] = self.rows[last]
            self.rows.pop()
        if not self.rows:
            self.cache.length = 0
            self.mask.zero_()

    def _make_room(self, rows: int, columns: int, shift: int = 0) -> None:
        """At least ``rows`` rows and ``columns`` positions once the written positions move ``shift`` columns right.
        Out of positions, the leading columns no live row uses are dropped first; storage grows by doubling."""
        have_rows, have_columns = self.capacity
        if shift == 0 and columns > have_columns:
            unused = self._unused_leading_columns()
            self._shift(-unused)
            columns -= unused
            if columns > have_columns:
                columns -= self._compact()
        if rows > have_rows or columns > have_columns:
            new_rows = have_rows if rows <= have_rows else min(max(rows, 2 * have_rows), max(rows, self.max_rows))
            new_columns = have_columns if columns <= have_columns else max(columns, 2 * have_columns, 64)
            if self.cache.keys:
                self.cache = self.cache.resized(new_rows, new_columns)
            else:
                self.cache = self.model.new_cache(new_rows, new_columns)
            mask = torch.zeros((new_rows, new_columns), dtype=torch.bool, device=self.mask.device)
            mask[:have_rows, :have_columns] = self.mask
            positions = torch.zeros(new_rows, dtype=torch.long, device=self.positions.device)
            positions[:have_rows] = self.positions
            self.mask, self.positions = mask, positions
        self._shift(shift)

    def _shift(self, by: int) -> None:
        if by == 0:
            return
        live, length = len(self.rows), self.cache.length
        self.cache.shift(live, by)
        start, count = max(0, -by), min(length, length + by)
        self.mask[:live, max(0, by) : max(0, by) + count] = self.mask[:live, start : start + count].clone()
        if by > 0:
            self.mask[:live, :by] = False
        else:
            self.mask[:live, count:length] = False

    def _compact(self) -> int:
        """Move each live row's columns together at the right end (holes that prompt lookup's rejected tokens left
        become left padding); the columns freed."""
        live, length = len(self.rows), self.cache.length
        valid = self.mask[:live, :length]
        counts = valid.sum(dim=1)
        width = int(counts.max()) if live and length else 0
        if width == length:
            return 0
        order = torch.argsort(valid.to(torch.uint8), dim=1, stable=True)  # each row's hidden columns first, in order
        self.cache.first_rows(live).gather_columns(order[:, length - width :])
        self.cache.length = width
        self.mask[:live, :width] = torch.arange(width, device=valid.device) >= (width - counts)[:, None]
        self.mask[:live, width:length] = False
        return length - width

    def _unused_leading_columns(self) -> int:
        used = self.mask[: len(self.rows), : self.cache.length].any(dim=0)
        return int(used.int().argmax()) if bool(used.any()) else self.cache.length


def _normalizers(logits: torch.Tensor, log_sum_exp: list[bool]) -> torch.Tensor:
    """Per row of (rows, vocab) ``logits``: the log-sum-exp where asked for, else the maximum (cheaper); one batched
    call each, not one per row."""
    normalizers = logits.amax(dim=-1)
    if any(log_sum_exp):
        wanted = torch.tensor(log_sum_exp)
        normalizers[wanted] = torch.logsumexp(logits[wanted], dim=-1)
    return normalizers


def _top(logprobs: torch.Tensor, count: int) -> list[TopLogprobs]:
    """The ``count`` likeliest (id, log-probability) pairs of each row of ``logprobs`` (rows, vocab)."""
    if count == 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, ids = torch.topk(logprobs, min(count, logprobs.shape[-1]), dim=-1)
    return [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def _prompt_scores(prompt: list[int], logits: torch.Tensor, count: int, model: PhiForCausalLM) -> PromptScores:
    """Log-softmax of the model's logits at every prompt position, read at the next prompt token."""
    logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    check_finite(logprobs.amax(dim=-1), model)
    targets = torch.tensor(prompt[1:], device=logprobs.device)
    chosen = logprobs.gather(1, targets[:, None]).squeeze(1).cpu().tolist()
    return PromptScores([None, *chosen], [None, *_top(logprobs.cpu(), count)])
