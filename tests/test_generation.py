"""Generation: greedy parity with transformers' generate, sampling filters, stop strings, UTF-8 streaming."""

from __future__ import annotations

import pytest
import torch

import phi_core
from phi_core.errors import PhiError
from phi_core.generation import (
    GenerationParams,
    SamplingParams,
    TextStream,
    choose_tokens,
    fit_prompt,
    generate,
    keep_min_p,
    keep_top_k,
    keep_top_p,
    next_token_distribution,
    penalize_repetition,
)

VOCAB = 50304  # room for the real tokenizer's ids


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return phi_core.load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from conftest import hf_model

    reference = hf_model(vocab_size=VOCAB, eos_token_id=50256, bos_token_id=50256, seed=3)
    folder = tmp_path_factory.mktemp("gen")
    reference.save_pretrained(folder)
    return reference, folder


def collect(events):
    tokens, texts, reasons = {}, {}, {}
    for event in events:
        tokens.setdefault(event.row, []).append(event.token_id)
        texts[event.row] = texts.get(event.row, "") + event.text
        if event.finish_reason:
            reasons[event.row] = event.finish_reason
    return tokens, texts, reasons


PROMPTS = ["def fibonacci(n):", "import os\nclass Path", "# héllo 🙂 wörld\nx ="]


@pytest.mark.parametrize("chunk", [None, 3], ids=["one-pass-prefill", "chunked-prefill"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_matches_transformers_single_and_left_padded_batch(checkpoint, tokenizer, attn, chunk, monkeypatch):
    if chunk is not None:  # prompts read 3 tokens at a time, as a long prompt is read 512 at a time
        monkeypatch.setattr("phi_core.model.PREFILL_CHUNK", chunk)
    reference, folder = checkpoint
    model = phi_core.load_model(folder, attn=attn)
    encoded = [tokenizer.encode(p) for p in PROMPTS]
    params = GenerationParams(max_new_tokens=12, ignore_eos=True)
    batched, _, _ = collect(generate(model, tokenizer, encoded, params))
    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.no_grad():
        expected = reference.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0
        )[:, width:]
    for row, prompt in enumerate(encoded):
        assert batched[row] == expected[row].tolist()
        alone, _, _ = collect(generate(model, tokenizer, [prompt], params))
        assert alone[0] == batched[row]


def test_greedy_stops_at_endoftext_like_transformers(checkpoint, tokenizer):
    reference, folder = checkpoint
    model = phi_core.load_model(folder)
    # Make <|endoftext|> the greedy choice after a few steps by boosting its bias in both models.
    with torch.no_grad():
        reference.lm_head.bias[50256] += 4.0
        model.lm_head.bias[50256] += 4.0
    try:
        prompt = tokenizer.encode("print('hi')")
        tokens, texts, reasons = collect(generate(model, tokenizer, [prompt], GenerationParams(max_new_tokens=30)))
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=30, eos_token_id=50256, pad_token_id=50256
            )[0, len(prompt) :].tolist()
    finally:
        with torch.no_grad():
            reference.lm_head.bias[50256] -= 4.0
    assert reasons[0] == "eos"
    assert tokens[0] == expected
    assert tokens[0][-1] == 50256
    assert "<|endoftext|>" not in texts[0]


def test_rows_finish_on_their_own(checkpoint, tokenizer):
    _, folder = checkpoint
    model = phi_core.load_model(folder)
    encoded = [tokenizer.encode(p) for p in PROMPTS]
    greedy, _, _ = collect(generate(model, tokenizer, encoded, GenerationParams(max_new_tokens=8, ignore_eos=True)))
    stop_text = tokenizer.decode(greedy[1][:3])
    params = GenerationParams(max_new_tokens=8, ignore_eos=True, stop=(stop_text,))
    tokens, texts, reasons = collect(generate(model, tokenizer, encoded, params))
    assert reasons[1] == "stop" and len(tokens[1]) <= 3 and texts[1] == ""
    assert tokens[0] == greedy[0][: len(tokens[0])]
    assert tokens[2] == greedy[2][: len(tokens[2])]


def test_seeded_sampling_is_reproducible(checkpoint, tokenizer):
    _, folder = checkpoint
    model = phi_core.load_model(folder)
    prompt = [tokenizer.encode("x = ")]
    params = GenerationParams(
        max_new_tokens=10, ignore_eos=True, sampling=SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7)
    )
    first, _, _ = collect(generate(model, tokenizer, prompt, params))
    second, _, _ = collect(generate(model, tokenizer, prompt, params))
    other, _, _ = collect(
        generate(
            model,
            tokenizer,
            prompt,
            GenerationParams(max_new_tokens=10, ignore_eos=True, sampling=SamplingParams(temperature=1.0, seed=8)),
        )
    )
    assert first == second
    assert first != other


def test_logprobs_are_the_models_own(checkpoint, tokenizer):
    _, folder = checkpoint
    model = phi_core.load_model(folder)
    prompt = tokenizer.encode("a = 1")
    event = next(generate(model, tokenizer, [prompt], GenerationParams(max_new_tokens=1)))
    expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1], -1)[event.token_id]
    assert event.logprob == pytest.approx(expected.item(), abs=1e-5)
    unasked = next(generate(model, tokenizer, [prompt], GenerationParams(max_new_tokens=1, logprobs=False)))
    assert unasked.logprob is None and unasked.token_id == event.token_id


# Sampling filters against hand-computed distributions -------------------------------------------------------
LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))


def test_top_k_keeps_the_k_best():
    probs = torch.softmax(keep_top_k(LOGITS, 2), -1)
    assert torch.allclose(probs, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0]]))


@pytest.mark.parametrize(
    ("p", "expected"),
    [(0.5, [1.0, 0, 0, 0]), (0.7, [2 / 3, 1 / 3, 0, 0]), (0.8, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0])],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    probs = torch.softmax(keep_top_p(LOGITS, p), -1)
    assert torch.allclose(probs, torch.tensor([expected]), atol=1e-6)


def test_min_p_is_relative_to_the_best_token():
    probs = torch.softmax(keep_min_p(LOGITS, 0.3), -1)  # threshold 0.15: keeps 0.5, 0.25, 0.15
    assert torch.allclose(probs, torch.tensor([[0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0.0]]), atol=1e-6)


def test_temperature_and_repetition_penalty():
    logits = torch.tensor([[2.0, -1.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert torch.equal(penalize_repetition(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 1.0]]))
    probs = next_token_distribution(logits, seen, SamplingParams(temperature=0.5, repetition_penalty=2.0))
    assert torch.allclose(probs, torch.softmax(torch.tensor([[2.0, -4.0, 2.0]]), -1))
    greedy = choose_tokens(logits, seen, SamplingParams(repetition_penalty=4.0), torch.Generator())
    assert greedy.tolist() == [2]


def test_sampling_follows_the_filtered_distribution():
    generator = torch.Generator().manual_seed(0)
    logits = LOGITS.expand(20000, 4)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    draws = choose_tokens(logits, seen, SamplingParams(temperature=1.0, top_k=3), generator)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.15, 0.0]) / 0.9, atol=0.015)


# Text streaming ---------------------------------------------------------------------------------------------
def test_stream_never_splits_a_utf8_character(tokenizer):
    text = "🙂 日本 é👍🏽"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # some characters span several tokens
    stream = TextStream(tokenizer, ())
    pieces = [stream.push(i)[0] for i in ids] + [stream.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_stop_string_across_token_boundaries_is_not_printed(tokenizer):
    text = "x = 1\nInstruct: more"
    stream = TextStream(tokenizer, ("\nInstruct:",))
    out, stopped = "", False
    for token in tokenizer.encode(text):
        delta, stopped = stream.push(token)
        out += delta
        if stopped:
            break
    assert stopped and out == "x = 1"


def test_held_back_prefix_is_released_when_it_is_not_a_stop(tokenizer):
    stream = TextStream(tokenizer, ("\n\n\n",))
    out = "".join(stream.push(t)[0] for t in tokenizer.encode("a\n\nb"))
    assert out + stream.finish() == "a\n\nb"


def test_fit_prompt():
    assert fit_prompt([1, 2, 3], 2, 10, truncate=False) == [1, 2, 3]
    assert fit_prompt(list(range(10)), 4, 10, truncate=True) == [4, 5, 6, 7, 8, 9]
    with pytest.raises(PhiError, match=r"prompt \(10 tokens\) \+ max new tokens \(4\) exceeds .* 10 tokens"):
        fit_prompt(list(range(10)), 4, 10, truncate=False)


def test_bad_parameters():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
