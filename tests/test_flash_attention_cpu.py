"""The flash_attention_2 backend's packing, unpacking and cache logic, run on a CPU against a stand-in for the
flash-attn kernels written from their documented semantics (tests/flash_attn_reference.py), compared with sdpa.

The real kernel needs a CUDA GPU and is compared with sdpa in test_flash_attention.py.
"""

from __future__ import annotations

import sys

import flash_attn_reference
import pytest
import torch
from conftest import CONFIGS

import phi_core
import phi_core.model
from phi_core.attention import ATTENTION_BACKENDS
from phi_core.generation import GenerationParams, generate

ATOL = 1e-4


@pytest.fixture
def stand_in():
    """The calls the stand-in kernels receive (cleared for each test)."""
    flash_attn_reference.calls.clear()
    return flash_attn_reference.calls


@pytest.fixture
def pair(monkeypatch):
    """(flash, sdpa) models of a checkpoint folder, with flash-attn replaced by the reference and the backend
    allowed on a CPU in float32 (the real kernel is not). Installed only once the checkpoint exists, since
    transformers (which writes it) probes for a flash_attn package."""

    def load(folder):
        monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_reference.as_module())
        monkeypatch.setattr(phi_core.model, "check_backend", lambda name, device, dtype: name in ATTENTION_BACKENDS)
        sdpa = phi_core.load_model(folder, dtype="float32", attn="sdpa")
        flash = phi_core.load_model(folder, dtype="float32", attn="sdpa")
        flash.set_attention_backend("flash_attention_2")
        return flash, sdpa

    return load


def left_padded(batch: int, width: int, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 320, (batch, width), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids, mask


def test_stand_in_aligns_the_causal_mask_bottom_right():
    q, k, v = torch.randn(1, 2, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    got = flash_attn_reference.flash_attn_func(q, k, v, causal=True)
    allowed = torch.arange(5)[None, :] <= torch.arange(2)[:, None] + 3  # 2 queries after 3 cached keys
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed
    ).transpose(1, 2)
    assert (got - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("variant", ["phi-1.5-like", "phi-2-like", "gqa", "qk-layernorm"])
def test_unpadded_forward_matches_sdpa(make_checkpoint, pair, stand_in, variant):
    _, folder = make_checkpoint(**CONFIGS[variant])
    flash, sdpa = pair(folder)
    ids, _ = left_padded(2, 24, [0, 0])
    assert (flash(ids).logits - sdpa(ids).logits).abs().max() <= ATOL
    assert stand_in == ["flash_attn_func"] * flash.config.num_hidden_layers


@pytest.mark.parametrize("variant", ["phi-1.5-like", "gqa"])
def test_left_padded_batch_takes_the_varlen_path_and_matches_sdpa(make_checkpoint, pair, stand_in, variant):
    _, folder = make_checkpoint(**CONFIGS[variant])
    flash, sdpa = pair(folder)
    ids, mask = left_padded(3, 12, [5, 0, 9])
    got, expected = flash(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= ATOL
    assert set(stand_in) == {"flash_attn_varlen_func"}


@pytest.mark.parametrize("pads", [[0, 0], [0, 3]])
def test_cached_decoding_matches_sdpa(make_checkpoint, pair, stand_in, pads):
    _, folder = make_checkpoint(**CONFIGS["gqa"])
    flash, sdpa = pair(folder)
    ids, mask = left_padded(2, 10, pads)
    steps = torch.tensor([[7, 8, 9], [11, 12, 13]])
    outputs = []
    for model in (flash, sdpa):
        cache = model.new_cache(2, 13)
        logits = [model(ids, attention_mask=mask if any(pads) else None, cache=cache).logits[:, -1]]
        full_mask = mask
        for column in range(steps.shape[1]):
            full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            step = steps[:, column : column + 1]
            logits.append(model(step, attention_mask=full_mask if any(pads) else None, cache=cache).logits[:, -1])
        outputs.append(torch.stack(logits))
    assert (outputs[0] - outputs[1]).abs().max() <= ATOL


def test_chunked_prefill_after_a_cache_matches_sdpa(make_checkpoint, pair, stand_in):
    """Several new queries after cached keys: the bottom-right causal alignment is what makes this right."""
    _, folder = make_checkpoint(**CONFIGS["phi-2-like"])
    flash, sdpa = pair(folder)
    ids, _ = left_padded(1, 16, [0])
    outputs = []
    for model in (flash, sdpa):
        cache = model.new_cache(1, 16)
        model(ids[:, :10], cache=cache)
        outputs.append(model(ids[:, 10:], cache=cache).logits)
    assert (outputs[0] - outputs[1]).abs().max() <= ATOL


def test_greedy_generation_of_a_padded_batch_is_identical(make_checkpoint, pair, stand_in):
    _, folder = make_checkpoint(**CONFIGS["gqa"])
    flash, sdpa = pair(folder)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    params = GenerationParams(max_new_tokens=8, ignore_eos=True, logprobs=False)
    tokens = [[(e.row, e.token_id) for e in generate(model, None, prompts, params)] for model in (flash, sdpa)]
    assert tokens[0] == tokens[1]
    assert "flash_attn_varlen_func" in stand_in
