"""flash_attention_2 agrees with sdpa on a CUDA GPU (fp16): plain, left-padded (varlen path) and cached decoding.

These tests skip cleanly where there is no CUDA device or no flash-attn package.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import CONFIGS

import phi_core

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs the flash-attn package"),
]
FP16_ATOL = 2e-2


def pair(folder):
    flash = phi_core.load_model(folder, dtype="float16", attn="flash_attention_2", device="cuda")
    sdpa = phi_core.load_model(folder, dtype="float16", attn="sdpa", device="cuda")
    return flash, sdpa


@pytest.mark.parametrize("variant", ["phi-1.5-like", "phi-2-like", "gqa"])
def test_flash_matches_sdpa_unpadded(make_checkpoint, variant):
    _, folder = make_checkpoint(**CONFIGS[variant])
    flash, sdpa = pair(folder)
    ids = torch.randint(0, 320, (2, 24), device="cuda")
    assert (flash(ids).logits.float() - sdpa(ids).logits.float()).abs().max() <= FP16_ATOL


def test_flash_varlen_matches_sdpa_on_a_left_padded_batch(make_checkpoint):
    _, folder = make_checkpoint(**CONFIGS["gqa"])
    flash, sdpa = pair(folder)
    ids = torch.randint(0, 320, (3, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :9] = 0
    real = mask.bool()
    got, expected = flash(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits
    assert (got[real].float() - expected[real].float()).abs().max() <= FP16_ATOL


def test_flash_cached_decoding_matches_sdpa(make_checkpoint):
    _, folder = make_checkpoint(**CONFIGS["phi-1.5-like"])
    flash, sdpa = pair(folder)
    ids = torch.randint(0, 320, (2, 10), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    outputs = []
    for model in (flash, sdpa):
        cache = model.new_cache(2, 12)
        model(ids, attention_mask=mask, cache=cache)
        step = torch.tensor([[7], [9]], device="cuda")
        full_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype, device="cuda")], dim=1)
        outputs.append(model(step, attention_mask=full_mask, cache=cache).logits.float())
    assert (outputs[0] - outputs[1]).abs().max() <= FP16_ATOL
