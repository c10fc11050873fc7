"""A preallocated key/value cache: one tensor pair for all layers, written in place, never reallocated."""

from __future__ import annotations

import torch

from phi_core.config import PhiConfig
from phi_core.errors import PhiError


class KVCache:
    """Keys and values of every layer, shaped (layers, batch, kv_heads, max_length, head_dim).

    ``length`` counts the positions already written. The model writes a forward pass's new keys and values
    through :meth:`update` and then moves ``length`` on with :meth:`advance`, so attention code never sees
    the storage.
    """

    def __init__(
        self,
        config: PhiConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new (batch, kv_heads, new, head_dim) keys/values after ``length``; return all stored so far."""
        end = self.length + keys.shape[2]
        if end > self.max_length:
            raise PhiError(f"KV cache holds {self.max_length} positions; {end} were asked for")
        self.keys[layer, :, :, self.length : end] = keys
        self.values[layer, :, :, self.length : end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, count: int) -> None:
        """Mark ``count`` more positions as written (called once per forward pass, after every layer)."""
        self.length += count

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (a 1-D index tensor), so finished sequences stop costing compute."""
        self.keys = self.keys.index_select(1, rows)
        self.values = self.values.index_select(1, rows)
