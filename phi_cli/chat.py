"""`phi chat`: an interactive conversation in a terminal, or one reply per stdin line in a script."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from phi_cli.errors import UsageProblem
from phi_cli.io import notice, stderr, visible, write_json_line
from phi_cli.options import (
    AttnOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    MaxNewTokensOpt,
    MinPOpt,
    ModelOpt,
    QuietOpt,
    RepetitionPenaltyOpt,
    RevisionOpt,
    SampleOpt,
    SeedOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    generation_overrides,
    load_for_task,
    model_folder,
)
from phi_core.conversation import Conversation, open_conversation
from phi_core.errors import PhiError

HELP = """/reset           forget the conversation (the system message stays)
/system [TEXT]   set (or clear) the system message and start over
/save FILE       write the conversation to FILE as JSON (an existing FILE is not replaced)
/help            this list
/exit            leave (Ctrl-D too); Ctrl-C stops a reply and keeps the conversation"""


def chat_command(
    system: Annotated[str | None, typer.Option(help="A system message to start from.")] = None,
    prompt_format: FormatOpt = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Without a terminal: one JSON object per reply (text kept exact).")
    ] = False,
    max_new_tokens: MaxNewTokensOpt = None,
    sample: SampleOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    dtype: DtypeOpt = None,
    attn: AttnOpt = "sdpa",
    device: DeviceOpt = None,
) -> None:
    """Talk with a model, keeping the conversation (and its KV cache) between turns.

    phi chat --model cognitivecomputations/dolphin-2_6-phi-2

    phi chat --format instruct --system "Answer in one sentence."

    printf 'Hello\\nWhat is a list?\\n' | phi chat --format chat
    """
    overrides = generation_overrides(max_new_tokens, sample, temperature, top_k, top_p, min_p, repetition_penalty, seed)
    lm, tokenizer = load_for_task("causal-lm", model, revision, dtype, attn, device, quiet)
    conversation = open_conversation(lm, tokenizer, model_folder(model, revision), overrides, prompt_format, system)
    if sys.stdin.isatty():
        _interactive(conversation, quiet)
    else:
        _scripted(conversation, json_output)


def _interactive(conversation: Conversation, quiet: bool) -> None:
    """The terminal session: line editing and history, streamed replies, slash commands."""
    history = _line_editing()
    if not quiet:
        stderr.print(f"[dim]format {conversation.prompt_format.name}; /help for commands, Ctrl-D to leave[/dim]")
    try:
        while True:
            try:
                line = input(">>> ")
            except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, like a shell
                sys.stdout.write("\n")
                continue
            except EOFError:
                sys.stdout.write("\n")
                return
            if not line.strip():
                continue
            if line.startswith("/"):
                if not _command(conversation, line, lambda text: stderr.print(text, markup=False, highlight=False)):
                    return
                continue
            _stream_reply(conversation, line)
    finally:
        history()


def _stream_reply(conversation: Conversation, text: str) -> None:
    """Print the reply as it comes; Ctrl-C stops it and keeps what was shown."""
    stream = conversation.reply(text)
    try:
        for event in stream:
            sys.stdout.write(visible(event.text))
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
        stderr.print("\n(reply stopped)", end="", markup=False, highlight=False)
    except PhiError as exc:
        stderr.print(f"error: {exc}", markup=False, highlight=False)
        return
    sys.stdout.write("\n")
    sys.stdout.flush()


def _scripted(conversation: Conversation, as_json: bool) -> None:
    """Without a terminal: each stdin line is a message (or a slash command); each reply is one line of stdout."""
    for raw in sys.stdin.buffer:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _command(conversation, line, lambda text: notice(text, quiet=False)):
                return
            continue
        reply = "".join(event.text for event in conversation.reply(line))
        if as_json:
            write_json_line({"user": line, "reply": reply, **vars(conversation.last_turn)})
        else:
            # One reply per line, so a script can pair them with its questions; --json keeps line breaks.
            sys.stdout.write(" ".join(reply.split()) + "\n")
            sys.stdout.flush()


def _command(conversation: Conversation, line: str, say: Callable[[str], None]) -> bool:
    """Run a slash command; False when the session should end."""
    name, _, argument = line.strip().partition(" ")
    argument = argument.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        conversation.reset(conversation.system)
        say("(conversation reset)")
    elif name == "/system":
        conversation.reset(argument or None)
        say("(system message set; conversation reset)" if argument else "(system message cleared; conversation reset)")
    elif name == "/save":
        try:
            say(f"(saved {_save(conversation, argument)})")
        except UsageProblem as exc:
            say(f"error: {exc}")
    elif name == "/help":
        say(HELP)
    else:
        say(f"unknown command {name} (/help lists them)")
    return True


def _save(conversation: Conversation, name: str) -> Path:
    """Write the conversation as JSON through a temporary file, never replacing an existing file."""
    if not name:
        raise UsageProblem("/save needs a file name: /save FILE")
    path = Path(name).expanduser()
    record = {
        "format": conversation.prompt_format.name,
        "system": conversation.system,
        "messages": conversation.messages,
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        temporary.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.link(temporary, path)  # fails if path exists: nothing is replaced
    except FileExistsError:
        raise UsageProblem(f"{path}: already exists; /save to a new file") from None
    except OSError as exc:
        raise UsageProblem(f"{path}: cannot be written ({exc.strerror})") from None
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _line_editing() -> Callable[[], None]:
    """Turn on readline editing with a history file kept between sessions; returns the function that saves it."""
    try:
        import readline
    except ImportError:  # no readline on this platform: plain input() still works
        return lambda: None
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "phi"
    history = state / "chat_history"
    with contextlib.suppress(OSError):  # no history yet
        readline.read_history_file(history)
    readline.set_history_length(1000)

    def save() -> None:
        with contextlib.suppress(OSError):  # a history that cannot be kept is not worth an error at exit
            state.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)

    return save
