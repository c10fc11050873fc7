"""`phi generate`: text generation from an argument, stdin or a JSONL file."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from phi_cli.cluster import RayRun, run_on_ray
from phi_cli.errors import UsageProblem
from phi_cli.io import (
    argument_text,
    progress,
    read_jsonl,
    read_stdin_text,
    stderr,
    stdin_has_input,
    write_json_line,
)
from phi_cli.options import (
    AttnOpt,
    CpusPerReplicaOpt,
    DeviceOpt,
    DraftOpt,
    DraftTokensOpt,
    DtypeOpt,
    ForceOpt,
    FormatOpt,
    GpusPerReplicaOpt,
    IdFieldOpt,
    LookupOpt,
    MaxNewTokensOpt,
    MinPOpt,
    ModelOpt,
    OnErrorOpt,
    OutputDirOpt,
    OutputFormatOpt,
    QuietOpt,
    RayAddressOpt,
    RayOpt,
    RepetitionPenaltyOpt,
    ReplicasOpt,
    RevisionOpt,
    SampleOpt,
    SeedOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    TruncateOpt,
    generation_overrides,
    load_draft_model,
    load_for_task,
    model_folder,
)
from phi_core.completion import Completion, CompletionSetup, PromptToken, complete, completion_setup
from phi_core.distributed import GenerateJob, ModelSpec
from phi_core.records import completion_record
from phi_core.speculative import DEFAULT_DRAFT_TOKENS

SAMPLING = "Sampling"
OUTPUT = "Input and output"


def generate_command(
    prompt: Annotated[
        str | None,
        typer.Argument(
            help="The prompt; - or none reads it from stdin. Piped stdin and a PROMPT: stdin, a blank line, PROMPT."
        ),
    ] = None,
    max_new_tokens: MaxNewTokensOpt = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop when this text appears (repeatable); not printed.")
    ] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep going past the end-of-text token(s).")] = False,
    prompt_format: FormatOpt = None,
    truncate: TruncateOpt = False,
    sample: SampleOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    seed: SeedOpt = None,
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
    lookup: LookupOpt = 0,
    draft: DraftOpt = None,
    draft_tokens: DraftTokensOpt = DEFAULT_DRAFT_TOKENS,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    replicas: ReplicasOpt = None,
    cpus_per_replica: CpusPerReplicaOpt = 1.0,
    gpus_per_replica: GpusPerReplicaOpt = 0.0,
    output: OutputDirOpt = None,
    output_format: OutputFormatOpt = None,
    on_error: OnErrorOpt = "fail",
    id_field: IdFieldOpt = None,
    force: ForceOpt = False,
) -> None:
    """Generate text from a prompt, stdin or a JSONL file.

    phi generate "def fibonacci(n):" --max-new-tokens 40

    cat script.py | phi generate --max-new-tokens 100

    cat script.py | phi generate "def test_main():"

    phi generate --input prompts.jsonl --json > out.jsonl

    cat module.py | phi generate "# The same module, with type hints:" --lookup 8 --greedy

    phi generate "def parse(text):" --draft int8 --model microsoft/phi-2 --dtype bfloat16

    phi generate --input 'prompts/*.jsonl' --ray --output completions/
    """
    overrides = generation_overrides(max_new_tokens, sample, temperature, top_k, top_p, min_p, repetition_penalty, seed)
    run = RayRun(
        ray, ray_address, replicas, cpus_per_replica, gpus_per_replica, output, output_format, on_error, id_field, force
    )
    if lookup and draft is not None:
        raise UsageProblem("--lookup and --draft: choose one way to propose tokens")
    if run.requested:
        stop_strings = tuple(stop or ())
        job = GenerateJob(overrides, prompt_format, stop_strings, ignore_eos, truncate, lookup, draft, draft_tokens)
        given = (("PROMPT", prompt), ("--echo", echo), ("--stats", stats))
        local_only = [name for name, value in given if value]
        model_spec = ModelSpec(model, revision, dtype, attn, device)
        return run_on_ray(job, input_file, model_spec, run, batch_size, quiet, local_only)
    run.check_local()
    records = _records(prompt, input_file, quiet)
    lm, tokenizer = load_for_task("causal-lm", model, revision, dtype, attn, device, quiet)
    drafter = load_draft_model(draft, draft_tokens, model, revision, dtype, attn, device, tokenizer, quiet)
    folder = model_folder(model, revision)
    setup = completion_setup(folder, overrides, prompt_format, tuple(stop or ()), ignore_eos, lookup, drafter)
    as_json = json_output or input_file is not None
    prompts = [r["prompt"] for r in records]
    fmt, special = setup.prompt_format, setup.special_tokens
    results = complete(lm, tokenizer, prompts, setup.params, batch_size, fmt, truncate, special)
    finished: list[Completion] = []
    shown = len(records) > 1 and not quiet and not sys.stdout.isatty()  # on a terminal the text is the progress
    with progress("generating", shown, total=len(records)) as advance:
        if echo and not as_json:
            _write(fmt.render_prompt(records[0]["prompt"], special))
        for item in results:
            if isinstance(item, PromptToken):
                if not as_json:
                    _write(item.event.text)
                continue
            finished.append(item)
            advance()
            if as_json:
                write_json_line(completion_record(records[item.index], item, lm.precision, setup))
    if not as_json:
        _write("\n")
    if stats:
        _print_stats(finished, lm.precision.describe(), batch_size, setup)


def _records(prompt: str | None, input_file: str | None, quiet: bool) -> list[dict[str, Any]]:
    if input_file is not None:
        if prompt is not None:
            raise UsageProblem("give either a PROMPT argument or --input, not both")
        return read_jsonl(input_file, "prompt")
    text = _prompt_text(prompt, quiet)
    if not text.strip():
        raise UsageProblem("the prompt is empty")
    return [{"prompt": text}]


def _prompt_text(prompt: str | None, quiet: bool) -> str:
    """The argument; stdin for ``-`` or no argument; piped stdin, a blank line and the argument when both come.

    The argument goes last because the model continues from the end of the prompt: `cat tests.py | phi generate
    "def test_parse():"` writes that test, with the file as context."""
    if prompt == "-":
        return read_stdin_text(quiet)
    if prompt is None:
        if not stdin_has_input():
            raise UsageProblem("no prompt: give one as an argument, pipe it on stdin, or use --input FILE")
        return read_stdin_text(quiet)
    text = argument_text(prompt, "the prompt", quiet)
    piped = read_stdin_text(quiet) if stdin_has_input() else ""
    return piped.rstrip("\n") + "\n\n" + text if piped.strip() else text


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _print_stats(finished: list[Completion], precision: str, batch_size: int, setup: CompletionSetup) -> None:
    # complete() runs prompts in consecutive batches of batch_size; the completions of one batch share one
    # prefill and one decode clock, which ran until its last row finished. Batches run one after another.
    per_batch: dict[int, list[Completion]] = {}
    for done in finished:
        per_batch.setdefault(done.index // batch_size, []).append(done)
    prompt_tokens = sum(c.prompt_tokens for c in finished)
    new_tokens = sum(c.completion_tokens for c in finished)
    prefill = sum(batch[0].prefill_s for batch in per_batch.values())
    decode = sum(max(c.decode_s for c in batch) for batch in per_batch.values())
    rate = new_tokens / decode if decode > 0 else 0.0
    stderr.print(
        f"{len(finished)} prompt(s): {prompt_tokens} prompt tokens, prefill {prefill:.3f} s; "
        f"{new_tokens} new tokens in {decode:.3f} s ({rate:.1f} tokens/s); {precision}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    settings = ", ".join(f"{name}={value} ({origin})" for name, (value, origin) in setup.generation.settings.items())
    stderr.print(
        f"format {setup.prompt_format.name}; generation: {settings}", highlight=False, markup=False, soft_wrap=True
    )
    speculated = [c.speculation for c in finished if c.speculation is not None]
    if setup.speculation is not None and speculated:
        total = speculated[0]
        for stats in speculated[1:]:
            total = total.add(stats)
        per_pass = (total.accepted + total.passes) / total.passes if total.passes else 0.0
        stderr.print(
            f"speculation ({setup.speculation}): {total.proposed} tokens proposed, {total.accepted} accepted "
            f"({total.acceptance:.1%}); {total.passes} checking passes, {per_pass:.2f} tokens each",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
