"""How far each weight dtype moves a model's outputs from float32: logits over a text, and greedy generation.

    python benchmarks/quality.py --pack-all            # the embedded model, every matrix quantized
    python benchmarks/quality.py --model ./wide-256 --int4-group 32 --int4-group 64 --int4-group 128
    python benchmarks/quality.py --model ./phi-1_5 --text some_file.py --dtype bfloat16 --dtype int4

For each dtype, against the same checkpoint in float32, over the text read once with teacher forcing: the
largest and the mean absolute logit difference, how often the top-1 token agrees, and the text's perplexity.
Then greedy generation from each prompt: how many of the new tokens equal float32's, and where the first
difference falls. Results are printed as JSON (and written to --json).

The default text is held-out standard-library source: the files ``scripts/train_tiny.py`` keeps out of the
embedded model's training (a fixed 1-in-20 share by a hash of the path), read in path order up to
``--max-tokens``. ``--int4-group`` measures int4 at each group size given (``phi_core.linear.INT4_GROUP``).
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
import phi_core.kernels
import phi_core.linear
from phi_core.generation import GenerationParams, generate
from phi_core.linear import PhiLinear

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
ROOT = Path(__file__).resolve().parents[1]


def held_out_text() -> str:
    """The standard-library files the embedded model was not trained on (scripts/train_tiny.py's split)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_tiny

    return "\n".join(train_tiny.read_source(p) for p in train_tiny.stdlib_files() if train_tiny.is_held_out(p))


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
    text = args.text.read_text(encoding="utf-8") if args.text else held_out_text()
    ids = tokenizer.encode(text)[: args.max_tokens]
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    reference = phi_core.load_model(args.model, dtype="float32")
    window = min(args.window, reference.config.max_position_embeddings)
    base_logits = text_logits(reference, ids, window)
    # Each row alone: batching pads, and padding is not what is being compared.
    base_greedy = [greedy(reference, [p], args.new_tokens)[0] for p in prompts]
    del reference
    base_perplexity = perplexity(base_logits, ids)
    rows = [{"dtype": "float32", "perplexity": round(base_perplexity, 4)}]
    runs = [(dtype, None) for dtype in args.dtype if dtype != "int4"]
    if "int4" in args.dtype:
        runs += [("int4", group) for group in args.int4_group or [phi_core.linear.INT4_GROUP]]
    default_group = phi_core.linear.INT4_GROUP
    for dtype, group in runs:
        phi_core.linear.INT4_GROUP = group or default_group
        model = phi_core.load_model(args.model, dtype=dtype)
        phi_core.linear.INT4_GROUP = default_group
        logits = text_logits(model, ids, window)
        diff = (logits - base_logits).abs()
        generated = [greedy(model, [p], args.new_tokens)[0] for p in prompts]
        pairs = list(zip(base_greedy, generated, strict=True))
        same = sum(a == b for want, got in pairs for a, b in zip(want, got, strict=False))
        first = [first_difference(want, got) for want, got in pairs]
        rows.append(
            {
                "dtype": dtype if group is None else f"int4 g{group}",
                "precision": model.precision.describe(),
                "weight_bytes": sum(m.stored_bytes() for m in model.modules() if isinstance(m, PhiLinear)),
                "max_abs_logit_diff": round(float(diff.max()), 5),
                "mean_abs_logit_diff": round(float(diff.mean()), 5),
                "logit_std": round(float(base_logits.std()), 4),
                "top1_agreement": round(float((logits.argmax(-1) == base_logits.argmax(-1)).float().mean()), 4),
                "perplexity": round(perplexity(logits, ids), 4),
                "perplexity_vs_float32": round(perplexity(logits, ids) / base_perplexity - 1, 5),
                "greedy_tokens_equal": f"{same}/{sum(len(g) for g in base_greedy)}",
                "prompts_identical": sum(f is None for f in first),
                "first_difference_at": first,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del model
    return {
        "model": args.model,
        "window": window,
        "pack_all": args.pack_all,
        "text": str(args.text) if args.text else "held-out standard library (scripts/train_tiny.py's split)",
        "cpu": phi_core.kernels.cpu_info().describe(),
        "text_tokens": len(ids),
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "torch": torch.__version__,
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="checkpoint folder or embedded name [tiny]")
    parser.add_argument("--text", type=Path, help="text to score [held-out standard-library files]")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument(
        "--window", type=int, default=256, help="tokens read at once [256: the embedded model's training length]"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", action="append", choices=["bfloat16", "float16", "int8", "int4"])
    parser.add_argument("--int4-group", type=int, action="append", choices=phi_core.kernels.INT4_GROUPS)
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
    args.dtype = args.dtype or ["bfloat16", "float16", "int8", "int4"]
    report = compare(args)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
