"""Which numbers a model holds and computes with: ``--dtype`` resolved against the device and the checkpoint.

On a CPU the weights' storage is separate from the compute dtype: 16-bit, int8 and int4 weights are multiplied by
phi_core's compiled kernels (or, without a compiler, fbgemm's) with float32 activations (see
:mod:`phi_core.kernels` and :mod:`phi_core.linear`), so every matrix is read at a half, a quarter or an eighth of
float32's bytes while LayerNorm, attention, the KV cache and the logits stay float32. On a GPU the weights and the
compute share one dtype, as usual.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from phi_core import kernels as compiled
from phi_core import linear
from phi_core.errors import PhiError
from phi_core.linear import WeightFormat, packed_formats_available

DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16", "int8", "int4")
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTIZED = ("int8", "int4")


@dataclass(frozen=True)
class Precision:
    """The resolved choice. ``weights`` names the values the matrices hold, ``weight_format`` their storage, and
    ``choice`` the products that serve them on this CPU (None on a GPU, where torch's own serve)."""

    requested: str
    compute: torch.dtype
    weights: str
    weight_format: WeightFormat
    embedding: torch.dtype
    choice: compiled.Choice | None = None
    group: int = 0  # int4: inputs per scale

    def describe(self) -> str:
        """One line for ``--stats``: what was picked, and which products run it."""
        compute = dtype_name(self.compute)
        fmt = self.weight_format
        if fmt == "dense":
            text = f"{self.weights} weights and compute"
        elif fmt == "fbgemm-fp16":
            held = "" if self.weights == "float16" else ", held as float16"
            text = f"{self.weights} weights{held} (fbgemm packed), {compute} compute"
        elif fmt == "fbgemm-int8":
            text = f"int8 weights (fbgemm packed, a scale per row, activations quantized per call), {compute} compute"
        elif fmt == "tiles-int8":
            text = f"int8 weights (a scale per row, activations quantized per call), {compute} compute"
        elif fmt == "tiles-int4":
            text = (
                f"int4 weights (a float16 scale per {self.group} inputs, activations quantized per call), "
                f"{compute} compute"
            )
        elif self.rounded_activations() is not None:
            rounded = dtype_name(self.rounded_activations())
            text = f"{self.weights} weights (prompts' activations rounded to {rounded}), {compute} compute"
        else:
            text = f"{self.weights} weights, {compute} compute"
        if self.choice is not None and (fmt != "dense" or self.choice.few != "torch"):
            text += f"; {self.kernel_text()}"
        return f"auto: {text}" if self.requested == "auto" else text

    def kernel_text(self) -> str:
        """Which products serve the matrices: ``phi avx512 bf16`` or ``phi avx512 f32 up to 16 rows, torch mkl
        beyond`` (small matrices, which stay dense float32, use torch's)."""
        if self.choice is None:
            return "torch"
        if self.choice.few == self.choice.many:
            return self.choice.few
        return f"{self.choice.few} up to {self.choice.few_rows} rows, {self.choice.many} beyond"

    def rounded_activations(self) -> torch.dtype | None:
        """The dtype the products of prompts (``kernels.ROUNDED_ROWS`` rows or more) round their float32 activations
        to, if they do (see :func:`phi_core.kernels.rounded_activations`)."""
        if self.choice is None or self.weight_format not in compiled.KIND_OF_STORAGE:
            return None
        return compiled.rounded_activations(compiled.KIND_OF_STORAGE[self.weight_format], compiled.cpu_info().level)

    def kernels(self) -> dict[str, object]:
        """What ``--json`` reports: the weights, their storage, the products for few and many rows, the CPU."""
        report: dict[str, object] = {"weights": self.weights, "storage": self.weight_format}
        if self.choice is not None:
            report |= {"decode": self.choice.few, "prefill": self.choice.many, "few_rows": self.choice.few_rows}
            if self.weight_format == "tiles-int4":
                report["group"] = self.group
            report["cpu"] = compiled.cpu_info().describe()
        return report

    def round_to(self) -> torch.dtype | None:
        """The dtype packed weights are rounded to before packing (bfloat16 models keep bfloat16 values)."""
        return torch.bfloat16 if self.weights == "bfloat16" and self.weight_format == "fbgemm-fp16" else None

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
    a 16-bit checkpoint on a CPU gets 16-bit weights with float32 compute, a float32 one stays float32. It never
    picks int8 or int4, which round the weights.
    """
    if isinstance(requested, torch.dtype):
        requested = dtype_name(requested)
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {requested!r} (choose one of {', '.join(DTYPE_CHOICES)})")
    on_cpu = torch.device(device).type == "cpu"
    wanted = requested
    if requested == "auto":
        wanted = dtype_name(checkpoint_dtype) if checkpoint_dtype in FLOAT_DTYPES.values() else "float32"
    if not on_cpu:
        if wanted in QUANTIZED:
            raise PhiError(f"--dtype {wanted} runs on a CPU only (use float16 or bfloat16 on a GPU)")
        return unpacked(FLOAT_DTYPES[wanted], requested)
    choice = compiled.choose(wanted)
    storage = choice.storage
    if storage.startswith("fbgemm") and not packed_formats_available():
        if wanted == "int8":
            raise PhiError("--dtype int8 needs phi_core's compiled kernels or a torch build with fbgemm")
        return unpacked(FLOAT_DTYPES[wanted], requested)
    if wanted in QUANTIZED:
        group = linear.INT4_GROUP if wanted == "int4" else 0
        return Precision(requested, torch.float32, wanted, storage, torch.float16, choice, group)
    dtype = FLOAT_DTYPES[wanted]
    return Precision(requested, torch.float32, wanted, storage, dtype, choice)


def checkpoint_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The floating dtype most of a checkpoint's tensors are stored in (float32 if it has none)."""
    counts = Counter(t.dtype for t in tensors if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")
