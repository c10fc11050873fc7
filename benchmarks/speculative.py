"""Speculative decoding measured: what a wider pass costs on the real shapes, what gets accepted on trained models,
and the speed of the whole thing, each said apart (random weights show costs, not acceptance).

    python benchmarks/speculative.py cost --json docs/bench/speculative-cost-phi-1.5.json
    python benchmarks/speculative.py finetune --out /tmp/tiny-copy            # a tiny model taught to copy (~20 min)
    python benchmarks/speculative.py tasks --model tiny --model /tmp/tiny-copy \\
        --costs docs/bench/speculative-cost-phi-1.5.json --json docs/bench/speculative-tasks.json
    python benchmarks/speculative.py self --json docs/bench/speculative-self-phi-1.5.json

``cost``: a random phi-1.5-shape model at each weight dtype, its KV cache holding ``--context`` tokens; one pass over
``w`` new tokens (the pending token and ``w - 1`` proposed ones) against one over a single token, for ``w`` in
``--widths``. Rounds interleave every dtype and width; medians.

``tasks``: the embedded model (or any checkpoint) on tasks whose answer copies the prompt (rename a given stdlib
function, document it, quote a sentence of a given passage) and on free continuation, greedy, plain against prompt
lookup (adaptive, and forced to propose every step) and, where a draft is given, a draft model; held-out stdlib files
only (the embedded model never trained on them). Per contender: tokens/s of decoding on this machine (this model's
own speed), acceptance, tokens per checking pass, and whether the output equals plain decoding's. With ``--costs``
each run is also replayed on the phi-1.5 cost table: the planner decides with phi-1.5's measured costs, and the passes
it runs are priced with them, which projects the speed-up at phi-1.5's shape for this model's acceptance.

``self``: self-speculative decoding on a random phi-1.5-shape model: 16-bit plain against the same weights drafting for
themselves in int8 and int4, end to end on this machine, with the output compared token for token. Random weights
make acceptance an artefact of quantization noise against random logit gaps; ``tasks --draft-quantized`` measures it
on the trained embedded model with every matrix quantized.

``finetune``: the embedded model fine-tuned on copy tasks built from the training split of the standard library
(the same three kinds as ``tasks``, other files) mixed with plain stdlib text, so that acceptance can be measured on
a model that copies the way Phi does in its main uses; the folder it writes is not shipped.
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import phi_core  # noqa: E402
import phi_core.linear  # noqa: E402
from phi_core import speculative  # noqa: E402
from phi_core.bench import SHAPES, random_model  # noqa: E402
from phi_core.generation import GenerationParams, SamplingParams, Timing, generate  # noqa: E402
from phi_core.kernels import cpu_info  # noqa: E402
from phi_core.speculative import Draft, StepCosts  # noqa: E402

COST_DTYPES = ["bfloat16", "int8", "int4"]
WIDTHS = [1, 2, 3, 4, 5, 6, 7, 8, 9]


def machine() -> dict[str, object]:
    return {
        "cpu": cpu_info().describe(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


# cost -----------------------------------------------------------------------------------------------------------
def run_cost(args: argparse.Namespace) -> dict[str, object]:
    config = SHAPES[args.shape]
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, 50000, (args.batch, args.context), generator=generator)
    models, caches = {}, {}
    for dtype in args.dtype:
        models[dtype] = random_model(config, dtype, "cpu")
        caches[dtype] = models[dtype].new_cache(args.batch, args.context + max(args.widths))
        with torch.no_grad():
            models[dtype](context, cache=caches[dtype], last_only=True)
    seconds: dict[str, dict[int, list[float]]] = {d: {w: [] for w in args.widths} for d in args.dtype}
    for round_ in range(args.rounds):
        for dtype in args.dtype:
            for width in args.widths if round_ % 2 == 0 else reversed(args.widths):
                ids = torch.randint(0, 50000, (args.batch, width), generator=generator)
                started = time.perf_counter()
                with torch.no_grad():
                    models[dtype](ids, cache=caches[dtype])
                seconds[dtype][width].append(time.perf_counter() - started)
                caches[dtype].truncate(args.context)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    table = {}
    for dtype in args.dtype:
        one = statistics.median(seconds[dtype][1])
        table[dtype] = {
            str(w): {
                "median_s": round(statistics.median(s), 5),
                "vs_one": round(statistics.median(s) / one, 3),
                "min_s": round(min(s), 5),
            }
            for w, s in seconds[dtype].items()
        }
    return {
        "shape": args.shape,
        "batch": args.batch,
        "context": args.context,
        "rounds": args.rounds,
        "machine": machine(),
        "costs": table,
    }


def print_cost(report: dict) -> None:
    widths = list(next(iter(report["costs"].values())))
    print(f"{report['shape']}, batch {report['batch']}, {report['context']} cached tokens; {report['machine']['cpu']}")
    print("| weights | one token | " + " | ".join(f"{w} tokens" for w in widths[1:]) + " |")
    print("|---|---|" + "---|" * (len(widths) - 1))
    for dtype, row in report["costs"].items():
        cells = [f"{row[w]['vs_one']:.2f}x" for w in widths[1:]]
        print(f"| {dtype} | {row['1']['median_s'] * 1000:.0f} ms | " + " | ".join(cells) + " |")


# tasks ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    kind: str  # rename, document, quote, continue
    copies: bool
    prompt: str


def held_out_functions() -> list[tuple[str, str]]:
    """(name, source) of functions of 6-40 lines from held-out stdlib files (train_tiny's split)."""
    import train_tiny

    found = []
    for path in train_tiny.stdlib_files():
        if not train_tiny.is_held_out(path):
            continue
        found += functions_of(train_tiny.read_source(path))
    return found


def training_functions() -> list[tuple[str, str]]:
    import train_tiny

    found = []
    for path in train_tiny.stdlib_files():
        if not train_tiny.is_held_out(path):
            found += functions_of(train_tiny.read_source(path))
    return found


def functions_of(source: str) -> list[tuple[str, str]]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.col_offset or node.decorator_list or not node.end_lineno:
            continue
        if 6 <= node.end_lineno - node.lineno + 1 <= 40:
            out.append((node.name, "\n".join(lines[node.lineno - 1 : node.end_lineno])))
    return out


def without_docstring(source: str) -> str | None:
    """The function's source with its docstring taken out, or None when it has none."""
    try:
        node = ast.parse(source).body[0]
    except (SyntaxError, IndexError):
        return None
    if not isinstance(node, ast.FunctionDef) or ast.get_docstring(node) is None or len(node.body) < 2:
        return None
    doc = node.body[0]
    lines = source.split("\n")
    return "\n".join(lines[: doc.lineno - 1] + lines[doc.end_lineno :])  # type: ignore[operator]


def docstring_passages(functions: list[tuple[str, str]]) -> list[str]:
    passages = []
    for _, source in functions:
        try:
            node = ast.parse(source).body[0]
        except SyntaxError:
            continue
        doc = ast.get_docstring(node)  # type: ignore[arg-type]
        if doc and len(doc) > 200 and doc.count(". ") >= 2:
            passages.append(" ".join(doc.split()))
    return passages


def make_tasks(functions: list[tuple[str, str]], per_kind: int, seed: int) -> list[Task]:
    """``per_kind`` prompts of each kind, drawn with ``seed``: the same for every model and contender.

    rename: a function, then ``# The same function, renamed to NAME_v2:`` and its new first line (the body is
    copied); document: a function with its docstring taken out, then ``# The same function, documented:`` and its
    first line (the docstring is new, the body copied); quote: a docstring, then the first words of its second
    sentence to complete; continue: a function's first line alone (nothing to copy)."""
    rng = random.Random(seed)
    chosen = rng.sample(functions, min(len(functions), 2 * per_kind))
    tasks = []
    for name, source in chosen[:per_kind]:
        head = source.split("\n")[0].replace(f"def {name}(", f"def {name}_v2(")
        tasks.append(Task("rename", True, f"{source}\n\n\n# The same function, renamed to {name}_v2:\n{head}\n"))
    documented = [(name, s, bare) for name, s in functions if (bare := without_docstring(s)) is not None]
    for _, source, bare in rng.sample(documented, min(len(documented), per_kind)):
        head = source.split("\n")[0]
        tasks.append(Task("document", True, f"{bare}\n\n\n# The same function, documented:\n{head}\n"))
    passages = docstring_passages(functions)
    for passage in rng.sample(passages, min(len(passages), per_kind)):
        start = " ".join(passage.split(". ")[1].split()[:3])
        tasks.append(Task("quote", True, f'"""{passage}"""\n\n# The second sentence above, quoted: "{start}'))
    for _, source in chosen[per_kind : 2 * per_kind]:
        tasks.append(Task("continue", False, source.split("\n")[0] + "\n"))
    return tasks


@dataclass
class Outcome:
    tokens: list[list[int]]
    decode_s: float
    proposed: int
    accepted: int
    passes: int
    passes_by_rows: dict[int, int]


def generate_once(model, prompts: list[list[int]], params: GenerationParams, record_passes: bool) -> Outcome:
    passes: dict[int, int] = {}
    original = speculative.Speculator.observe
    if record_passes:

        def observe(self, rows: int, seconds: float) -> None:
            passes[rows] = passes.get(rows, 0) + 1
            original(self, rows, seconds)

        speculative.Speculator.observe = observe  # type: ignore[method-assign]
    try:
        timing = Timing()
        out: list[list[int]] = [[] for _ in prompts]
        with torch.no_grad():
            for event in generate(model, None, prompts, params, timing):
                out[event.row].append(event.token_id)
    finally:
        speculative.Speculator.observe = original  # type: ignore[method-assign]
    stats = timing.speculation or []
    return Outcome(
        out,
        timing.decode_s,
        sum(s.proposed for s in stats),
        sum(s.accepted for s in stats),
        sum(s.passes for s in stats),
        passes,
    )


class FrozenCosts(StepCosts):
    """A cost table that measurements do not change: the phi-1.5 one, so the planner decides as it would there."""

    def observe_model(self, rows: int, seconds: float) -> None:
        pass

    def observe_draft(self, rows: int, seconds: float) -> None:
        pass


def phi15_costs(report: dict, target: str, draft: str | None) -> FrozenCosts:
    table = report["costs"]
    model = {int(w): v["median_s"] for w, v in table[target].items()}
    costs = FrozenCosts(model=model)
    if draft is not None:
        costs.draft = {1: table[draft]["1"]["median_s"]}
    return costs


def with_costs(costs: StepCosts | None) -> Callable[[], None]:
    """Make every Speculator use ``costs`` (None: its own measurements); returns the undo."""
    original = speculative.Speculator.__init__
    if costs is None:
        return lambda: None

    def init(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        self.costs = costs
        self.planner.costs = costs

    speculative.Speculator.__init__ = init  # type: ignore[method-assign]
    return lambda: setattr(speculative.Speculator, "__init__", original)


def forced(enabled: bool) -> Callable[[], None]:
    original = speculative.Planner.plan
    if not enabled:
        return lambda: None
    speculative.Planner.plan = lambda self, available: min(self.most, max(available, default=0))  # type: ignore
    return lambda: setattr(speculative.Planner, "plan", original)


def generate_alone(model, prompt: list[int], params: GenerationParams, force: bool) -> Outcome:
    """One prompt at batch 1, with the planner forced to propose every step when ``force``."""
    undo = forced(force)
    try:
        return generate_once(model, [prompt], params, False)
    finally:
        undo()


def run_tasks(args: argparse.Namespace) -> dict[str, object]:
    functions = held_out_functions()
    tasks = make_tasks(functions, args.per_kind, args.seed)
    cost_report = json.loads(Path(args.costs).read_text()) if args.costs else None
    results = []
    for source in args.model:
        model = phi_core.load_model(source, dtype=args.dtype)
        tokenizer = phi_core.load_tokenizer(source)
        drafts: dict[str, Draft] = {}
        for spec in args.draft_quantized:
            saved = phi_core.linear.SMALL_MATRIX
            phi_core.linear.SMALL_MATRIX = 0  # every matrix quantized, as at the real shapes
            try:
                drafts[spec] = Draft(phi_core.load_model(source, dtype=spec), tokens=args.draft_tokens, name=spec)
            finally:
                phi_core.linear.SMALL_MATRIX = saved
        contenders: list[tuple[str, dict, bool]] = [("plain", {}, False)]
        for n in args.lookup:
            contenders += [(f"lookup {n}", {"lookup": n}, False), (f"lookup {n} forced", {"lookup": n}, True)]
        for spec, draft in drafts.items():
            contenders += [(f"draft {spec} forced", {"draft": draft}, True)]
        prompts_by_kind: dict[str, list[list[int]]] = {}
        for task in tasks:
            prompts_by_kind.setdefault(task.kind, []).append(tokenizer.encode(task.prompt)[-args.prompt_tokens :])
        sampling = SamplingParams(repetition_penalty=args.repetition_penalty)
        for kind, prompts in prompts_by_kind.items():
            runs: dict[str, list[Outcome]] = {name: [] for name, _, _ in contenders}
            for round_ in range(args.rounds):
                for name, extra, force in contenders:
                    for prompt in prompts:  # batch 1: one prompt at a time
                        params = GenerationParams(max_new_tokens=args.new_tokens, sampling=sampling, **extra)
                        runs[name].append(generate_alone(model, prompt, params, force))
                print(f"{source} {kind}: round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
            row = summarize(source, kind, prompts, runs, args.rounds)
            if cost_report is not None:
                row["phi-1.5 projection"] = project(model, prompts, contenders, sampling, args, cost_report)
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return {"settings": vars(args), "machine": machine(), "results": results}


def summarize(source: str, kind: str, prompts: list, runs: dict[str, list[Outcome]], rounds: int) -> dict:
    """Per contender: tokens/s over each round's prompts (median over rounds), its ratio to plain (median of the
    per-round ratios), acceptance, tokens per checking pass, and output equal to plain's."""
    per_round = len(prompts)
    plain = runs["plain"]
    out: dict[str, object] = {"model": source, "task": kind, "prompts": per_round}
    for name, outcomes in runs.items():
        rates, ratios = [], []
        for r in range(rounds):
            mine = outcomes[r * per_round : (r + 1) * per_round]
            base = plain[r * per_round : (r + 1) * per_round]
            tokens = sum(len(o.tokens[0]) - 1 for o in mine)  # the first token comes from the prefill
            rate = tokens / sum(o.decode_s for o in mine)
            rates.append(rate)
            ratios.append(rate / (sum(len(o.tokens[0]) - 1 for o in base) / sum(o.decode_s for o in base)))
        first = outcomes[:per_round]
        proposed, accepted = sum(o.proposed for o in first), sum(o.accepted for o in first)
        passes = sum(o.passes for o in first)
        out[name] = {
            "tokens_per_s": round(statistics.median(rates), 1),
            "vs_plain": round(statistics.median(ratios), 3),
            "proposed": proposed,
            "accepted": accepted,
            "acceptance": round(accepted / proposed, 3) if proposed else None,
            "tokens_per_checking_pass": round((accepted + passes) / passes, 2) if passes else None,
            "same_as_plain": all(o.tokens == p.tokens for o, p in zip(outcomes, plain, strict=True)),
        }
    return out


def project(model, prompts, contenders, sampling, args, cost_report) -> dict[str, object]:
    """Each contender replayed with the planner deciding on phi-1.5's measured costs; its passes priced with them."""
    out: dict[str, object] = {}
    target = args.projection_target
    one = cost_report["costs"][target]["1"]["median_s"]
    for name, extra, force in contenders:
        draft_dtype = name.split()[1] if name.startswith("draft") else None
        costs = phi15_costs(cost_report, target, draft_dtype)
        undo_costs, undo_force = with_costs(costs), forced(force)
        try:
            tokens, seconds = 0, 0.0
            for prompt in prompts:
                params = GenerationParams(max_new_tokens=args.new_tokens, sampling=sampling, **extra)
                outcome = generate_once(model, [prompt], params, name != "plain")
                tokens += len(outcome.tokens[0]) - 1
                if name == "plain":
                    seconds += (len(outcome.tokens[0]) - 1) * one
                    continue
                seconds += sum(costs.model_seconds(rows) * n for rows, n in outcome.passes_by_rows.items())
                if draft_dtype is not None:  # a proposal of k tokens: k draft passes
                    draft_passes = sum((rows - 1) * n for rows, n in outcome.passes_by_rows.items())
                    seconds += draft_passes * costs.draft_seconds(1)
        finally:
            undo_force()
            undo_costs()
        out[name] = {"tokens_per_s": round(tokens / seconds, 2), "vs_plain": None}
    plain_rate = out["plain"]["tokens_per_s"]  # type: ignore[index]
    for name in out:
        out[name]["vs_plain"] = round(out[name]["tokens_per_s"] / plain_rate, 3)  # type: ignore[index]
    return out


def print_tasks(report: dict) -> None:
    for row in report["results"]:
        print(f"\n{row['model']} / {row['task']} ({row['prompts']} prompts, batch 1)")
        print("| contender | tokens/s | vs plain | acceptance | tokens per check | same output | phi-1.5 projected |")
        print("|---|---|---|---|---|---|---|")
        projection = row.get("phi-1.5 projection", {})
        for name, value in row.items():
            if not isinstance(value, dict) or name == "phi-1.5 projection":
                continue
            projected = projection.get(name, {}).get("vs_plain")
            print(
                f"| {name} | {value['tokens_per_s']} | {value['vs_plain']:.2f}x | {value['acceptance']} | "
                f"{value['tokens_per_checking_pass']} | {value['same_as_plain']} | "
                f"{'' if projected is None else f'{projected:.2f}x'} |"
            )


# self-speculative on the real shape -----------------------------------------------------------------------------
def run_self(args: argparse.Namespace) -> dict[str, object]:
    config = SHAPES[args.shape]
    target = random_model(config, args.target, "cpu")
    drafts = {d: Draft(random_model(config, d, "cpu"), tokens=args.draft_tokens, name=d) for d in args.draft}
    generator = torch.Generator().manual_seed(1)
    shape = (args.prompts, args.prompt_tokens)
    prompts = torch.randint(0, 50000, shape, generator=generator).tolist()
    # Each draft as the planner runs it, and forced to propose every step (what the draft could give if the
    # planner knew its acceptance from the start).
    contenders: list[tuple[str, dict, bool]] = [("plain", {}, False)]
    for d, draft in drafts.items():
        contenders += [(f"draft {d}", {"draft": draft}, False), (f"draft {d} forced", {"draft": draft}, True)]
    runs: dict[str, list[Outcome]] = {name: [] for name, _, _ in contenders}
    for round_ in range(args.rounds):
        for name, extra, force in contenders:
            for prompt in prompts:
                params = GenerationParams(max_new_tokens=args.new_tokens, logprobs=False, **extra)
                runs[name].append(generate_alone(target, prompt, params, force))
        print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
    row = summarize(f"random {args.shape} {args.target}", "random prompts", prompts, runs, args.rounds)
    return {"settings": vars(args), "machine": machine(), "results": [row]}


# finetune -------------------------------------------------------------------------------------------------------
def run_finetune(args: argparse.Namespace) -> dict[str, object]:
    import train_tiny

    torch.manual_seed(args.seed)
    tokenizer = phi_core.load_tokenizer("tiny")
    model = phi_core.load_model(args.start, dtype="float32", prepare=False).train().requires_grad_(True)
    functions = training_functions()
    tasks = make_tasks(functions, len(functions) // 2, args.seed)
    by_head = {source.split("\n")[0]: source for _, source in functions}
    texts = [t.prompt + completion_of(t, by_head) for t in tasks if t.copies]
    texts = [t for t in texts if len(tokenizer.encode(t)) <= args.seq_len]  # whole examples: the copy is the lesson
    rng = random.Random(args.seed)
    files = [p for p in train_tiny.stdlib_files() if not train_tiny.is_held_out(p)]
    # The softmax over the tokens the embedded model was trained on (the rest keep their -20 bias), as train_tiny.
    active = (model.lm_head.bias > -19).nonzero().flatten()
    remap = torch.full((model.config.vocab_size,), -100, dtype=torch.long)
    remap[active] = torch.arange(len(active))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    started, losses = time.perf_counter(), []
    for step in range(args.steps):
        rows, targets = [], []
        while len(rows) < args.batch:
            if rng.random() < args.copy_share:
                text = rng.choice(texts)
            else:
                text = train_tiny.read_source(rng.choice(files))
                text = text[rng.randrange(max(1, len(text) - 4 * args.seq_len)) :]
            ids = tokenizer.encode(text)[: args.seq_len + 1]
            if len(ids) < 2:  # an empty file: nothing to predict
                continue
            padding = args.seq_len + 1 - len(ids)
            rows.append(ids + [tokenizer.eos_token_id] * padding)
            targets.append(remap[torch.tensor(ids[1:], dtype=torch.long)].tolist() + [-100] * padding)
        ids = torch.tensor(rows)
        hidden = model.model(ids[:, :-1])
        logits = hidden @ model.lm_head.weight[active].T + model.lm_head.bias[active]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(active)), torch.tensor(targets).reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 20)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            print(f"step {step}: loss {statistics.mean(losses[-20:]):.3f}", file=sys.stderr, flush=True)
    from phi_core.saving import save_model

    out = Path(args.out)
    save_model(model.eval().requires_grad_(False), out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = Path(str(phi_core.embedded.embedded_model_path("tiny"))) / name
        if source.is_file():
            (out / name).write_bytes(source.read_bytes())
    return {
        "steps": args.steps,
        "examples": len(texts),
        "seconds": round(time.perf_counter() - started),
        "loss_first_20": round(statistics.mean(losses[:20]), 3),
        "loss_last_20": round(statistics.mean(losses[-20:]), 3),
    }


def completion_of(task: Task, functions: dict[str, str]) -> str:
    """What a model that copies would write after the task's prompt."""
    if task.kind == "rename":
        source = task.prompt.split("\n\n\n# The same function")[0]
        return "\n".join(source.split("\n")[1:]) + "\n"
    if task.kind == "document":
        head = task.prompt.rstrip("\n").split("\n")[-1]
        return "\n".join(functions[head].split("\n")[1:]) + "\n"
    passage = task.prompt.split('"""')[1]
    start = task.prompt.rsplit('"', 1)[1]
    sentence = next((s for s in passage.split(". ") if s.startswith(start)), start)
    return sentence[len(start) :] + '."\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cost = commands.add_parser("cost", help="pass cost by width on a real shape")
    cost.add_argument("--shape", default="phi-1.5", choices=sorted(SHAPES))
    cost.add_argument("--dtype", action="append", help=f"repeatable (default: {' '.join(COST_DTYPES)})")
    cost.add_argument("--widths", type=int, nargs="+", default=WIDTHS)
    cost.add_argument("--context", type=int, default=256)
    cost.add_argument("--batch", type=int, default=1)
    cost.add_argument("--rounds", type=int, default=7)
    tasks = commands.add_parser("tasks", help="acceptance and speed on copy-heavy and free tasks")
    tasks.add_argument("--model", action="append", help="repeatable (default: tiny)")
    tasks.add_argument("--dtype", default="auto")
    tasks.add_argument("--lookup", type=int, nargs="+", default=[8])
    tasks.add_argument("--draft-quantized", nargs="*", default=[], choices=["int8", "int4"])
    tasks.add_argument("--draft-tokens", type=int, default=4)
    tasks.add_argument("--per-kind", type=int, default=6)
    tasks.add_argument("--new-tokens", type=int, default=64)
    tasks.add_argument("--prompt-tokens", type=int, default=400)
    tasks.add_argument("--repetition-penalty", type=float, default=1.0)
    tasks.add_argument("--rounds", type=int, default=3)
    tasks.add_argument("--seed", type=int, default=17)
    tasks.add_argument("--costs", help="a `cost` JSON report: also project onto that shape")
    tasks.add_argument("--projection-target", default="bfloat16")
    self_ = commands.add_parser("self", help="self-speculative decoding on a random real-shape model")
    self_.add_argument("--shape", default="phi-1.5", choices=sorted(SHAPES))
    self_.add_argument("--target", default="bfloat16")
    self_.add_argument("--draft", action="append", help="repeatable (default: int8 int4)")
    self_.add_argument("--draft-tokens", type=int, default=4)
    self_.add_argument("--prompts", type=int, default=2)
    self_.add_argument("--prompt-tokens", type=int, default=64)
    self_.add_argument("--new-tokens", type=int, default=48)
    self_.add_argument("--rounds", type=int, default=3)
    finetune = commands.add_parser("finetune", help="teach the embedded model to copy (for acceptance only)")
    finetune.add_argument("--out", required=True)
    finetune.add_argument("--start", default="tiny", help="the model to fine-tune (default: the embedded one)")
    finetune.add_argument("--steps", type=int, default=300)
    finetune.add_argument("--batch", type=int, default=8)
    finetune.add_argument("--seq-len", type=int, default=512)
    finetune.add_argument("--lr", type=float, default=5e-4)
    finetune.add_argument("--copy-share", type=float, default=0.8, help="of the sequences, copy tasks")
    finetune.add_argument("--seed", type=int, default=5)
    for sub in (cost, tasks, self_, finetune):
        sub.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    if args.command == "cost":
        args.dtype = args.dtype or COST_DTYPES
        report = run_cost(args)
        print_cost(report)
    elif args.command == "tasks":
        args.model = args.model or ["tiny"]
        report = run_tasks(args)
        print_tasks(report)
    elif args.command == "self":
        args.draft = args.draft or ["int8", "int4"]
        report = run_self(args)
        print_tasks(report)
    else:
        report = run_finetune(args)
        print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
