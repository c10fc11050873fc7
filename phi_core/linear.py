"""How a Linear layer's weight is held in memory and multiplied, chosen by measurement on this kind of CPU.

Three formats (``WEIGHT_FORMATS``):

- ``dense``: an ordinary ``(out, in)`` tensor in the model's compute dtype. On a CPU in float32, products of two
  or more rows run as ``W @ x^T`` where torch hands that to a faster GEMM path than ``x @ W^T``: for rows of 1024
  inputs or more at any row count, and for shorter rows only up to 32 rows (measured on a 2-core AMD EPYC, torch
  2.13: 2048 x 8192 times 8 rows 7.4 ms against 21-29 ms, 1.5x at 128 rows, 1.1x at 512; but 384 x 128 times
  1024 rows 2.6 ms against 0.57 ms, and 51200 x 128 times 512 rows 0.44x). One row goes to torch's GEMV, except
  for small matrices and for wide ones with short rows (a vocabulary head over a small hidden size), where
  ``x @ W^T`` over ``(out, in)`` runs at half speed: those keep a second, ``(in, out)`` copy for one-row products
  (128 x 384: 15.8 us against 30.0 us; 51200 x 128: 1.6 ms against 3.4 ms). That is 29 MB more for the embedded
  model and nothing for the real Phi shapes, whose matrices are all larger. ``python
  benchmarks/linear_layout.py`` repeats these measurements.
- ``float16``: fbgemm's packed half-precision weight (half the bytes), multiplied with float32 activations by
  fbgemm's AVX2 kernel, which converts tiles on the fly. Against dense float32 on the same machine (phi-1.5's
  8192 x 2048, 2048 x 8192 and 6144 x 2048): 1.9-2.9x faster for one row, 2.5-2.9x for eight, 1.2-1.9x for 128,
  1.0-1.3x for 512 (an earlier, noisier run had 128-512 rows 1.2-1.3x slower; end to end, a 512-token prefill
  takes 0.67x float32's time). torch's own bfloat16 and float16 GEMVs were slower (1.3x and 1.6x float32 for
  one row, and 2.5-3x slower than float32 for eight rows), and upcasting bfloat16 weights per product cost
  1.1-2.1x float32's time at 128-512 rows.
- ``int8``: fbgemm's packed int8 weight with one symmetric scale per output row, multiplied after quantizing the
  activations of each call to 8 bits (dynamic quantization): a quarter of the bytes, 4x float32 for one row.

The packed formats exist only on CPUs (fbgemm); elsewhere every weight is dense in the compute dtype. fbgemm
packs from a float32 matrix, so a large matrix is packed in blocks of output rows (``PACK_BLOCK_ELEMENTS``), each
its own product: loading then needs one block's float32 copy at a time, not the whole matrix's (the phi-1.5
vocabulary head alone is 420 MB in float32), and only matrices over the block size, such as that head, pay one
extra call per block.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from phi_core.errors import PhiError

WeightFormat = Literal["dense", "float16", "int8"]
WEIGHT_FORMATS: tuple[WeightFormat, ...] = ("dense", "float16", "int8")

# Products of more rows than this with rows shorter than _LONG_ROW are faster as x @ W^T.
_SHORT_ROW_GEMM_ROWS = 32
_LONG_ROW = 1024
# A matrix this many times wider than its rows are long, with rows this short, keeps an (in, out) copy...
_SHORT_ROW_RATIO = 16
_SHORT_ROW_MAX = 512
# ... and so does any matrix this small (4 MB in float32), which also stays dense float32 when the other weights
# are packed: a packed product's fixed cost is more than such a matrix saves in bytes (384 x 128, one row: 32 us
# packed, 7 us dense float32).
SMALL_MATRIX = 1 << 20
_FLOAT16_MAX = 65504.0
# Largest block packed at once: 64 MB in float32, so no phi-1.5 layer matrix is split.
PACK_BLOCK_ELEMENTS = 1 << 24


class DirectCall:
    """Mixin: calling the module runs ``forward`` directly, without ``nn.Module.__call__``'s hook bookkeeping.

    That bookkeeping costs about 13 us a call on a 2-core EPYC, and a decode step of the embedded model makes some
    40 module calls (measured: ``F.linear`` 13.8 us, the same product through ``nn.Linear`` 26.6 us). Forward
    hooks therefore do not fire on phi_core's own layers.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)


class PhiLinear(DirectCall, nn.Linear):
    """``nn.Linear`` whose product uses the fastest measured kernel for its weight format and row count.

    Parameter names and shapes are nn.Linear's, so checkpoints load unchanged. Once :meth:`pack` has packed it,
    ``weight`` and ``bias`` are gone and the layer holds only the packed blocks (inference only).
    """

    packed: tuple[Any, ...] | None = None  # fbgemm packed blocks of consecutive output rows
    weight_format: WeightFormat = "dense"
    # (in, out) copy of the weight and a zero-or-real bias, for one-row products where that layout is faster.
    one_row: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            one_row = self.one_row
            if one_row is not None and x.numel() == self.in_features:
                return torch.addmm(one_row[1], x.reshape(1, -1), one_row[0]).view(*x.shape[:-1], self.out_features)
            return dense_product(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features)
        if len(self.packed) == 1:
            out = self._packed_product(flat, self.packed[0])
        else:
            out = torch.cat([self._packed_product(flat, block) for block in self.packed], dim=-1)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _packed_product(self, flat: torch.Tensor, block: Any) -> torch.Tensor:
        if self.weight_format == "float16":
            return torch.ops.quantized.linear_dynamic_fp16(flat, block)
        return torch.ops.quantized.linear_dynamic(flat, block, True)  # reduce_range: AVX2 needs 7 bits

    def pack(self, weight_format: WeightFormat, round_to: torch.dtype | None = None) -> None:
        """Replace the dense weight with ``weight_format`` (``float16`` or ``int8``); CPU only.

        ``round_to`` rounds the weights to that dtype first (``bfloat16``: the values a bf16 model has; every
        bfloat16 value from 2**-17 up to 65504 is exactly a float16 value, smaller ones move by at most 3e-8).
        A matrix of at most ``SMALL_MATRIX`` weights is not packed: it becomes dense float32 holding the same
        (rounded) values, and an int8 request leaves it unquantized.
        """
        if weight_format != "dense" and self.weight.numel() <= SMALL_MATRIX:
            weight = self.weight.detach()
            if round_to is not None:
                weight = weight.to(round_to)
            self.weight = nn.Parameter(weight.float(), requires_grad=False)
            weight_format = "dense"
        if weight_format == "dense":
            if _one_row_copy_pays(self.weight):
                weight = self.weight.detach()
                bias = self.bias.detach() if self.bias is not None else weight.new_zeros(self.out_features)
                self.one_row = (weight.t().contiguous(), bias)
            return
        weight = self.weight.detach()
        if weight_format == "float16":
            largest = float(weight.abs().max())
            if largest > _FLOAT16_MAX:
                raise PhiError(f"a weight of {largest:g} does not fit in 16 bits here; use --dtype float32")
        rows = max(1, PACK_BLOCK_ELEMENTS // self.in_features)
        blocks = []
        for start in range(0, self.out_features, rows):
            part = weight[start : start + rows]
            if round_to is not None and part.dtype != round_to:
                part = part.to(round_to)
            part = part.float().contiguous()
            bias = None if self.bias is None else self.bias.detach()[start : start + rows].float().contiguous()
            if weight_format == "float16":
                blocks.append(torch.ops.quantized.linear_prepack_fp16(part, bias))
            else:
                blocks.append(torch.ops.quantized.linear_prepack(quantize_rows(part), bias))
            del part
        self.packed = tuple(blocks)
        self.weight_format = weight_format
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def stored_bytes(self) -> int:
        """Bytes of weight (and int8 scales) one product reads: what a decode step costs in bandwidth."""
        count = self.in_features * self.out_features
        if self.weight_format == "float16":
            return 2 * count
        if self.weight_format == "int8":
            return count + 8 * self.out_features  # int8 values and a float64 scale per row
        return count * self.weight.element_size()


def dense_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` through the kernel measured fastest for this shape (see the module docstring)."""
    if x.device.type != "cpu" or weight.dtype != torch.float32 or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    if rows == 1 or (rows > _SHORT_ROW_GEMM_ROWS and in_features < _LONG_ROW):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, in_features)
    out = torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias[:, None], weight, flat.t())
    # A contiguous result keeps the next product's input in the layout its fast path wants.
    return out.t().contiguous().view(*x.shape[:-1], out_features)


def _one_row_copy_pays(weight: torch.Tensor) -> bool:
    """Whether one-row products are measurably faster from an (in, out) copy (see the module docstring)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    out_features, in_features = weight.shape
    short_rows = in_features <= _SHORT_ROW_MAX and out_features >= _SHORT_ROW_RATIO * in_features
    return short_rows or weight.numel() <= SMALL_MATRIX


def quantize_rows(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output row (scale = max |w| / 127), as the quantized tensor fbgemm packs."""
    scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # torch marks quantized tensor creation as deprecated; it is still how fbgemm's int8 kernel is fed.
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)


def pack_linears(model: nn.Module, weight_format: WeightFormat, round_to: torch.dtype | None = None) -> None:
    """Pack every :class:`PhiLinear` of ``model`` (one at a time, so one float32 copy exists at once)."""
    for module in model.modules():
        if isinstance(module, PhiLinear):
            module.pack(weight_format, round_to)


def packed_formats_available() -> bool:
    """Whether this torch build has fbgemm, which the packed formats need."""
    return "fbgemm" in torch.backends.quantized.supported_engines
