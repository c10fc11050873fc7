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
from phi_core.linear import PhiLinear
from phi_core.model import TASK_MODELS, PhiPreTrained
from phi_core.precision import DTYPE_CHOICES, Precision, checkpoint_dtype, choose_precision
from phi_core.tokenizer import PhiTokenizer, tokenizer_from_folder


def load_model(
    source: str | os.PathLike[str],
    task: str = "causal-lm",
    dtype: str | torch.dtype = "auto",
    attn: str = "sdpa",
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> PhiPreTrained:
    """Load a Phi checkpoint for ``task`` (``causal-lm``, ``sequence-classification``, ``token-classification``).

    ``source`` is a local folder, the name of an embedded model, or a Hub repo id (downloaded into the standard
    Hugging Face cache; ``HF_HUB_OFFLINE=1`` is honoured). The model is built on the meta device and the
    checkpoint tensors are assigned into it one by one, in the storage ``dtype`` resolves to (see
    :func:`phi_core.precision.choose_precision`; ``model.precision`` says what was picked).
    """
    if task not in TASK_MODELS:
        raise ValueError(f"unknown task {task!r} (choose one of {', '.join(TASK_MODELS)})")
    if isinstance(dtype, str) and dtype not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {dtype!r} (choose one of {', '.join(DTYPE_CHOICES)})")
    folder = resolve_source(source, revision, weights=True)
    config = PhiConfig.from_json_file(folder / "config.json")
    state = to_current_layout(read_state_dict(folder), config, task, folder)
    source_dtype = checkpoint_dtype(state.values())
    precision = choose_precision(dtype, device, source_dtype)
    check_backend(attn, device, precision.compute)
    with torch.device("meta"):
        model = TASK_MODELS[task](config)
    _check_names(model, state, folder)
    place_weights(model, state, precision, device, source_dtype)
    model.set_attention_backend(attn)
    return model.eval().requires_grad_(False)


def load_tokenizer(source: str | os.PathLike[str], revision: str | None = None) -> PhiTokenizer:
    """Load the CodeGen tokenizer of a checkpoint folder, embedded model or Hub repo."""
    return tokenizer_from_folder(resolve_source(source, revision, weights=False))


def place_weights(
    model: PhiPreTrained,
    state: dict[str, torch.Tensor],
    precision: Precision,
    device: torch.device | str,
    source_dtype: torch.dtype,
) -> None:
    """Assign ``state`` (read as ``source_dtype``) into a model built on the meta device, each tensor in its
    storage dtype, then pack.

    ``state`` is emptied on the way, so an original, its cast copy and its packed form exist for one tensor at a
    time, not for the whole model (16-bit weights then peak near half of float32's memory).
    """
    dtypes = storage_dtypes(model, precision, source_dtype)
    tied = model.config.tie_word_embeddings and hasattr(model, "lm_head")
    cast = {name: state.pop(name).to(device=device, dtype=dtypes[name]) for name in list(state)}
    model.load_state_dict(cast, strict=not tied, assign=True)
    del cast
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.prepare_for_inference(precision)


def storage_dtypes(model: PhiPreTrained, precision: Precision, source: torch.dtype) -> dict[str, torch.dtype]:
    """Per tensor name: matrices in the staging dtype when they will be packed, the embedding in its own dtype,
    everything else (LayerNorms, biases) in the compute dtype."""
    dtypes = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(prefix=module_name, recurse=False):
            if isinstance(module, PhiLinear) and name.endswith(".weight") and precision.weight_format != "dense":
                dtypes[name] = precision.staging(source)
            elif name == "model.embed_tokens.weight":
                dtypes[name] = precision.embedding
            else:
                dtypes[name] = precision.compute
    return dtypes


def _check_names(model: PhiPreTrained, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Check names and shapes against the model (a tied head's stored copy is dropped: it reuses the embedding)."""
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
