"""Building a model around a checkpoint's weights with about one copy of the weights in memory: the model is
made on the meta device and the checkpoint's tensors are assigned into it one by one."""

from __future__ import annotations

import os
from collections.abc import KeysView
from pathlib import Path

import torch

from phi_core.attention import check_backend
from phi_core.checkpoint import read_state_dict, resolve_source
from phi_core.config import PhiConfig
from phi_core.convert import HEADS, head_of, to_current_layout
from phi_core.errors import CheckpointError
from phi_core.model import TASK_MODELS, PhiPreTrained, store_linears_column_major
from phi_core.tokenizer import PhiTokenizer, tokenizer_from_folder

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"float16"``/``"bfloat16"`` (or the torch dtype itself) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ValueError(f"dtype {dtype} is not supported (use float32, float16 or bfloat16)")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use float32, float16 or bfloat16)")
    return DTYPES[dtype]


def load_model(
    source: str | os.PathLike[str],
    task: str = "causal-lm",
    dtype: str | torch.dtype = "float32",
    attn: str = "sdpa",
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> PhiPreTrained:
    """Load a Phi checkpoint for ``task`` (``causal-lm``, ``sequence-classification``, ``token-classification``).

    ``source`` is a local folder, the name of an embedded model, or a Hub repo id (downloaded into the standard
    Hugging Face cache; ``HF_HUB_OFFLINE=1`` is honoured). The model is built on the meta device and the
    checkpoint tensors are assigned into it one by one, cast to ``dtype`` on the way.
    """
    if task not in TASK_MODELS:
        raise ValueError(f"unknown task {task!r} (choose one of {', '.join(TASK_MODELS)})")
    torch_dtype = resolve_dtype(dtype)
    check_backend(attn, device, torch_dtype)
    folder = resolve_source(source, revision, weights=True)
    config = PhiConfig.from_json_file(folder / "config.json")
    state = to_current_layout(read_state_dict(folder), config, task, folder)
    with torch.device("meta"):
        model = TASK_MODELS[task](config)
    _assign_weights(model, state, torch_dtype, folder)
    model.to(device)
    store_linears_column_major(model)
    model.set_attention_backend(attn)
    return model.eval().requires_grad_(False)


def load_tokenizer(source: str | os.PathLike[str], revision: str | None = None) -> PhiTokenizer:
    """Load the CodeGen tokenizer of a checkpoint folder, embedded model or Hub repo."""
    return tokenizer_from_folder(resolve_source(source, revision, weights=False))


def _assign_weights(model: PhiPreTrained, state: dict[str, torch.Tensor], dtype: torch.dtype, folder: Path) -> None:
    """Check names and shapes against the model, then assign the tensors (cast to ``dtype``) in place."""
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    tied = model.config.tie_word_embeddings and "lm_head.weight" in expected
    if tied:
        state.pop("lm_head.weight", None)  # tied heads reuse the embedding; a stored copy is redundant
        expected.pop("lm_head.weight")
    _check_head(type(model), state.keys(), folder)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not fit the config: {_describe_mismatch(missing, unexpected)}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{folder}: {name} has shape {list(tensor.shape)}, the config implies {list(expected[name])}"
            )
    # Cast while popping, so an original and its cast copy coexist for one tensor at a time.
    cast = {name: state.pop(name).to(dtype) for name in list(state)}
    model.load_state_dict(cast, strict=not tied, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def _check_head(model_class: type[PhiPreTrained], keys: KeysView[str], folder: Path) -> None:
    wanted = next(task for task, cls in TASK_MODELS.items() if cls is model_class)
    found = head_of(keys)
    if found == wanted:
        return
    has = f"has {HEADS[found][0]} ({HEADS[found][1]})" if found else "has no task head (only model.*)"
    raise CheckpointError(f"{folder}: {has}, not the {wanted} head ({HEADS[wanted][1]}) this task needs")


def _describe_mismatch(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected {_few(unexpected)}")
    return "; ".join(parts)


def _few(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
