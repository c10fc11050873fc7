"""Row-major against column-major Linear weights on this CPU: the measurement behind
``phi_core.model.store_linears_column_major``.

    python benchmarks/linear_layout.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(51200, 128), (51200, 2048), (2048, 2048), (2048, 8192), (8192, 2048)]


def median_ms(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        F.linear(x, weight, bias)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        F.linear(x, weight, bias)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'weight':>12} {'rows':>5} {'row-major ms':>13} {'column-major ms':>16} {'ratio':>6}")
    for out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features)
        bias = torch.randn(out_features)
        column_major = weight.t().contiguous().t()
        for rows in (1, 8, 128):
            x = torch.randn(rows, in_features)
            repeats = 20 if rows == 128 else 100
            a = median_ms(x, weight, bias, repeats)
            b = median_ms(x, column_major, bias, repeats)
            print(f"{out_features:>6}x{in_features:<5} {rows:>5} {a:>13.2f} {b:>16.2f} {a / b:>6.2f}")


if __name__ == "__main__":
    main()
