"""POST /v1/chat/completions on `phi serve`, driven by the official openai client: the messages are rendered by the
renderer of `phi chat` (the embedded model has no template of its own, so the built-in `chat` format), and greedy
answers equal plain generation on the rendered conversation, plain and streamed. The server runs with `--lookup`,
so every answer here is decoded with prompt lookup, and must still equal plain generation's."""

from __future__ import annotations

from dataclasses import replace

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from test_serve import API_KEY, call, metric, start_server, stop_server  # noqa: E402

import phi_core  # noqa: E402
from phi_core.completion import Completion, complete  # noqa: E402
from phi_core.generation import GenerationParams  # noqa: E402
from phi_core.prompt_format import BUILT_IN_FORMATS  # noqa: E402

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How do I read a file?"},
    {"role": "assistant", "content": "Use open()."},
    {"role": "user", "content": "And count its lines?"},
]
GREEDY = {"temperature": 0, "max_tokens": 16, "extra_body": {"repetition_penalty": 1.0}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start_server(tmp_path_factory.mktemp("serve-chat"), "--lookup", "8", env={"PHI_API_KEY": API_KEY})
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def expected():
    """The greedy answer plain generation gives on the conversation rendered in the `chat` format."""
    model, tokenizer = phi_core.load_model("tiny"), phi_core.load_tokenizer("tiny")
    text = BUILT_IN_FORMATS["chat"].render(MESSAGES)
    params = GenerationParams(max_new_tokens=16, logprobs=False)
    fmt = replace(BUILT_IN_FORMATS["code"], stop=BUILT_IN_FORMATS["chat"].stop)
    return next(item for item in complete(model, tokenizer, [text], params, 1, fmt) if isinstance(item, Completion))


def test_chat_completion_equals_plain_generation_on_the_rendered_conversation(server, expected):
    answer = server.client().chat.completions.create(model="tiny", messages=MESSAGES, **GREEDY)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    (choice,) = answer.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.completion
    assert choice.finish_reason == {"length": "length", "eos": "stop", "stop": "stop"}[expected.finish_reason]
    assert answer.usage.completion_tokens == expected.completion_tokens


def test_streamed_chat_deltas_add_up_to_the_same_answer(server, expected):
    stream = server.client().chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **GREEDY)
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.completion
    assert chunks[-1].choices[0].finish_reason is not None


def test_the_servers_lookup_applies_unless_a_request_turns_it_off(server, expected):
    def proposed() -> float:
        return metric(server, "phi_speculative_proposed_tokens_total")

    before = proposed()
    off = {**GREEDY, "extra_body": {**GREEDY["extra_body"], "lookup": 0}}
    answer = server.client().chat.completions.create(model="tiny", messages=MESSAGES, **off)
    assert answer.choices[0].message.content == expected.completion and proposed() == before
    answer = server.client().chat.completions.create(model="tiny", messages=MESSAGES, **GREEDY)  # --lookup 8
    assert answer.choices[0].message.content == expected.completion and proposed() > before


def test_n_choices_logprobs_and_the_format_in_models(server):
    answer = server.client().chat.completions.create(
        model="tiny", messages=MESSAGES[1:2], n=2, seed=5, max_completion_tokens=6, logprobs=True, top_logprobs=2
    )
    assert [c.index for c in answer.choices] == [0, 1]
    for choice in answer.choices:
        assert len(choice.logprobs.content) == answer.usage.completion_tokens // 2 or choice.finish_reason == "stop"
        # Up to 2 alternatives (the legacy object keys them by text, so two ids that print alike count once), plus
        # the chosen token when it is not among them.
        assert all(1 <= len(entry.top_logprobs) <= 3 for entry in choice.logprobs.content)
        assert all(
            entry.logprob <= 0 and entry.bytes == list(entry.token.encode()) for entry in choice.logprobs.content
        )
    status, models = call(server, "GET", "/v1/models")
    assert status == 200 and models["data"][0]["chat_format"] == "chat"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ({"model": "tiny", "messages": MESSAGES, "top_logprobs": 99}, "top_logprobs"),
        ({"model": "tiny", "messages": MESSAGES, "lookup": -2}, "lookup"),
    ],
)
def test_invalid_chat_requests_are_400_naming_the_parameter(server, body, param):
    status, answer = call(server, "POST", "/v1/chat/completions", body)
    assert status == 400 and param in (answer["error"]["param"] or "")


def test_unknown_model_is_404(server):
    status, answer = call(server, "POST", "/v1/chat/completions", {"model": "other", "messages": MESSAGES})
    assert status == 404 and answer["error"]["code"] == "model_not_found"
