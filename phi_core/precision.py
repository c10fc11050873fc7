"""Which numbers a model holds and computes with: ``--dtype`` resolved against the device and the checkpoint.

On a CPU the weights' storage is separate from the compute dtype: 16-bit and int8 weights are multiplied by
fbgemm's kernels with float32 activations (see :mod:`phi_core.linear` for the measurements), so every matrix is
read at half or a quarter of float32's bytes while LayerNorm, attention, the KV cache and the logits stay
float32. On a GPU the weights and the compute share one dtype, as usual.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from phi_core.errors import PhiError
from phi_core.linear import WeightFormat, packed_formats_available

DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16", "int8")
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """The resolved choice. ``weights`` names the values the matrices hold, ``weight_format`` their storage."""

    requested: str
    compute: torch.dtype
    weights: str
    weight_format: WeightFormat
    embedding: torch.dtype

    def describe(self) -> str:
        """One line for ``--stats``: what was picked, and how it runs."""
        compute = dtype_name(self.compute)
        if self.weight_format == "dense":
            text = f"{self.weights} weights and compute"
        elif self.weight_format == "float16":
            held = "" if self.weights == "float16" else ", held as float16"
            text = f"{self.weights} weights{held} (fbgemm packed), {compute} compute"
        else:
            text = f"int8 weights (fbgemm packed, a scale per row, activations quantized per call), {compute} compute"
        return f"auto: {text}" if self.requested == "auto" else text

    def round_to(self) -> torch.dtype | None:
        """The dtype packed weights are rounded to before packing (bfloat16 models keep bfloat16 values)."""
        return torch.bfloat16 if self.weights == "bfloat16" and self.weight_format == "float16" else None

    def staging(self, checkpoint_dtype: torch.dtype) -> torch.dtype:
        """The dtype matrices are held in between reading and packing (half of float32's memory for 16 bits)."""
        if self.weight_format == "dense":
            return self.compute
        if self.weights in FLOAT_DTYPES:
            return FLOAT_DTYPES[self.weights]
        return checkpoint_dtype if checkpoint_dtype != torch.float32 else torch.bfloat16


def unpacked(dtype: torch.dtype, requested: str | None = None) -> Precision:
    """Weights and compute both in ``dtype`` (float32 on CPU by default; any dtype on a GPU)."""
    name = dtype_name(dtype)
    return Precision(requested or name, dtype, name, "dense", dtype)


def choose_precision(
    requested: str | torch.dtype, device: torch.device | str, checkpoint_dtype: torch.dtype = torch.float32
) -> Precision:
    """Resolve ``requested`` (one of :data:`DTYPE_CHOICES` or a torch dtype) for ``device``.

    ``auto`` keeps the checkpoint's own precision (nothing is rounded away) in the fastest form for the device:
    a 16-bit checkpoint on a CPU gets 16-bit packed weights with float32 compute, a float32 one stays float32.
    """
    if isinstance(requested, torch.dtype):
        requested = dtype_name(requested)
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {requested!r} (choose one of {', '.join(DTYPE_CHOICES)})")
    on_cpu = torch.device(device).type == "cpu"
    packable = on_cpu and packed_formats_available()
    wanted = requested
    if requested == "auto":
        wanted = dtype_name(checkpoint_dtype) if checkpoint_dtype in FLOAT_DTYPES.values() else "float32"
    if wanted == "int8":
        if not packable:
            raise PhiError("--dtype int8 runs on a CPU with fbgemm only (use float16 or bfloat16 on a GPU)")
        return Precision(requested, torch.float32, "int8", "int8", torch.float16)
    dtype = FLOAT_DTYPES[wanted]
    if dtype == torch.float32 or not packable:
        return unpacked(dtype, requested)
    return Precision(requested, torch.float32, wanted, "float16", dtype)


def checkpoint_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The floating dtype most of a checkpoint's tensors are stored in (float32 if it has none)."""
    counts = Counter(t.dtype for t in tensors if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")
