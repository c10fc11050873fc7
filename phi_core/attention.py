"""Attention backends, chosen explicitly by name: ``eager``, ``sdpa`` and ``flash_attention_2``.

Each backend takes queries (batch, heads, new, head_dim), keys and values (batch, kv_heads, total, head_dim)
and an :class:`AttentionMask`, and returns (batch, new, heads * head_dim). A backend that cannot run with the
requested device and dtype is an error at load time, never a silent fallback.

On a CPU, an inference model computing in float32 serves ``sdpa`` with phi_core's compiled attention
(:meth:`phi_core.kernels.Kernels.attention`, bound by ``PhiPreTrained.use_cpu_kernels``): the same causal and
padding masks, 2-3x torch's CPU flash attention on prompt pieces and without its ~40 us a call when decoding.
:func:`sdpa_attention` below serves everything else.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from phi_core.errors import BackendUnavailableError
from phi_core.precision import dtype_name

ATTENTION_BACKENDS = ("eager", "sdpa", "flash_attention_2")


@dataclass
class AttentionMask:
    """Which keys each query may see, built once per forward pass and shared by every layer.

    ``key_valid`` (batch, total) marks real tokens (None: all real); queries are the last ``new`` positions of
    ``total``. Causality is implied. A padding query still sees itself, so no softmax row is empty.
    """

    key_valid: torch.Tensor | None
    new: int
    total: int
    device: torch.device

    @property
    def past(self) -> int:
        return self.total - self.new

    @cached_property
    def allowed(self) -> torch.Tensor:
        """Dense boolean mask (batch or 1, 1, new, total)."""
        if self.key_valid is not None and self.new == 1:
            # One new token may see every real key: the padding mask itself is the answer (a view, no copy).
            return self.key_valid[:, None, None, :]
        query_pos = torch.arange(self.past, self.total, device=self.device)[:, None]
        key_pos = torch.arange(self.total, device=self.device)[None, :]
        causal = key_pos <= query_pos
        if self.key_valid is None:
            return causal[None, None]
        return (causal & self.key_valid[:, None, None, :]) | (key_pos == query_pos)


def check_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise :class:`BackendUnavailableError` unless backend ``name`` can run on ``device`` in ``dtype``."""
    if name not in ATTENTION_BACKENDS:
        raise BackendUnavailableError(
            f"unknown attention backend {name!r} (choose one of {', '.join(ATTENTION_BACKENDS)})"
        )
    if name != "flash_attention_2":
        return
    if torch.device(device).type != "cuda":
        raise BackendUnavailableError(f"flash_attention_2 needs a CUDA device, not {torch.device(device).type}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise BackendUnavailableError(f"flash_attention_2 runs in float16 or bfloat16, not {dtype_name(dtype)}")
    if importlib.util.find_spec("flash_attn") is None:
        raise BackendUnavailableError(
            "flash_attention_2 needs the flash-attn package: pip install 'phi-toolkit[flash]'"
        )


def attention_function(name: str) -> Callable[..., torch.Tensor]:
    """The function implementing backend ``name`` (call :func:`check_backend` first)."""
    return {"eager": eager_attention, "sdpa": sdpa_attention, "flash_attention_2": flash_attention}[name]


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Plain matmul + softmax. q and k are multiplied in fp32 because Phi-2's scores overflow fp16."""
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask.key_valid is not None or mask.new > 1:
        scores = scores.masked_fill(~mask.allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return _merge_heads(torch.matmul(probs, v))


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``, with its causal fast path when nothing is padded."""
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    if mask.key_valid is None and (mask.new == 1 or mask.past == 0):
        # One new token sees everything; a fresh unpadded prompt is plain causal.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=mask.new > 1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed)
    return _merge_heads(out)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """flash-attn 2. Padded batches take the unpadded (varlen) kernel, so no work is spent on padding."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # flash-attn wants (batch, seq, heads, dim)
    batch, new, heads, dim = q.shape
    if mask.key_valid is None:
        # flash-attn aligns the causal mask bottom-right, which is what a query block after a cache needs.
        return flash_attn_func(q, k, v, causal=True).reshape(batch, new, heads * dim)
    query_valid = mask.key_valid[:, mask.past :]
    q_index, q_starts, q_max = _unpad_index(query_valid)
    k_index, k_starts, k_max = _unpad_index(mask.key_valid)
    packed = flash_attn_varlen_func(
        q.reshape(-1, heads, dim)[q_index],
        k.reshape(-1, k.shape[2], dim)[k_index],
        v.reshape(-1, v.shape[2], dim)[k_index],
        cu_seqlens_q=q_starts,
        cu_seqlens_k=k_starts,
        max_seqlen_q=q_max,
        max_seqlen_k=k_max,
        causal=True,
    )
    out = q.new_zeros(batch * new, heads, dim)
    out[q_index] = packed
    return out.reshape(batch, new, heads * dim)


def _unpad_index(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat indices of the valid positions, cumulative row lengths (int32, leading 0) and the longest row."""
    lengths = valid.sum(dim=1, dtype=torch.int32)
    starts = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    return valid.flatten().nonzero().flatten(), starts, int(lengths.max())


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat each key/value head for its group of query heads (query head j uses kv head j // group)."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, new, dim = x.shape
    return x.transpose(1, 2).reshape(batch, new, heads * dim)
