"""Partial rotary position embeddings, rotate-half (GPT-NeoX) convention, with linear and dynamic NTK scaling.

Only the first ``rotary_dim`` channels of each query/key head rotate; the rest pass through. Angles are computed
in fp32 from integer positions, and the rotation itself runs in fp32, as Microsoft's remote code does.
"""

from __future__ import annotations

import functools

import torch

from phi_core.config import PhiConfig


def inverse_frequencies(config: PhiConfig, seq_len: int, device: torch.device | str) -> torch.Tensor:
    """The ``rotary_dim / 2`` inverse frequencies for a sequence of ``seq_len`` positions."""
    base = config.rope_theta
    scaling = config.rope_scaling
    if scaling is not None and scaling.kind == "dynamic" and seq_len > config.max_position_embeddings:
        # NTK-aware: raise the base so the lowest frequency still spans the longer sequence.
        stretch = scaling.factor * seq_len / config.max_position_embeddings - (scaling.factor - 1)
        base = base * stretch ** (config.rotary_dim / (config.rotary_dim - 2))
    linear = scaling.factor if scaling is not None and scaling.kind == "linear" else 1.0
    return _inverse_frequencies(config.rotary_dim, base, linear, str(device))


@functools.lru_cache(maxsize=64)
def _inverse_frequencies(dim: int, base: float, linear_factor: float, device: str) -> torch.Tensor:
    # Cached: a decode step would otherwise rebuild the same few numbers on every call.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base**exponents) / linear_factor


def rotary_angles(config: PhiConfig, positions: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (batch, 1, seq, rotary_dim), fp32, for integer ``positions`` of shape (batch, seq).

    ``seq_len`` is the length the sequence has reached (dynamic scaling depends on it).
    """
    inv_freq = inverse_frequencies(config, seq_len, positions.device)
    freqs = positions[:, None, :, None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` (batch, heads, seq, head_dim)."""
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    rot = rot * cos + rotated_half * sin
    return torch.cat((rot.to(x.dtype), rest), dim=-1)
