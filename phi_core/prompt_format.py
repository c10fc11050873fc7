"""Prompt formats: a conversation (a list of ``{"role", "content"}`` messages) rendered to the text a model reads.

A format is a Jinja chat template rendered as transformers' ``apply_chat_template`` renders it (sandboxed
environment, ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``,
``strftime_now``, a ``tojson`` that does not escape HTML, and the tokenizer's special tokens as variables), so the
text is byte-identical. A checkpoint's own template comes from ``chat_template.jinja`` or the ``chat_template`` of
``tokenizer_config.json``; base Phi models have none, and use one of the built-in formats from the model cards,
each with the stop strings that end the model's turn (a base Phi otherwise writes the next turn too).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from phi_core.checkpoint import has_file, read_checkpoint_text
from phi_core.errors import CheckpointError, PhiError
from phi_core.files import TEXT_LIMIT, read_text_file
from phi_core.tokenizer import ENDOFTEXT

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
Message = Mapping[str, Any]


class PromptFormatError(PhiError):
    """A template that cannot be read or fails to render (the message names the template)."""


@dataclass(frozen=True)
class PromptFormat:
    """A named Jinja chat template and the stop strings that end the model's turn."""

    name: str
    template: str
    stop: tuple[str, ...] = ()

    def render(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        special_tokens: Mapping[str, str] | None = None,
    ) -> str:
        """The conversation as text, ending with the cue for the assistant's turn when ``add_generation_prompt``."""
        try:
            compiled = _compile(self.template)
            return compiled.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **dict(special_tokens or {}),
            )
        except Exception as exc:  # Jinja's own errors, and whatever a template's expressions raise
            line = getattr(exc, "lineno", None)
            where = f" (line {line})" if line else ""
            raise PromptFormatError(f"template {self.name}{where}: {_one_line(exc)}") from None

    def render_prompt(self, prompt: str, special_tokens: Mapping[str, str] | None = None) -> str:
        """One user message, cued for the reply: what ``phi generate --format`` sends the model."""
        return self.render([{"role": "user", "content": prompt}], True, special_tokens)


# The base models' formats, from the Phi-1.5 and Phi-2 model cards. Written as templates so a conversation of any
# length renders through the same path as a checkpoint's template.
BUILT_IN_FORMATS: dict[str, PromptFormat] = {
    "code": PromptFormat("code", "{% for message in messages %}{{ message['content'] }}{% endfor %}"),
    "instruct": PromptFormat(
        "instruct",
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
        "{% elif message['role'] == 'user' %}Instruct: {{ message['content'] }}\n"
        "{% else %}Output: {{ message['content'] }}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}Output:{% endif %}",
        ("\nInstruct:",),
    ),
    "chat": PromptFormat(
        "chat",
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
        "{% elif message['role'] == 'user' %}Alice: {{ message['content'] }}\n"
        "{% else %}Bob: {{ message['content'] }}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}Bob:{% endif %}",
        ("\nAlice:",),
    ),
}


def checkpoint_format(folder: Path) -> PromptFormat | None:
    """The checkpoint's own chat template (``chat_template.jinja`` wins over ``tokenizer_config.json``, as in
    transformers), or None. A template that ends turns with its own end-of-text token stops on it too."""
    stop = _own_end_token(folder)
    if has_file(folder, CHAT_TEMPLATE_FILE):
        return PromptFormat(str(folder / CHAT_TEMPLATE_FILE), read_checkpoint_text(folder, CHAT_TEMPLATE_FILE), stop)
    template = _tokenizer_config(folder).get("chat_template")
    if template is None:
        return None
    name = f"{folder / TOKENIZER_CONFIG} chat_template"
    return PromptFormat(name, _default_template(template, name), stop)


def choose_format(name: str | None, folder: Path | None) -> PromptFormat:
    """``name`` as a built-in format or a ``.jinja`` file; with no name, the checkpoint's template, else ``code``."""
    if name is None:
        own = checkpoint_format(folder) if folder is not None else None
        return own or BUILT_IN_FORMATS["code"]
    if name in BUILT_IN_FORMATS:
        return BUILT_IN_FORMATS[name]
    if name.endswith(".jinja"):
        try:
            return PromptFormat(name, read_text_file(Path(name).expanduser(), TEXT_LIMIT))
        except CheckpointError as exc:
            raise PromptFormatError(f"template {exc}") from None
    choices = ", ".join([*BUILT_IN_FORMATS, "FILE.jinja"])
    raise PromptFormatError(f"unknown prompt format {name!r} (choose one of {choices})")


def special_tokens(folder: Path | None) -> dict[str, str]:
    """The special tokens a template sees as variables (``bos_token``, ``eos_token``, ...), from
    ``special_tokens_map.json`` over ``tokenizer_config.json``, as transformers merges them."""
    tokens: dict[str, str] = {}
    if folder is None:
        return tokens
    for source in (_tokenizer_config(folder), _json_file(folder, "special_tokens_map.json")):
        for key in SPECIAL_TOKEN_NAMES:
            value = source.get(key)
            content = value.get("content") if isinstance(value, Mapping) else value
            if isinstance(content, str):
                tokens[key] = content
    return tokens


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    """The template compiled in transformers' sandboxed environment."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _default_template(value: Any, name: str) -> str:
    """``chat_template`` is a string, or a list of ``{"name", "template"}`` of which ``default`` is used."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise PromptFormatError(f"{name}: several templates ({', '.join(map(str, named))}) and none named default")
    raise PromptFormatError(f"{name}: expected a string or a list of named templates")


def _own_end_token(folder: Path) -> tuple[str, ...]:
    eos = special_tokens(folder).get("eos_token")
    return (eos,) if eos and eos != ENDOFTEXT else ()


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    return _json_file(folder, TOKENIZER_CONFIG)


def _json_file(folder: Path, name: str) -> dict[str, Any]:
    if not has_file(folder, name):
        return {}
    try:
        value = json.loads(read_checkpoint_text(folder, name))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / name}: not valid JSON ({exc})") from None
    return value if isinstance(value, dict) else {}


def _one_line(exc: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip()
    return text or type(exc).__name__
