"""`phi convert`: write a checkpoint of any layout (see :mod:`phi_core.layouts`) in the current one, one tensor at
a time, checked against its config before anything is written, and published atomically."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from phi_core.checkpoint import (
    TOKENIZER_FILES,
    checkpoint_roots,
    iter_tensors,
    read_config,
    resolve_source,
    tensor_shapes,
)
from phi_core.config import PhiConfig
from phi_core.errors import CheckpointError
from phi_core.layouts import CURRENT, HEAD_ALIASES, convert_tensors, current_layout_shapes, detect_layout
from phi_core.loading import checked_meta_model, load_model
from phi_core.precision import FLOAT_DTYPES, dtype_name
from phi_core.saving import atomic_folder, checked_output, copy_tokenizer, with_dtype, write_config
from phi_core.tasks import head_of

log = logging.getLogger("phi_core")


KEEP = "keep"
ENDOFTEXT_ID = 50256
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion did: the layout found, tensors and bytes written, shards, and the --verify result."""

    layout: str
    tensors: int
    bytes_written: int
    shards: int
    max_abs_diff: float | None


def parse_size(text: str) -> int:
    """``"2GB"`` -> 2_000_000_000; ``"500MiB"`` -> 524_288_000; a bare number is bytes."""
    found = _SIZE.match(text)
    if found is None:
        raise ValueError(f"cannot read size {text!r} (use e.g. 2GB, 500MB or 1GiB)")
    return int(float(found.group(1)) * _UNITS[(found.group(2) or "B").upper()])


def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    dtype: str = KEEP,
    max_shard_size: int | None = None,
    force: bool = False,
    verify: bool = False,
    revision: str | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
) -> ConversionReport:
    """Convert a checkpoint of any layout to the current one in ``output``, one tensor at a time.

    Nothing from ``source`` is executed. ``output`` appears only once complete (an existing one is kept unless
    ``force``). ``on_tensor(name, nbytes)`` is called for each tensor written (progress bars).
    """

    folder = resolve_source(source, revision, weights=True)
    target = _checked_output(output, folder, force)
    target_dtype = None if dtype == KEEP else FLOAT_DTYPES[dtype]
    config = read_config(folder)
    shapes = tensor_shapes(folder)
    layout = detect_layout(shapes)
    _cross_check(layout, config, folder)
    current = current_layout_shapes(shapes, config, folder)
    task = head_of(current) or "causal-lm"
    checked_meta_model(config, current, task, folder)  # names and shapes against the config, before writing
    config = _fill_token_ids(config)
    if target_dtype is not None:
        config = with_dtype(config, target_dtype)
    elif config.torch_dtype is None:
        config = with_dtype(config, torch.float32)
    tensors = iter_tensors(folder)
    converted = (
        ((HEAD_ALIASES.get(k, k), v) for k, v in tensors)
        if layout == CURRENT
        else convert_tensors(tensors, config, layout, folder)
    )
    with atomic_folder(target, force=force) as staging:
        written, total, shards = _write_shards(converted, staging, target_dtype, max_shard_size, on_tensor)
        write_config(staging, config, task)
        copy_tokenizer(folder, staging)
        _check_tokenizer_copied(folder, staging, TOKENIZER_FILES)
        diff = _verify(folder, staging, output) if verify else None
    return ConversionReport(layout, len(written), total, shards, diff)


def _checked_output(output: str | Path, folder: Path, force: bool) -> Path:
    """The resolved output, refused when it is, holds or lies inside the source checkpoint (replacing it would
    delete the source), or is the current directory or one of its parents."""
    target = checked_output(output, force)
    if any(target.is_relative_to(root) or root.is_relative_to(target) for root in checkpoint_roots(folder)):
        raise CheckpointError(f"{output}: is, holds or lies inside the source checkpoint {folder}; give another folder")
    return target


def _cross_check(layout: str, config: PhiConfig, folder: Path) -> None:
    """The weights' layout and the config's format must agree (remote keys go with remote configs)."""
    remote_config = config.source_format != "hf"
    remote_weights = layout in ("mixformer-sequential", "phi-msft")
    if remote_config != remote_weights:
        kind = "remote-code (n_embd, ...)" if remote_config else "transformers (hidden_size, ...)"
        raise CheckpointError(
            f"{folder}: config.json is in the {kind} format but the weights are in the {layout} layout"
        )


def _fill_token_ids(config: PhiConfig) -> PhiConfig:
    """Old configs leave bos/eos unset; every Phi tokenizer uses <|endoftext|> (50256) for both, and without it
    transformers' generate never stops."""
    if config.vocab_size <= ENDOFTEXT_ID:
        return config
    return replace(
        config,
        bos_token_id=ENDOFTEXT_ID if config.bos_token_id is None else config.bos_token_id,
        eos_token_id=ENDOFTEXT_ID if config.eos_token_id is None else config.eos_token_id,
    )


def _write_shards(
    tensors: Iterable[tuple[str, torch.Tensor]],
    staging: Path,
    dtype: torch.dtype | None,
    max_shard_size: int | None,
    on_tensor: Callable[[str, int], None] | None,
) -> tuple[dict[str, int], int, int]:
    """Write tensors into ``model.safetensors`` or numbered shards plus an index; return (name -> shard, bytes,
    shard count). Only one shard's tensors are held in memory at a time."""

    shard: dict[str, torch.Tensor] = {}
    shard_bytes, total, shard_files = 0, 0, []
    placement: dict[str, int] = {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"shard-{len(shard_files):05d}.partial"
            save_file(shard, str(staging / name), metadata={"format": "pt"})
            shard_files.append(name)
            shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        tensor = _cast(name, tensor, dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if max_shard_size is not None and shard and shard_bytes + size > max_shard_size:
            flush()
        shard[name] = tensor
        placement[name] = len(shard_files)
        shard_bytes += size
        total += size
        if on_tensor is not None:
            on_tensor(name, size)
    flush()
    if len(shard_files) <= 1:
        if shard_files:
            (staging / shard_files[0]).rename(staging / "model.safetensors")
        return placement, total, len(shard_files)
    names = [f"model-{i + 1:05d}-of-{len(shard_files):05d}.safetensors" for i in range(len(shard_files))]
    for old, new in zip(shard_files, names, strict=True):
        (staging / old).rename(staging / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in sorted(placement.items())}}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return placement, total, len(shard_files)


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in ``dtype``; a value beyond the dtype's range (float16 stops at 65504) is an error, not an inf."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    cast = tensor.to(dtype)
    overflow = torch.isinf(cast) & torch.isfinite(tensor)
    if overflow.any():
        largest = float(tensor[overflow].abs().max())
        raise CheckpointError(
            f"{name}: holds values up to {largest:.4g}, beyond {dtype_name(dtype)}'s range "
            f"(+-{torch.finfo(dtype).max:.6g}); keep a wider --dtype"
        )
    return cast


def _check_tokenizer_copied(source: Path, staging: Path, names: tuple[str, ...]) -> None:
    if not any((staging / name).is_file() for name in names):
        log.warning("note: %s has no tokenizer files; the converted checkpoint has none either", source)


def _verify(source: Path, converted: Path, output: str | Path) -> float:
    """Max |logit difference| between the converted checkpoint and the source weights, both run in fp32 by
    phi_core on the same fixed tokens; a non-finite difference (inf or nan logits) fails the conversion."""
    log.disabled = True  # the in-memory conversion notice would only repeat what the converter says
    try:
        original = load_model(source, dtype="float32", attn="eager")
    finally:
        log.disabled = False
    result = load_model(converted, dtype="float32", attn="eager")
    generator = torch.Generator().manual_seed(0)
    length = min(32, original.config.max_position_embeddings)
    ids = torch.randint(0, min(original.config.vocab_size, 50257), (2, length), generator=generator)
    with torch.no_grad():
        diff = float((original(ids).logits - result(ids).logits).abs().max())
    if not math.isfinite(diff):
        raise CheckpointError(
            f"{output}: --verify found non-finite logits (max |logit difference| = {diff}); not saved"
        )
    return diff
