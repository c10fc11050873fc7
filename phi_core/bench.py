"""The benchmark harness behind ``phi bench``: random weights of the real Phi shapes, honest timing, and the
docs' speedup chart.

Timing: warm-up runs are excluded; CUDA work is synchronized before the clock is read; every repeat is kept
and reported as median, min and max. Peak memory is CUDA's max allocated on a GPU and the resident-set
high-water mark (reset before each measurement through /proc/self/clear_refs) on a CPU.

In generate mode each row also has its decode rate (new tokens after the first, which the prefill yields, over
the decode time) and the weight bytes one decode step reads, so their product is the bandwidth achieved: on a
CPU batch-1 decoding reads every matrix once per token, and that bandwidth is its ceiling.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from phi_core.attention import ATTENTION_BACKENDS, AttentionMask, check_backend
from phi_core.bench_models import (
    SHAPES,
    our_generation,
    random_model,
    random_state,
    transformers_generation,
    transformers_prefill,
    transformers_twin,
    weight_bytes_per_step,
)
from phi_core.bench_report import BenchReport, BenchSettings, Row
from phi_core.checkpoint import read_state_dict, resolve_source
from phi_core.config import PhiConfig
from phi_core.errors import BackendUnavailableError
from phi_core.layouts import to_current_layout
from phi_core.loading import load_model
from phi_core.model import PhiForCausalLM
from phi_core.precision import FLOAT_DTYPES


def bench_config(settings: BenchSettings) -> PhiConfig:
    if settings.shape not in SHAPES:
        raise ValueError(f"unknown shape {settings.shape!r} (choose one of {', '.join(SHAPES)})")
    config = SHAPES[settings.shape]
    if settings.layers is not None:
        config = replace(config, num_hidden_layers=settings.layers)
    return replace(
        config,
        max_position_embeddings=max(
            config.max_position_embeddings,
            settings.seq_len + (settings.new_tokens if settings.mode == "generate" else 0),
        ),
    )


# Timing ------------------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets the kernel's resident-set high-water mark


def peak_memory(device: str) -> int | None:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_runs(
    run: Callable[[], float | None], device: str, warmup: int, repeats: int
) -> tuple[list[float], list[float], int | None]:
    """Seconds of each of ``repeats`` runs after ``warmup`` untimed ones, the part of them each run reports as
    its decode seconds (when it does), and the peak memory of the timed runs."""
    for _ in range(warmup):
        run()
    synchronize(device)
    reset_peak_memory(device)
    seconds, reported = [], []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        part = run()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        if part is not None:
            reported.append(part)
    return seconds, reported, peak_memory(device)


def attention_seconds(model: PhiForCausalLM, batch: int, seq_len: int, device: str, repeats: int) -> float:
    """Median seconds of the attention alone (all layers) for one prefill, as the model's layers compute it (its
    backend, or phi_core's compiled attention where that serves it): the part backends change."""
    config, dtype = model.config, model.compute_dtype
    generator = torch.Generator(device=device).manual_seed(1)
    shape = (batch, config.num_attention_heads, seq_len, config.head_dim)
    kv_shape = (batch, config.num_key_value_heads, seq_len, config.head_dim)
    q = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    k = torch.randn(kv_shape, generator=generator, device=device, dtype=dtype)
    v = torch.randn(kv_shape, generator=generator, device=device, dtype=dtype)
    mask = AttentionMask(key_valid=None, new=seq_len, total=seq_len, device=torch.device(device))
    attend = model.model.layers[0].self_attn.attend
    seconds, _, _ = time_runs(lambda: attend(q, k, v, mask), device, warmup=1, repeats=repeats)
    return statistics.median(seconds) * config.num_hidden_layers


# The sweep ---------------------------------------------------------------------------------------------------
def available_backends(settings: BenchSettings, dtype: torch.dtype) -> list[tuple[str, str | None]]:
    """(backend, reason it is skipped or None) for each backend asked for (default: all, eager first)."""
    asked = settings.backends or ATTENTION_BACKENDS
    out = []
    for name in asked:
        try:
            check_backend(name, settings.device, dtype)
            out.append((name, None))
        except BackendUnavailableError as exc:
            if settings.backends and len(settings.backends) == 1:
                raise
            out.append((name, str(exc)))
    return out


def run_benchmark(settings: BenchSettings, on_step: Callable[[str], None] | None = None) -> BenchReport:
    """Measure every (dtype, implementation, backend, batch size) of ``settings``; ``on_step`` hears progress.

    One model is held at a time. transformers runs once per float dtype (int8 compares with its float32)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    rows: list[Row] = []
    twin_dtypes_done: set[str] = set()
    info: dict[str, Any] = {}
    for dtype_name in settings.dtypes:
        model = _bench_model(settings, dtype_name)
        info = info or metadata(settings, model)
        backends = available_backends(settings, model.compute_dtype)
        twin_dtype = dtype_name if dtype_name in FLOAT_DTYPES else "float32"
        with_twin = settings.against_transformers and twin_dtype not in twin_dtypes_done
        twin_dtypes_done.add(twin_dtype)
        for batch in settings.batch_sizes:
            ids = torch.randint(
                0,
                min(model.config.vocab_size, 50257),
                (batch, settings.seq_len),
                generator=torch.Generator().manual_seed(settings.seed),
            ).to(settings.device)
            for backend, reason in backends:
                if on_step:
                    on_step(f"phi_core {model.precision.weights} {backend} batch {batch}")
                rows.append(_measure_ours(model, backend, reason, ids, settings))
                if with_twin and reason is None and backend != "flash_attention_2":
                    if on_step:
                        on_step(f"transformers {twin_dtype} {backend} batch {batch}")
                    rows.append(_measure_transformers(model, twin_dtype, backend, ids, settings))
        del model
    return BenchReport(settings, info, rows)


def _bench_model(settings: BenchSettings, dtype: str) -> PhiForCausalLM:
    """The checkpoint of ``settings.model`` (cut to ``settings.layers``), or random weights of the shape."""
    if settings.model is None:
        return random_model(bench_config(settings), dtype, settings.device, settings.seed)
    model = load_model(settings.model, "causal-lm", dtype, "sdpa", settings.device)
    if settings.layers is not None:
        model.model.layers = model.model.layers[: settings.layers]
        model.config = model.model.config = replace(model.config, num_hidden_layers=settings.layers)
    return model


def _measure_ours(
    model: PhiForCausalLM, backend: str, reason: str | None, ids: torch.Tensor, settings: BenchSettings
) -> Row:
    row = Row("phi_core", backend, ids.shape[0], model.precision.weights, skipped=reason)
    if reason is not None:
        return row
    model.set_attention_backend(backend)
    run = _forward_run(model, ids) if settings.mode == "forward" else _generate_run(model, ids, settings.new_tokens)
    with torch.no_grad():
        row.seconds, decode, row.peak_memory_bytes = time_runs(run, settings.device, settings.warmup, settings.repeats)
    row.tokens = _tokens_per_run(ids, settings)
    if settings.mode == "forward":
        row.attention_seconds = attention_seconds(model, ids.shape[0], ids.shape[1], settings.device, settings.repeats)
    else:
        _record_decode(row, decode, model, settings)
    return row


def _measure_transformers(
    model: PhiForCausalLM, dtype: str, backend: str, ids: torch.Tensor, settings: BenchSettings
) -> Row:
    twin = transformers_twin(model.config, backend, _twin_weights(model, dtype, settings), settings.device)
    row = Row("transformers", backend, ids.shape[0], dtype)
    if settings.mode == "forward":

        def run() -> None:
            twin(ids)
    else:

        def run() -> None:
            transformers_generation(twin, ids, settings.new_tokens)

    with torch.no_grad():
        row.seconds, _, row.peak_memory_bytes = time_runs(run, settings.device, settings.warmup, settings.repeats)
    if settings.mode == "generate":
        # generate() does not report its prefill: time the same prefill alone and take it off each run.
        prefill, _, _ = time_runs(lambda: transformers_prefill(twin, ids), settings.device, 0, 1)
        decode = [max(seconds - prefill[0], 1e-9) for seconds in row.seconds]
        _record_decode(row, decode, twin, settings)
    row.tokens = _tokens_per_run(ids, settings)
    return row


def _record_decode(row: Row, decode_seconds: list[float], model: torch.nn.Module, settings: BenchSettings) -> None:
    row.decode_seconds = decode_seconds
    row.decode_tokens = row.batch_size * (settings.new_tokens - 1)  # the first new token comes from the prefill
    row.weight_bytes_per_step = weight_bytes_per_step(model)


def _twin_weights(model: PhiForCausalLM, dtype: str, settings: BenchSettings) -> dict[str, torch.Tensor]:
    """Plain weights for transformers: the same values as ours, in ``dtype``."""
    torch_dtype = FLOAT_DTYPES[dtype]
    if settings.model is None:
        return {name: t.to(settings.device, torch_dtype) for name, t in random_state(model.config, settings.seed)}
    folder = resolve_source(settings.model, None, weights=True)
    state = to_current_layout(read_state_dict(folder), model.config, folder)
    return {name: tensor.to(settings.device, torch_dtype) for name, tensor in state.items()}


def _forward_run(model: PhiForCausalLM, ids: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model(ids)

    return run


def _generate_run(model: PhiForCausalLM, ids: torch.Tensor, new_tokens: int) -> Callable[[], float]:
    prompts = ids.tolist()
    return lambda: our_generation(model, prompts, new_tokens).decode_s


def _tokens_per_run(ids: torch.Tensor, settings: BenchSettings) -> int:
    return ids.numel() if settings.mode == "forward" else ids.shape[0] * settings.new_tokens


def metadata(settings: BenchSettings, model: PhiForCausalLM) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.device(settings.device).type == "cuda" else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
        "reduced_layers": settings.layers is not None,
    }
    for package in ("flash_attn", "transformers"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
