"""`phi bench`: the attention-backend speedup chart, reproducible on any machine."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from phi_cli.errors import UsageProblem
from phi_cli.io import progress, stderr, stdout_console
from phi_cli.options import QuietOpt
from phi_core.attention import ATTENTION_BACKENDS
from phi_core.bench import run_benchmark
from phi_core.bench_models import SHAPES
from phi_core.bench_report import BenchReport, BenchSettings, Mode, format_bytes, plot_chart, write_csv, write_json
from phi_core.errors import PhiError
from phi_core.precision import DTYPE_CHOICES

CPU_DEFAULT_LAYERS = 2  # the full 24-layer sweep takes hours on a small CPU
# Generate mode on a CPU compares the weight formats by default: float16 runs the same kernel as bfloat16.
CPU_GENERATE_DTYPES = ("float32", "bfloat16", "int8")
# More threads than this only oversubscribes the cores; far more (100000) crashes torch's thread pool.
MAX_THREADS = 4 * (os.cpu_count() or 1)
OUTPUT_SUFFIXES = (".json", ".csv")
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def bench_command(
    attn: Annotated[
        list[str] | None,
        typer.Option(
            help="Backend to measure (repeatable); eager is the baseline.",
            show_default="every backend that can run here",
        ),
    ] = None,
    shape: Annotated[Literal[tuple(SHAPES)], typer.Option(help="Random weights of this real shape.")] = "phi-1",
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Measure this checkpoint instead of a random shape.")
    ] = None,
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens per sequence.")] = 2048,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,2,4,8",
    mode: Annotated[
        Mode,
        typer.Option(help="forward: one prefill pass; generate: prefill + --new-tokens decode steps."),
    ] = "forward",
    new_tokens: Annotated[int, typer.Option(min=1, help="Decode steps in generate mode.")] = 32,
    dtype: Annotated[
        list[str] | None,
        typer.Option(
            help="Weight dtype to measure (repeatable).",
            show_default="float32 on CPU, float16 on CUDA; in generate mode on CPU: float32, bfloat16 and int8",
        ),
    ] = None,
    device: Annotated[
        str, typer.Option(help="cpu, cuda, cuda:1 ... (the chart of docs/benchmarks.md is --device cuda).")
    ] = "cpu",
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs first.")] = 1,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs (median, min, max reported).")] = 3,
    threads: Annotated[
        int | None, typer.Option(min=1, max=MAX_THREADS, help="CPU threads for torch.", show_default="torch's own")
    ] = None,
    layers: Annotated[
        int | None,
        typer.Option(
            min=1, help="Use only N layers (same per-layer shape): a quick and honest chart on a small machine."
        ),
    ] = None,
    quick: Annotated[bool, typer.Option(help="Shrink the sweep: 2 layers, seq 512, batches 1,2, 1 repeat.")] = False,
    against: Annotated[
        Literal["transformers"] | None, typer.Option(help="Also run transformers' PhiForCausalLM on the same weights.")
    ] = None,
    output: Annotated[
        list[Path] | None, typer.Option(help="Write results to FILE.json or FILE.csv (repeatable).")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Draw the chart to FILE.png (or .svg, .pdf; needs matplotlib).")
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Time one forward pass (or generation) per attention backend and batch size, with the speedup over eager.

    On a CPU the default sweep keeps the per-layer shape but uses 2 of the 24 layers (it says so), which takes
    about 15 minutes on 2 cores; --layers 24 measures the whole model (hours), --quick about a minute. The
    flash-attention chart needs a CUDA GPU:

    phi bench --device cuda --dtype float16 --attn eager --attn sdpa --attn flash_attention_2 --plot fa2.png

    Generate mode compares weight dtypes by decode speed and the weight bandwidth it achieves:

    phi bench --mode generate --shape phi-1.5 --layers 24 --seq-len 128 --batch-sizes 1 --against transformers
    """
    for name in attn or ():
        if name not in ATTENTION_BACKENDS:
            raise UsageProblem(f"--attn {name!r} is not a backend (choose from {', '.join(ATTENTION_BACKENDS)})")
    for name in dtype or ():
        if name not in DTYPE_CHOICES:
            raise UsageProblem(f"--dtype {name!r} is not a dtype (choose from {', '.join(DTYPE_CHOICES)})")
    batches = _parse_batches(batch_sizes)
    _check_outputs(output or [], plot)  # before the measurement, which can take hours, not after
    if layers is None and model is None and not quick and device == "cpu":
        layers = CPU_DEFAULT_LAYERS
        stderr.print(
            f"note: on a CPU the sweep uses {layers} of the model's layers (same per-layer shape); "
            "--layers N to change that",
            highlight=False,
        )
    if quick:
        layers, seq_len, batches, repeats, warmup = layers or 2, min(seq_len, 512), batches[:2], 1, min(warmup, 1)
    settings = BenchSettings(
        shape=shape,
        model=model,
        backends=tuple(attn or ()),
        seq_len=seq_len,
        batch_sizes=batches,
        mode=mode,
        new_tokens=new_tokens,
        dtypes=tuple(dtype or _default_dtypes(device, mode)),
        device=device,
        warmup=warmup,
        repeats=repeats,
        threads=threads,
        layers=layers,
        against_transformers=against is not None,
    )
    with progress("benchmarking", enabled=not quiet) as update:
        report = run_benchmark(settings, lambda step: update(0, f"measuring {step}"))
    _print_report(report)
    for path in output or []:
        (write_json if path.suffix == ".json" else write_csv)(report, path)
    if plot is not None:
        plot_chart(report, plot)


def _check_outputs(outputs: list[Path], plot: Path | None) -> None:
    """Fail now on a file that could not be written after the measurement."""
    for path in outputs:
        if path.suffix not in OUTPUT_SUFFIXES:
            raise UsageProblem(f"--output {path}: use a .json or .csv file name")
        _check_writable("--output", path)
    if plot is None:
        return
    if plot.suffix not in PLOT_SUFFIXES:
        raise UsageProblem(f"--plot {plot}: use a .png, .svg or .pdf file name")
    _check_writable("--plot", plot)
    if importlib.util.find_spec("matplotlib") is None:
        raise PhiError("--plot needs matplotlib: pip install 'phi-toolkit[plot]'")


def _check_writable(option: str, path: Path) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise UsageProblem(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageProblem(f"{option} {path}: not writable")


def _default_dtypes(device: str, mode: str) -> tuple[str, ...]:
    if device != "cpu":
        return ("float16",)
    return CPU_GENERATE_DTYPES if mode == "generate" else ("float32",)


def _parse_batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise UsageProblem(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if any(b <= 0 for b in batches):
        raise UsageProblem("--batch-sizes must be positive")
    return batches


def _print_report(report: BenchReport) -> None:
    s, meta = report.settings, report.metadata
    layers = _layers_used(report)
    generating = s.mode == "generate"
    new = f" + {s.new_tokens} new tokens" if generating else ""
    title = (
        f"{s.model or s.shape} {s.mode}, seq {s.seq_len}{new}, {s.device}{layers}; "
        f"{meta['gpu'] or meta['cpu']}, {meta['threads']} threads"
    )
    table = Table(title=title, title_style="bold")
    columns = ["impl", "dtype", "attn", "batch", "median s", "min-max s", "tokens/s", "vs eager"]
    columns += ["decode tok/s", "weights/step", "GB/s", "vs hf fp32"] if generating else ["attn share"]
    for name in [*columns, "peak mem"]:
        table.add_column(name, justify="left" if name in ("impl", "dtype", "attn") else "right")
    skipped: dict[str, str] = {}
    for row in report.rows:
        if row.skipped:
            skipped[row.backend] = row.skipped
            continue
        data = row.to_dict()
        cells = [
            row.implementation,
            row.dtype,
            row.backend,
            str(row.batch_size),
            f"{data['median_s']:.3f}",
            f"{data['min_s']:.3f}-{data['max_s']:.3f}",
            f"{data['tokens_per_s']:.1f}",
            _ratio(report.speedup(row)),
        ]
        if generating:
            cells += [
                _number(row.decode_tokens_per_s, ".1f"),
                format_bytes(row.weight_bytes_per_step),
                _number(row.weight_gb_per_s, ".1f"),
                _ratio(report.decode_speedup(row)),
            ]
        else:
            cells.append(_number(data["attention_share"], ".0%"))
        table.add_row(*cells, format_bytes(row.peak_memory_bytes))
    stdout_console().print(table)
    for backend, reason in skipped.items():
        stderr.print(f"skipped {backend}: {reason}", highlight=False)


def _layers_used(report: BenchReport) -> str:
    """', 2 of 24 layers (--layers)' for a cut random shape, ', first 2 layers (--layers)' for a cut checkpoint
    (its own depth is not in the report), nothing for a whole model."""
    used, settings = report.metadata["layers"], report.settings
    if not report.metadata["reduced_layers"]:
        return ""
    if settings.model is not None:
        return f", first {used} layers (--layers)"
    total = SHAPES[settings.shape].num_hidden_layers
    return "" if used == total else f", {used} of {total} layers (--layers)"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
