"""Token classification with character offsets, and word/entity aggregation that knows real word boundaries.

A word is a piece of the tokenizer's own pre-tokenizer (byte-level BPE splits before merging), with its
leading whitespace left out of the span; transformers falls back to guessing words from spaces for this
tokenizer. Aggregation follows transformers' token-classification pipeline: ``simple`` merges runs of tokens
of one entity type (``B-X`` starts a new run, ``I-X`` or a bare ``X`` continues one); ``first``, ``average``
and ``max`` first give each word one label from its tokens, then merge runs of words the same way.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from phi_core.batching import batches, left_pad
from phi_core.classify import encode_texts
from phi_core.model import PhiForTokenClassification
from phi_core.tokenizer import PhiTokenizer

Aggregation = Literal["none", "simple", "first", "average", "max"]
AGGREGATIONS: tuple[Aggregation, ...] = ("none", "simple", "first", "average", "max")


@dataclass(frozen=True)
class Span:
    """A labelled piece of the text: ``text == source[start:end]``."""

    start: int
    end: int
    text: str
    label: str
    score: float


@dataclass(frozen=True)
class TaggedText:
    index: int
    text: str
    spans: list[Span]


@dataclass(frozen=True)
class _Token:
    start: int  # first non-space character (whitespace-only tokens keep their whole span)
    end: int
    probs: torch.Tensor  # (num_labels,)
    word: int | None  # index into the text's words; None for whitespace


def tag(
    model: PhiForTokenClassification,
    tokenizer: PhiTokenizer,
    texts: Sequence[str],
    aggregate: Aggregation = "simple",
    ignore_labels: Sequence[str] = ("O",),
    batch_size: int = 8,
    truncate: bool = False,
) -> Iterator[TaggedText]:
    """Label the tokens (or words, or entities) of each text; yields one :class:`TaggedText` per text."""
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregate!r} (choose one of {', '.join(AGGREGATIONS)})")
    labels = model.config.id2label
    device = model.device
    for chunk in batches(len(texts), batch_size):
        chunk_texts = [texts[i] for i in chunk]
        rows = encode_texts(tokenizer, chunk_texts, model.config.max_position_embeddings, truncate, chunk.start)
        ids, mask = left_pad(rows)
        with torch.no_grad():
            probs = torch.softmax(model(ids.to(device), attention_mask=mask.to(device)).logits.float(), -1).cpu()
        for row, (index, text) in enumerate(zip(chunk, chunk_texts, strict=True)):
            row_probs = probs[row, ids.shape[1] - len(rows[row]) :]
            tokens = _tokens(tokenizer, text, len(rows[row]), row_probs)
            spans = aggregate_tokens(text, tokens, labels, aggregate)
            yield TaggedText(index, text, [s for s in spans if s.label not in ignore_labels])


def word_spans(tokenizer: PhiTokenizer, text: str) -> list[tuple[int, int]]:
    """(start, end) of each word: the pre-tokenizer's pieces, leading whitespace excluded, blanks dropped."""
    spans = []
    for _, (start, end) in tokenizer.backend.pre_tokenizer.pre_tokenize_str(text):
        piece = text[start:end]
        stripped = piece.lstrip()
        if stripped:
            spans.append((start + len(piece) - len(stripped), end))
    return spans


def _tokens(tokenizer: PhiTokenizer, text: str, count: int, probs: torch.Tensor) -> list[_Token]:
    offsets = tokenizer.backend.encode(text, add_special_tokens=False).offsets[:count]
    words = word_spans(tokenizer, text)
    starts = [start for start, _ in words]
    tokens = []
    for (begin, end), token_probs in zip(offsets, probs, strict=True):
        piece = text[begin:end]
        first = begin + len(piece) - len(piece.lstrip())
        if first >= end:
            tokens.append(_Token(begin, end, token_probs, None))
            continue
        word = bisect.bisect_right(starts, first) - 1
        tokens.append(_Token(first, end, token_probs, word if word >= 0 and first < words[word][1] else None))
    return tokens


def aggregate_tokens(text: str, tokens: list[_Token], labels: dict[int, str], strategy: Aggregation) -> list[Span]:
    """Turn per-token probabilities into spans by ``strategy`` (see the module docstring)."""
    if strategy == "none":
        return [_span(text, t.start, t.end, labels[int(t.probs.argmax())], float(t.probs.max())) for t in tokens]
    if strategy == "simple":
        units = [_span(text, t.start, t.end, labels[int(t.probs.argmax())], float(t.probs.max())) for t in tokens]
    else:
        units = _words(text, tokens, labels, strategy)
    return group_entities(text, units)


def _words(text: str, tokens: list[_Token], labels: dict[int, str], strategy: Aggregation) -> list[Span]:
    grouped: dict[int, list[_Token]] = {}
    for token in tokens:
        if token.word is not None:
            grouped.setdefault(token.word, []).append(token)
    spans = []
    for members in grouped.values():
        if strategy == "first":
            probs = members[0].probs
        elif strategy == "average":
            probs = torch.stack([t.probs for t in members]).mean(dim=0)
        else:  # max: the label of the single most confident token
            probs = max(members, key=lambda t: float(t.probs.max())).probs
        start, end = members[0].start, max(t.end for t in members)
        spans.append(_span(text, start, end, labels[int(probs.argmax())], float(probs.max())))
    return spans


def group_entities(text: str, units: list[Span]) -> list[Span]:
    """Merge consecutive units of one entity type; the group's score is the mean of its units' scores."""
    groups: list[list[Span]] = []
    previous_type = None
    for unit in units:
        tag, entity_type = _bio(unit.label)
        if groups and tag == "I" and entity_type == previous_type:
            groups[-1].append(unit)
        else:
            groups.append([unit])
        previous_type = entity_type
    return [
        _span(text, group[0].start, group[-1].end, _bio(group[0].label)[1], sum(u.score for u in group) / len(group))
        for group in groups
    ]


def _bio(label: str) -> tuple[str, str]:
    """("B" or "I", entity type); a label with no B-/I- prefix continues a run of itself."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def _span(text: str, start: int, end: int, label: str, score: float) -> Span:
    return Span(start, end, text[start:end], label, score)
