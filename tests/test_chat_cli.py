"""`phi chat` as a person uses it: typed into a real pseudo-terminal (two turns streamed, Ctrl-C during a reply,
/reset, Ctrl-D), and fed through a pipe by a script. Greedy replies equal plain generation on the rendered
conversation."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pexpect
import pytest

import phi_core
from phi_core.checkpoint import resolve_source
from phi_core.conversation import open_conversation
from phi_core.generation import generate
from phi_core.generation_config import GenerationOverrides

PHI = str(Path(sys.executable).parent / "phi")
ARGS = ["chat", "--format", "chat", "--greedy", "--max-new-tokens", "12"]
OVERRIDES = GenerationOverrides(do_sample=False, max_new_tokens=12)


@pytest.fixture(scope="module")
def expected_replies():
    """What plain generation makes of each turn's rendered conversation (the embedded model, same settings)."""
    model, tokenizer = phi_core.load_model("tiny"), phi_core.load_tokenizer("tiny")
    folder = resolve_source("tiny")
    conversation = open_conversation(model, tokenizer, folder, OVERRIDES, "chat")

    def reply_to(history: list[dict[str, str]]) -> str:
        ids = tokenizer.encode(conversation.rendered(history))
        events = generate(model, tokenizer, [ids], replace(conversation.params, stop=conversation.prompt_format.stop))
        return "".join(event.text for event in events)

    return reply_to


def spawn(tmp_path: Path, *extra: str) -> pexpect.spawn:
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "TERM": "xterm", "COLUMNS": "120", "NO_COLOR": "1"}
    return pexpect.spawn(PHI, [*ARGS, *extra], env=env, encoding="utf-8", timeout=60, dimensions=(40, 120))


def read_reply(child: pexpect.spawn, sent: str) -> str:
    """The text between the echoed message and the next prompt."""
    child.sendline(sent)
    child.expect_exact(sent + "\r\n")
    child.expect_exact(">>> ")
    return child.before.replace("\r\n", "\n").removesuffix("\n")


def test_a_terminal_session(tmp_path, expected_replies):
    child = spawn(tmp_path)
    child.expect_exact(">>> ")
    first = read_reply(child, "Hello there")
    history = [{"role": "user", "content": "Hello there"}]
    assert first == expected_replies(history)
    history += [{"role": "assistant", "content": first.strip()}, {"role": "user", "content": "What is a list?"}]
    assert read_reply(child, "What is a list?") == expected_replies(history)
    child.sendline("/help")
    child.expect_exact("/save FILE")
    child.expect_exact(">>> ")
    child.sendline(f"/save {tmp_path / 'talk.json'}")
    child.expect_exact("(saved ")
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "talk.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert (tmp_path / ".local" / "state" / "phi" / "chat_history").is_file()


def test_ctrl_c_stops_a_reply_and_keeps_the_session(tmp_path):
    child = spawn(tmp_path, "--max-new-tokens", "900")
    child.expect_exact(">>> ")
    child.sendline("Tell me everything")
    child.expect_exact("Tell me everything\r\n")
    child.expect(r"\S")  # the reply has started printing
    child.sendcontrol("c")
    child.expect_exact("(reply stopped)")
    child.expect_exact(">>> ")
    child.sendline("/reset")
    child.expect_exact("(conversation reset)")
    child.expect_exact(">>> ")
    child.sendline("/save " + str(tmp_path / "after-reset.json"))
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert json.loads((tmp_path / "after-reset.json").read_text())["messages"] == []


def test_a_piped_conversation_prints_one_reply_per_line(tmp_path, expected_replies):
    lines = "Hello there\nWhat is a list?\n/reset\nHello there\n"
    result = subprocess.run(
        [PHI, *ARGS, "--json"], input=lines.encode(), capture_output=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr.decode()
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [r["user"] for r in records] == ["Hello there", "What is a list?", "Hello there"]
    history = [{"role": "user", "content": "Hello there"}]
    assert records[0]["reply"] == expected_replies(history)
    history += [{"role": "assistant", "content": records[0]["reply"].strip()}]
    history += [{"role": "user", "content": "What is a list?"}]
    assert records[1]["reply"] == expected_replies(history)
    assert records[2]["reply"] == records[0]["reply"]  # /reset starts over
    assert records[1]["reused"] > 0 and records[2]["reused"] > 0  # the kept cache served the shared prefix

    plain = subprocess.run([PHI, *ARGS], input=lines.encode(), capture_output=True, timeout=120, cwd=tmp_path)
    assert plain.returncode == 0
    assert plain.stdout.decode().splitlines() == [" ".join(r["reply"].split()) for r in records]


def test_save_never_replaces_a_file(tmp_path):
    existing = tmp_path / "keep.json"
    existing.write_text("mine")
    lines = f"Hello\n/save {existing}\n"
    result = subprocess.run([PHI, *ARGS], input=lines.encode(), capture_output=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0
    assert "already exists" in result.stderr.decode()
    assert existing.read_text() == "mine"
