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

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from phi_core.config import PhiConfig
from phi_core.errors import CheckpointError

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


def _param_rules(names: dict[str, str]) -> dict[str, str]:
    """Expand module renames to their ``.weight`` and ``.bias`` keys."""
    return {f"{src}.{p}": f"{dst}.{p}" for src, dst in names.items() for p in ("weight", "bias")}


_REMOTE_BLOCK = {
    **_param_rules(
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


def to_current_layout(state: dict[str, torch.Tensor], config: PhiConfig, folder: Path) -> dict[str, torch.Tensor]:
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
