"""A preallocated key/value cache: a tensor pair per layer, written in place, never reallocated."""

from __future__ import annotations

import torch

from phi_core.config import PhiConfig
from phi_core.errors import PhiError


class KVCache:
    """Keys and values of every layer: per layer a (batch, kv_heads, max_length, head_dim) tensor each.

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
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        layers = range(config.num_hidden_layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new (batch, kv_heads, new, head_dim) keys/values after ``length``; return all stored so far."""
        new = keys.shape[2]
        end = self.length + new
        if end > self.max_length:
            raise PhiError(f"KV cache holds {self.max_length} positions; {end} were asked for")
        stored_keys, stored_values = self.keys[layer], self.values[layer]
        stored_keys.narrow(2, self.length, new).copy_(keys)
        stored_values.narrow(2, self.length, new).copy_(values)
        return stored_keys.narrow(2, 0, end), stored_values.narrow(2, 0, end)

    def advance(self, count: int) -> None:
        """Mark ``count`` more positions as written (called once per forward pass, after every layer)."""
        self.length += count

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (a conversation rewinds to the prefix its next turn shares)."""
        if not 0 <= length <= self.length:
            raise PhiError(f"KV cache holds {self.length} positions; cannot rewind to {length}")
        self.length = length

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (a 1-D index tensor), so finished sequences stop costing compute."""
        self.keys = [stored.index_select(0, rows) for stored in self.keys]
        self.values = [stored.index_select(0, rows) for stored in self.values]
