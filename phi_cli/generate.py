"""`phi generate`: text generation from an argument, stdin or a JSONL file."""

from __future__ import annotations

import sys
from typing import Annotated, Any, Literal

import typer

from phi_cli.errors import UsageProblem
from phi_cli.io import progress_bar, read_jsonl, stderr, stdin_is_piped, write_json_line
from phi_cli.options import AttnOpt, DeviceOpt, DtypeOpt, ModelOpt, QuietOpt, RevisionOpt, load_for_task
from phi_core.completion import PROMPT_FORMATS, Completion, PromptToken, complete
from phi_core.generation import GenerationParams, SamplingParams

SAMPLING = "Sampling"
OUTPUT = "Input and output"


def generate_command(
    prompt: Annotated[str | None, typer.Argument(help="The prompt. Omit it to read the prompt from stdin.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate per prompt.")] = 128,
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop when this text appears (repeatable); not printed.")
    ] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep going past <|endoftext|>.")] = False,
    prompt_format: Annotated[
        Literal["code", "instruct", "chat"],
        typer.Option(
            "--format", help="code: the prompt as is; instruct: 'Instruct: ...\\nOutput:'; chat: 'Alice: ...\\nBob:'."
        ),
    ] = "code",
    truncate: Annotated[
        Literal["left"] | None, typer.Option(help="'left': drop the start of a prompt too long for the context.")
    ] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.", rich_help_panel=SAMPLING)] = 0.0,
    top_k: Annotated[
        int, typer.Option(min=0, help="Keep the k likeliest tokens (0 = all).", rich_help_panel=SAMPLING)
    ] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.", rich_help_panel=SAMPLING)] = 1.0,
    min_p: Annotated[
        float, typer.Option(help="Drop tokens below min_p x the best token's probability.", rich_help_panel=SAMPLING)
    ] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats.", rich_help_panel=SAMPLING)] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.", rich_help_panel=SAMPLING)] = None,
    input_file: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            help='JSONL file (- = stdin) of {"prompt": ...} objects; other fields are copied to the '
            "output, which is JSONL.",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated together.", rich_help_panel=OUTPUT)] = 8,
    json_output: Annotated[
        bool, typer.Option("--json", help="One JSON object per prompt.", rich_help_panel=OUTPUT)
    ] = False,
    echo: Annotated[bool, typer.Option(help="Print the prompt before the completion.", rich_help_panel=OUTPUT)] = False,
    stats: Annotated[bool, typer.Option(help="Timing summary on stderr.", rich_help_panel=OUTPUT)] = False,
    quiet: QuietOpt = False,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    dtype: DtypeOpt = None,
    attn: AttnOpt = "sdpa",
    device: DeviceOpt = None,
) -> None:
    """Generate text from a prompt, stdin or a JSONL file.

    phi generate "def fibonacci(n):" --max-new-tokens 40

    cat script.py | phi generate --max-new-tokens 100

    phi generate --input prompts.jsonl --json > out.jsonl
    """
    records = _records(prompt, input_file)
    params = GenerationParams(
        max_new_tokens=max_new_tokens,
        stop=tuple(stop or ()),
        ignore_eos=ignore_eos,
        sampling=SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed),
        logprobs=False,  # not printed
    )
    lm, tokenizer = load_for_task("causal-lm", model, revision, dtype, attn, device, quiet)
    as_json = json_output or input_file is not None
    results = complete(
        lm, tokenizer, [r["prompt"] for r in records], params, batch_size, prompt_format, truncate == "left"
    )
    finished: list[Completion] = []
    with progress_bar(len(records), "generating", enabled=len(records) > 1 and not quiet) as advance:
        if echo and not as_json:
            _write(PROMPT_FORMATS[prompt_format].template.format(prompt=records[0]["prompt"]))
        for item in results:
            if isinstance(item, PromptToken):
                if not as_json:
                    _write(item.event.text)
                continue
            finished.append(item)
            advance()
            if as_json:
                write_json_line(_result_record(records[item.index], item, lm.precision.weights))
    if not as_json:
        _write("\n")
    if stats:
        _print_stats(finished, lm.precision.describe())


def _records(prompt: str | None, input_file: str | None) -> list[dict[str, Any]]:
    if input_file is not None:
        if prompt is not None:
            raise UsageProblem("give either a PROMPT argument or --input, not both")
        return read_jsonl(input_file, "prompt")
    if prompt is None:
        if not stdin_is_piped():
            raise UsageProblem("no prompt: give one as an argument, pipe it on stdin, or use --input FILE")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageProblem("the prompt is empty")
    return [{"prompt": prompt}]


def _result_record(record: dict[str, Any], done: Completion, dtype: str) -> dict[str, Any]:
    return {
        **record,
        "prompt": done.prompt,
        "completion": done.completion,
        "tokens": done.tokens,
        "finish_reason": done.finish_reason,
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "prefill_s": round(done.prefill_s, 4),
        "decode_s": round(done.decode_s, 4),
        "tokens_per_s": round(done.tokens_per_s, 2),
        "dtype": dtype,
    }


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _print_stats(finished: list[Completion], precision: str) -> None:
    prompt_tokens = sum(c.prompt_tokens for c in finished)
    new_tokens = sum(c.completion_tokens for c in finished)
    prefill = sum({c.prefill_s for c in finished})  # the prompts of one batch share one prefill time
    decode = max((c.decode_s for c in finished), default=0.0)
    rate = new_tokens / decode if decode > 0 else 0.0
    stderr.print(
        f"{len(finished)} prompt(s): {prompt_tokens} prompt tokens, prefill {prefill:.3f} s; "
        f"{new_tokens} new tokens in {decode:.3f} s ({rate:.1f} tokens/s); {precision}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
