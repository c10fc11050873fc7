"""What ``phi bench`` measured and how it is written: the settings, one row per measurement, the report, and its
JSON, CSV and chart writers."""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from phi_core.bench_models import SHAPES
from phi_core.errors import PhiError

Mode = Literal["forward", "generate"]


@dataclass(frozen=True)
class BenchSettings:
    """What to measure. ``layers`` keeps the per-layer shape but uses fewer layers (said in every output)."""

    shape: str = "phi-1"
    model: str | None = None
    backends: tuple[str, ...] = ()
    seq_len: int = 2048
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    mode: Mode = "forward"
    new_tokens: int = 32
    dtypes: tuple[str, ...] = ("float32",)
    device: str = "cpu"
    warmup: int = 1
    repeats: int = 3
    threads: int | None = None
    layers: int | None = None
    against_transformers: bool = False
    seed: int = 0


@dataclass
class Row:
    """One backend at one batch size: every repeat's seconds and what they mean."""

    implementation: str
    backend: str
    batch_size: int
    dtype: str = "float32"
    seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    peak_memory_bytes: int | None = None
    attention_seconds: float | None = None
    skipped: str | None = None
    # Generate mode only: each repeat's decode seconds, the new tokens they produced, the matrix bytes per step.
    decode_seconds: list[float] = field(default_factory=list)
    decode_tokens: int = 0
    weight_bytes_per_step: int | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.median_s if self.seconds and self.median_s else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        if not self.decode_seconds or not self.decode_tokens:
            return None
        median = statistics.median(self.decode_seconds)
        return self.decode_tokens / median if median > 0 else None

    @property
    def weight_gb_per_s(self) -> float | None:
        """Matrix bytes read per second of decoding (one read per step, whatever the batch)."""
        rate = self.decode_tokens_per_s
        if rate is None or self.weight_bytes_per_step is None:
            return None
        return self.weight_bytes_per_step * rate / self.batch_size / 1e9

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            median_s=self.median_s,
            min_s=min(self.seconds) if self.seconds else None,
            max_s=max(self.seconds) if self.seconds else None,
            tokens_per_s=self.tokens_per_s,
            decode_tokens_per_s=self.decode_tokens_per_s,
            weight_gb_per_s=self.weight_gb_per_s,
            attention_share=(
                self.attention_seconds / self.median_s if self.attention_seconds and self.median_s else None
            ),
        )
        return data


@dataclass
class BenchReport:
    settings: BenchSettings
    metadata: dict[str, Any]
    rows: list[Row]

    def baseline(self, row: Row) -> Row | None:
        """phi_core's eager row at the same batch size and dtype."""
        return next(
            (
                r
                for r in self.rows
                if (r.batch_size, r.dtype) == (row.batch_size, row.dtype)
                and r.implementation == "phi_core"
                and r.backend == "eager"
                and r.seconds
            ),
            None,
        )

    def speedup(self, row: Row) -> float | None:
        base = self.baseline(row)
        if base is None or not row.seconds:
            return None
        return base.median_s / row.median_s

    def decode_speedup(self, row: Row) -> float | None:
        """Decode tokens/s over transformers' float32 decode tokens/s (same backend and batch), in generate mode."""
        reference = next(
            (
                r
                for r in self.rows
                if (r.implementation, r.dtype, r.backend, r.batch_size)
                == ("transformers", "float32", row.backend, row.batch_size)
            ),
            None,
        )
        if reference is None or not reference.decode_tokens_per_s or not row.decode_tokens_per_s:
            return None
        return row.decode_tokens_per_s / reference.decode_tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for row in self.rows:
            data = row.to_dict()
            data["speedup_vs_eager"] = self.speedup(row)
            data["decode_vs_transformers_float32"] = self.decode_speedup(row)
            rows.append(data)
        return {"settings": asdict(self.settings), "metadata": self.metadata, "rows": rows}


def write_json(report: BenchReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


CSV_FIELDS = (
    "implementation",
    "dtype",
    "backend",
    "batch_size",
    "median_s",
    "min_s",
    "max_s",
    "tokens_per_s",
    "speedup_vs_eager",
    "decode_tokens_per_s",
    "weight_bytes_per_step",
    "weight_gb_per_s",
    "decode_vs_transformers_float32",
    "peak_memory_bytes",
    "attention_share",
    "skipped",
)


def write_csv(report: BenchReport, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in report.to_dict()["rows"]:
            writer.writerow(row)


def plot_chart(report: BenchReport, path: Path) -> None:
    """Bars of median latency per backend for each batch size, with the speedup over eager written on top."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PhiError("--plot needs matplotlib: pip install 'phi-toolkit[plot]'") from None
    measured = [r for r in report.rows if r.seconds]
    series = sorted(
        {(r.implementation, r.dtype, r.backend) for r in measured}, key=lambda s: (s[0] != "phi_core", s[1], s[2])
    )
    several_dtypes = len({r.dtype for r in measured}) > 1
    batches = list(report.settings.batch_sizes)
    width = 0.8 / max(len(series), 1)
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for i, (impl, dtype, backend) in enumerate(series):
        xs, ys, labels = [], [], []
        for j, batch in enumerate(batches):
            row = next(
                (
                    r
                    for r in measured
                    if (r.implementation, r.dtype, r.backend, r.batch_size) == (impl, dtype, backend, batch)
                ),
                None,
            )
            if row is None:
                continue
            xs.append(j + (i - (len(series) - 1) / 2) * width)
            ys.append(row.median_s)
            speedup = report.speedup(row)
            labels.append("" if speedup is None else f"{speedup:.2f}x")
        name = backend if impl == "phi_core" else f"{impl} {backend}"
        if several_dtypes:
            name = f"{name} {dtype}"
        bars = axis.bar(xs, ys, width, label=name)
        axis.bar_label(bars, labels=labels, fontsize=8, padding=2)
    s, meta = report.settings, report.metadata
    layers = ""  # the whole model: nothing to say
    if s.layers is not None and s.model is not None:
        layers = f", first {meta['layers']} layers"
    elif s.layers is not None and meta["layers"] != SHAPES[s.shape].num_hidden_layers:
        layers = f", {meta['layers']} of {SHAPES[s.shape].num_hidden_layers} layers"
    weights = "random weights, " if s.model is None else ""
    axis.set_title(
        f"{s.shape if s.model is None else s.model}: {s.mode}, seq {s.seq_len}, {', '.join(s.dtypes)}{layers}\n"
        f"{weights}{meta['gpu'] or meta['cpu']}, {meta['threads']} threads, median of {s.repeats} runs",
        fontsize=10,
    )
    axis.set_xticks(range(len(batches)), [str(b) for b in batches])
    axis.set_xlabel("batch size")
    axis.set_ylabel("median latency (s), lower is better")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def format_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    exponent = min(int(math.log(max(count, 1), 1024)), 4)
    return f"{count / 1024**exponent:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][exponent]}"
