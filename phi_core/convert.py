"""Old Phi checkpoint layouts, told apart by their keys and renamed to the current one through one table.

Layouts (facts in ``docs/convert.md``):

* ``mixformer-sequential`` (A): ``layers.0.wte``, block i at ``layers.{i+1}``, head at ``layers.{n_layer+1}``;
* ``phi-msft`` (B): ``transformer.embd.wte``, ``transformer.h.{i}``, ``lm_head.ln`` / ``lm_head.linear``;
* ``transformers-4.36`` (C): ``self_attn.query_key_value``, interleaved per head;
* ``current`` (D): separate ``q_proj``/``k_proj``/``v_proj`` (transformers >= 4.37): nothing to rename.

Each rule maps a source key template to a target template (``None`` drops the key) or splits a fused qkv
tensor. ``{i}`` is the target block index; the source block number is ``i + offset`` (A counts the embedding as
layer 0); ``{head}`` is A's head index ``n_layer + 1``. Every source key must match exactly one rule.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from phi_core.checkpoint import (
    checkpoint_roots,
    iter_tensors,
    read_checkpoint_text,
    read_config,
    resolve_source,
    tensor_shapes,
)
from phi_core.config import PhiConfig, detect_config_format
from phi_core.errors import CheckpointError
from phi_core.precision import FLOAT_DTYPES, dtype_name
from phi_core.saving import atomic_folder, checked_output, copy_tokenizer, with_dtype, write_config
from phi_core.tokenizer import TOKENIZER_FILES

log = logging.getLogger("phi_core")
Q_K_V = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_BLOCK = "model.layers.{i}."


@dataclass(frozen=True)
class Rule:
    """One source key template and what becomes of it: a target name, a qkv split, or nothing."""

    source: str
    target: str | None
    split: str | None = None  # "contiguous" ([q | k | v] rows) or "interleaved" (per head: q, k, v)


def _block_rules(prefix: str, names: dict[str, str | None]) -> list[Rule]:
    return [Rule(prefix + src, None if dst is None else _BLOCK + dst) for src, dst in names.items()]


def _param_rules(prefix: str, names: dict[str, str]) -> dict[str, str]:
    """Expand module renames to their ``.weight`` and ``.bias`` keys."""
    return {f"{src}.{p}": f"{dst}.{p}" for src, dst in names.items() for p in ("weight", "bias")}


_REMOTE_BLOCK = {
    **_param_rules(
        "",
        {
            "ln": "input_layernorm",
            "mixer.out_proj": "self_attn.dense",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
            "mlp.fc_in": "mlp.fc1",
            "mlp.fc_out": "mlp.fc2",
            "mlp.mlp.fc1": "mlp.fc1",
            "mlp.mlp.fc2": "mlp.fc2",
        },
    ),
    "mixer.rotary_emb.inv_freq": None,
}
_REMOTE_QKV = ("mixer.Wqkv.weight", "mixer.Wqkv.bias")
_HF_BLOCK = {
    **_param_rules(
        "",
        {
            "input_layernorm": "input_layernorm",
            "self_attn.dense": "self_attn.dense",
            "self_attn.q_layernorm": "self_attn.q_layernorm",
            "self_attn.k_layernorm": "self_attn.k_layernorm",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        },
    ),
    "self_attn.rotary_emb.inv_freq": None,
}


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout: the key that identifies it, its block numbering and its rename rules."""

    name: str
    marker: str
    block_offset: int
    rules: tuple[Rule, ...]


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="mixformer-sequential",
        marker="layers.0.wte.weight",
        block_offset=1,
        rules=(
            Rule("layers.0.wte.weight", "model.embed_tokens.weight"),
            *_block_rules("layers.{i}.", _REMOTE_BLOCK),
            *(Rule("layers.{i}." + key, _BLOCK + "self_attn", split="contiguous") for key in _REMOTE_QKV),
            *(Rule(f"layers.{{head}}.ln.{p}", f"model.final_layernorm.{p}") for p in ("weight", "bias")),
            *(Rule(f"layers.{{head}}.linear.{p}", f"lm_head.{p}") for p in ("weight", "bias")),
        ),
    ),
    Layout(
        name="phi-msft",
        marker="transformer.embd.wte.weight",
        block_offset=0,
        rules=(
            Rule("transformer.embd.wte.weight", "model.embed_tokens.weight"),
            *_block_rules("transformer.h.{i}.", _REMOTE_BLOCK),
            *(Rule("transformer.h.{i}." + key, _BLOCK + "self_attn", split="contiguous") for key in _REMOTE_QKV),
            *(Rule(f"lm_head.ln.{p}", f"model.final_layernorm.{p}") for p in ("weight", "bias")),
            *(Rule(f"lm_head.linear.{p}", f"lm_head.{p}") for p in ("weight", "bias")),
        ),
    ),
    Layout(
        name="transformers-4.36",
        marker="model.layers.0.self_attn.query_key_value.weight",
        block_offset=0,
        rules=(
            Rule("model.embed_tokens.weight", "model.embed_tokens.weight"),
            *_block_rules("model.layers.{i}.", _HF_BLOCK),
            *(
                Rule(f"model.layers.{{i}}.self_attn.query_key_value.{p}", _BLOCK + "self_attn", split="interleaved")
                for p in ("weight", "bias")
            ),
            *(Rule(f"model.final_layernorm.{p}", f"model.final_layernorm.{p}") for p in ("weight", "bias")),
            *(Rule(f"lm_head.{p}", f"lm_head.{p}") for p in ("weight", "bias")),
            *(Rule(f"classifier.{p}", f"score.{p}") for p in ("weight", "bias")),
            Rule("score.weight", "score.weight"),
        ),
    ),
)
CURRENT = "current"
# transformers 4.36-4.47 named the token-classification head `classifier`; later versions call it `score`.
HEAD_ALIASES = {"classifier.weight": "score.weight", "classifier.bias": "score.bias"}


HEADS = {
    "causal-lm": ("a causal-LM head", "lm_head.weight"),
    "sequence-classification": ("a sequence-classification head", "score.weight without bias"),
    "token-classification": ("a token-classification head", "score.weight and score.bias"),
}


def head_of(keys: Iterable[str]) -> str | None:
    """Which task head a set of (current-layout) tensor names carries, if any."""
    keys = set(keys)
    if "lm_head.bias" in keys or "lm_head.weight" in keys:
        return "causal-lm"
    if "score.weight" in keys:
        return "token-classification" if "score.bias" in keys else "sequence-classification"
    return None


def detect_layout(keys: Iterable[str]) -> str:
    """The layout name of a checkpoint from its tensor names."""
    keys = set(keys)
    for layout in LAYOUTS:
        if layout.marker in keys:
            return layout.name
    if "model.embed_tokens.weight" in keys or "model.layers.0.self_attn.q_proj.weight" in keys:
        return CURRENT
    sample = ", ".join(sorted(keys)[:5]) or "no tensors at all"
    raise CheckpointError(f"unrecognized checkpoint layout; keys seen: {sample}")


def to_current_layout(
    state: dict[str, torch.Tensor], config: PhiConfig, task: str, folder: Path
) -> dict[str, torch.Tensor]:
    """The state dict in the current layout, converting an old layout in memory (with a logged notice)."""
    layout = detect_layout(state)
    if layout == CURRENT:
        return {HEAD_ALIASES.get(k, k): v for k, v in state.items()}
    log.warning(
        "note: %s is in the old %s layout; converting in memory (`phi convert %s NEW_FOLDER` saves a converted copy)",
        folder,
        layout,
        folder,
    )
    return dict(convert_tensors(state.items(), config, layout, folder))


def current_layout_shapes(
    shapes: dict[str, tuple[int, ...]], config: PhiConfig, folder: Path
) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a checkpoint renamed (and split) to the current layout, worked out on the meta device
    from the shapes alone, so the weights can be checked against the config before any tensor is read."""
    layout = detect_layout(shapes)
    if layout == CURRENT:
        return {HEAD_ALIASES.get(k, k): v for k, v in shapes.items()}
    meta = ((name, torch.empty(shape, device="meta")) for name, shape in shapes.items())
    return {name: tuple(tensor.shape) for name, tensor in convert_tensors(meta, config, layout, folder)}


def convert_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], config: PhiConfig, layout_name: str, source: Path | str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename (and split) each source tensor into the current layout, one at a time."""
    layout = next(item for item in LAYOUTS if item.name == layout_name)
    matchers = _compile(layout, config)
    produced: set[str] = set()
    for key, tensor in tensors:
        rule, index = _match(matchers, key, config, layout, source)
        if rule.target is None:
            continue
        target = rule.target.format(i=index)
        pieces = _split(rule, tensor, config, key, target) if rule.split else [(target, tensor)]
        for name, piece in pieces:
            if name in produced:
                raise CheckpointError(f"{source}: {key} gives {name} a second time (two aliases of one tensor?)")
            produced.add(name)
            yield name, piece


def _compile(layout: Layout, config: PhiConfig) -> list[tuple[re.Pattern[str], Rule]]:
    head = str(config.num_hidden_layers + 1)
    compiled = []
    for rule in layout.rules:
        pattern = re.escape(rule.source).replace(r"\{i\}", r"(\d+)").replace(r"\{head\}", head)
        compiled.append((re.compile(f"^{pattern}$"), rule))
    return compiled


def _match(
    matchers: list[tuple[re.Pattern[str], Rule]], key: str, config: PhiConfig, layout: Layout, source: Path | str
) -> tuple[Rule, int]:
    for pattern, rule in matchers:
        found = pattern.match(key)
        if found is None:
            continue
        if not found.groups():
            return rule, -1
        index = int(found.group(1)) - layout.block_offset
        if 0 <= index < config.num_hidden_layers:
            return rule, index
    raise CheckpointError(f"{source}: unknown key {key!r} for the {layout.name} layout")


def _split(rule: Rule, fused: torch.Tensor, config: PhiConfig, key: str, target: str) -> list[tuple[str, torch.Tensor]]:
    """Split a fused qkv weight or bias into q_proj, k_proj and v_proj."""
    hd, heads, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    suffix = key.rsplit(".", 1)[1]
    rows = (heads + 2 * kv) * hd
    if fused.shape[0] != rows or (suffix == "weight" and fused.shape[1:] != (config.hidden_size,)):
        expected = [rows, config.hidden_size] if suffix == "weight" else [rows]
        raise CheckpointError(f"{key} has shape {list(fused.shape)}, the config implies {expected}")
    if rule.split == "interleaved":
        if kv != heads:
            raise CheckpointError(f"{key}: the interleaved 4.36 layout has no grouped key/value heads")
        per_head = fused.reshape(heads, 3, hd, *fused.shape[1:])
        parts = [per_head[:, j].reshape(heads * hd, *fused.shape[1:]) for j in range(3)]
    else:
        parts = list(torch.split(fused, [heads * hd, kv * hd, kv * hd], dim=0))
    block = target.rsplit("self_attn", 1)[0]
    return [(f"{block}{name}.{suffix}", part.clone()) for name, part in zip(Q_K_V, parts, strict=True)]


# Writing a converted checkpoint ------------------------------------------------------------------------------
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

    from phi_core.loading import checked_meta_model  # loading.py imports this module

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

    raw = json.loads(read_checkpoint_text(folder, "config.json"))
    remote_config = detect_config_format(raw).name != "hf"
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
    from phi_core.loading import load_model

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
