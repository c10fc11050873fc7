"""Prompt formats render byte-identically to transformers' apply_chat_template: real-world templates kept in
tests/data/chat_templates, read from chat_template.jinja or tokenizer_config.json, and the built-in formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from phi_core.errors import PhiError
from phi_core.prompt_format import (
    BUILT_IN_FORMATS,
    PromptFormat,
    PromptFormatError,
    checkpoint_format,
    choose_format,
    special_tokens,
)

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
CONVERSATIONS = {
    "one-turn": [{"role": "user", "content": "Write a function that adds two numbers."}],
    "system-and-turns": [
        {"role": "system", "content": "You are a careful Python tutor."},
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "An ordered, mutable sequence."},
        {"role": "user", "content": 'And a "tuple" <immutable>? é 🙂'},
    ],
    "alternating": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Sort [3, 1, 2]."},
    ],
}
# (template file, conversation): every pairing that the template accepts.
CASES = [
    (template.name, conversation)
    for template in sorted(TEMPLATES.glob("*.jinja"))
    for conversation in CONVERSATIONS
    if not (template.name.startswith("mistral") and conversation == "system-and-turns")
]


def tokenizer_folder(tmp_path, tokenizer_dir, template: str | None, as_file: bool, eos: str | None = None) -> Path:
    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if eos is not None:
        config["eos_token"] = eos
        special = json.loads((folder / "special_tokens_map.json").read_text())
        special["eos_token"] = eos
        (folder / "special_tokens_map.json").write_text(json.dumps(special))
    if template is not None and as_file:
        (folder / "chat_template.jinja").write_text(template)
    elif template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def transformers_render(folder: Path, messages, add_generation_prompt: bool, template: str | None = None) -> str:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


@pytest.mark.parametrize("as_file", [True, False], ids=["chat_template.jinja", "tokenizer_config.json"])
@pytest.mark.parametrize("template_name, conversation", CASES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_checkpoint_templates_render_like_transformers(
    tmp_path, tokenizer_dir, template_name, conversation, add_generation_prompt, as_file
):
    template = (TEMPLATES / template_name).read_text()
    folder = tokenizer_folder(tmp_path, tokenizer_dir, template, as_file, eos="<|end|>")
    messages = CONVERSATIONS[conversation]
    ours = checkpoint_format(folder).render(messages, add_generation_prompt, special_tokens(folder))
    assert ours == transformers_render(folder, messages, add_generation_prompt)


@pytest.mark.parametrize("name", list(BUILT_IN_FORMATS))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_built_in_formats_render_like_transformers(tmp_path, tokenizer_dir, name, conversation):
    folder = tokenizer_folder(tmp_path, tokenizer_dir, None, as_file=False)
    fmt = BUILT_IN_FORMATS[name]
    messages = CONVERSATIONS[conversation]
    assert fmt.render(messages, True, special_tokens(folder)) == transformers_render(
        folder, messages, True, fmt.template
    )


def test_built_in_formats_give_the_model_cards_prompts():
    assert BUILT_IN_FORMATS["code"].render_prompt("def f(x):") == "def f(x):"
    assert BUILT_IN_FORMATS["instruct"].render_prompt("Add 2 and 3.") == "Instruct: Add 2 and 3.\nOutput:"
    assert BUILT_IN_FORMATS["chat"].render_prompt("Hi!") == "Alice: Hi!\nBob:"
    turns = CONVERSATIONS["alternating"]
    assert BUILT_IN_FORMATS["chat"].render(turns) == "Alice: Hi\nBob: Hello.\nAlice: Sort [3, 1, 2].\nBob:"
    assert BUILT_IN_FORMATS["instruct"].stop == ("\nInstruct:",)
    assert BUILT_IN_FORMATS["chat"].stop == ("\nAlice:",)


def test_raise_exception_is_a_one_line_error_naming_the_template(tmp_path, tokenizer_dir):
    template = (TEMPLATES / "mistral-alternating.jinja").read_text()
    folder = tokenizer_folder(tmp_path, tokenizer_dir, template, as_file=True)
    fmt = checkpoint_format(folder)
    with pytest.raises(PromptFormatError) as error:
        fmt.render(CONVERSATIONS["system-and-turns"], True, special_tokens(folder))
    message = str(error.value)
    assert "chat_template.jinja" in message and "roles must alternate" in message and "\n" not in message


@pytest.mark.parametrize(
    "template, fragment",
    [
        ("{% for m in messages %}{{ m.content }", "line 1"),
        ("{{ messages[0].content.__class__.__mro__ }}", "unsafe"),
        ("{{ undefined_function() }}", "undefined"),
    ],
)
def test_templates_that_fail_are_one_line_errors(template, fragment):
    with pytest.raises(PhiError) as error:
        PromptFormat("mine.jinja", template).render_prompt("hi")
    message = str(error.value)
    assert message.startswith("template mine.jinja") and fragment in message.lower() and "\n" not in message


def test_own_end_token_becomes_a_stop_string(tmp_path, tokenizer_dir):
    template = (TEMPLATES / "chatml.jinja").read_text()
    folder = tokenizer_folder(tmp_path, tokenizer_dir, template, as_file=False, eos="<|im_end|>")
    assert checkpoint_format(folder).stop == ("<|im_end|>",)


def test_choose_format(tmp_path, tokenizer_dir):
    plain = tokenizer_folder(tmp_path, tokenizer_dir, None, as_file=False)
    assert choose_format(None, plain).name == "code"
    assert choose_format("instruct", plain) is BUILT_IN_FORMATS["instruct"]
    own = tmp_path / "mine.jinja"
    own.write_text("Q: {{ messages[-1]['content'] }}\nA:")
    assert choose_format(str(own), plain).render_prompt("why?") == "Q: why?\nA:"
    with pytest.raises(PromptFormatError, match="unknown prompt format 'poem'"):
        choose_format("poem", plain)
    with pytest.raises(PromptFormatError, match="missing.jinja"):
        choose_format(str(tmp_path / "missing.jinja"), plain)


def test_a_list_of_named_templates_uses_the_default(tmp_path, tokenizer_dir):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}]
    folder = tokenizer_folder(tmp_path, tokenizer_dir, None, as_file=False)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = named
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert checkpoint_format(folder).render_prompt("x") == "D1"


def test_a_template_linking_outside_the_checkpoint_is_refused(tmp_path, tokenizer_dir):
    folder = tokenizer_folder(tmp_path, tokenizer_dir, None, as_file=False)
    outside = tmp_path / "elsewhere.jinja"
    outside.write_text("secret")
    (folder / "chat_template.jinja").symlink_to(outside)
    with pytest.raises(PhiError, match="outside the checkpoint"):
        checkpoint_format(folder)
