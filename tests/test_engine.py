"""The continuous-batching engine in process: rows that join mid-flight, leave, or are cancelled produce exactly the
tokens they produce alone (greedy, float32), each with its own sampling parameters, seed, stop strings and limit."""

from __future__ import annotations

import pytest
import torch

import phi_core
from phi_core.cache import KVCache
from phi_core.engine import Ended, Engine, EngineClosed, EngineFull, EngineRequest, PromptScores, Token
from phi_core.generation import GenerationParams, SamplingParams, generate

TIMEOUT = 60


@pytest.fixture(scope="module")
def tiny():
    model = phi_core.load_model("tiny", dtype="float32")
    return model, phi_core.load_tokenizer("tiny")


@pytest.fixture
def engine(tiny):
    model, tokenizer = tiny
    running = Engine(model, tokenizer, max_batch=4, max_queue=2)
    yield running
    running.shutdown()


def alone(tiny, prompt: list[int], params: GenerationParams) -> list[int]:
    """What `phi generate` produces for the prompt by itself."""
    model, tokenizer = tiny
    return [event.token_id for event in generate(model, tokenizer, [prompt], params)]


def tokens_of(events) -> list[int]:
    return [event.token_id for event in events if isinstance(event, Token)]


PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\nimport json\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n",
    "x =",
    "class Stack:\n    def push(self, item):",
]


def test_rows_joining_mid_flight_match_their_tokens_alone(tiny, engine):
    _, tokenizer = tiny
    first = tokenizer.encode(PROMPTS[0])
    greedy = GenerationParams(max_new_tokens=60)
    handle = engine.submit([EngineRequest(first, greedy)])[0]
    got, joined = [], []
    others = [
        (tokenizer.encode(PROMPTS[1]), GenerationParams(max_new_tokens=30)),  # longer: the batch is padded
        (tokenizer.encode(PROMPTS[2]), GenerationParams(max_new_tokens=45, sampling=SamplingParams(0.8, seed=3))),
        (
            tokenizer.encode(PROMPTS[3]),
            GenerationParams(max_new_tokens=12, sampling=SamplingParams(0.0, 0, 1.0, 0, 1.3)),
        ),
    ]
    for event in handle.stream(TIMEOUT):
        got.append(event.token_id)
        if len(got) == 8:
            joined = engine.submit([EngineRequest(p, params) for p, params in others])
    assert got == alone(tiny, first, greedy)
    for (prompt, params), other in zip(others, joined, strict=True):
        assert tokens_of(other.stream(TIMEOUT)) == alone(tiny, prompt, params)


def test_many_rows_coming_and_going_with_cache_compaction(lm_checkpoint, monkeypatch):
    """A small batch and context (the random test model has 64 positions), so rows churn, the cache is padded on
    both sides and its unused leading columns are dropped; every row still matches itself alone."""
    import phi_core.engine

    model, tokenizer = phi_core.load_model(lm_checkpoint), phi_core.load_tokenizer(lm_checkpoint)
    shifts = []
    original = phi_core.engine._RunningBatch._shift
    monkeypatch.setattr(
        phi_core.engine._RunningBatch, "_shift", lambda self, by: shifts.append(by) or original(self, by)
    )
    words = tokenizer.encode(" ".join(PROMPTS))
    with Engine(model, tokenizer, max_batch=3, max_queue=20) as engine:
        requests = [
            EngineRequest(
                words[i : i + 2 + 5 * (i % 3)], GenerationParams(max_new_tokens=4 + 6 * (i % 6), ignore_eos=True)
            )
            for i in range(12)
        ]
        results = {i: [] for i in range(len(requests))}
        for index, event in engine.run(requests, TIMEOUT):
            if isinstance(event, Token):
                results[index].append(event.token_id)
    for index, request in enumerate(requests):
        assert results[index] == alone((model, tokenizer), request.prompt, request.params), index
    assert any(by < 0 for by in shifts) and any(by > 0 for by in shifts)


def test_seeded_sampling_does_not_depend_on_neighbours(tiny, engine):
    _, tokenizer = tiny
    prompt = tokenizer.encode("def parse(text):")
    sampled = GenerationParams(max_new_tokens=20, sampling=SamplingParams(temperature=1.0, top_p=0.95, seed=11))
    by_itself = tokens_of(engine.submit([EngineRequest(prompt, sampled)])[0].stream(TIMEOUT))
    crowd = [EngineRequest(tokenizer.encode(p), GenerationParams(max_new_tokens=25)) for p in PROMPTS[:3]]
    handles = engine.submit([*crowd, EngineRequest(prompt, sampled)])
    assert tokens_of(handles[-1].stream(TIMEOUT)) == by_itself == alone(tiny, prompt, sampled)


def test_stop_strings_and_limits_are_per_request(tiny, engine):
    _, tokenizer = tiny
    prompt = tokenizer.encode(PROMPTS[0])
    text = tokenizer.decode(alone(tiny, prompt, GenerationParams(max_new_tokens=40)))
    stop = text[5:9]  # spans token boundaries somewhere inside the greedy text
    handles = engine.submit(
        [
            EngineRequest(prompt, GenerationParams(max_new_tokens=40, stop=(stop,))),
            EngineRequest(prompt, GenerationParams(max_new_tokens=3)),
        ]
    )
    stopped = list(handles[0].stream(TIMEOUT))
    assert "".join(e.text for e in stopped) == text[: text.index(stop)]
    assert stopped[-1].finish_reason == "stop"
    limited = list(handles[1].stream(TIMEOUT))
    assert len(limited) == 3 and limited[-1].finish_reason == "length"


def test_cancelling_frees_the_row_at_the_next_step(tiny, engine):
    _, tokenizer = tiny
    prompt = tokenizer.encode(PROMPTS[0])
    endless = GenerationParams(max_new_tokens=900, ignore_eos=True)
    handles = engine.submit(
        [EngineRequest(prompt, endless), EngineRequest(prompt, GenerationParams(max_new_tokens=30))]
    )
    events = handles[0].stream(TIMEOUT)
    for _ in range(5):
        next(events)
    assert engine.running == 2
    handles[0].cancel()
    assert isinstance(list(events)[-1], Ended)
    assert len(tokens_of(handles[1].stream(TIMEOUT))) == 30
    assert engine.running == 0 and engine.waiting == 0


def test_prompt_scores_are_the_models_log_softmax(tiny, engine):
    model, tokenizer = tiny
    prompt = tokenizer.encode("def add(a, b):\n    return a + b")
    events = list(
        engine.submit([EngineRequest(prompt, GenerationParams(), prompt_logprobs=3, score_only=True)])[0].stream(
            TIMEOUT
        )
    )
    scores, end = events
    assert isinstance(scores, PromptScores) and end == Ended("length")
    expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert scores.logprobs[0] is None and scores.top[0] is None
    for position in range(1, len(prompt)):
        assert scores.logprobs[position] == pytest.approx(float(expected[position - 1, prompt[position]]), abs=1e-5)
        best = torch.topk(expected[position - 1], 3)
        assert [t for t, _ in scores.top[position]] == best.indices.tolist()


def test_token_logprobs_and_alternatives(tiny, engine):
    model, tokenizer = tiny
    prompt = tokenizer.encode("import os\n")
    events = list(
        engine.submit([EngineRequest(prompt, GenerationParams(max_new_tokens=4), logprobs=2)])[0].stream(TIMEOUT)
    )
    ids = prompt + [e.token_id for e in events]
    expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for step, event in enumerate(events):
        row = expected[len(prompt) - 1 + step]
        assert event.logprob == pytest.approx(float(row[event.token_id]), abs=1e-4)
        assert [t for t, _ in event.top] == torch.topk(row, 2).indices.tolist()


def test_admission_refusals(tiny, engine):
    _, tokenizer = tiny
    prompt = tokenizer.encode("x")
    with pytest.raises(EngineFull):
        engine.submit([EngineRequest(prompt, GenerationParams(max_new_tokens=5))] * 7)  # 4 rows + 2 waiting
    with pytest.raises(ValueError, match="context"):
        engine.submit([EngineRequest(prompt * 1020, GenerationParams(max_new_tokens=10))])
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([EngineRequest([60000], GenerationParams())])
    engine.stop_accepting()
    with pytest.raises(EngineClosed):
        engine.submit([EngineRequest(prompt, GenerationParams())])


def test_shutdown_cancels_what_is_left(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, max_batch=1)
    endless = EngineRequest(tokenizer.encode("x"), GenerationParams(max_new_tokens=900, ignore_eos=True))
    running, waiting = engine.submit([endless, endless])
    engine.shutdown(grace_s=0.05)
    assert list(running.stream(TIMEOUT))[-1].reason == "cancelled"
    assert list(waiting.stream(TIMEOUT)) == [Ended("cancelled", "the server shut down")]


# The KV cache operations the engine uses ---------------------------------------------------------------------
def filled_cache(rows: int, length: int, capacity: int) -> KVCache:
    cache = KVCache(phi_core.embedded.TINY_CONFIG, rows, capacity, torch.float32, "cpu")
    for stored in (*cache.keys, *cache.values):
        stored[:, :, :length] = torch.arange(rows * length, dtype=torch.float32).view(rows, 1, length, 1) + 1
    cache.length = length
    return cache


def test_cache_rows_views_share_storage():
    cache = filled_cache(3, 4, 8)
    view = cache.first_rows(2)
    view.keys[0][1, 0, 5, 0] = -1.0
    assert cache.keys[0][1, 0, 5, 0] == -1.0 and view.rows == 2 and view.length == 4


def test_cache_write_row_shift_and_resize():
    cache = filled_cache(2, 3, 8)
    newcomer = filled_cache(1, 2, 2)
    cache.write_row(1, newcomer, column=1)
    assert cache.keys[0][1, 0, 1:3, 0].tolist() == [1.0, 2.0]
    cache.write_row(0, cache, column=0, source_row=1)  # the last row moves into a freed slot
    assert torch.equal(cache.keys[0][0, :, :3], cache.keys[0][1, :, :3])
    cache.shift(2, 2)  # left padding grows
    assert cache.length == 5 and cache.keys[0][1, 0, 3:5, 0].tolist() == [1.0, 2.0]
    cache.shift(2, -3)  # unused leading columns dropped
    assert cache.length == 2 and cache.values[0][1, 0, :2, 0].tolist() == [1.0, 2.0]
    bigger = cache.resized(4, 16)
    assert bigger.rows == 4 and bigger.max_length == 16 and bigger.length == 2
    assert torch.equal(bigger.keys[1][:2, :, :2], cache.keys[1][:, :, :2]) and not bigger.keys[1][2:].any()
    with pytest.raises(phi_core.PhiError):
        cache.shift(2, 7)
