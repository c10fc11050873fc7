"""Conversations: each greedy reply equals plain generation on the rendered conversation, while the KV cache kept
between turns pre-fills only the new tokens."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

import phi_core
from phi_core.conversation import Conversation
from phi_core.errors import PhiError
from phi_core.generation import GenerationParams, generate
from phi_core.prompt_format import BUILT_IN_FORMATS

PARAMS = GenerationParams(max_new_tokens=6, logprobs=False)


@pytest.fixture(scope="module")
def lm(lm_checkpoint):
    return phi_core.load_model(lm_checkpoint, dtype="float32"), phi_core.load_tokenizer(lm_checkpoint)


def plain_reply(lm, conversation: Conversation) -> str:
    """What `phi generate` makes of the rendered conversation, with the format's stop strings."""
    model, tokenizer = lm
    ids = tokenizer.encode(conversation.rendered())
    params = replace(conversation.params, stop=conversation.prompt_format.stop)
    return "".join(event.text for event in generate(model, tokenizer, [ids], params))


def talk(conversation: Conversation, text: str) -> str:
    return "".join(event.text for event in conversation.reply(text))


@pytest.mark.parametrize("name", ["chat", "instruct"])
def test_each_greedy_reply_equals_plain_generation(lm, name):
    conversation = Conversation(*lm, BUILT_IN_FORMATS[name], PARAMS, system="Be brief.")
    for text in ("Hello there", "What is a list?", "Thanks"):
        conversation.messages.append({"role": "user", "content": text})
        expected = plain_reply(lm, conversation)
        conversation.messages.pop()
        assert talk(conversation, text) == expected
    assert [m["role"] for m in conversation.messages] == ["user", "assistant"] * 3


def test_later_turns_prefill_only_their_new_tokens(lm):
    model, tokenizer = lm
    conversation = Conversation(model, tokenizer, BUILT_IN_FORMATS["chat"], PARAMS)
    talk(conversation, "Hello there")
    first = conversation.last_turn
    assert first.reused == 0
    talk(conversation, "And then?")
    second = conversation.last_turn
    total = len(tokenizer.encode(conversation.rendered(conversation.messages[:-1])))
    assert second.reused > 0 and second.reused + second.prefilled == total
    assert second.prefilled < total / 2


def test_an_interrupted_reply_keeps_what_was_shown_and_the_session_goes_on(lm):
    conversation = Conversation(*lm, BUILT_IN_FORMATS["chat"], replace(PARAMS, max_new_tokens=8))
    stream = conversation.reply("Tell me a story")
    shown = "".join(next(stream).text for _ in range(3))
    stream.close()  # what Ctrl-C does to the reply being printed
    assert conversation.messages[-1] == {"role": "assistant", "content": shown.strip()}
    conversation.messages.append({"role": "user", "content": "Go on"})
    expected = plain_reply(lm, conversation)
    conversation.messages.pop()
    assert talk(conversation, "Go on") == expected


def test_reset_forgets_the_turns(lm):
    conversation = Conversation(*lm, BUILT_IN_FORMATS["chat"], PARAMS)
    talk(conversation, "Hello")
    conversation.reset(system="New rules.")
    assert conversation.messages == [] and conversation.rendered([]).startswith("New rules.\n")


def test_the_oldest_turns_go_when_the_context_fills(lm, caplog):
    model, tokenizer = lm  # a context of 64 tokens
    conversation = Conversation(model, tokenizer, BUILT_IN_FORMATS["chat"], replace(PARAMS, max_new_tokens=8))
    with caplog.at_level(logging.WARNING, logger="phi_core"):
        for turn in range(6):
            talk(conversation, f"This is message number {turn} of a long talk")
    assert "dropped the oldest" in caplog.text
    assert conversation.messages[0]["content"] != "This is message number 0 of a long talk"
    ids = tokenizer.encode(conversation.rendered(conversation.messages[:-1]))
    assert len(ids) + 8 <= model.config.max_position_embeddings


def test_a_message_too_long_for_the_context_is_an_error(lm):
    conversation = Conversation(*lm, BUILT_IN_FORMATS["chat"], PARAMS)
    with pytest.raises(PhiError, match="does not fit"):
        talk(conversation, "word " * 200)
    assert conversation.messages == []
