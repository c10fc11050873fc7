"""How a Linear layer's weight is held in memory and multiplied, chosen by measurement on this kind of CPU.

Storage formats (``WEIGHT_FORMATS``); which one a dtype gets, and which product serves it, is
:mod:`phi_core.kernels`' table for this CPU's level (AVX-512 with VNNI, AVX2, or neither):

- ``dense``: an ordinary ``(out, in)`` tensor in the model's compute dtype. On a CPU in float32, a few rows go
  to phi_core's compiled kernel where there is one (one sequential stream per weight row, software prefetch;
  MKL's GEMV reads float32 at about half the speed on the machines measured), longer products to MKL: as
  ``W @ x^T`` where torch hands that to a faster GEMM path than ``x @ W^T``, for rows of 1024 inputs or more at
  any row count and for shorter rows only up to 32 rows (2048 x 8192 times 8 rows 7.4 ms against 21-29 ms on a
  Zen 3, 1.5x at 128 rows, 1.1x at 512; but 384 x 128 times 1024 rows 2.6 ms against 0.57 ms). Without the
  kernels one row goes to torch's GEMV, except for small matrices and for wide ones with short rows (a
  vocabulary head over a small hidden size), which keep a second, ``(in, out)`` copy for one-row products
  (128 x 384: 15.8 us against 30.0 us; 51200 x 128: 1.6 ms against 3.4 ms).
- ``rows-bf16``, ``rows-f16``: the ``(out, in)`` matrix in bfloat16 or float16 (half the bytes), multiplied by
  phi_core's kernel, which widens the weights to float32 in registers (float32 activations and arithmetic).
- ``tiles-int8``, ``tiles-int4``: int8 with a scale per output row, or 4-bit with a float16 scale per group of
  ``INT4_GROUP`` inputs, in phi_core's tiled layouts; each call quantizes its activations to int8 per block of 32
  and multiplies with integer dot products.
- ``fbgemm-fp16``, ``fbgemm-int8``: fbgemm's packed half-precision weight (float32 arithmetic) and its packed
  int8 weight (activations quantized to 7 bits per call): torch's fastest products for 16-bit and int8 weights,
  used where phi_core's kernels cannot be compiled.

fbgemm packs from a float32 matrix, and phi_core's integer layouts are quantized from one, so a large matrix is
packed in blocks of output rows (``PACK_BLOCK_ELEMENTS``): loading then needs one block's float32 copy at a
time, not the whole matrix's (the phi-1.5 vocabulary head alone is 420 MB in float32).

Matrices of at most ``SMALL_MATRIX`` weights stay dense float32 (holding the rounded values of a 16-bit dtype;
int8 and int4 leave them unquantized): the embedded model's layer matrices are that small, and there a product's
fixed cost is more than the bytes saved (384 x 128, one row: 32 us fbgemm-packed, 7 us dense float32).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from phi_core import kernels as compiled
from phi_core.errors import PhiError

WeightFormat = Literal["dense", "rows-bf16", "rows-f16", "tiles-int8", "tiles-int4", "fbgemm-fp16", "fbgemm-int8"]
WEIGHT_FORMATS: tuple[WeightFormat, ...] = (
    "dense",
    "rows-bf16",
    "rows-f16",
    "tiles-int8",
    "tiles-int4",
    "fbgemm-fp16",
    "fbgemm-int8",
)
# int4: inputs per float16 scale (see docs/performance.md for the quality and speed of 32, 64 and 128).
INT4_GROUP = 64

# Products of more rows than this with rows shorter than _LONG_ROW are faster as x @ W^T.
_SHORT_ROW_GEMM_ROWS = 32
_LONG_ROW = 1024
# A matrix this many times wider than its rows are long, with rows this short, keeps an (in, out) copy...
_SHORT_ROW_RATIO = 16
_SHORT_ROW_MAX = 512
# ... and so does any matrix this small (4 MB in float32), which also stays dense float32 when the other weights
# are packed: a packed product's fixed cost is more than such a matrix saves in bytes.
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
    ``weight`` is gone (and, for fbgemm's formats, ``bias``) and the layer holds ``packed`` (inference only).
    """

    packed: tuple[Any, ...] | None = None  # the weight's storage: fbgemm blocks, or phi_core's layout
    weight_format: WeightFormat = "dense"
    # (in, out) copy of the weight and a zero-or-real bias, for one-row products where that layout is faster.
    one_row: tuple[torch.Tensor, torch.Tensor] | None = None
    # phi_core's compiled kernels when they serve this layer, up to how many rows, and the int4 group size.
    kernels: compiled.Kernels | None = None
    few_rows: int = 0
    group: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = self.kernels
        # is_cpu: a dense model moved to a GPU after loading must not hand GPU memory to the compiled products.
        if kernels is not None and x.numel() <= self.few_rows * self.in_features and x.is_cpu:
            return kernels.linear(
                compiled.KIND_OF_STORAGE[self.weight_format],
                x,
                self.packed or (self.weight,),
                self.bias,
                self.out_features,
                self.group,
            )
        if self.packed is None:
            one_row = self.one_row
            if one_row is not None and x.numel() == self.in_features:
                return torch.addmm(one_row[1], x.reshape(1, -1), one_row[0]).view(*x.shape[:-1], self.out_features)
            return dense_product(x, self.weight, self.bias)
        if self.weight_format.startswith("fbgemm"):
            flat = x.reshape(-1, self.in_features)
            if len(self.packed) == 1:
                out = self._fbgemm_product(flat, self.packed[0])
            else:
                out = torch.cat([self._fbgemm_product(flat, block) for block in self.packed], dim=-1)
            return out.reshape(*x.shape[:-1], self.out_features)
        return self._widened_product(x)

    def _fbgemm_product(self, flat: torch.Tensor, block: Any) -> torch.Tensor:
        if self.weight_format == "fbgemm-fp16":
            return torch.ops.quantized.linear_dynamic_fp16(flat, block)
        return torch.ops.quantized.linear_dynamic(flat, block, True)  # reduce_range: AVX2 needs 7 bits

    def _widened_product(self, x: torch.Tensor) -> torch.Tensor:
        """The product through MKL on the weights widened to float32, a block of output rows at a time."""
        rows = max(compiled.TILE, PACK_BLOCK_ELEMENTS // 4 // self.in_features // compiled.TILE * compiled.TILE)
        parts = []
        for start in range(0, self.out_features, rows):
            stop = min(self.out_features, start + rows)
            bias = None if self.bias is None else self.bias[start:stop]
            parts.append(dense_product(x, self.unpacked_rows(start, stop), bias))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def unpacked_rows(self, start: int, stop: int) -> torch.Tensor:
        """Output rows ``start:stop`` of the weight as float32 (phi_core's formats; ``start`` a multiple of 16)."""
        fmt = self.weight_format
        if fmt == "dense":
            return self.weight[start:stop].float()
        if fmt in ("rows-bf16", "rows-f16"):
            return self.packed[0][start:stop].float()
        tiles, scales = self.packed
        first, last = start // compiled.TILE, -(-stop // compiled.TILE)
        count = min(stop, self.out_features) - start
        if fmt == "tiles-int8":
            width = -(-self.in_features // compiled.QBLOCK) * compiled.QBLOCK
            part = tiles[first * compiled.TILE * width : last * compiled.TILE * width]
            scale = scales[first * compiled.TILE : last * compiled.TILE]
            return compiled.unpack_int8(part, scale, (last - first) * compiled.TILE, self.in_features)[:count]
        if fmt == "tiles-int4":
            width = -(-self.in_features // self.group) * self.group
            part = tiles[first * compiled.TILE * width // 2 : last * compiled.TILE * width // 2]
            groups = width // self.group
            scale = scales[first * compiled.TILE * groups : last * compiled.TILE * groups]
            return compiled.unpack_int4(part, scale, (last - first) * compiled.TILE, self.in_features, self.group)[
                :count
            ]
        raise ValueError(f"{fmt} weights cannot be unpacked here")

    def pack(self, weight_format: WeightFormat, round_to: torch.dtype | None = None) -> None:
        """Replace the dense weight with ``weight_format`` (see the module docstring); CPU only.

        ``round_to`` rounds the weights to that dtype first (``bfloat16`` in ``fbgemm-fp16``: the values a bf16
        model has; every bfloat16 value from 2**-17 up to 65504 is exactly a float16 value, smaller ones move by at
        most 3e-8). A matrix of at most ``SMALL_MATRIX`` weights is not packed: it becomes dense float32 holding
        the same (rounded) values, and an int8 or int4 request leaves it unquantized.
        """
        if weight_format != "dense" and self.weight.numel() <= SMALL_MATRIX:
            weight = self.weight.detach()
            if round_to is not None:
                weight = weight.to(round_to)
            elif weight_format == "rows-bf16":
                weight = weight.to(torch.bfloat16)
            elif weight_format in ("rows-f16", "fbgemm-fp16"):
                weight = weight.to(torch.float16)
            self.weight = nn.Parameter(weight.float(), requires_grad=False)
            weight_format = "dense"
        if weight_format in ("rows-f16", "fbgemm-fp16"):
            largest = float(self.weight.detach().abs().max())
            if largest > _FLOAT16_MAX:
                raise PhiError(f"a weight of {largest:g} does not fit in 16 bits here; use --dtype float32")
        if weight_format == "dense":
            self._use_kernels("dense")
            if self.kernels is not None:
                # .data, not a new Parameter: a tied embedding shares this Parameter and must keep sharing it.
                self.weight.data = compiled.copy_to_huge_pages(self.weight.detach())
            if self.kernels is None and _one_row_copy_pays(self.weight):
                weight = self.weight.detach()
                bias = self.bias.detach() if self.bias is not None else weight.new_zeros(self.out_features)
                self.one_row = (weight.t().contiguous(), bias)
            return
        weight = self.weight.detach()
        if weight_format.startswith("fbgemm"):
            self._pack_fbgemm(weight, weight_format, round_to)
            return
        if weight_format in ("rows-bf16", "rows-f16"):
            stored = torch.bfloat16 if weight_format == "rows-bf16" else torch.float16
            self.packed = (compiled.copy_to_huge_pages(weight, stored),)
        else:
            self.group = INT4_GROUP if weight_format == "tiles-int4" else compiled.QBLOCK
            self.packed = self._pack_tiles(weight, weight_format)
        self.weight_format = weight_format
        self.register_parameter("weight", None)
        self._use_kernels(weight_format)

    def _use_kernels(self, weight_format: WeightFormat) -> None:
        """Let phi_core's compiled kernels serve this layer where this CPU's table says they should."""
        self.kernels, self.few_rows = None, 0
        weights = {"dense": "float32", "rows-bf16": "bfloat16", "rows-f16": "float16"}.get(weight_format)
        weights = weights or weight_format.removeprefix("tiles-")
        if weight_format == "dense" and (self.weight.dtype != torch.float32 or self.weight.numel() <= SMALL_MATRIX):
            return  # small float32 matrices: torch's products measure faster at such sizes
        if weight_format == "dense" and self.weight.device.type != "cpu":
            return  # the compiled products read CPU memory (a GPU pointer made them crash on a lent GPU machine)
        choice = compiled.choose(weights)
        if choice.storage == weight_format and choice.few.startswith("phi"):
            self.kernels = compiled.library(compiled.cpu_info().level)
            self.few_rows = choice.few_rows if choice.many.startswith("torch") else 1 << 62

    def _pack_tiles(self, weight: torch.Tensor, weight_format: WeightFormat) -> tuple[torch.Tensor, torch.Tensor]:
        rows = max(compiled.TILE, PACK_BLOCK_ELEMENTS // self.in_features // compiled.TILE * compiled.TILE)
        tiles, scales = [], []
        for start in range(0, self.out_features, rows):
            part = weight[start : start + rows].float()
            packed = compiled.pack_int8(part) if weight_format == "tiles-int8" else compiled.pack_int4(part, self.group)
            tiles.append(packed[0])
            scales.append(packed[1])
            del part
        stored = compiled.empty_on_huge_pages((sum(len(t) for t in tiles), *tiles[0].shape[1:]), tiles[0].dtype)
        return torch.cat(tiles, out=stored), torch.cat(scales)

    def _pack_fbgemm(self, weight: torch.Tensor, weight_format: WeightFormat, round_to: torch.dtype | None) -> None:
        rows = max(1, PACK_BLOCK_ELEMENTS // self.in_features)
        blocks = []
        for start in range(0, self.out_features, rows):
            part = weight[start : start + rows]
            if round_to is not None and part.dtype != round_to:
                part = part.to(round_to)
            part = part.float().contiguous()
            bias = None if self.bias is None else self.bias.detach()[start : start + rows].float().contiguous()
            if weight_format == "fbgemm-fp16":
                blocks.append(torch.ops.quantized.linear_prepack_fp16(part, bias))
            else:
                blocks.append(torch.ops.quantized.linear_prepack(quantize_rows(part), bias))
            del part
        self.packed = tuple(blocks)
        self.weight_format = weight_format
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def stored_bytes(self) -> int:
        """Bytes of weight (and scales) one product reads: what a decode step costs in bandwidth."""
        count = self.in_features * self.out_features
        fmt = self.weight_format
        if fmt in ("rows-bf16", "rows-f16", "fbgemm-fp16"):
            return 2 * count
        if fmt == "fbgemm-int8":
            return count + 8 * self.out_features  # int8 values and a float64 scale per row
        if fmt.startswith("tiles"):
            return sum(t.numel() * t.element_size() for t in self.packed)
        return count * self.weight.element_size()


def dense_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` through torch's product measured fastest for this shape (module docstring)."""
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
    """Whether this torch build has fbgemm, which the fbgemm formats need."""
    return "fbgemm" in torch.backends.quantized.supported_engines
