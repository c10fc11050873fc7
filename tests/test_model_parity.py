"""Our logits equal transformers' on the same random weights (fp32, 1e-4), for every config variant."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS

import phi_core

ATOL = 1e-4


def random_ids(batch: int, length: int, vocab: int = 320, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_causal_lm_logits_match_transformers(make_checkpoint, variant, attn):
    reference, folder = make_checkpoint(**CONFIGS[variant])
    ours = phi_core.load_model(folder, attn=attn)
    # 24 tokens: past max_position_embeddings (16) for the dynamic-rope variant, so its scaling is exercised.
    ids = random_ids(2, 24)
    with torch.no_grad():
        expected = reference(ids).logits
    got = ours(ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= ATOL


@pytest.mark.parametrize("variant", ["phi-1.5-like", "rope-linear"])
def test_config_v4_layout_gives_same_logits(make_checkpoint, variant):
    reference, folder = make_checkpoint(config_layout="v4", **CONFIGS[variant])
    ours = phi_core.load_model(folder)
    ids = random_ids(1, 12)
    with torch.no_grad():
        expected = reference(ids).logits
    assert (ours(ids).logits - expected).abs().max() <= ATOL


def left_padded(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["phi-2-like", "gqa", "qk-layernorm"])
def test_left_padded_rows_match_rows_alone_and_transformers(make_checkpoint, variant, attn):
    reference, folder = make_checkpoint(**CONFIGS[variant])
    ours = phi_core.load_model(folder, attn=attn)
    rows = [random_ids(1, n, seed=n)[0] for n in (9, 4, 7)]
    ids, mask = left_padded(rows)
    batched = ours(ids, attention_mask=mask).logits
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, position_ids=positions).logits
    for i, row in enumerate(rows):
        alone = ours(row[None]).logits[0]
        real = batched[i, ids.shape[1] - len(row) :]
        assert (real - alone).abs().max() <= ATOL
        assert (real - expected[i, ids.shape[1] - len(row) :]).abs().max() <= ATOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["phi-1.5-like", "gqa", "rope-linear"])
def test_cached_decoding_equals_full_forward(make_checkpoint, variant, attn):
    _, folder = make_checkpoint(**CONFIGS[variant])
    ours = phi_core.load_model(folder, attn=attn)
    rows = [random_ids(1, n, seed=n)[0] for n in (10, 6)]
    ids, mask = left_padded(rows)
    full = ours(ids, attention_mask=mask).logits
    prompt = 4
    cache = ours.new_cache(batch_size=2, max_length=ids.shape[1])
    steps = [ours(ids[:, :prompt], attention_mask=mask[:, :prompt], cache=cache).logits]
    for t in range(prompt, ids.shape[1]):
        steps.append(ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    cached = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (cached[real] - full[real]).abs().max() <= ATOL
    assert cache.length == ids.shape[1]


def test_sequence_classification_matches_transformers(make_checkpoint):
    reference, folder = make_checkpoint("sequence-classification", num_labels=3, pad_token_id=0)
    ours = phi_core.load_model(folder, task="sequence-classification")
    rows = [random_ids(1, n, seed=n)[0].clamp(min=1) for n in (8, 3, 5)]
    ids, mask = left_padded(rows, pad_id=0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, position_ids=positions).logits
    got = ours(ids, attention_mask=mask).logits
    assert got.shape == (3, 3)
    assert (got - expected).abs().max() <= ATOL
    for i, row in enumerate(rows):
        assert (ours(row[None]).logits[0] - got[i]).abs().max() <= ATOL


def test_token_classification_matches_transformers(make_checkpoint):
    reference, folder = make_checkpoint("token-classification", num_labels=5)
    ours = phi_core.load_model(folder, task="token-classification")
    ids = random_ids(2, 11)
    with torch.no_grad():
        expected = reference(ids).logits
    got = ours(ids).logits
    assert got.shape == (2, 11, 5)
    assert (got - expected).abs().max() <= ATOL


def test_token_classification_accepts_old_classifier_name(make_checkpoint):
    from safetensors.torch import load_file, save_file

    reference, folder = make_checkpoint("token-classification", num_labels=4)
    weights = load_file(folder / "model.safetensors")
    weights["classifier.weight"] = weights.pop("score.weight")
    weights["classifier.bias"] = weights.pop("score.bias")
    save_file(weights, folder / "model.safetensors")
    ours = phi_core.load_model(folder, task="token-classification")
    ids = random_ids(1, 7)
    with torch.no_grad():
        expected = reference(ids).logits
    assert (ours(ids).logits - expected).abs().max() <= ATOL


def test_tied_embeddings_share_the_embedding_matrix(make_checkpoint):
    reference, folder = make_checkpoint(tie_word_embeddings=True)
    ours = phi_core.load_model(folder)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    ids = random_ids(1, 9)
    with torch.no_grad():
        expected = reference(ids).logits
    assert (ours(ids).logits - expected).abs().max() <= ATOL


def test_last_only_returns_the_final_position(make_checkpoint):
    _, folder = make_checkpoint()
    ours = phi_core.load_model(folder)
    ids = random_ids(2, 6)
    assert torch.allclose(ours(ids, last_only=True).logits[:, 0], ours(ids).logits[:, -1], atol=1e-6)


def test_backends_agree_on_padded_cached_inputs(make_checkpoint):
    _, folder = make_checkpoint(**CONFIGS["gqa"])
    eager = phi_core.load_model(folder, attn="eager")
    sdpa = phi_core.load_model(folder, attn="sdpa")
    ids, mask = left_padded([random_ids(1, n, seed=n)[0] for n in (7, 3)])
    outputs = []
    for model in (eager, sdpa):
        cache = model.new_cache(2, 10)
        model(ids, attention_mask=mask, cache=cache)
        step = torch.tensor([[5], [6]])
        outputs.append(
            model(step, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), cache=cache).logits
        )
    assert (outputs[0] - outputs[1]).abs().max() <= ATOL


@pytest.mark.parametrize("variant", ["phi-2-like", "gqa", "rope-linear"])
def test_a_prompt_read_in_chunks_leaves_the_logits_and_cache_of_one_pass(make_checkpoint, variant, monkeypatch):
    _, folder = make_checkpoint(**CONFIGS[variant])
    model = phi_core.load_model(folder)
    rows = [random_ids(1, n, seed=n)[0] for n in (23, 9, 17)]
    ids, mask = left_padded(rows)
    results = []
    for chunk in (10_000, 5):  # one pass, then pieces of 5 tokens
        monkeypatch.setattr("phi_core.model.PREFILL_CHUNK", chunk)
        cache = model.new_cache(3, 30)
        logits = model(ids, attention_mask=mask, cache=cache, last_only=True).logits
        results.append((logits, cache))
    (whole, whole_cache), (pieces, piece_cache) = results
    assert piece_cache.length == whole_cache.length == ids.shape[1]
    assert (pieces - whole).abs().max() <= 1e-5
    real = mask.bool()
    for a, b in zip(whole_cache.keys + whole_cache.values, piece_cache.keys + piece_cache.values, strict=True):
        assert (
            a[:, :, : ids.shape[1]].transpose(1, 2)[real] - b[:, :, : ids.shape[1]].transpose(1, 2)[real]
        ).abs().max() <= 1e-5
