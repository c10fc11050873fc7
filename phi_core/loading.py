"""Building a model around a checkpoint's weights with about one copy of the weights in memory: the model is
made on the meta device and the checkpoint's tensors are assigned into it one by one."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from phi_core.attention import check_backend
from phi_core.checkpoint import read_config, read_state_dict, resolve_source, tensor_shapes
from phi_core.config import PhiConfig
from phi_core.errors import CheckpointError, PhiError
from phi_core.layouts import current_layout_shapes, to_current_layout
from phi_core.linear import PhiLinear
from phi_core.model import PhiPreTrained
from phi_core.precision import (
    DTYPE_CHOICES,
    FLOAT_DTYPES,
    Precision,
    checkpoint_dtype,
    choose_precision,
    dtype_name,
    unpacked,
)
from phi_core.tasks import TASKS, Task, head_of, task_named, task_of
from phi_core.tokenizer import PhiTokenizer, tokenizer_from_folder


def load_model(
    source: str | os.PathLike[str],
    task: str = "causal-lm",
    dtype: str | torch.dtype = "auto",
    attn: str = "sdpa",
    device: str | torch.device = "cpu",
    revision: str | None = None,
    prepare: bool = True,
) -> PhiPreTrained:
    """Load a Phi checkpoint for ``task`` (``causal-lm``, ``sequence-classification``, ``token-classification``).

    ``source`` is a local folder, the name of an embedded model, or a Hub repo id (downloaded into the standard
    Hugging Face cache; ``HF_HUB_OFFLINE=1`` is honoured). The model is built on the meta device and the
    checkpoint tensors are assigned into it one by one, in the storage ``dtype`` resolves to (see
    :func:`phi_core.precision.choose_precision`; ``model.precision`` says what was picked).

    ``prepare`` puts the model in its inference form (:meth:`PhiPreTrained.prepare_for_inference`: q/k/v fused,
    matrices packed). With ``prepare=False`` it keeps the checkpoint's names and plain ``dtype`` tensors, so it can
    be trained or saved back (``dtype`` then names a float dtype, or ``auto`` for the checkpoint's own).
    """
    task_named(task)
    if isinstance(dtype, str) and dtype not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {dtype!r} (choose one of {', '.join(DTYPE_CHOICES)})")
    check_device(device)
    folder = resolve_source(source, revision, weights=True)
    config = read_config(folder)
    model = checked_meta_model(config, current_layout_shapes(tensor_shapes(folder), config, folder), task, folder)
    state = to_current_layout(read_state_dict(folder), config, folder)
    if model.config.tie_word_embeddings and hasattr(model, "lm_head"):
        state.pop("lm_head.weight", None)  # a tied head reuses the embedding; a stored copy is redundant
    source_dtype = checkpoint_dtype(state.values())
    precision = choose_precision(dtype, device, source_dtype) if prepare else unprepared_precision(dtype, source_dtype)
    check_backend(attn, device, precision.compute)
    place_weights(model, state, precision, device, source_dtype, prepare)
    model.set_attention_backend(attn)
    return model.eval().requires_grad_(False)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, once it is known to exist here: a bad name, a PyTorch or machine without CUDA,
    or a GPU index out of range is one PhiError rather than a traceback from deep inside PyTorch."""
    shown = f"device {str(device)!r}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise PhiError(f"{shown}: not a device name (use cpu, cuda, cuda:N or mps)") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda is not None or torch.version.hip is not None
            reason = "no CUDA GPU is visible" if built else "this PyTorch was built without CUDA"
            raise PhiError(f"{shown}: CUDA is not available ({reason}); use --device cpu")
        count = torch.cuda.device_count()
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise PhiError(f"{shown}: MPS is not available on this machine; use --device cpu")
        count = 1
    else:
        raise PhiError(f"{shown}: phi runs on cpu, cuda or mps, not {parsed.type}")
    if parsed.index is not None and parsed.index >= count:
        raise PhiError(f"{shown}: no such device (this machine has {count} {parsed.type} device(s))")
    return parsed


def check_tokenizer_fits(config: PhiConfig, tokenizer: PhiTokenizer) -> None:
    """Every id the tokenizer can produce must be a row of the model's embedding. (More rows than ids is normal:
    phi-2 pads its 50,295 ids to 51,200 rows.)"""
    ids = max(tokenizer.backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    if ids > config.vocab_size:
        raise CheckpointError(
            f"{tokenizer.name or 'tokenizer'}: tokenizer has {ids} ids but the model has only {config.vocab_size} "
            "embedding rows (vocab_size in config.json)"
        )


def load_tokenizer(source: str | os.PathLike[str], revision: str | None = None) -> PhiTokenizer:
    """Load the CodeGen tokenizer of a checkpoint folder, embedded model or Hub repo."""
    return tokenizer_from_folder(resolve_source(source, revision, weights=False))


def place_weights(
    model: PhiPreTrained,
    state: dict[str, torch.Tensor],
    precision: Precision,
    device: torch.device | str,
    source_dtype: torch.dtype,
    prepare: bool = True,
) -> None:
    """Assign ``state`` (read as ``source_dtype``) into a model built on the meta device, each tensor in its
    storage dtype, then (``prepare``) put the model in its inference form.

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
    if prepare:
        model.prepare_for_inference(precision)
    else:
        model.precision = precision


def unprepared_precision(dtype: str | torch.dtype, source_dtype: torch.dtype) -> Precision:
    """Plain tensors of one float dtype (``auto``: the checkpoint's), for a model that is not prepared."""
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
    if name == "auto":
        name = dtype_name(source_dtype) if source_dtype in FLOAT_DTYPES.values() else "float32"
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype {name!r} exists only in the inference form; load with prepare=True")
    return unpacked(FLOAT_DTYPES[name], name)


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


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def checked_meta_model(
    config: PhiConfig, shapes: Mapping[str, tuple[int, ...]], task: str, folder: Path
) -> PhiPreTrained:
    """The model for ``task`` on the meta device, built only once the config's sizes agree with the weights' shapes
    (current-layout names, from the headers), and with every parameter name and shape checked against them."""
    _check_sizes(config, shapes, task, folder)
    with torch.device("meta"):
        model = task_named(task).model_class(config)
    _check_names(model, shapes, folder)
    return model


def _check_sizes(config: PhiConfig, shapes: Mapping[str, tuple[int, ...]], task: str, folder: Path) -> None:
    """The config's sizes against the weights before anything is built from them: a config.json that claims 10**9
    layers would otherwise build 10**9 modules."""
    layers = {int(found.group(1)) for name in shapes if (found := _LAYER.match(name))}
    if len(layers) != config.num_hidden_layers:
        raise CheckpointError(
            f"{folder}: config.json says num_hidden_layers = {config.num_hidden_layers}, "
            f"but the weights hold {len(layers)} layers"
        )
    implied = {"model.embed_tokens.weight": ((config.vocab_size, config.hidden_size), "vocab_size and hidden_size")}
    if task != "causal-lm":
        implied["score.weight"] = ((config.num_labels, config.hidden_size), "num_labels and hidden_size")
    for name, (shape, fields) in implied.items():
        if name in shapes and tuple(shapes[name]) != shape:
            raise CheckpointError(
                f"{folder}: {name} has shape {list(shapes[name])}, but config.json's {fields} imply {list(shape)}"
            )


def _check_names(model: PhiPreTrained, shapes: Mapping[str, tuple[int, ...]], folder: Path) -> None:
    """Check names and shapes against the model (a tied head's stored copy is ignored: it reuses the embedding)."""
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    found = dict(shapes)
    if model.config.tie_word_embeddings and "lm_head.weight" in expected:
        found.pop("lm_head.weight", None)
        expected.pop("lm_head.weight")
    _check_head(task_of(model), found, folder)
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not fit the config: {_describe_mismatch(missing, unexpected)}")
    for name, shape in found.items():
        if tuple(shape) != expected[name]:
            implied = list(expected[name])
            raise CheckpointError(f"{folder}: {name} has shape {list(shape)}, the config implies {implied}")


def _check_head(wanted: Task, keys: Iterable[str], folder: Path) -> None:
    found = head_of(keys)
    if found == wanted.name:
        return
    has = f"has {TASKS[found].head} ({TASKS[found].head_keys})" if found else "has no task head (only model.*)"
    raise CheckpointError(f"{folder}: {has}, not the {wanted.name} head ({wanted.head_keys}) this task needs")


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
