"""`phi classify` and `phi tag`: sequence and token classification from the shell."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from phi_cli.cluster import RayRun, run_on_ray
from phi_cli.errors import UsageProblem
from phi_cli.io import (
    argument_text,
    progress,
    read_jsonl,
    stdin_has_input,
    stdout_console,
    texts_from_stdin_lines,
    visible,
    write_json_line,
)
from phi_cli.options import (
    AttnOpt,
    CpusPerReplicaOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    GpusPerReplicaOpt,
    IdFieldOpt,
    ModelOpt,
    OnErrorOpt,
    OutputDirOpt,
    OutputFormatOpt,
    QuietOpt,
    RayAddressOpt,
    RayOpt,
    ReplicasOpt,
    RevisionOpt,
    TruncateOpt,
    load_for_task,
)
from phi_core.classify import Classification, ScoreFunction, classify
from phi_core.distributed import ClassifyJob, ModelSpec, TagJob
from phi_core.records import classification_record, tag_record
from phi_core.tagging import Aggregation, TaggedText, tag

TextsArg = Annotated[
    list[str] | None,
    typer.Argument(help="Texts to label; - stands for the lines of stdin. Omit them to read one text per stdin line."),
]
InputOpt = Annotated[
    str | None,
    typer.Option("--input", "-i", help='JSONL file (- = stdin) of {"text": ...} objects; other fields are copied.'),
]
BatchOpt = Annotated[int, typer.Option(min=1, help="Texts run together.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSONL output, one object per text (the default with --input).")]
LABEL_STYLES = ("bold cyan", "bold magenta", "bold green", "bold yellow", "bold blue", "bold red", "underline")


def classify_command(
    texts: TextsArg = None,
    input_file: InputOpt = None,
    top_k: Annotated[int, typer.Option(min=1, help="Show the k best labels.")] = 1,
    all_scores: Annotated[bool, typer.Option(help="Show every label's score.")] = False,
    function: Annotated[
        ScoreFunction | None,
        typer.Option(
            help="Score function.",
            show_default="from the config: softmax, sigmoid if multi-label, none for regression",
        ),
    ] = None,
    batch_size: BatchOpt = 8,
    json_output: JsonOpt = False,
    truncate: TruncateOpt = False,
    quiet: QuietOpt = False,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    dtype: DtypeOpt = None,
    attn: AttnOpt = "sdpa",
    device: DeviceOpt = None,
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
    """Label whole texts with a sequence-classification model.

    phi classify "def f(x): return x" "Return the sum of two numbers."

    phi classify --input snippets.jsonl --all-scores > labelled.jsonl

    phi classify --input s3://bucket/texts/ --ray-address auto --output s3://bucket/labels/
    """
    run = RayRun(
        ray, ray_address, replicas, cpus_per_replica, gpus_per_replica, output, output_format, on_error, id_field, force
    )
    if run.requested:
        job = ClassifyJob(top_k, all_scores, function, truncate)
        model_spec = ModelSpec(model, revision, dtype, attn, device)
        return run_on_ray(job, input_file, model_spec, run, batch_size, quiet, ["TEXTS"] if texts else [])
    run.check_local()
    records = _records(texts, input_file, quiet)
    classifier, tokenizer = load_for_task("sequence-classification", model, revision, dtype, attn, device, quiet)
    shown = len(classifier.config.id2label) if all_scores else top_k
    results = classify(classifier, tokenizer, [r["text"] for r in records], batch_size, function, truncate)
    if not (json_output or input_file is not None):
        _print_table(list(results), shown)
        return
    with progress("classifying", _bar_shown(records, quiet), total=len(records)) as advance:
        for result in results:
            write_json_line(classification_record(records[result.index], result, top_k, all_scores))
            advance()


def tag_command(
    texts: TextsArg = None,
    input_file: InputOpt = None,
    aggregate: Annotated[
        Aggregation,
        typer.Option(
            help="none: every token; simple: merge runs of a label; first/average/max: one label per word, then merge."
        ),
    ] = "simple",
    ignore_labels: Annotated[
        list[str] | None, typer.Option(help="Labels not to report (repeatable).", show_default="O")
    ] = None,
    batch_size: BatchOpt = 8,
    json_output: JsonOpt = False,
    truncate: TruncateOpt = False,
    quiet: QuietOpt = False,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    dtype: DtypeOpt = None,
    attn: AttnOpt = "sdpa",
    device: DeviceOpt = None,
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
    """Label the tokens or words of texts with a token-classification model, with character offsets.

    phi tag "for item in items: print(item)"

    phi tag --aggregate none --json "x = 1"

    phi tag --input texts.jsonl --ray --replicas 2 --output tagged/
    """
    ignored = tuple(ignore_labels) if ignore_labels is not None else ("O",)
    run = RayRun(
        ray, ray_address, replicas, cpus_per_replica, gpus_per_replica, output, output_format, on_error, id_field, force
    )
    if run.requested:
        job = TagJob(aggregate, ignored, truncate)
        model_spec = ModelSpec(model, revision, dtype, attn, device)
        return run_on_ray(job, input_file, model_spec, run, batch_size, quiet, ["TEXTS"] if texts else [])
    run.check_local()
    records = _records(texts, input_file, quiet)
    tagger, tokenizer = load_for_task("token-classification", model, revision, dtype, attn, device, quiet)
    results = tag(tagger, tokenizer, [r["text"] for r in records], aggregate, ignored, batch_size, truncate)
    as_json = json_output or input_file is not None
    labels = list(tagger.config.id2label.values())
    with progress("tagging", as_json and _bar_shown(records, quiet), total=len(records)) as advance:
        for result in results:
            if as_json:
                write_json_line(tag_record(records[result.index], result))
            else:
                _print_tagged(result, labels)
            advance()


def _records(texts: list[str] | None, input_file: str | None, quiet: bool) -> list[dict[str, Any]]:
    if input_file is not None:
        if texts:
            raise UsageProblem("give either TEXTS or --input, not both")
        return read_jsonl(input_file, "text")
    if not texts:
        if not stdin_has_input():
            raise UsageProblem("no text: give texts as arguments, pipe lines on stdin, or use --input FILE")
        texts = ["-"]
    return [{"text": text} for text in _expand_stdin(texts, quiet)]


def _expand_stdin(texts: list[str], quiet: bool) -> list[str]:
    """The argument texts, with ``-`` replaced by the non-empty lines of stdin (read once)."""
    if texts.count("-") > 1:
        raise UsageProblem("- (stdin) given more than once")
    expanded = []
    for number, text in enumerate(texts, start=1):
        if text != "-":
            expanded.append(argument_text(text, f"text {number}", quiet))
            continue
        lines = texts_from_stdin_lines(quiet)
        if not lines:
            raise UsageProblem("stdin holds no text")
        expanded.extend(lines)
    return expanded


def _bar_shown(records: list[dict[str, Any]], quiet: bool) -> bool:
    """A progress bar for several records written to a file or pipe (on a terminal the results are the progress)."""
    return len(records) > 1 and not quiet and not sys.stdout.isatty()


def _print_table(results: list[Classification], shown: int) -> None:
    table = Table(show_header=True, header_style="bold")
    table.add_column("text", overflow="ellipsis", max_width=60, no_wrap=True)
    table.add_column("label")
    table.add_column("score", justify="right")
    for result in results:
        for rank, item in enumerate(result.scores[:shown]):
            first_line = result.text.splitlines()[0] if result.text.strip() else result.text
            # Text(), not str: user text and labels are shown as they are, never read as Rich markup
            shown_text = Text(visible(first_line) if rank == 0 else "")
            table.add_row(shown_text, Text(visible(item.label)), f"{item.score:.4f}")
    stdout_console().print(table)


def _print_tagged(result: TaggedText, labels: list[str]) -> None:
    """The text with its spans highlighted in one colour per label; without colour (NO_COLOR, TERM=dumb), each
    span is bracketed and followed by its label instead: ``[if]KEYWORD``."""
    console = stdout_console()
    coloured = console.color_system is not None and not console.no_color
    styles = {label: LABEL_STYLES[i % len(LABEL_STYLES)] for i, label in enumerate(labels)}
    text, end = Text(), 0
    for span in sorted(result.spans, key=lambda s: s.start):
        if span.start < end:  # spans of one multi-token character share offsets: show it once
            continue
        text.append(visible(result.text[end : span.start]))
        piece = visible(result.text[span.start : span.end])
        if coloured:
            text.append(piece, style=styles.get(span.label, "reverse"))
        else:
            text.append(f"[{piece}]{visible(span.label)}")
        end = span.end
    text.append(visible(result.text[end:]))
    console.print(text)
    if result.spans and coloured:
        found = sorted({s.label for s in result.spans})
        console.print(Text("  ").join(Text(visible(label), style=styles.get(label, "reverse")) for label in found))
