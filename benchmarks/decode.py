"""Decode and prefill speed of phi_core at each weight dtype against transformers, same random weights, same run.

    python benchmarks/decode.py --shape phi-1.5 --batch 1 --batch 8 --new-tokens 32
    python benchmarks/decode.py --shape tiny --batch 1 --batch 8
    python benchmarks/decode.py --shape phi-1.5 --batch 1 --dtype float32 --dtype bfloat16 --dtype int8
    python benchmarks/decode.py --shape phi-1.5 --batch 1 --prompt-tokens 512 --new-tokens 2 --dtype float32 \\
        --dtype bfloat16 --no-transformers        # prefill of 512 tokens
    python benchmarks/decode.py --shape phi-1.5 --memory --dtype float32 --dtype bfloat16 --dtype int8

Reports prefill seconds, decode tokens/s (median of --repeats rounds; each round runs every implementation and
dtype once at every batch size, in turn), the weight bytes each decode step reads, and the bandwidth that implies
next to this machine's measured float32 GEMV bandwidth (a large matrix-vector product, the ceiling for float32
batch-1 decoding), and each one's decode and prefill speed over the first one's (transformers float32), as the
median of the per-round ratios; ``decode_vs_batch_1`` is a larger batch's aggregate decode rate over the same
contender's at batch 1. transformers runs in float32 (``--transformers-dtype`` adds others). ``--memory`` measures
instead each dtype's peak resident memory in a fresh process of its own: loading a random checkpoint written to
disk in --checkpoint-dtype (float16, as Microsoft's Phi checkpoints are stored) through
``phi_core.load_model``, then a short generation.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import phi_core
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
from phi_core.precision import FLOAT_DTYPES

DTYPES = ["float32", "bfloat16", "float16", "int8", "int4"]


def gemv_bandwidth(repeats: int = 20) -> float:
    """Bytes/s of a 4096 x 8192 float32 matrix times a vector: what float32 batch-1 decoding can hope for."""
    matrix = torch.randn(8192, 4096)
    vector = torch.randn(4096)
    for _ in range(3):
        matrix @ vector
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matrix @ vector
        times.append(time.perf_counter() - start)
    return matrix.numel() * matrix.element_size() / statistics.median(times)


def ours(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    timing = our_generation(model, prompts, new_tokens)
    # The first new token comes from the prefill's logits: decode_s covers the other new_tokens - 1 steps.
    steps = len(prompts) * (new_tokens - 1)
    return timing.prefill_s, steps / timing.decode_s if timing.decode_s else 0.0


def theirs(twin, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    transformers_prefill(twin, ids)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    transformers_generation(twin, ids, new_tokens)
    # generate() includes its own prefill: subtract the separately measured one.
    decode = max(time.perf_counter() - start - prefill, 1e-9)
    return prefill, len(prompts) * (new_tokens - 1) / decode


def summary(name, dtype, measured, batch, step_bytes, bandwidth) -> dict:
    """Medians of one contender's (prefill seconds, decode tokens/s) over the rounds."""
    prefill = statistics.median(m[0] for m in measured)
    rate = statistics.median(m[1] for m in measured)
    steps_per_s = rate / batch
    return {
        "implementation": name,
        "dtype": dtype,
        "batch": batch,
        "prefill_s": round(prefill, 4),
        "decode_tokens_per_s": round(rate, 2),
        "weight_bytes_per_step": step_bytes,
        "weight_gb_per_s": round(step_bytes * steps_per_s / 1e9, 2),
        "share_of_fp32_gemv_bandwidth": round(step_bytes * steps_per_s / bandwidth, 3),
    }


def write_checkpoint(shape: str, dtype: str, folder: Path) -> None:
    """A random checkpoint of ``shape`` stored in ``dtype``, as Phi checkpoints ship (model.safetensors)."""
    config = replace(SHAPES[shape], max_position_embeddings=max(SHAPES[shape].max_position_embeddings, 2048))
    state = {name: tensor.to(FLOAT_DTYPES[dtype]) for name, tensor in random_state(config)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))


def peak_memory_child(folder: Path, dtype: str, prompt_tokens: int, new_tokens: int) -> None:
    """Load the checkpoint as a user would and generate a little, then print this process's peak resident memory
    (VmHWM: the weights as held, the transient copies of loading, file pages mapped while reading)."""
    model = phi_core.load_model(folder, dtype=dtype)
    prompts = torch.randint(0, 50000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).tolist()
    ours(model, prompts, new_tokens)
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"dtype": dtype, "peak_rss_bytes": peak}))


def memory_report(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "checkpoint"
        write_checkpoint(args.shape, args.checkpoint_dtype, folder)
        for dtype in args.dtype or DTYPES:
            command = [sys.executable, __file__, "--child-folder", str(folder), "--child", dtype]
            command += ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{dtype}: peak {rows[-1]['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    base = next((r["peak_rss_bytes"] for r in rows if r["dtype"] == "float32"), None)
    for row in rows:
        row["checkpoint_dtype"] = args.checkpoint_dtype
        row["ratio_to_float32"] = round(row["peak_rss_bytes"] / base, 3) if base else None
    return rows


def speed_report(args: argparse.Namespace) -> list[dict]:
    """Every contender in turn within each round, so a slow minute of a shared machine hits all of them alike;
    ratios against the first contender (transformers float32 unless --no-transformers) are medians of the
    per-round ratios."""
    config = replace(SHAPES[args.shape], max_position_embeddings=max(SHAPES[args.shape].max_position_embeddings, 2048))
    bandwidth = gemv_bandwidth()
    batches = args.batch or [1, 8]
    contenders = []  # (implementation, dtype, runner, weight bytes per step)
    if not args.no_transformers:
        for dtype in args.transformers_dtype or ["float32"]:
            twin = transformers_twin(config, "sdpa", {n: t.to(FLOAT_DTYPES[dtype]) for n, t in random_state(config)})
            contenders.append(("transformers", dtype, functools.partial(theirs, twin), weight_bytes_per_step(twin)))
    for dtype in args.dtype or ["float32"]:
        model = random_model(config, dtype, "cpu")
        contenders.append(("phi_core", dtype, functools.partial(ours, model), weight_bytes_per_step(model)))
    prompts = {
        batch: torch.randint(0, 50000, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(batch))
        for batch in batches
    }
    for batch in batches:
        for _, _, runner, _ in contenders:
            runner(prompts[batch].tolist(), 4)  # warm-up
    # Batch sizes interleaved too: every round runs every contender at every batch size.
    rounds = [
        {
            batch: [runner(prompts[batch].tolist(), args.new_tokens) for _, _, runner, _ in contenders]
            for batch in batches
        }
        for _ in range(args.repeats)
    ]
    results = []
    for batch in batches:
        for i, (name, dtype, _, step_bytes) in enumerate(contenders):
            row = summary(name, dtype, [r[batch][i] for r in rounds], batch, step_bytes, bandwidth)
            first = contenders[0]
            row["versus"] = f"{first[0]} {first[1]}"
            row["decode_ratio"] = round(statistics.median(r[batch][i][1] / r[batch][0][1] for r in rounds), 3)
            row["prefill_ratio"] = round(statistics.median(r[batch][0][0] / r[batch][i][0] for r in rounds), 3)
            if batch != batches[0]:
                # aggregate decode tokens/s over the first batch size's, same contender, median of the rounds
                ratios = (r[batch][i][1] / r[batches[0]][i][1] for r in rounds)
                row[f"decode_vs_batch_{batches[0]}"] = round(statistics.median(ratios), 3)
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="phi-1.5", choices=list(SHAPES))
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable) [1, 8]")
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="phi_core weight dtypes (repeatable)")
    parser.add_argument("--transformers-dtype", action="append", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory", action="store_true", help="peak resident memory per dtype instead of speed")
    parser.add_argument(
        "--checkpoint-dtype", default="float16", choices=list(FLOAT_DTYPES), help="--memory: dtype on disk [float16]"
    )
    parser.add_argument("--child", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--child-folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        peak_memory_child(args.child_folder, args.child, args.prompt_tokens, args.new_tokens)
        return
    results = memory_report(args) if args.memory else speed_report(args)
    report = {
        "shape": args.shape,
        "threads": torch.get_num_threads(),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "results": results,
    }
    if not args.memory:
        report["fp32_gemv_gb_per_s"] = round(gemv_bandwidth() / 1e9, 2)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
