"""The Phi decoder and its three heads, written out in plain PyTorch.

A block is parallel: one LayerNorm feeds both attention and the MLP, and both outputs are added to the
residual. Submodules are named exactly like the keys of a current (transformers >= 4.37) checkpoint, so loading
needs no renames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phi_core import kernels as compiled
from phi_core.attention import AttentionMask, attention_function, check_backend
from phi_core.cache import KVCache
from phi_core.config import PhiConfig
from phi_core.errors import PhiError
from phi_core.linear import DirectCall, PhiLinear, pack_linears
from phi_core.precision import Precision, unpacked
from phi_core.rotary import Rotation, apply_rotary, rotary_angles

# A long prompt read into a cache on a CPU goes through the decoder this many tokens at a time: a 2048-token pass
# keeps 2048 x 8192 float32 MLP activations (64 MB at phi-1.5's shape) that no cache holds. Measured on a 2-core
# Zen 5, phi-1.5 shape, 2048 tokens (tokens/s, float32 / bfloat16): one pass 62-67 / 94-95, pieces of 512 88-90 /
# 112, of 256 98 / 122, of 128 91-96 / 119 (llama.cpp reads prompts in 512-token micro-batches).
PREFILL_CHUNK = 256


@dataclass
class CausalLMOutput:
    """Next-token logits, (batch, seq, vocab); (batch, 1, vocab) when only the last position was asked for."""

    logits: torch.Tensor


@dataclass
class SequenceClassifierOutput:
    """One row of label logits per sequence, (batch, num_labels), read at each row's last real token."""

    logits: torch.Tensor


@dataclass
class TokenClassifierOutput:
    """Label logits for every token, (batch, seq, num_labels)."""

    logits: torch.Tensor


class LayerNorm(DirectCall, nn.LayerNorm):
    """nn.LayerNorm called without hook bookkeeping (see :class:`phi_core.linear.DirectCall`)."""


class Embedding(DirectCall, nn.Embedding):
    """nn.Embedding called without hook bookkeeping (see :class:`phi_core.linear.DirectCall`)."""


def activation(name: str, x: torch.Tensor, kernels: compiled.Kernels | None = None) -> torch.Tensor:
    """Phi's ``gelu_new`` is the tanh approximation of GELU; plain ``gelu`` is the exact (erf) one. With ``kernels``,
    the tanh form of a fresh float32 CPU tensor (fc1's output) is computed in place by the compiled kernel."""
    if name == "gelu":
        return F.gelu(x)
    if kernels is not None and x.is_cpu and x.dtype == torch.float32 and x.is_contiguous() and not x.requires_grad:
        return kernels.gelu_tanh_(x)
    return F.gelu(x, approximate="tanh")


class PhiAttention(DirectCall, nn.Module):
    def __init__(self, config: PhiConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = PhiLinear(config.hidden_size, self.num_heads * self.head_dim)
        self.k_proj = PhiLinear(config.hidden_size, self.num_kv_heads * self.head_dim)
        self.v_proj = PhiLinear(config.hidden_size, self.num_kv_heads * self.head_dim)
        self.qkv_proj: PhiLinear | None = None
        self.dense = PhiLinear(self.num_heads * self.head_dim, config.hidden_size)
        self.qk_layernorm = config.qk_layernorm
        if config.qk_layernorm:
            self.q_layernorm = LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = LayerNorm(self.head_dim, eps=config.layer_norm_eps)
        self.backend = "sdpa"
        # phi_core's compiled attention, serving the sdpa backend on a CPU where it applies (see use_cpu_kernels)
        self.kernels: compiled.Kernels | None = None

    def fuse_projections(self) -> None:
        """Replace q_proj, k_proj and v_proj by one ``qkv_proj`` holding the three matrices stacked (for inference).

        One product instead of three per layer; at one token per step the fixed cost of a product is most of it.
        The state dict then has ``qkv_proj`` in place of the checkpoint's three names.
        """
        parts = (self.q_proj, self.k_proj, self.v_proj)
        fused = PhiLinear(parts[0].in_features, sum(p.out_features for p in parts), device="meta")
        fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = fused

    def forward(
        self,
        x: torch.Tensor,
        rotary: Rotation,
        mask: AttentionMask,
        cache: KVCache | None,
    ) -> torch.Tensor:
        projected = self._projected(x)
        if cache is not None and self.kernels is not None and not self.qk_layernorm:
            # the compiled rotation writes keys and values straight into the cache
            new = x.shape[1]
            keys, values = cache.slots(self.layer_index, new)
            q = self.kernels.rotate_into_cache(
                projected, rotary.cos, rotary.sin, rotary.rotary_dim, self.num_heads, keys, values, cache.length
            )
            if q is not None:
                k, v = cache.written(self.layer_index, new)
                return self.dense(self.attend(q, k, v, mask))
        # to (batch, heads, new, head_dim)
        q, k, v = (t.transpose(1, 2) for t in self._rotated_qkv(projected, rotary))
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        return self.dense(self.attend(q, k, v, mask))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """Attention of rotated queries (batch, heads, new, head_dim) over all keys and values as this layer computes
        it: the compiled kernel where one is bound and applies, else the backend. (batch, new, heads * head_dim)."""
        out = None if self.kernels is None else self.kernels.attention(q, k, v, mask.key_valid)
        return attention_function(self.backend)(q, k, v, mask) if out is None else out

    def _projected(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values side by side, (batch, new, (heads + 2 * kv_heads) * head_dim)."""
        if self.qkv_proj is not None:
            return self.qkv_proj(x)
        return torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)

    def _rotated_qkv(
        self, projected: torch.Tensor, rotary: Rotation
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries (batch, new, heads, head_dim) and keys, and values (batch, new, kv_heads, head_dim), from
        the projection."""
        batch, new, _ = projected.shape
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        # Queries and keys sit side by side, heads + kv_heads head-sized slots: one rotation covers both.
        qk = projected[..., : (heads + kv_heads) * dim].view(batch, new, heads + kv_heads, dim)
        if self.qk_layernorm:
            qk = torch.cat((self.q_layernorm(qk[:, :, :heads]), self.k_layernorm(qk[:, :, heads:])), dim=2)
        qk = apply_rotary(qk, rotary)
        return (
            qk[:, :, :heads],
            qk[:, :, heads:],
            projected[..., (heads + kv_heads) * dim :].view(batch, new, kv_heads, dim),
        )


class PhiMLP(DirectCall, nn.Module):
    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        self.act = config.hidden_act
        self.fc1 = PhiLinear(config.hidden_size, config.intermediate_size)
        self.fc2 = PhiLinear(config.intermediate_size, config.hidden_size)
        self.kernels: compiled.Kernels | None = None  # the compiled GELU, for an inference model on a CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.act, self.fc1(x), self.kernels))


class PhiDecoderLayer(DirectCall, nn.Module):
    def __init__(self, config: PhiConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PhiAttention(config, layer_index)
        self.mlp = PhiMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rotary: Rotation,
        mask: AttentionMask,
        cache: KVCache | None,
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        return x + self.self_attn(h, rotary, mask, cache) + self.mlp(h)


class PhiModel(nn.Module):
    """Embeddings, the decoder layers and the final LayerNorm: token ids in, hidden states out."""

    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PhiDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (batch, new, hidden) for ``input_ids`` (batch, new).

        ``attention_mask`` (batch, past + new), 1 for real tokens and 0 for padding, covers the cached positions
        too. Positions are counted over real tokens only, so a left-padded row matches the same row unpadded;
        pass ``positions`` (batch, new) to skip that count when the caller already knows them.
        """
        past = cache.length if cache is not None else 0
        new = input_ids.shape[1]
        key_valid = _key_valid(attention_mask, input_ids.shape[0], past + new)
        if positions is None:
            positions = _positions(key_valid, input_ids.shape[0], past, new, input_ids.device)
        seq_len = past + new
        if self.config.rope_scaling is not None and key_valid is not None:
            seq_len = int(positions.max()) + 1
        rotary = rotary_angles(self.config, positions, seq_len)
        mask = AttentionMask(key_valid=key_valid, new=new, total=past + new, device=input_ids.device)
        # Embeddings may be stored narrower than the compute dtype (16-bit weights on a CPU): widen the rows read.
        x = self.embed_tokens(input_ids).to(self.final_layernorm.weight.dtype)
        for layer in self.layers:
            x = layer(x, rotary, mask, cache)
        if cache is not None:
            cache.advance(new)
        return self.final_layernorm(x)


class PhiPreTrained(nn.Module):
    """What the three heads share: the config, the decoder, and the attention backend switch."""

    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        self.config = config
        self.model = PhiModel(config)
        self.precision: Precision = unpacked(torch.float32)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of activations, attention and the KV cache (the weights may be stored narrower)."""
        return self.model.final_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.final_layernorm.weight.device

    @property
    def is_prepared(self) -> bool:
        """Whether :meth:`prepare_for_inference` ran: the weights no longer have the checkpoint's names."""
        return self.model.layers[0].self_attn.qkv_proj is not None

    def prepare_for_inference(self, precision: Precision) -> None:
        """The inference form: q/k/v fused into one product per layer, matrices packed in ``precision``'s weight
        format. The state dict then no longer matches a checkpoint's names (``save_model`` refuses it)."""
        self.precision = precision
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
        pack_linears(self, precision.weight_format, precision.round_to())
        self.use_cpu_kernels()

    def set_attention_backend(self, name: str) -> None:
        """Use backend ``name`` from now on; raises if it cannot run with this model's device and dtype."""
        check_backend(name, self.device, self.compute_dtype)
        for layer in self.model.layers:
            layer.self_attn.backend = name
        self.use_cpu_kernels()

    def use_cpu_kernels(self) -> None:
        """An inference model computing in float32 on a CPU takes attention (for the ``sdpa`` backend) and GELU
        from phi_core's compiled kernels where they can be had; anything else keeps torch's."""
        kernels = None
        if self.is_prepared and self.device.type == "cpu" and self.compute_dtype == torch.float32:
            kernels = compiled.library(compiled.cpu_info().level)
        for layer in self.model.layers:
            layer.self_attn.kernels = kernels if layer.self_attn.backend == "sdpa" else None
            layer.mlp.kernels = kernels

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A KV cache on this model's device and dtype for ``batch_size`` rows of up to ``max_length`` tokens."""
        return KVCache(self.config, batch_size, max_length, self.compute_dtype, self.device)


class PhiForCausalLM(PhiPreTrained):
    """The language model: decoder, then ``lm_head`` (with bias) over the vocabulary."""

    def __init__(self, config: PhiConfig) -> None:
        super().__init__(config)
        self.lm_head = PhiLinear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> CausalLMOutput:
        """Logits for every position, or with ``last_only`` for the last one (all generation needs)."""
        if last_only and cache is not None and self._reads_in_chunks(input_ids):
            hidden = self._read_in_chunks(input_ids, attention_mask, cache, positions)
        else:
            hidden = self.model(input_ids, attention_mask, cache, positions)
        if last_only:
            hidden = hidden[:, -1:]
        return CausalLMOutput(logits=self.lm_head(hidden))

    def _reads_in_chunks(self, input_ids: torch.Tensor) -> bool:
        # Dynamic NTK scaling depends on the length reached, so pieces would rotate early tokens otherwise.
        scaling = self.config.rope_scaling
        dynamic = scaling is not None and scaling.kind == "dynamic"
        return input_ids.shape[1] > PREFILL_CHUNK and input_ids.device.type == "cpu" and not dynamic

    def _read_in_chunks(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: KVCache,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """The decoder over ``input_ids`` in pieces of :data:`PREFILL_CHUNK` tokens, each after the cached ones; the
        hidden states of the last piece (the cache ends up as one pass would leave it)."""
        past, new = cache.length, input_ids.shape[1]
        for start in range(0, new, PREFILL_CHUNK):
            end = min(start + PREFILL_CHUNK, new)
            mask = None if attention_mask is None else attention_mask[:, : past + end]
            piece_positions = None if positions is None else positions[:, start:end]
            hidden = self.model(input_ids[:, start:end], mask, cache, piece_positions)
        return hidden


class PhiForSequenceClassification(PhiPreTrained):
    """One label distribution per sequence, from ``score`` (no bias) at the row's last real token."""

    def __init__(self, config: PhiConfig) -> None:
        super().__init__(config)
        self.score = PhiLinear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SequenceClassifierOutput:
        hidden = self.model(input_ids, attention_mask)
        last = last_real_index(attention_mask, input_ids.shape[1]).to(hidden.device)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return SequenceClassifierOutput(logits=self.score(pooled))


class PhiForTokenClassification(PhiPreTrained):
    """A label distribution per token, from ``score`` (with bias)."""

    def __init__(self, config: PhiConfig) -> None:
        super().__init__(config)
        self.score = PhiLinear(config.hidden_size, config.num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TokenClassifierOutput:
        return TokenClassifierOutput(logits=self.score(self.model(input_ids, attention_mask)))


def last_real_index(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor:
    """Index of each row's rightmost real token (works for left and right padding); the last one if no mask."""
    if attention_mask is None:
        return torch.tensor([seq_len - 1])
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (columns * (attention_mask != 0)).argmax(dim=1)


def _key_valid(attention_mask: torch.Tensor | None, batch: int, total: int) -> torch.Tensor | None:
    """The mask as booleans, or None when every token is real (so backends can take their fast paths)."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != (batch, total):
        raise PhiError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, cached + new) = "
            f"({batch}, {total})"
        )
    valid = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    return None if bool(valid.all()) else valid


def _positions(key_valid: torch.Tensor | None, batch: int, past: int, new: int, device: torch.device) -> torch.Tensor:
    if key_valid is None:
        return torch.arange(past, past + new, device=device).expand(batch, new)
    counts = torch.cumsum(key_valid, dim=1) - 1
    return counts[:, past:].clamp(min=0)
