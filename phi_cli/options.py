"""Option types shared by every command that loads a model, defined once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Literal, get_args

import torch
import typer

from phi_core import PhiTokenizer, load_model, load_tokenizer
from phi_core.attention import ATTENTION_BACKENDS
from phi_core.embedded import DEFAULT_FOR_TASK
from phi_core.model import PhiPreTrained
from phi_core.precision import DTYPE_CHOICES

MODEL_PANEL = "Model"

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Checkpoint folder, Hub repo id, or embedded name [default: the embedded tiny model]",
        rich_help_panel=MODEL_PANEL,
    ),
]
RevisionOpt = Annotated[
    str | None, typer.Option(help="Hub revision (branch, tag or commit).", rich_help_panel=MODEL_PANEL)
]
Dtype = Literal["auto", "float32", "float16", "bfloat16", "int8"]
assert get_args(Dtype) == DTYPE_CHOICES
Backend = Literal["eager", "sdpa", "flash_attention_2"]
assert get_args(Backend) == ATTENTION_BACKENDS
DtypeOpt = Annotated[
    Dtype | None,
    typer.Option(
        help="Weight dtype. On a CPU, 16-bit and int8 weights are multiplied in float32 (half or a quarter of the "
        "bytes per token); auto keeps the checkpoint's own precision [default: auto on CPU, float16 on CUDA].",
        rich_help_panel=MODEL_PANEL,
    ),
]
AttnOpt = Annotated[Backend, typer.Option(help="Attention backend.", rich_help_panel=MODEL_PANEL)]
DeviceOpt = Annotated[
    str | None,
    typer.Option(help="cpu, cuda, cuda:1 ... [default: cuda if available, else cpu].", rich_help_panel=MODEL_PANEL),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or notices on stderr.")]


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
    return ModelChoice(model or DEFAULT_FOR_TASK[task], revision, dtype, attn, device)


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
    loaded = load_model(choice.source, task, choice.dtype, choice.attn, choice.device, choice.revision)
    return loaded, load_tokenizer(choice.source, choice.revision)


def silence_notices(quiet: bool) -> None:
    """phi_core logs notices (not errors) on the "phi_core" logger; --quiet turns them off."""
    logging.getLogger("phi_core").setLevel(logging.ERROR if quiet else logging.WARNING)
