"""Sequence classification: one label distribution per text, read at each text's last real token."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from phi_core.batching import batches, left_pad
from phi_core.config import PhiConfig
from phi_core.errors import PhiError
from phi_core.model import PhiForSequenceClassification
from phi_core.tokenizer import PhiTokenizer

ScoreFunction = Literal["softmax", "sigmoid", "none"]


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class Classification:
    """All labels of one text, best first."""

    index: int
    text: str
    scores: list[LabelScore]

    @property
    def top(self) -> LabelScore:
        return self.scores[0]


def default_function(config: PhiConfig) -> ScoreFunction:
    """softmax for single-label, sigmoid for multi-label, the raw value for regression (one label)."""
    if config.problem_type == "multi_label_classification":
        return "sigmoid"
    if config.problem_type == "regression" or config.num_labels == 1:
        return "none"
    return "softmax"


def encode_texts(
    tokenizer: PhiTokenizer, texts: Sequence[str], context: int, truncate: bool, start: int = 0
) -> list[list[int]]:
    """Token ids of each text, cut to ``context`` tokens when ``truncate``; otherwise too long is an error."""
    rows = []
    for offset, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if not ids:
            raise PhiError(f"text {start + offset + 1} is empty")
        if len(ids) > context:
            if not truncate:
                raise PhiError(
                    f"text {start + offset + 1} has {len(ids)} tokens; the model's context is {context} "
                    "(use --truncate to cut it)"
                )
            ids = ids[:context]
        rows.append(ids)
    return rows


def classify(
    model: PhiForSequenceClassification,
    tokenizer: PhiTokenizer,
    texts: Sequence[str],
    batch_size: int = 8,
    function: ScoreFunction | None = None,
    truncate: bool = False,
) -> Iterator[Classification]:
    """Classify ``texts`` in batches; yields one :class:`Classification` per text, in order."""
    function = function or default_function(model.config)
    labels = model.config.id2label
    device = model.device
    for chunk in batches(len(texts), batch_size):
        rows = encode_texts(
            tokenizer, [texts[i] for i in chunk], model.config.max_position_embeddings, truncate, chunk.start
        )
        ids, mask = left_pad(rows)
        with torch.no_grad():
            logits = model(ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        for index, row in zip(chunk, scores_of(logits, function), strict=True):
            ranked = sorted(range(len(row)), key=lambda j: -row[j])
            yield Classification(index, texts[index], [LabelScore(labels[j], row[j]) for j in ranked])


def scores_of(logits: torch.Tensor, function: ScoreFunction) -> list[list[float]]:
    if function == "softmax":
        return torch.softmax(logits, dim=-1).tolist()
    if function == "sigmoid":
        return torch.sigmoid(logits).tolist()
    return logits.tolist()
