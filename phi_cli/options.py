"""Option types shared by every command that loads a model, defined once."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import typer

from phi_cli.io import progress
from phi_core import PhiTokenizer, load_model, load_tokenizer
from phi_core.attention import ATTENTION_BACKENDS
from phi_core.checkpoint import resolve_source
from phi_core.generation_config import GenerationOverrides
from phi_core.loading import check_tokenizer_fits
from phi_core.model import PhiPreTrained
from phi_core.precision import DTYPE_CHOICES
from phi_core.speculative import Draft, load_draft
from phi_core.tasks import TASKS

MODEL_PANEL = "Model"

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Checkpoint folder, Hub repo id, or embedded name.",
        show_default="the embedded model for the task",
        rich_help_panel=MODEL_PANEL,
    ),
]
RevisionOpt = Annotated[
    str | None, typer.Option(help="Hub revision (branch, tag or commit).", rich_help_panel=MODEL_PANEL)
]
# Choices come from phi_core's own lists (Literal[tuple] is Literal of its items), so a new one needs no CLI edit.
Dtype = Literal[DTYPE_CHOICES]
Backend = Literal[ATTENTION_BACKENDS]
DtypeOpt = Annotated[
    Dtype | None,
    typer.Option(
        help="Weight dtype. On a CPU, 16-bit, int8 and int4 weights are multiplied with float32 activations (a "
        "half, a quarter or an eighth of the bytes per token); auto keeps the checkpoint's own precision.",
        show_default="auto on CPU, float16 on CUDA",
        rich_help_panel=MODEL_PANEL,
    ),
]
AttnOpt = Annotated[Backend, typer.Option(help="Attention backend.", rich_help_panel=MODEL_PANEL)]
DeviceOpt = Annotated[
    str | None,
    typer.Option(help="cpu, cuda, cuda:1 ...", show_default="cuda if available, else cpu", rich_help_panel=MODEL_PANEL),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or notices on stderr.")]
SeedOpt = Annotated[
    int | None, typer.Option(min=0, max=2**64 - 1, help="Seed for sampling.", rich_help_panel="Sampling")
]


def finite(value: float | None) -> float | None:
    """Option callback that refuses nan and inf, which every range check lets through (None: not given)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


@dataclass(frozen=True)
class ModelChoice:
    """The model options of a command, resolved to concrete values."""

    source: str
    revision: str | None
    dtype: str
    attn: str
    device: str


def model_choice(
    task: str, model: str | None, revision: str | None, dtype: str | None, attn: str, device: str | None
) -> ModelChoice:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = "auto" if torch.device(device).type == "cpu" else "float16"
    source = TASKS[task].embedded_default if model is None else model  # `-m ''` is a mistake, not the default
    return ModelChoice(source, revision, dtype, attn, device)


def load_for_task(
    task: str,
    model: str | None,
    revision: str | None,
    dtype: str | None,
    attn: str,
    device: str | None,
    quiet: bool = False,
) -> tuple[PhiPreTrained, PhiTokenizer]:
    """The model for ``task`` from the shared model options (the embedded default when none), and its tokenizer.

    ``quiet`` silences phi_core's notices (such as converting an old layout in memory)."""
    silence_notices(quiet)
    choice = model_choice(task, model, revision, dtype, attn, device)
    with progress("loading model...", enabled=not quiet):
        loaded = load_model(choice.source, task, choice.dtype, choice.attn, choice.device, choice.revision)
        tokenizer = load_tokenizer(choice.source, choice.revision)
    check_tokenizer_fits(loaded.config, tokenizer)
    return loaded, tokenizer


def silence_notices(quiet: bool) -> None:
    """phi_core logs notices (not errors) on the "phi_core" logger; --quiet turns them off."""
    logging.getLogger("phi_core").setLevel(logging.ERROR if quiet else logging.WARNING)


# Generation options, shared by every command that generates. None means "not given": the checkpoint's
# generation_config.json decides, then the built-in defaults (phi_core.generation_config).
SAMPLING_PANEL = "Sampling"
MaxNewTokensOpt = Annotated[
    int | None,
    typer.Option(min=1, help="Most tokens to generate.", show_default="the checkpoint's max_new_tokens, else 128"),
]
SampleOpt = Annotated[
    bool | None,
    typer.Option(
        "--sample/--greedy",
        help="Sample, or take the likeliest token.",
        show_default="the checkpoint's do_sample, else greedy",
        rich_help_panel=SAMPLING_PANEL,
    ),
]
TemperatureOpt = Annotated[
    float | None,
    typer.Option(min=0.0, callback=finite, help="0 = greedy; > 0 samples.", rich_help_panel=SAMPLING_PANEL),
]
TopKOpt = Annotated[
    int | None, typer.Option(min=0, help="Keep the k likeliest tokens (0 = all).", rich_help_panel=SAMPLING_PANEL)
]
TopPOpt = Annotated[
    float | None, typer.Option(callback=finite, help="Nucleus sampling mass.", rich_help_panel=SAMPLING_PANEL)
]
MinPOpt = Annotated[
    float | None,
    typer.Option(
        callback=finite, help="Drop tokens below min_p x the best token's probability.", rich_help_panel=SAMPLING_PANEL
    ),
]
RepetitionPenaltyOpt = Annotated[
    float | None, typer.Option(callback=finite, help="> 1 discourages repeats.", rich_help_panel=SAMPLING_PANEL)
]
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="Prompt format: code (as is), instruct ('Instruct: ...\\nOutput:'), chat ('Alice: ...\\nBob:'), or a "
        "FILE.jinja chat template.",
        show_default="the checkpoint's chat template, else code",
    ),
]

# Speculative decoding (phi_core.speculative): proposed tokens checked in one pass; greedy output unchanged.
SPECULATION_PANEL = "Speculative decoding"
LookupOpt = Annotated[
    int,
    typer.Option(
        min=0,
        metavar="N",
        help="Prompt lookup: propose up to N tokens that followed the last few tokens earlier in the prompt or "
        "output, all checked in one pass (pays when the output copies the input: edits, answers from a text). "
        "0: off.",
        rich_help_panel=SPECULATION_PANEL,
    ),
]
DraftOpt = Annotated[
    str | None,
    typer.Option(
        metavar="int8|int4|MODEL",
        help="Speculative decoding with a draft model: int8 or int4, a quantized copy of the model; or a checkpoint "
        "(folder, Hub id) with the same tokenizer, such as phi-1.5 for phi-2.",
        rich_help_panel=SPECULATION_PANEL,
    ),
]
DraftTokensOpt = Annotated[
    int,
    typer.Option(min=1, metavar="K", help="Most tokens the draft proposes a step.", rich_help_panel=SPECULATION_PANEL),
]


def load_draft_model(
    spec: str | None,
    tokens: int,
    model: str | None,
    revision: str | None,
    dtype: str | None,
    attn: str,
    device: str | None,
    tokenizer: PhiTokenizer,
    quiet: bool = False,
) -> Draft | None:
    """The ``--draft`` model (None without one): a quantized copy of the model the other options name, or a
    checkpoint with its tokenizer, loaded with the same dtype, attention and device options."""
    if spec is None:
        return None
    choice = model_choice("causal-lm", model, revision, dtype, attn, device)
    with progress("loading draft model...", enabled=not quiet):
        return load_draft(
            spec, choice.source, tokenizer, tokens, choice.dtype, choice.attn, choice.device, choice.revision
        )


def generation_overrides(
    max_new_tokens: int | None,
    sample: bool | None,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    repetition_penalty: float | None,
    seed: int | None,
) -> GenerationOverrides:
    """The generation flags a user gave (None where not given), checked like the checkpoint's own values."""
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise typer.BadParameter(f"{top_p} is not in (0, 1]", param_hint="--top-p")
    if min_p is not None and not 0.0 <= min_p < 1.0:
        raise typer.BadParameter(f"{min_p} is not in [0, 1)", param_hint="--min-p")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise typer.BadParameter(f"{repetition_penalty} is not > 0", param_hint="--repetition-penalty")
    return GenerationOverrides(sample, temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, seed)


def model_folder(model: str | None, revision: str | None, task: str = "causal-lm") -> Path:
    """The local folder of the model a command runs (no weights fetched: they were loaded already)."""
    return resolve_source(TASKS[task].embedded_default if model is None else model, revision, weights=False)


TruncateOpt = Annotated[
    bool,
    typer.Option(
        help="Cut an input too long for the model's context instead of failing (a prompt keeps its end, a text to "
        "classify or tag its start)."
    ),
]


# Distributed runs (`--ray`, phi_core.distributed), shared by generate, classify and tag.
RAY_PANEL = "Distributed (Ray)"
RayOpt = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Run on Ray over --input into the dataset folder --output; without --ray-address, on a local Ray "
        "instance sized to this machine. Needs the ray extra.",
        rich_help_panel=RAY_PANEL,
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        metavar="ADDRESS|auto",
        help="Run on the Ray cluster at ADDRESS (host:port of its head, or auto: the cluster this machine is part "
        "of, or RAY_ADDRESS); implies --ray.",
        rich_help_panel=RAY_PANEL,
    ),
]
ReplicasOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Model replicas (Ray actors), each loading the model once.",
        show_default="as many as the cluster's CPUs (or GPUs) allow",
        rich_help_panel=RAY_PANEL,
    ),
]
CpusPerReplicaOpt = Annotated[
    float,
    typer.Option(min=0.1, help="CPUs each replica reserves (and torch threads it runs).", rich_help_panel=RAY_PANEL),
]
GpusPerReplicaOpt = Annotated[
    float, typer.Option(min=0.0, help="GPUs each replica reserves (0: CPU only).", rich_help_panel=RAY_PANEL)
]
OutputDirOpt = Annotated[
    str | None,
    typer.Option(
        "--output",
        help="Dataset folder a --ray run publishes once every row is done: part-NNNNN shards, _SUCCESS, "
        "_errors.jsonl. A local path or a URI pyarrow knows (s3://...).",
        rich_help_panel=RAY_PANEL,
    ),
]
OutputFormatOpt = Annotated[
    Literal["jsonl", "parquet"] | None,
    typer.Option(help="Format of the output shards.", show_default="the input's", rich_help_panel=RAY_PANEL),
]
OnErrorOpt = Annotated[
    Literal["fail", "skip"],
    typer.Option(
        help="A bad row (not JSON, missing or non-string field, too long without --truncate): fail naming its file "
        "and line, or skip it into OUTPUT/_errors.jsonl with the reason.",
        rich_help_panel=RAY_PANEL,
    ),
]
IdFieldOpt = Annotated[
    str | None,
    typer.Option(
        help="A field of every row that identifies it in the output, instead of the added _file and _row.",
        rich_help_panel=RAY_PANEL,
    ),
]
ForceOpt = Annotated[bool, typer.Option(help="Replace --output if it exists.", rich_help_panel=RAY_PANEL)]
