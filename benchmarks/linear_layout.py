"""The products phi_core.linear chooses between, timed on this CPU: the measurements behind its rules.

    python benchmarks/linear_layout.py
    python benchmarks/linear_layout.py --shape 2048x8192 --rows 1 --rows 512

For each weight shape (out x in) and row count: ``x @ W^T`` (``F.linear`` over the ``(out, in)`` weight),
``W @ x^T`` (the GEMM phi_core uses for float32 products of several rows), ``x @ W_t`` over an ``(in, out)``
copy (what small matrices use for one row), fbgemm's packed float16 product (16-bit weights) and its packed
int8 product (int8 weights). Median milliseconds of --repeats calls.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from phi_core.linear import packed_formats_available, quantize_rows

SHAPES = ["51200x128", "384x128", "51200x2048", "2048x2048", "6144x2048", "8192x2048", "2048x8192"]


def median_ms(product: Callable[[], torch.Tensor], repeats: int) -> float:
    for _ in range(3):
        product()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def products(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    transposed = weight.t().contiguous()
    found = {
        "x @ W^T": lambda: F.linear(x, weight, bias),
        "W @ x^T": lambda: torch.addmm(bias[:, None], weight, x.t()).t().contiguous(),
        "x @ (in,out)": lambda: torch.addmm(bias, x, transposed),
    }
    if packed_formats_available():
        half = torch.ops.quantized.linear_prepack_fp16(weight, bias)
        eight = torch.ops.quantized.linear_prepack(quantize_rows(weight), bias)
        found["fbgemm fp16"] = lambda: torch.ops.quantized.linear_dynamic_fp16(x, half)
        found["fbgemm int8"] = lambda: torch.ops.quantized.linear_dynamic(x, eight, True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help=f"OUTxIN (repeatable) [{' '.join(SHAPES)}]")
    parser.add_argument("--rows", type=int, action="append", help="row counts (repeatable) [1 8 128 512]")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms")
    generator = torch.Generator().manual_seed(0)
    for shape in args.shape or SHAPES:
        out_features, in_features = (int(n) for n in shape.split("x"))
        weight = torch.randn(out_features, in_features, generator=generator) * 0.02
        bias = torch.randn(out_features, generator=generator)
        for rows in args.rows or [1, 8, 128, 512]:
            x = torch.randn(rows, in_features, generator=generator)
            timings = {name: median_ms(run, args.repeats) for name, run in products(weight, bias, x).items()}
            cells = "  ".join(f"{name} {ms:8.3f}" for name, ms in timings.items())
            print(f"{shape:>11} x {rows:>3} rows: {cells}", flush=True)


if __name__ == "__main__":
    main()
