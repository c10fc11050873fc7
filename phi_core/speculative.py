"""Speculative decoding: propose several tokens cheaply, check them all with one forward pass of the model.

At batch 1 a decode step reads every weight once, whatever it computes, so checking ``k`` proposed tokens in one
pass of ``k + 1`` rows costs about one step where the kernels keep a few-row product near a one-row product's
cost (measured in docs/performance.md). Two proposers:

- **prompt lookup** (:class:`PromptLookup`): the tokens that followed the latest earlier occurrence of the row's
  last n-gram in its prompt and output (code edits and answers from a given text copy long spans);
- **a draft model** (:class:`DraftRunner`): a cheaper Phi with the same tokenizer (a quantized copy of the same
  weights, or a smaller checkpoint) proposes ``k`` tokens one step at a time.

The model checks them (:func:`accept_greedy`, :func:`accept_sampled`): greedy keeps the longest prefix equal to
its own choices, sampling the standard rejection rule (accept ``d`` with probability ``min(1, p(d) / q(d))``, on
rejection draw from ``max(0, p - q)``), so the output has exactly the distribution plain sampling has; either way
the step ends with one token of the model's own, so a step yields from one token to ``k + 1``.

Rows of a batch accept different lengths while the KV cache has one length: :class:`RowCache` keeps a mask of
which cache columns hold each row's tokens, so a row's rejected columns become holes its mask hides (compacted
away when the cache runs out of room), and each row's positions are its own. :class:`Planner` decides how many
tokens to propose from each row's acceptance so far and the measured cost of a wider pass, and stops proposing
when that stops paying. The sampling functions live in :mod:`phi_core.generation`, which drives all this.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from phi_core.batching import left_pad
from phi_core.cache import KVCache
from phi_core.errors import PhiError
from phi_core.linear import PhiLinear
from phi_core.loading import load_model, load_tokenizer
from phi_core.model import PhiForCausalLM
from phi_core.tokenizer import PhiTokenizer

# (logits (rows, vocab), seen (rows, vocab)) -> (chosen ids (rows,), the distribution they were drawn from or None
# when greedy): how generation picks tokens, handed in so the draft picks as the model would.
Pick = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]

# Prompt lookup matches the last 3, then 2, then 1 tokens (the longest match found is the surest).
NGRAM_SIZES = (3, 2, 1)
DEFAULT_DRAFT_TOKENS = 4


@dataclass(frozen=True, eq=False)
class Draft:
    """A loaded draft model, how many tokens it proposes per step at most, and what it is (for reports)."""

    model: PhiForCausalLM
    tokens: int = DEFAULT_DRAFT_TOKENS
    name: str = "draft"

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise ValueError(f"a draft proposes at least 1 token per step, not {self.tokens}")


def load_draft(
    spec: str,
    target_source: str,
    target_tokenizer: PhiTokenizer,
    tokens: int = DEFAULT_DRAFT_TOKENS,
    dtype: str = "auto",
    attn: str = "sdpa",
    device: str = "cpu",
    revision: str | None = None,
) -> Draft:
    """``int8`` or ``int4``: a quantized copy of the target's own checkpoint; anything else: a checkpoint (folder, Hub
    id, embedded name) with the target's tokenizer, loaded in ``dtype``."""
    if spec in ("int8", "int4"):
        if torch.device(device).type != "cpu":
            raise PhiError(
                f"--draft {spec} is a quantized copy for the CPU; on {device} draft with a smaller checkpoint of the "
                "same tokenizer (such as phi-1.5 for phi-2)"
            )
        model = load_model(target_source, dtype=spec, attn=attn, device=device, revision=revision)
        return Draft(model, tokens, f"{spec} copy")  # type: ignore[arg-type]
    tokenizer = load_tokenizer(spec)
    if tokenizer.backend.get_vocab(with_added_tokens=True) != target_tokenizer.backend.get_vocab(
        with_added_tokens=True
    ):
        raise PhiError(f"draft model {spec!r} has another tokenizer than the model; a draft must share it")
    model = load_model(spec, dtype=dtype, attn=attn, device=device)
    return Draft(model, tokens, spec)  # type: ignore[arg-type]


@dataclass
class RowStats:
    """One row's speculation: tokens proposed, how many of them it kept, and the passes that checked them."""

    proposed: int = 0
    accepted: int = 0
    passes: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def add(self, other: RowStats) -> RowStats:
        return RowStats(self.proposed + other.proposed, self.accepted + other.accepted, self.passes + other.passes)


# The KV cache of a batch whose rows advance by different counts ------------------------------------------------
class RowCache:
    """Rows of a batch in one KV cache: ``mask`` (rows, capacity) says which cache columns hold each row's tokens,
    ``positions`` (rows,) the position of each row's next token.

    A pass writes the same columns for every row; a row that keeps fewer of them than another leaves holes that its
    mask hides. When the cache runs out of room, :meth:`compact` moves each row's columns together (right-aligned,
    as left padding) and only then does the cache grow.
    """

    SLACK = 64

    def __init__(self, cache: KVCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache, self.mask, self.positions = cache, mask, positions

    @classmethod
    def start(cls, model: PhiForCausalLM, prompts: list[list[int]], room: int) -> tuple[RowCache, torch.Tensor]:
        """Room for the left-padded ``prompts`` and ``room`` more columns; returns it and the padded prompt ids."""
        device = model.device
        ids, mask = left_pad(prompts, extra_columns=room)
        positions = torch.tensor([len(p) for p in prompts], device=device)
        rows = cls(model.new_cache(len(prompts), mask.shape[1]), mask.to(device), positions)
        return rows, ids.to(device)

    def prefill(self, model: PhiForCausalLM, ids: torch.Tensor) -> torch.Tensor:
        """Read the padded prompts; logits (rows, vocab) at each row's last token."""
        mask = self.mask[:, : ids.shape[1]]
        return model(ids, attention_mask=mask, cache=self.cache, last_only=True).logits[:, -1]

    def feed(
        self, model: PhiForCausalLM, tokens: torch.Tensor, valid: torch.Tensor | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """Run ``tokens`` (rows, new) after each row's cached ones; ``valid`` (rows, new) marks holes (False) that
        take no position and that no later token sees. Logits (rows, new or 1, vocab)."""
        new = tokens.shape[1]
        self.reserve(new)
        column = self.cache.length
        if valid is None:
            self.mask[:, column : column + new] = True
            positions = self.positions[:, None] + torch.arange(new, device=tokens.device)
            self.positions += new
        else:
            self.mask[:, column : column + new] = valid
            positions = self.positions[:, None] + torch.cumsum(valid, dim=1) - valid.long()
            self.positions += valid.sum(dim=1)
        return model(
            tokens,
            attention_mask=self.mask[:, : column + new],
            cache=self.cache,
            positions=positions,
            last_only=last_only,
        ).logits

    def rollback(self, since: int, kept: torch.Tensor) -> None:
        """Of the tokens each row was fed from cache column ``since`` on, keep its first ``kept[row]``; forget the
        rest, as if they had never been fed."""
        end = self.cache.length
        block = self.mask[:, since:end]
        keep = block & (torch.cumsum(block, dim=1) <= kept[:, None])
        self.positions -= block.sum(dim=1) - keep.sum(dim=1)
        self.mask[:, since:end] = keep
        used = keep.any(dim=0).nonzero()
        self.cache.truncate(since + (int(used.max()) + 1 if len(used) else 0))

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` (a 1-D index tensor)."""
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.cache.keep_rows(index)

    def holes(self) -> int:
        """Columns written but hidden from their row, over all rows (what :meth:`compact` would free)."""
        length = self.cache.length
        return int(self.mask.shape[0] * length - self.mask[:, :length].sum())

    def compact(self) -> None:
        """Move each row's columns together at the right end of a shorter written length (rows with fewer tokens
        get more left padding), so no row has holes; positions do not change."""
        length = self.cache.length
        valid = self.mask[:, :length]
        counts = valid.sum(dim=1)
        width = int(counts.max()) if length else 0
        order = torch.argsort(valid.to(torch.uint8), dim=1, stable=True)  # each row's hidden columns first, in order
        self.cache.gather_columns(order[:, length - width :])
        columns = torch.arange(width, device=valid.device)
        self.mask[:, :width] = columns >= (width - counts)[:, None]
        self.mask[:, width:] = False

    def reserve(self, new: int) -> None:
        """Make room for ``new`` more columns, so that feeding that many moves nothing: compact when rows have holes,
        and grow (by a quarter, at least ``SLACK`` columns) when that frees too little to last a while."""
        cache = self.cache
        if cache.length + new <= cache.max_length:
            return
        if self.holes():
            self.compact()
        if cache.length + new + self.SLACK > cache.max_length:
            grown = cache.length + new + max(self.SLACK, cache.max_length // 4)
            self.cache = cache.resized(cache.rows, grown)
            wider = torch.zeros((self.mask.shape[0], grown), dtype=torch.bool, device=self.mask.device)
            wider[:, : self.mask.shape[1]] = self.mask
            self.mask = wider


# Proposers -------------------------------------------------------------------------------------------------------
class PromptLookup:
    """Per row, its tokens so far (prompt and output) and where each n-gram last occurred in them; proposes the
    tokens that followed the latest earlier occurrence of the row's last n-gram (longest n first)."""

    def __init__(self, prompts: list[list[int]], sizes: tuple[int, ...] = NGRAM_SIZES) -> None:
        self.sizes = sizes
        self.tokens = [list(p) for p in prompts]
        self.ends: list[dict[tuple[int, ...], int]] = [{} for _ in prompts]
        self.indexed = [0] * len(prompts)

    def extend(self, slot: int, tokens: list[int]) -> None:
        self.tokens[slot].extend(tokens)

    def propose(self, slot: int, limit: int) -> list[int]:
        """Up to ``limit`` tokens to follow row ``slot``'s tokens, or none when its last n-gram never occurred."""
        tokens, ends = self.tokens[slot], self.ends[slot]
        # Index every n-gram that ends before the last token (one ending at the last token is the suffix itself).
        for end in range(max(self.indexed[slot], 1), len(tokens)):
            for size in self.sizes:
                if size <= end:
                    ends[tuple(tokens[end - size : end])] = end
        self.indexed[slot] = max(self.indexed[slot], len(tokens))
        if limit <= 0:
            return []
        for size in self.sizes:
            if size < len(tokens):
                end = ends.get(tuple(tokens[-size:]))
                if end is not None:
                    return tokens[end : end + limit]
        return []

    def keep_rows(self, slots: list[int]) -> None:
        self.tokens = [self.tokens[s] for s in slots]
        self.ends = [self.ends[s] for s in slots]
        self.indexed = [self.indexed[s] for s in slots]


class DraftRunner:
    """The draft model's own rows: its cache, and per row the accepted tokens it has not read yet (``pending``).

    Each proposal first reads the pending tokens (rows with fewer get holes in front), then picks ``k`` tokens one
    pass at a time, as the model would pick them (greedy, or sampled with the same settings: the distributions are
    kept for the rejection rule). After the check the draft keeps what was accepted of what it read.
    """

    def __init__(self, draft: Draft, prompts: list[list[int]], room: int, vocab_size: int) -> None:
        self.model = draft.model
        self.vocab_size = vocab_size
        self.rows, self.ids = RowCache.start(self.model, prompts, room)
        self.pending: list[list[int]] = [[] for _ in prompts]
        self.since = 0
        self.drafted: torch.Tensor | None = None  # (rows, k) the last proposal

    def prefill(self) -> None:
        self.rows.prefill(self.model, self.ids)  # the model picks the first token; the draft only needs the cache

    def propose(self, k: int, seen: torch.Tensor | None, pick: Pick) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``k`` tokens per row (rows, k) and, when sampling, the distributions they were drawn from (rows, k, vocab).
        ``seen`` (rows, vocab) marks the tokens the repetition penalty applies to (None: no penalty)."""
        width = max(len(p) for p in self.pending)
        self.rows.reserve(width + k - 1)
        self.since = self.rows.cache.length
        device = self.rows.mask.device
        tokens = torch.zeros((len(self.pending), width), dtype=torch.long, device=device)
        valid = torch.zeros((len(self.pending), width), dtype=torch.bool, device=device)
        for row, pending in enumerate(self.pending):
            tokens[row, width - len(pending) :] = torch.tensor(pending, dtype=torch.long, device=device)
            valid[row, width - len(pending) :] = True
        logits = self.rows.feed(self.model, tokens, None if bool(valid.all()) else valid, last_only=True)[:, -1]
        seen = seen.clone() if seen is not None else None
        drafted, distributions = [], []
        for step in range(k):
            chosen, distribution = pick(self._fit(logits), seen if seen is not None else _nothing_seen(logits))
            drafted.append(chosen)
            distributions.append(distribution)
            if seen is not None:
                seen[torch.arange(len(chosen), device=seen.device), chosen.to(seen.device)] = True
            if step + 1 < k:
                logits = self.rows.feed(self.model, chosen[:, None].to(device), last_only=True)[:, -1]
        self.drafted = torch.stack(drafted, dim=1)
        sampled = None if distributions[0] is None else torch.stack(distributions, dim=1)  # type: ignore[arg-type]
        return self.drafted, sampled

    def accepted(self, emitted: list[list[int]], accepted: list[int] | None) -> None:
        """Record each row's new tokens; ``accepted`` (per row, how many drafted tokens were kept) when the draft
        proposed this step, None when it sat out (its pending tokens then just grow)."""
        if accepted is None or self.drafted is None:
            for pending, tokens in zip(self.pending, emitted, strict=True):
                pending.extend(tokens)
            return
        k = self.drafted.shape[1]
        read = [len(p) for p in self.pending]
        kept = torch.tensor([r + min(a, k - 1) for r, a in zip(read, accepted, strict=True)])
        self.rows.rollback(self.since, kept.to(self.rows.mask.device))
        for row, (tokens, count) in enumerate(zip(emitted, accepted, strict=True)):
            # All k accepted: the last drafted token was picked but never read.
            self.pending[row] = tokens[-2:] if count == k else tokens[-1:]
        self.drafted = None

    def keep_rows(self, slots: list[int], index: torch.Tensor) -> None:
        self.rows.keep_rows(index.to(self.rows.mask.device))
        self.pending = [self.pending[s] for s in slots]

    def _fit(self, logits: torch.Tensor) -> torch.Tensor:
        """The draft's logits over the model's vocabulary (a draft with fewer rows never proposes the rest)."""
        have = logits.shape[-1]
        if have == self.vocab_size:
            return logits
        if have > self.vocab_size:
            return logits[..., : self.vocab_size]
        return torch.nn.functional.pad(logits, (0, self.vocab_size - have), value=float("-inf"))


def _nothing_seen(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)


# Checking proposals ----------------------------------------------------------------------------------------------
def accept_greedy(targets: torch.Tensor, drafted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """How many of each row's ``counts[row]`` drafted tokens (rows, k) equal the model's choices ``targets``
    (rows, k + 1) before the first that does not. The row then yields ``targets[row, : accepted + 1]``."""
    k = drafted.shape[1]
    match = (drafted == targets[:, :k]) & (torch.arange(k, device=drafted.device) < counts[:, None])
    return torch.cumprod(match.long(), dim=1).sum(dim=1)


def accept_sampled(
    probs: torch.Tensor,
    drafted: torch.Tensor,
    counts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection rule: (tokens (rows, k + 1), accepted (rows,)); row ``r`` yields ``tokens[r, : accepted + 1]``.

    ``probs`` (rows, k + 1, vocab) are the model's sampling distributions after the row's tokens and each drafted
    prefix, ``draft_probs`` (rows, k, vocab) those the drafted tokens were drawn from (None: proposed outright, as
    prompt lookup does, which is a distribution all on the drafted token). Drafted token ``d`` is accepted with
    probability ``min(1, p(d) / q(d))``; at the first rejection the token is drawn from ``max(0, p - q)``
    renormalized, and when all are accepted one more is drawn from the last ``p``. Each yielded token is then
    distributed as plain sampling's (Leviathan et al. 2023, Chen et al. 2023).
    """
    rows, k = drafted.shape
    arange = torch.arange(rows)
    p_drafted = probs[:, :k].gather(2, drafted[..., None]).squeeze(-1)
    q_drafted = 1.0 if draft_probs is None else draft_probs.gather(2, drafted[..., None]).squeeze(-1)
    draws = torch.rand((rows, k), generator=generator)
    ok = (draws * q_drafted < p_drafted) & (torch.arange(k) < counts[:, None])
    accepted = torch.cumprod(ok.long(), dim=1).sum(dim=1)
    last = probs[arange, accepted]
    rejected = accepted < counts
    if rejected.any():
        at = accepted.clamp(max=max(k - 1, 0))
        if draft_probs is None:
            proposal = torch.zeros_like(last).scatter_(1, drafted[arange, at][:, None], 1.0)
        else:
            proposal = draft_probs[arange, at]
        residual = (last - proposal).clamp(min=0.0)
        usable = rejected & (residual.sum(dim=1) > 0)  # p == q leaves nothing: then rejection had probability 0
        last = torch.where(usable[:, None], residual, last)
    chosen = torch.multinomial(last, 1, generator=generator).squeeze(-1)
    tokens = torch.cat((drafted, drafted.new_zeros((rows, 1))), dim=1)
    tokens[arange, accepted] = chosen
    return tokens, accepted


# When proposing pays ---------------------------------------------------------------------------------------------
@dataclass
class StepCosts:
    """Measured seconds of the model's passes by rows fed (rows x width), and of the draft's passes by rows.

    Unmeasured sizes are estimated from the nearest measured one with the prior shape ``1 + slope (n - 1)`` (a
    product of n rows against one), and the draft's pass, until measured, as ``draft_ratio`` of the model's.
    """

    slope: float = 0.1
    draft_ratio: float = 0.5
    weight: float = 0.3  # of each new measurement in the running averages
    model: dict[int, float] = field(default_factory=dict)
    draft: dict[int, float] = field(default_factory=dict)

    def observe_model(self, rows: int, seconds: float) -> None:
        self.model[rows] = _average(self.model.get(rows), seconds, self.weight)

    def observe_draft(self, rows: int, seconds: float) -> None:
        self.draft[rows] = _average(self.draft.get(rows), seconds, self.weight)

    def model_seconds(self, rows: int) -> float:
        """Measured or estimated seconds of a pass over ``rows`` rows (in units of one row when nothing is known)."""
        if rows in self.model:
            return self.model[rows]
        shape = 1 + self.slope * (rows - 1)
        if not self.model:
            return shape
        near = min(self.model, key=lambda measured: abs(measured - rows))
        return self.model[near] * shape / (1 + self.slope * (near - 1))

    def draft_seconds(self, rows: int) -> float:
        if rows in self.draft:
            return self.draft[rows]
        return self.draft_ratio * self.model_seconds(rows)


def _average(old: float | None, new: float, weight: float) -> float:
    return new if old is None else (1 - weight) * old + weight * new


def expected_tokens(rate: float, k: int) -> float:
    """Tokens a step yields with ``k`` proposed when each is accepted with probability ``rate`` (after the ones
    before it): 1 + rate + ... + rate^k."""
    if rate >= 1.0:
        return k + 1.0
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)


@dataclass
class Acceptance:
    """One row's recent acceptance: tokens accepted against the rejections that ended proposals, both decaying (recent
    proposals weigh most), from a prior of one each."""

    DECAY = 0.85  # per proposal

    hits: float = 1.0
    misses: float = 1.0

    @classmethod
    def expecting_a_draft(cls) -> Acceptance:
        """The prior for a draft model, chosen because it agrees with the model: 0.8. From the even prior a draft
        costing half a model step (an int8 copy of a 16-bit model) never looked worth proposing with, and the
        planner spent most of a short generation probing (1.15x in 96 tokens where always proposing gave 1.52x)."""
        return cls(hits=4.0, misses=1.0)

    @property
    def rate(self) -> float:
        return self.hits / (self.hits + self.misses)

    def record(self, proposed: int, accepted: int) -> None:
        """``proposed`` tokens were checked and ``accepted`` of them kept (0 proposed: nothing to learn)."""
        if proposed:
            self.hits = self.hits * self.DECAY + accepted
            self.misses = self.misses * self.DECAY + (1.0 if accepted < proposed else 0.0)


class Planner:
    """How many tokens to propose this step: the number that maximizes the batch's expected tokens per second.

    Each row's :class:`Acceptance` (``rows``) says how likely its next proposed token is to be accepted; a step
    proposing ``k`` costs a pass of ``k + 1`` tokens per row (and ``k`` draft passes) against a plain step's one.
    When no ``k`` beats plain decoding by ``MARGIN`` it proposes nothing, and after ``backoff`` such steps it probes
    with ``PROBE`` tokens, waiting twice as long after each probe that does not bring proposing back (up to
    ``MOST_BACKOFF`` steps), so a stretch that stops copying costs little and one that starts again is found.
    """

    MARGIN = 0.03
    PROBE = 2
    FIRST_BACKOFF = 8
    MOST_BACKOFF = 128

    def __init__(self, rows: int, most: int, costs: StepCosts, uses_draft: bool) -> None:
        self.most, self.costs, self.uses_draft = most, costs, uses_draft
        prior = Acceptance.expecting_a_draft if uses_draft else Acceptance
        self.rows = [prior() for _ in range(rows)]
        self.backoff, self.idle = self.FIRST_BACKOFF, 0

    def rate(self, slot: int) -> float:
        return self.rows[slot].rate

    def plan(self, available: list[int]) -> int:
        """``available[slot]``: how many tokens row ``slot`` could propose; the common cap on proposals (0: none)."""
        most = min(self.most, max(available, default=0))
        if most == 0:
            return 0
        rows = len(available)
        plain = self.costs.model_seconds(rows)
        best, best_value = 0, rows / plain * (1 + self.MARGIN)
        for k in range(1, most + 1):
            seconds = self.costs.model_seconds(rows * (k + 1))
            if self.uses_draft:
                seconds += k * self.costs.draft_seconds(rows)
            tokens = sum(expected_tokens(self.rate(s), min(k, a)) for s, a in enumerate(available))
            if tokens / seconds > best_value:
                best, best_value = k, tokens / seconds
        if best:
            self.backoff, self.idle = self.FIRST_BACKOFF, 0
            return best
        self.idle += 1
        if self.idle <= self.backoff:
            return 0
        self.idle, self.backoff = 0, min(2 * self.backoff, self.MOST_BACKOFF)
        return min(self.PROBE, most)

    def record(self, slot: int, proposed: int, accepted: int) -> None:
        """Row ``slot`` had ``proposed`` tokens checked and ``accepted`` of them kept."""
        self.rows[slot].record(proposed, accepted)

    def keep_rows(self, slots: list[int]) -> None:
        self.rows = [self.rows[s] for s in slots]


def stored_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one pass reads (every matrix once): the measure the draft's cost is first guessed from."""
    return sum(m.stored_bytes() for m in model.modules() if isinstance(m, PhiLinear))


class Clock:
    """Times a pass (``with clock: ...``) for :class:`StepCosts`; on a GPU it waits for the work first."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0

    def __enter__(self) -> Clock:
        if self.cuda:
            torch.cuda.synchronize()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.started


# One generate() call's speculation ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Proposal:
    """Tokens proposed to follow each row's last one: ``tokens`` (rows, k), of which row ``r`` proposes the first
    ``counts[r]`` (the rest are padding), and ``probs`` (rows, k, vocab), the distributions a sampling draft drew
    them from (None: proposed outright)."""

    tokens: torch.Tensor
    counts: torch.Tensor
    probs: torch.Tensor | None = None


class Speculator:
    """Speculation for the rows of one batch: the proposer (prompt lookup of up to ``lookup`` tokens, or ``draft``),
    the :class:`Planner` and its :class:`StepCosts`, and each row's :class:`RowStats` (``stats``, by prompt row).

    :mod:`phi_core.generation` calls :meth:`propose` before each pass, checks the proposal against the pass's
    logits, and reports what each row yielded to :meth:`accepted`.
    """

    def __init__(
        self, model: PhiForCausalLM, prompts: list[list[int]], room: int, lookup: int = 0, draft: Draft | None = None
    ) -> None:
        if (lookup > 0) == (draft is not None):
            raise ValueError("speculate with prompt lookup or with a draft model: exactly one")
        self.most = lookup if lookup > 0 else draft.tokens  # type: ignore[union-attr]
        self.lookup = PromptLookup(prompts) if lookup > 0 else None
        self.runner = None
        ratio = 0.0
        if draft is not None:
            self.runner = DraftRunner(draft, prompts, room + self.room, model.config.vocab_size)
            ratio = stored_bytes(draft.model) / max(1, stored_bytes(model))
        self.costs = StepCosts(draft_ratio=ratio)
        self.planner = Planner(len(prompts), self.most, self.costs, uses_draft=draft is not None)
        self.clock = Clock(model.device)
        self.rows = list(range(len(prompts)))
        self.stats = [RowStats() for _ in prompts]

    @property
    def room(self) -> int:
        """Cache columns a pass needs beyond plain decoding's one."""
        return self.most + 1

    def prefill(self) -> None:
        if self.runner is not None:
            self.runner.prefill()

    def propose(self, rooms: list[int], seen: torch.Tensor | None, pick: Pick) -> Proposal | None:
        """What to check in the next pass, or None for a plain step. ``rooms[slot]``: how many tokens row ``slot`` may
        still yield after the next one (its length limit); ``seen`` and ``pick`` as :meth:`DraftRunner.propose`."""
        candidates: list[list[int]] = []
        if self.lookup is not None:
            candidates = [self.lookup.propose(slot, min(self.most, room)) for slot, room in enumerate(rooms)]
            available = [len(c) for c in candidates]
        else:
            available = [max(0, min(self.most, room)) for room in rooms]
        k = self.planner.plan(available)
        if k == 0:
            return None
        counts = torch.tensor([min(k, a) for a in available])
        if self.runner is None:
            tokens = torch.zeros((len(rooms), k), dtype=torch.long)
            for slot, proposed in enumerate(candidates):
                tokens[slot, : counts[slot]] = torch.tensor(proposed[:k], dtype=torch.long)
            return Proposal(tokens, counts)
        with self.clock:
            tokens, probs = self.runner.propose(k, seen, pick)
        self.costs.observe_draft(len(rooms), self.clock.seconds / k)
        return Proposal(tokens.cpu(), counts, None if probs is None else probs.cpu())

    def observe(self, rows: int, seconds: float) -> None:
        """The model's pass over ``rows`` token rows took ``seconds``."""
        self.costs.observe_model(rows, seconds)

    def accepted(self, proposal: Proposal | None, accepted: list[int] | None, emitted: list[list[int]]) -> None:
        """After a pass: ``emitted[slot]``, the tokens row ``slot`` yielded (fewer than checked when it finished);
        ``accepted[slot]``, how many proposed tokens it kept (None without a proposal)."""
        for slot, tokens in enumerate(emitted):
            if self.lookup is not None:
                self.lookup.extend(slot, tokens)
            if proposal is None or accepted is None:
                continue
            count, kept = int(proposal.counts[slot]), accepted[slot]
            self.planner.record(slot, count, kept)
            if count:
                stats = self.stats[self.rows[slot]]
                stats.proposed += count
                stats.accepted += min(kept, len(tokens))
                stats.passes += 1
        if self.runner is not None:
            self.runner.accepted(emitted, accepted if proposal is not None else None)

    def keep_rows(self, slots: list[int], index: torch.Tensor) -> None:
        """Keep only the rows at ``slots`` (``index``: the same as a tensor)."""
        self.rows = [self.rows[s] for s in slots]
        self.planner.keep_rows(slots)
        if self.lookup is not None:
            self.lookup.keep_rows(slots)
        if self.runner is not None:
            self.runner.keep_rows(slots, index)
