"""Padding token-id rows into one batch: left-padded, with the attention mask that says which ids are real.

The pad id never matters: positions, attention and pooling all follow the mask.
"""

from __future__ import annotations

import torch

PAD_ID = 0


def left_pad(rows: list[list[int]], extra_columns: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) for ``rows``: ids (batch, longest) and a boolean mask (batch, longest + extra_columns) whose
    extra columns start False (room for tokens generated later)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width + extra_columns), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) : width] = True
    return ids, mask


def batches(count: int, batch_size: int) -> list[range]:
    """Index ranges of consecutive batches of at most ``batch_size`` items."""
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
