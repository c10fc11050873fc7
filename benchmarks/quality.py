"""How far each weight dtype moves a model's outputs from float32: logits over a text, and greedy generation.

    python benchmarks/quality.py                       # the embedded model, on a file of the standard library
    python benchmarks/quality.py --model ./phi-1_5 --text some_file.py --dtype bfloat16 --dtype int8

For each dtype, against the same checkpoint in float32, over the text read once with teacher forcing: the
largest and the mean absolute logit difference, how often the top-1 token agrees, and the text's perplexity.
Then greedy generation from each prompt: how many of the new tokens equal float32's, and where the first
difference falls. Results are printed as JSON (and written to --json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import phi_core
import phi_core.linear
from phi_core.generation import GenerationParams, generate

PROMPTS = [
    "def fibonacci(n):",
    "import os\n",
    "class Stack:\n    def",
    "# Return the sum of a list\ndef",
    "for line in open(path):",
    'if __name__ == "__main__":',
    "def parse_args(argv):\n    parser =",
    "try:\n    import json\nexcept",
]
DEFAULT_TEXT = Path(__import__("textwrap").__file__)  # a standard-library file, present on every Python


def text_logits(model: torch.nn.Module, ids: list[int], window: int) -> torch.Tensor:
    """Next-token logits at every position of ``ids``, read in windows of the model's context."""
    chunks = [ids[start : start + window] for start in range(0, len(ids), window)]
    with torch.no_grad():
        return torch.cat([model(torch.tensor([chunk])).logits[0] for chunk in chunks])


def greedy(model: torch.nn.Module, prompts: list[list[int]], steps: int) -> list[list[int]]:
    params = GenerationParams(max_new_tokens=steps, ignore_eos=True, logprobs=False)
    rows: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for event in generate(model, None, prompts, params):
            rows[event.row].append(event.token_id)
    return rows


def first_difference(want: list[int], got: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), None)


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    targets = torch.tensor(ids[1:])
    loss = torch.nn.functional.cross_entropy(logits[:-1].float(), targets)
    return math.exp(float(loss))


def compare(args: argparse.Namespace) -> dict:
    tokenizer = phi_core.load_tokenizer(args.model)
    text = args.text.read_text(encoding="utf-8")
    ids = tokenizer.encode(text)[: args.max_tokens]
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    reference = phi_core.load_model(args.model, dtype="float32")
    window = min(args.window, reference.config.max_position_embeddings)
    base_logits = text_logits(reference, ids, window)
    # Each row alone: batching pads, and padding is not what is being compared.
    base_greedy = [greedy(reference, [p], args.new_tokens)[0] for p in prompts]
    del reference
    rows = [{"dtype": "float32", "perplexity": round(perplexity(base_logits, ids), 4)}]
    for dtype in args.dtype:
        model = phi_core.load_model(args.model, dtype=dtype)
        logits = text_logits(model, ids, window)
        diff = (logits - base_logits).abs()
        generated = [greedy(model, [p], args.new_tokens)[0] for p in prompts]
        pairs = list(zip(base_greedy, generated, strict=True))
        same = sum(a == b for want, got in pairs for a, b in zip(want, got, strict=False))
        first = [
            next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), None) for want, got in pairs
        ]
        rows.append(
            {
                "dtype": dtype,
                "precision": model.precision.describe(),
                "max_abs_logit_diff": round(float(diff.max()), 5),
                "mean_abs_logit_diff": round(float(diff.mean()), 5),
                "logit_std": round(float(base_logits.std()), 4),
                "top1_agreement": round(float((logits.argmax(-1) == base_logits.argmax(-1)).float().mean()), 4),
                "perplexity": round(perplexity(logits, ids), 4),
                "greedy_tokens_equal": f"{same}/{sum(len(g) for g in base_greedy)}",
                "prompts_identical": sum(f is None for f in first),
                "first_difference_at": first,
            }
        )
        del model
    return {
        "model": args.model,
        "window": window,
        "pack_all": args.pack_all,
        "text": str(args.text),
        "text_tokens": len(ids),
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "torch": torch.__version__,
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="checkpoint folder or embedded name [tiny]")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text to score [textwrap.py]")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument(
        "--window", type=int, default=256, help="tokens read at once [256: the embedded model's training length]"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", action="append", choices=["bfloat16", "float16", "int8"])
    parser.add_argument(
        "--pack-all",
        action="store_true",
        help="pack and quantize small matrices too, as every matrix of a real Phi shape is (the embedded model's "
        "layer matrices are small enough that phi_core keeps them float32)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.pack_all:
        phi_core.linear.SMALL_MATRIX = 0
    args.dtype = args.dtype or ["bfloat16", "float16", "int8"]
    report = compare(args)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
