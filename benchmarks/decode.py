"""Decode and prefill speed of phi_core against transformers, on the same random weights, in the same run.

    python benchmarks/decode.py --shape phi-1.5 --batch 1 --batch 8 --new-tokens 32
    python benchmarks/decode.py --shape tiny --batch 1 --batch 8

Reports prefill seconds, decode tokens/s (median of --repeats), the weight bytes each decode step reads, and
the bandwidth that implies next to this machine's measured GEMV bandwidth (a large matrix-vector product, the
ceiling for batch-1 decoding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi_core.bench import SHAPES, random_model, transformers_twin
from phi_core.generation import GenerationParams, Timing, generate


def gemv_bandwidth(dtype: torch.dtype, repeats: int = 20) -> float:
    """Bytes/s of a 4096 x 8192 matrix times a vector: what batch-1 decoding can hope for."""
    matrix = torch.randn(8192, 4096, dtype=dtype)
    vector = torch.randn(4096, dtype=dtype)
    for _ in range(3):
        matrix @ vector
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matrix @ vector
        times.append(time.perf_counter() - start)
    return matrix.numel() * matrix.element_size() / statistics.median(times)


def ours(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    timing = Timing()
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    with torch.no_grad():
        count = sum(1 for _ in generate(model, None, prompts, params, timing))
    # The first new token comes from the prefill's logits: decode_s covers the other new_tokens - 1 steps.
    steps = count - len(prompts)
    return timing.prefill_s, steps / timing.decode_s if timing.decode_s else 0.0


def theirs(twin, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        start = time.perf_counter()
        twin(ids, attention_mask=mask, logits_to_keep=1)  # last position only, as generate() and ours do
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        twin.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
        total = time.perf_counter() - start
    # generate() includes its own prefill: subtract the separately measured one.
    decode = max(total - prefill, 1e-9)
    return prefill, len(prompts) * (new_tokens - 1) / decode


def weight_bytes(model) -> int:
    """Bytes read per decode step: every weight once (the tied embedding is read as the head)."""
    seen, total = set(), 0
    for name, param in model.named_parameters():
        if param.data_ptr() in seen or (name == "model.embed_tokens.weight" and not model.config.tie_word_embeddings):
            continue  # the embedding lookup reads one row per token, not the matrix
        seen.add(param.data_ptr())
        total += param.numel() * param.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="phi-1.5", choices=list(SHAPES))
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable) [1, 8]")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = SHAPES[args.shape]
    config = replace(config, max_position_embeddings=max(config.max_position_embeddings, 2048))
    model = random_model(config, dtype, "cpu")
    twin = transformers_twin(model, "sdpa")
    bandwidth = gemv_bandwidth(dtype)
    bytes_per_step = weight_bytes(model)
    results = []
    for batch in args.batch or [1, 8]:
        generator = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, 50000, (batch, args.prompt_tokens), generator=generator).tolist()
        ours(model, prompts, 4)  # warm-up
        theirs(twin, prompts, 4)
        runs = {
            "phi_core": [ours(model, prompts, args.new_tokens) for _ in range(args.repeats)],
            "transformers": [theirs(twin, prompts, args.new_tokens) for _ in range(args.repeats)],
        }
        for name, measured in runs.items():
            prefill = statistics.median(m[0] for m in measured)
            rate = statistics.median(m[1] for m in measured)
            steps_per_s = rate / batch
            results.append(
                {
                    "implementation": name,
                    "batch": batch,
                    "prefill_s": round(prefill, 4),
                    "decode_tokens_per_s": round(rate, 2),
                    "weight_gb_per_s": round(bytes_per_step * steps_per_s / 1e9, 2),
                    "share_of_gemv_bandwidth": round(bytes_per_step * steps_per_s / bandwidth, 3),
                }
            )
        ratio = results[-2]["decode_tokens_per_s"] / results[-1]["decode_tokens_per_s"]
        print(f"batch {batch}: phi_core / transformers decode = {ratio:.2f}x", flush=True)
    report = {
        "shape": args.shape,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "weight_bytes_per_step": bytes_per_step,
        "gemv_gb_per_s": round(bandwidth / 1e9, 2),
        "torch": torch.__version__,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
