"""A slow, exact stand-in for the flash-attn 2 package, written from its documented semantics, so phi_core's
packing, unpacking and cache logic around the kernel runs on a CPU. Only the kernel itself stays untested here.

Documented semantics followed (flash_attn_interface docstrings):
- ``flash_attn_func(q, k, v, causal=...)``: q (batch, seqlen_q, heads, dim), k and v (batch, seqlen_k, kv_heads,
  dim) with ``heads % kv_heads == 0`` (MQA/GQA: query head h reads kv head ``h // (heads // kv_heads)``).
- ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=...)``: the
  sequences packed along the first axis, ``cu_seqlens`` int32 cumulative lengths starting at 0.
- The causal mask is aligned to the bottom-right corner: query i of a sequence with seqlen_q queries and seqlen_k
  keys sees key j iff ``j <= i + seqlen_k - seqlen_q``; a query that sees no key gets zeros.
"""

from __future__ import annotations

import math
import types

import torch

calls: list[str] = []  # which entry points ran, so a test can tell the varlen path was taken


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None) -> torch.Tensor:
    """One sequence: q (seqlen_q, heads, dim), k and v (seqlen_k, kv_heads, dim)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    assert heads % kv_heads == 0, "heads must be a multiple of kv_heads"
    group = heads // kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    seqlen_q, seqlen_k = q.shape[0], k.shape[0]
    if causal:
        query = torch.arange(seqlen_q)[:, None]
        key = torch.arange(seqlen_k)[None, :]
        scores = scores.masked_fill(key > query + seqlen_k - seqlen_q, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key is all -inf: zeros
    return torch.einsum("hqk,khd->qhd", probs, v.double()).to(q.dtype)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    assert q.dtype == k.dtype == v.dtype, "q, k and v must share a dtype"
    assert k.shape == v.shape, "k and v must have the same shape"
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.stride(-1) == 1, f"{name} must be contiguous in its last dimension"


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **unused):
    calls.append("flash_attn_func")
    _check_inputs(q, k, v)
    assert q.dim() == 4 and q.shape[0] == k.shape[0] and q.shape[-1] == k.shape[-1]
    return torch.stack([_attend(q[b], k[b], v[b], causal, softmax_scale) for b in range(q.shape[0])])


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, **unused,
):  # fmt: skip
    calls.append("flash_attn_varlen_func")
    _check_inputs(q, k, v)
    for name, cu, total, longest in (
        ("q", cu_seqlens_q, q.shape[0], max_seqlen_q),
        ("k", cu_seqlens_k, k.shape[0], max_seqlen_k),
    ):
        assert cu.dtype == torch.int32, f"cu_seqlens_{name} must be int32"
        assert int(cu[0]) == 0 and int(cu[-1]) == total, f"cu_seqlens_{name} must run from 0 to the packed length"
        assert int((cu[1:] - cu[:-1]).max()) == longest, f"max_seqlen_{name} must be the longest sequence"
    assert len(cu_seqlens_q) == len(cu_seqlens_k), "one (q, k) pair of lengths per sequence"
    out = torch.empty_like(q)
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        out[qs:qe] = _attend(q[qs:qe], k[ks:ke], v[ks:ke], causal, softmax_scale)
    return out


def as_module() -> types.ModuleType:
    """This stand-in as a module named ``flash_attn``."""
    module = types.ModuleType("flash_attn")
    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module
