"""Models for benchmarks and tests: random weights of the real Phi shapes, transformers' twin of a model on the same
weights, what one decode step reads, and the generation runs both sides are timed with (so ``phi bench``,
``benchmarks/decode.py`` and the tests time the same thing)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from phi_core.config import PhiConfig
from phi_core.embedded import TINY_CONFIG
from phi_core.errors import PhiError
from phi_core.generation import GenerationParams, Timing, generate
from phi_core.linear import PhiLinear
from phi_core.loading import place_weights, storage_dtypes
from phi_core.model import PhiForCausalLM
from phi_core.precision import choose_precision

# The real Phi shapes (phi-1 and phi-1.5 share one), and the embedded model's.
SHAPES: dict[str, PhiConfig] = {
    "phi-1": PhiConfig(),
    "phi-1.5": PhiConfig(),
    "phi-2": PhiConfig(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, partial_rotary_factor=0.4),
    "tiny": TINY_CONFIG,
}


def random_model(config: PhiConfig, dtype: str | torch.dtype, device: str, seed: int = 0) -> PhiForCausalLM:
    """A Phi of ``config``'s shape with random weights, stored as ``dtype`` resolves to on ``device``.

    The same seed gives the same weights at every dtype (drawn in float32, then rounded), so dtypes compare on
    the same model.
    """
    precision = choose_precision(dtype, device, torch.float32)
    with torch.device("meta"):
        model = PhiForCausalLM(config)
    dtypes = storage_dtypes(model, precision, torch.float32)
    state = {name: tensor.to(device=device, dtype=dtypes[name]) for name, tensor in random_state(config, seed)}
    place_weights(model, state, precision, device, torch.float32)
    return model.eval().requires_grad_(False)


def random_state(config: PhiConfig, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Random float32 weights for every tensor of a ``config`` language model (a tied head once), one at a time."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = PhiForCausalLM(config).state_dict()
    for name, param in shapes.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if "layernorm" in name:
            yield name, torch.full(param.shape, 1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            yield name, torch.zeros(param.shape)
        else:
            yield name, torch.empty(param.shape).normal_(0.0, 0.02, generator=generator)


def transformers_twin(
    config: PhiConfig, backend: str, state: dict[str, torch.Tensor], device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """transformers' PhiForCausalLM of ``config`` holding the weights ``state`` (checkpoint names).

    phi_core's loaded models hold their weights in their own layout (fused q/k/v, packed formats), so the twin
    takes the plain tensors they were made from (test/benchmark oracle only).
    """
    try:
        import transformers
    except ImportError:
        raise PhiError("--against transformers needs the transformers package: pip install transformers") from None
    hf_config = transformers.PhiConfig(**_hf_config_fields(config))
    hf_config._attn_implementation = backend
    with torch.device("meta"):
        twin = transformers.PhiForCausalLM(hf_config)
    weights = dict(state)
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    twin.load_state_dict(weights, strict=True, assign=True)
    # Rotary frequencies are a non-persistent buffer, so the meta build left them empty: make them for real.
    twin.model.rotary_emb = type(twin.model.rotary_emb)(hf_config)
    return twin.to(device).eval()


def _hf_config_fields(config: PhiConfig) -> dict[str, Any]:
    raw = config.to_hf_dict()
    for key in ("architectures", "model_type", "id2label", "label2id"):
        raw.pop(key, None)
    raw.pop("rope_scaling")
    raw["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": raw.pop("rope_theta"),
        "partial_rotary_factor": raw.pop("partial_rotary_factor"),
    }
    return raw


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of matrices one decode step reads: every Linear once (the embedding is a row lookup)."""
    if isinstance(model, PhiForCausalLM):
        return sum(m.stored_bytes() for m in model.modules() if isinstance(m, PhiLinear))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(m.weight.numel() * m.weight.element_size() for m in linears)


def our_generation(model: PhiForCausalLM, prompts: list[list[int]], new_tokens: int) -> Timing:
    """Generate exactly ``new_tokens`` per prompt, greedily and past any end of text (as transformers' side is
    timed); the prefill and decode seconds."""
    timing = Timing()
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True, logprobs=False)
    with torch.no_grad():
        for _ in generate(model, None, prompts, params, timing):
            pass
    return timing


def transformers_generation(twin: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> None:
    """transformers' greedy ``generate()`` of exactly ``new_tokens`` per row (its prefill included)."""
    with torch.no_grad():
        twin.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )


def transformers_prefill(twin: torch.nn.Module, ids: torch.Tensor) -> None:
    """The prefill ``generate()`` starts with (last logits only, as it keeps), timed alone to take it off."""
    with torch.no_grad():
        twin(ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
