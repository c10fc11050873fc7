"""How much a model repeats itself under each generation setting: the measurement behind the embedded model's
generation_config.json.

    python benchmarks/repetition.py                          # the embedded model, the candidate settings below
    python benchmarks/repetition.py --model ./phi-1_5 --new-tokens 96 --seeds 5 --json out.json

For each setting, every prompt is completed once per seed (``--seeds`` runs, seeded 0, 1, ... so the numbers are
reproducible). A completion's repeated-4-gram rate is the share of its 4-grams of tokens that already appeared
earlier in the same completion; the table gives the mean over all completions, with the distinct-token share, and
the completions of the first seed are printed so the text can be read, not only counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality import PROMPTS  # the same code prompts the quality benchmark completes (this script's folder)

import phi_core
from phi_core.generation import generate
from phi_core.generation_config import GenerationDefaults, GenerationOverrides, resolve_generation

CANDIDATES = {
    "greedy": GenerationDefaults(),
    "greedy, penalty 1.3": GenerationDefaults(repetition_penalty=1.3),
    "t0.7 p0.9 penalty 1.2": GenerationDefaults(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2),
    "t0.6 p0.9 penalty 1.2": GenerationDefaults(do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=1.2),
    "t0.7 k40 p0.9 penalty 1.1": GenerationDefaults(
        do_sample=True, temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1
    ),
    "t0.8 p0.95 penalty 1.2": GenerationDefaults(do_sample=True, temperature=0.8, top_p=0.95, repetition_penalty=1.2),
}


def repeated_ngram_rate(tokens: list[int], n: int = 4) -> float:
    """Share of the n-grams of ``tokens`` that already occurred earlier in ``tokens``."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams) if grams else 0.0


def complete(model, tokenizer, defaults: GenerationDefaults, seed: int, new_tokens: int) -> list[list[int]]:
    overrides = GenerationOverrides(max_new_tokens=new_tokens, seed=seed)
    params = resolve_generation(overrides, defaults, logprobs=False).params
    rows: list[list[int]] = [[] for _ in PROMPTS]
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    with torch.no_grad():
        for event in generate(model, tokenizer, prompts, params):
            rows[event.row].append(event.token_id)
    return rows


def measure(model, tokenizer, defaults: GenerationDefaults, seeds: int, new_tokens: int) -> dict:
    rates, distinct, texts = [], [], []
    for seed in range(seeds):
        for row in complete(model, tokenizer, defaults, seed, new_tokens):
            rates.append(repeated_ngram_rate(row))
            distinct.append(len(set(row)) / len(row) if row else 0.0)
            if seed == 0:
                texts.append(tokenizer.decode(row))
    return {
        "repeated_4gram_rate": round(statistics.mean(rates), 4),
        "distinct_token_share": round(statistics.mean(distinct), 4),
        "completions": seeds * len(PROMPTS),
        "texts_seed_0": texts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--show", action="store_true", help="print the first seed's completions")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = phi_core.load_model(args.model), phi_core.load_tokenizer(args.model)
    results = {}
    for name, defaults in CANDIDATES.items():
        results[name] = measure(model, tokenizer, defaults, args.seeds, args.new_tokens)
        row = results[name]
        rate, distinct = row["repeated_4gram_rate"], row["distinct_token_share"]
        print(f"{name:28s} repeated 4-grams {rate:6.1%}  distinct {distinct:.2f}")
        if args.show:
            for prompt, text in zip(PROMPTS, row["texts_seed_0"], strict=True):
                print(f"  --- {prompt!r}\n{prompt}{text}")
    if args.json:
        settings = {"model": args.model, "new_tokens": args.new_tokens, "seeds": args.seeds, "prompts": PROMPTS}
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
