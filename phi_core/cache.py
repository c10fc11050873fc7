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
        return self.written(layer, new)

    def slots(self, layer: int, new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value tensors of ``layer``, for a writer that puts ``new`` positions at ``length`` on
        itself (then :meth:`written` gives what :meth:`update` returns); raises if they would not fit."""
        if self.length + new > self.max_length:
            raise PhiError(f"KV cache holds {self.max_length} positions; {self.length + new} were asked for")
        return self.keys[layer], self.values[layer]

    def written(self, layer: int, new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All keys and values of ``layer`` up to ``length + new`` (after a write of ``new`` positions)."""
        end = self.length + new
        return self.keys[layer].narrow(2, 0, end), self.values[layer].narrow(2, 0, end)

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

    def gather_columns(self, columns: torch.Tensor) -> None:
        """Row ``r``'s written columns ``columns[r]`` (a (rows, width) index tensor), in that order, become its first
        ``width`` columns, and ``length`` becomes ``width`` (speculative decoding closes the holes rejected tokens
        left; see :class:`phi_core.speculative.RowCache`)."""
        width = columns.shape[1]
        if width > self.length or (width and int(columns.max()) >= self.length):
            raise PhiError(f"KV cache holds {self.length} positions; cannot gather columns beyond them")
        for stored in (*self.keys, *self.values):
            index = columns[:, None, :, None].expand(-1, stored.shape[1], -1, stored.shape[3])
            stored[:, :, :width] = stored.gather(2, index)
        self.length = width

    # Continuous batching (phi_core.engine): rows come and go while the batch keeps one common length.
    @classmethod
    def wrapping(cls, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> KVCache:
        """A cache over existing per-layer tensors (no copy), ``length`` positions of them already written."""
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.length = keys, values, length
        return cache

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    def first_rows(self, count: int) -> KVCache:
        """The first ``count`` rows as a cache of their own that shares this one's tensors: what the model writes
        through it lands here (its ``length`` is its own)."""
        return KVCache.wrapping(
            [k.narrow(0, 0, count) for k in self.keys], [v.narrow(0, 0, count) for v in self.values], self.length
        )

    def write_row(self, row: int, source: KVCache, column: int, source_row: int = 0) -> None:
        """Copy the ``source.length`` written positions of ``source``'s row ``source_row`` into row ``row`` of this
        cache, at columns ``column`` on (``source`` may be this cache: another row moves into ``row``)."""
        count = source.length
        if column < 0 or column + count > self.max_length:
            raise PhiError(f"KV cache holds {self.max_length} positions; {column + count} were asked for")
        for stored, given in ((self.keys, source.keys), (self.values, source.values)):
            for mine, theirs in zip(stored, given, strict=True):
                mine[row, :, column : column + count].copy_(theirs[source_row, :, :count])

    def shift(self, rows: int, by: int) -> None:
        """Move the written positions of the first ``rows`` rows ``by`` columns right (their left padding grows) or,
        negative, left (the first ``-by`` columns are dropped), in place; ``length`` moves with them. Columns left
        behind keep their old (finite) values: the caller's attention mask hides them."""
        length = self.length + by
        if not 0 <= length <= self.max_length:
            raise PhiError(f"KV cache holds {self.max_length} positions; {length} were asked for")
        start, count = max(0, -by), min(self.length, length)
        if rows and count:
            for stored in (*self.keys, *self.values):
                stored[:rows, :, max(0, by) : max(0, by) + count] = stored[:rows, :, start : start + count].clone()
        self.length = length

    def resized(self, rows: int, max_length: int) -> KVCache:
        """A new cache of ``rows`` rows and ``max_length`` positions holding this one's first rows and length; the
        rest is zero (masked keys must be finite)."""
        keep = min(rows, self.rows)
        if self.length > max_length:
            raise PhiError(f"a KV cache of {max_length} positions cannot hold {self.length}")
        shape = (rows, self.keys[0].shape[1], max_length, self.keys[0].shape[3])
        moved = []
        for stored in (self.keys, self.values):
            fresh = [torch.zeros(shape, dtype=s.dtype, device=s.device) for s in stored]
            for new, old in zip(fresh, stored, strict=True):
                new[:keep, :, : self.length].copy_(old[:keep, :, : self.length])
            moved.append(fresh)
        return KVCache.wrapping(moved[0], moved[1], self.length)
