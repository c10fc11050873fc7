"""Option types shared by every command that loads a model, defined once."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Annotated, Literal, get_args

import torch
import typer

from phi_cli.io import spinner
from phi_core import PhiTokenizer, load_model, load_tokenizer
from phi_core.attention import ATTENTION_BACKENDS
from phi_core.loading import check_tokenizer_fits
from phi_core.model import PhiPreTrained
from phi_core.precision import DTYPE_CHOICES
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
Dtype = Literal["auto", "float32", "float16", "bfloat16", "int8", "int4"]
assert get_args(Dtype) == DTYPE_CHOICES
Backend = Literal["eager", "sdpa", "flash_attention_2"]
assert get_args(Backend) == ATTENTION_BACKENDS
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


def finite(value: float) -> float:
    """Option callback that refuses nan and inf, which every range check lets through."""
    if not math.isfinite(value):
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
    with spinner("loading model...", enabled=not quiet):
        loaded = load_model(choice.source, task, choice.dtype, choice.attn, choice.device, choice.revision)
        tokenizer = load_tokenizer(choice.source, choice.revision)
    check_tokenizer_fits(loaded.config, tokenizer)
    return loaded, tokenizer


def silence_notices(quiet: bool) -> None:
    """phi_core logs notices (not errors) on the "phi_core" logger; --quiet turns them off."""
    logging.getLogger("phi_core").setLevel(logging.ERROR if quiet else logging.WARNING)
