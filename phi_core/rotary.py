"""Partial rotary position embeddings, rotate-half (GPT-NeoX) convention, with linear and dynamic NTK scaling.

Only the first ``rotary_dim`` channels of each query/key head rotate; the rest pass through. Angles are computed
in fp32 from integer positions, and the rotation itself runs in fp32, as Microsoft's remote code does.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from phi_core.config import PhiConfig


def _base_and_factor(config: PhiConfig, seq_len: int) -> tuple[float, float]:
    base = config.rope_theta
    scaling = config.rope_scaling
    if scaling is not None and scaling.kind == "dynamic" and seq_len > config.max_position_embeddings:
        # NTK-aware: raise the base so the lowest frequency still spans the longer sequence.
        stretch = scaling.factor * seq_len / config.max_position_embeddings - (scaling.factor - 1)
        base = base * stretch ** (config.rotary_dim / (config.rotary_dim - 2))
    linear = scaling.factor if scaling is not None and scaling.kind == "linear" else 1.0
    return base, linear


@functools.lru_cache(maxsize=64)
def _head_tables(
    rotary_dim: int, head_dim: int, base: float, linear_factor: float, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel of a head: frequency and sign of the sine term.

    Cached: a decode step would otherwise rebuild the same few numbers on every call.
    """
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    inv_freq = 1.0 / (base**exponents) / linear_factor
    half, rest = rotary_dim // 2, head_dim - rotary_dim
    zeros = inv_freq.new_zeros(rest)
    frequencies = torch.cat((inv_freq, inv_freq, zeros))
    signs = torch.cat((-inv_freq.new_ones(half), inv_freq.new_ones(half), zeros))
    return frequencies, signs


class Rotation(NamedTuple):
    """Everything a decoder layer needs to rotate its queries and keys, built once per forward pass.

    Rotate-half is written as ``x * cos`` over the whole head plus each half of the rotary channels times the
    other half's ``sin`` (which carries the sign); channels that do not rotate get cos 1. Three operations per
    tensor instead of a dozen slices and concatenations, which is what a decode step with one token per row is
    made of, and no gather along the channels (an ``index_select`` over them cost 1.1 ms per layer for a 256-token
    piece of prompt at phi-1.5's shape, the two in-place products 0.1 ms).
    """

    cos: torch.Tensor  # (batch, seq, 1, head_dim), fp32: broadcasts over the heads of (batch, seq, heads, dim)
    sin: torch.Tensor
    rotary_dim: int


def rotary_angles(config: PhiConfig, positions: torch.Tensor, seq_len: int) -> Rotation:
    """The rotation for integer ``positions`` of shape (batch, seq).

    ``seq_len`` is the length the sequence has reached (dynamic scaling depends on it).
    """
    base, linear = _base_and_factor(config, seq_len)
    frequencies, signs = _head_tables(config.rotary_dim, config.head_dim, base, linear, str(positions.device))
    # Channels that do not rotate have frequency 0: cos 1, so they pass through unchanged.
    angles = positions[:, :, None, None].float() * frequencies
    return Rotation(angles.cos(), angles.sin() * signs, config.rotary_dim)


def apply_rotary(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Rotate the rotary channels of ``x`` (batch, seq, heads, head_dim), in fp32; the rest pass through exactly."""
    rot = x.float()
    half, end = rotation.rotary_dim // 2, rotation.rotary_dim
    rotated = rot * rotation.cos
    rotated[..., :half].addcmul_(rot[..., half:end], rotation.sin[..., :half])
    rotated[..., half:end].addcmul_(rot[..., :half], rotation.sin[..., half:end])
    return rotated.to(x.dtype)
