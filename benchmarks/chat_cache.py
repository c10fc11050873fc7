"""What keeping the KV cache between turns saves in a long conversation: tokens pre-filled and pre-fill time per
turn, with the cache kept (phi chat) and without (every turn pre-filled from the start, as a stateless call is).

    python benchmarks/chat_cache.py                         # the embedded model, 16 turns
    python benchmarks/chat_cache.py --model ./phi-2 --turns 8 --json out.json

Both modes run the same greedy conversation (the same messages, the same replies) in alternating rounds, so load on
the machine falls on both alike; the table gives per-mode totals and the ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import phi_core
from phi_core.checkpoint import resolve_source
from phi_core.conversation import Conversation, open_conversation
from phi_core.generation_config import GenerationOverrides

MESSAGES = [
    "Write a function that reverses a string.",
    "Now make it skip spaces.",
    "Add a docstring.",
    "How would you test it?",
    "Write the test with pytest.",
    "What does parametrize do?",
    "Use it in the test.",
    "What about unicode input?",
]


def run(conversation: Conversation, turns: int) -> dict:
    """Talk for ``turns`` turns; pre-fill tokens and seconds per turn (the first reply token's wait)."""
    prefilled, seconds = [], []
    for turn in range(turns):
        started = time.perf_counter()
        stream = conversation.reply(MESSAGES[turn % len(MESSAGES)])
        next(stream)  # the first token comes right after the pre-fill
        seconds.append(time.perf_counter() - started)
        for _ in stream:
            pass
        prefilled.append(conversation.last_turn.prefilled)
    return {"prefilled_tokens": prefilled, "first_token_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--format", default="chat")
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--reply-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = phi_core.load_model(args.model), phi_core.load_tokenizer(args.model)
    folder = resolve_source(args.model, weights=False)
    overrides = GenerationOverrides(do_sample=False, max_new_tokens=args.reply_tokens)
    results: dict[str, list[dict]] = {"kept": [], "refilled": []}
    for _ in range(args.rounds):
        for mode in results:
            conversation = open_conversation(model, tokenizer, folder, overrides, args.format)
            conversation.keep_cache = mode == "kept"
            results[mode].append(run(conversation, args.turns))
    summary = {}
    for mode, rounds in results.items():
        tokens = sum(rounds[0]["prefilled_tokens"])
        seconds = statistics.median(sum(r["first_token_s"]) for r in rounds)
        summary[mode] = {"prefilled_tokens": tokens, "median_prefill_s": round(seconds, 4), "rounds": rounds}
        print(
            f"{mode:9s} pre-filled {tokens:6d} tokens in {args.turns} turns; time to first token, all turns: "
            f"{seconds:.3f} s (median of {args.rounds})"
        )
    kept, refilled = summary["kept"], summary["refilled"]
    token_ratio = refilled["prefilled_tokens"] / kept["prefilled_tokens"]
    time_ratio = refilled["median_prefill_s"] / kept["median_prefill_s"]
    print(f"keeping the cache: {token_ratio:.1f}x fewer tokens pre-filled, {time_ratio:.1f}x less time to first token")
    if args.json:
        machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
        settings = {**vars(args), "json": str(args.json)}
        args.json.write_text(json.dumps({"settings": settings, "machine": machine, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
