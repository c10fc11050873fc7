"""The products phi_core.linear and phi_core.kernels choose between, timed on this CPU: the measurements behind
their tables.

    python benchmarks/linear_layout.py                                  # phi-1.5's matrices, 1, 8, 128, 512 rows
    python benchmarks/linear_layout.py --shape 2048x8192 --rows 1 --rows 512
    python benchmarks/linear_layout.py --copies 1 --shape 384x128       # small matrices, cache-resident

Each contender multiplies ``--copies`` distinct matrices of each shape (out x in) in turn, so that, as in
decoding, the weights stream from memory rather than from the caches (24 copies of phi-1.5's 8192 x 2048 are
1.6 GB in float32). Every round runs every contender once, in turn; the figures are medians over ``--rounds``
(and the best round), in GB/s of weights read and milliseconds per product.

Contenders: torch's float32 products (``x @ W^T``, ``W @ x^T``), fbgemm's packed float16 and int8 products,
phi_core's compiled kernels (``phi f32``, ``bf16``, ``f16``, ``q8``, ``q4 gN``) at this CPU's level (and the
AVX2 build with ``--level avx2``), and ``widened bf16``: the bfloat16 matrix widened to float32 a block at a time
and multiplied by MKL (how many-row products of 16-bit and int4 weights can run without phi_core's kernels).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from phi_core import kernels
from phi_core.linear import packed_formats_available, quantize_rows

SHAPES = ["2048x2048", "6144x2048", "8192x2048", "2048x8192", "51200x2048"]
Product = Callable[[torch.Tensor], torch.Tensor]


def contenders(weights: list[torch.Tensor], level: str, names: set[str] | None) -> dict[str, tuple[list, int]]:
    """name -> (one product per matrix, weight bytes each reads)."""
    out_features, in_features = weights[0].shape
    count = out_features * in_features
    found: dict[str, tuple[list, int]] = {}

    def add(name: str, make: Callable[[torch.Tensor], Product], nbytes: int) -> None:
        if names is None or name in names:
            found[name] = ([make(w) for w in weights], nbytes)

    add("torch x@W^T", lambda w: lambda x: F.linear(x, w), 4 * count)
    add("torch W@x^T", lambda w: lambda x: torch.mm(w, x.t()).t().contiguous(), 4 * count)
    if packed_formats_available():

        def fbgemm16(w: torch.Tensor) -> Product:
            packed = torch.ops.quantized.linear_prepack_fp16(w, None)
            return lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed)

        def fbgemm8(w: torch.Tensor) -> Product:
            packed = torch.ops.quantized.linear_prepack(quantize_rows(w), None)
            return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)

        add("fbgemm fp16", fbgemm16, 2 * count)
        add("fbgemm int8", fbgemm8, count + 8 * out_features)

    def widened(w: torch.Tensor) -> Product:
        held = w.to(torch.bfloat16)
        rows = max(16, (1 << 22) // in_features // 16 * 16)
        return lambda x: torch.cat([F.linear(x, held[s : s + rows].float()) for s in range(0, out_features, rows)], -1)

    add("widened bf16", widened, 2 * count)
    library = kernels.library(level) if level != "none" else None
    if library is None:
        return found

    def phi(kind: str, group: int = 64) -> Callable[[torch.Tensor], Product]:
        def make(w: torch.Tensor) -> Product:
            packed, _, used = kernels.pack(kind, w, group)
            return lambda x: library.linear(kind, x, packed, None, out_features, used)

        return make

    add("phi f32", phi("f32"), 4 * count)
    add("phi bf16", phi("bf16"), 2 * count)
    add("phi f16", phi("f16"), 2 * count)
    add("phi q8", phi("q8"), count + 4 * out_features)
    for group in kernels.INT4_GROUPS:
        add(f"phi q4 g{group}", phi("q4", group), count // 2 + 2 * count // group)
    return found


def measure(shape: str, rows: int, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    out_features, in_features = (int(n) for n in shape.split("x"))
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(out_features, in_features, generator=generator) * 0.02 for _ in range(args.copies)]
    x = torch.randn(rows, in_features, generator=generator)
    found = contenders(weights, args.level, set(args.only) if args.only else None)
    del weights
    seconds: dict[str, list[float]] = {name: [] for name in found}
    for products, _ in found.values():
        for product in products[:2]:
            product(x)  # warm-up
    for _ in range(args.rounds):
        for name, (products, _) in found.items():
            start = time.perf_counter()
            for product in products:
                product(x)
            seconds[name].append((time.perf_counter() - start) / len(products))
    return {
        name: (nbytes / statistics.median(seconds[name]) / 1e9, statistics.median(seconds[name]) * 1e3)
        for name, (_, nbytes) in found.items()
    } | {
        f"{name} best": (nbytes / min(seconds[name]) / 1e9, min(seconds[name]) * 1e3)
        for name, (_, nbytes) in found.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help=f"OUTxIN (repeatable) [{' '.join(SHAPES)}]")
    parser.add_argument("--rows", type=int, action="append", help="row counts (repeatable) [1 8 128 512]")
    parser.add_argument("--copies", type=int, default=8, help="distinct matrices per shape [8]")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--level", default=kernels.cpu_info().level, choices=list(kernels.LEVELS))
    parser.add_argument("--only", action="append", help="contender names to run (repeatable)")
    args = parser.parse_args()
    print(f"{kernels.cpu_info().describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"kernels: {kernels.kernel_status(args.level) if args.level != 'none' else 'none'}")
    print("GB/s of weights (median over rounds, best round) and ms per product")
    for shape in args.shape or SHAPES:
        for rows in args.rows or [1, 8, 128, 512]:
            result = measure(shape, rows, args)
            for name in sorted((n for n in result if not n.endswith(" best")), key=lambda n: -result[n][0]):
                rate, ms = result[name]
                best = result[f"{name} best"][0]
                print(f"{shape:>11} x {rows:>3} rows  {name:<13} {rate:6.1f} GB/s (best {best:5.1f})  {ms:8.3f} ms")
            print(flush=True)


if __name__ == "__main__":
    main()
