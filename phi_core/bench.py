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
import csv
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch

from phi_core.attention import ATTENTION_BACKENDS, AttentionMask, attention_function, check_backend
from phi_core.checkpoint import read_state_dict, resolve_source
from phi_core.config import PhiConfig
from phi_core.embedded import TINY_CONFIG
from phi_core.errors import BackendUnavailableError, PhiError
from phi_core.generation import GenerationParams, Timing, generate
from phi_core.layouts import to_current_layout
from phi_core.linear import PhiLinear
from phi_core.loading import load_model, place_weights, storage_dtypes
from phi_core.model import PhiForCausalLM
from phi_core.precision import FLOAT_DTYPES, choose_precision

Mode = Literal["forward", "generate"]
SHAPES: dict[str, PhiConfig] = {
    "phi-1": PhiConfig(),
    "phi-1.5": PhiConfig(),
    "phi-2": PhiConfig(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, partial_rotary_factor=0.4),
    "tiny": TINY_CONFIG,
}


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


# Models --------------------------------------------------------------------------------------------------
def random_model(config: PhiConfig, dtype: str | torch.dtype, device: str, seed: int = 0) -> PhiForCausalLM:
    """A Phi of ``config``'s shape with random weights, stored as ``dtype`` resolves to on ``device``.

    The same seed gives the same weights at every dtype (drawn in float32, then rounded), so dtypes compare on
    the same model.
    """
    precision = choose_precision(dtype, device, torch.float32)
    with torch.device("meta"):
        model = PhiForCausalLM(config)
    dtypes = storage_dtypes(model, precision, torch.float32)
    state = {name: tensor.to(device=device, dtype=dtypes[name]) for name, tensor in random_state(config, seed)}
    place_weights(model, state, precision, device, torch.float32)
    return model.eval().requires_grad_(False)


def random_state(config: PhiConfig, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Random float32 weights for every tensor of a ``config`` language model (a tied head once), one at a time."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = PhiForCausalLM(config).state_dict()
    for name, param in shapes.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if "layernorm" in name:
            yield name, torch.full(param.shape, 1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            yield name, torch.zeros(param.shape)
        else:
            yield name, torch.empty(param.shape).normal_(0.0, 0.02, generator=generator)


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


def transformers_twin(
    config: PhiConfig, backend: str, state: dict[str, torch.Tensor], device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """transformers' PhiForCausalLM of ``config`` holding the weights ``state`` (checkpoint names).

    phi_core's loaded models hold their weights in their own layout (fused q/k/v, packed formats), so the twin
    takes the plain tensors they were made from (test/benchmark oracle only).
    """
    try:
        import transformers
    except ImportError:
        raise PhiError("--against transformers needs the transformers package: pip install transformers") from None
    hf_config = transformers.PhiConfig(**_hf_config_fields(config))
    hf_config._attn_implementation = backend
    with torch.device("meta"):
        twin = transformers.PhiForCausalLM(hf_config)
    weights = dict(state)
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    twin.load_state_dict(weights, strict=True, assign=True)
    # Rotary frequencies are a non-persistent buffer, so the meta build left them empty: make them for real.
    twin.model.rotary_emb = type(twin.model.rotary_emb)(hf_config)
    return twin.to(device).eval()


def _hf_config_fields(config: PhiConfig) -> dict[str, Any]:
    raw = config.to_hf_dict()
    for key in ("architectures", "model_type", "id2label", "label2id"):
        raw.pop(key, None)
    raw.pop("rope_scaling")
    raw["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": raw.pop("rope_theta"),
        "partial_rotary_factor": raw.pop("partial_rotary_factor"),
    }
    return raw


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


def attention_seconds(
    config: PhiConfig, backend: str, batch: int, seq_len: int, dtype: torch.dtype, device: str, repeats: int
) -> float:
    """Median seconds of the attention alone (all layers) for one prefill: the part backends change."""
    generator = torch.Generator(device=device).manual_seed(1)
    shape = (batch, config.num_attention_heads, seq_len, config.head_dim)
    kv_shape = (batch, config.num_key_value_heads, seq_len, config.head_dim)
    q = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    k = torch.randn(kv_shape, generator=generator, device=device, dtype=dtype)
    v = torch.randn(kv_shape, generator=generator, device=device, dtype=dtype)
    mask = AttentionMask(key_valid=None, new=seq_len, total=seq_len, device=torch.device(device))
    attend = attention_function(backend)
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


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of matrices one decode step reads: every Linear once (the embedding is a row lookup)."""
    if isinstance(model, PhiForCausalLM):
        return sum(m.stored_bytes() for m in model.modules() if isinstance(m, PhiLinear))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(m.weight.numel() * m.weight.element_size() for m in linears)


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
        row.attention_seconds = attention_seconds(
            model.config, backend, ids.shape[0], ids.shape[1], model.compute_dtype, settings.device, settings.repeats
        )
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
        mask = torch.ones_like(ids)

        def run() -> None:
            twin.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=settings.new_tokens,
                min_new_tokens=settings.new_tokens,
                pad_token_id=0,
            )

    with torch.no_grad():
        row.seconds, _, row.peak_memory_bytes = time_runs(run, settings.device, settings.warmup, settings.repeats)
        if settings.mode == "generate":
            # generate() does not report its prefill: time the same prefill alone (last logits only, as generate
            # keeps) and take it off each run.
            prefill, _, _ = time_runs(lambda: twin(ids, attention_mask=mask, logits_to_keep=1), settings.device, 0, 1)
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
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True, logprobs=False)  # as transformers
    prompts = ids.tolist()

    def run() -> float:
        timing = Timing()
        for _ in generate(model, None, prompts, params, timing):
            pass
        return timing.decode_s

    return run


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


# Outputs -----------------------------------------------------------------------------------------------------
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
