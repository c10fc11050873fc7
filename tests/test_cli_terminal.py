"""The installed `phi` in real terminals and pipelines: what Typer's CliRunner cannot see.

Each test starts the console script as a process (tests/cli_harness.py) with its streams on pseudo-terminals,
pipes or files, and sends it real signals. Every start imports torch (seconds), so checks share runs where
they can. The last tests need no process: the exit-code table and the catch-all for unexpected errors.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import signal
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from cli_harness import Signal, run_phi
from typer.testing import CliRunner

import phi_core
from phi_cli import entry, errors
from phi_cli.errors import EXIT_CODES, INTERNAL_ERROR, exit_code_for
from phi_cli.main import app
from phi_core.errors import PhiError

SCRIPT = "import os\n\n\ndef main():\n    print(os.getcwd())\n"


def write_jsonl(path: Path, field: str, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({field: text, "id": i}) + "\n" for i, text in enumerate(texts)))
    return path


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def assert_one_error_line(stderr: str, message: str) -> None:
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr and "Traceback" not in stderr


# --- Results reach stdout whatever stderr is: the documented pipelines, with stderr on a terminal ----------


@pytest.mark.parametrize(
    ("command", "field", "count"),
    [
        (["generate", "--input", "{input}", "--json", "--max-new-tokens", "4"], "prompt", 3),
        (["classify", "--input", "{input}", "--all-scores"], "text", 3),
        (["tag", "--input", "{input}"], "text", 3),
        (["classify", "def f(x): return x", "Return the sum of two numbers.", "--json", "--quiet"], None, 2),
    ],
)
def test_jsonl_redirected_to_a_file_keeps_every_line_with_stderr_on_a_terminal(tmp_path, command, field, count):
    # `phi generate --input prompts.jsonl --json > out.jsonl`, `phi classify --input texts.jsonl > labels.jsonl`:
    # Rich's progress bar used to send stdout to the terminal while it ran, leaving the file empty.
    source = write_jsonl(tmp_path / "in.jsonl", field or "text", ["x = 1", "import os", "Returns the sum."])
    out = tmp_path / "out.jsonl"
    result = run_phi([arg.format(input=source) for arg in command], stdout=out, stderr="tty")
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stdout)
    assert len(records) == count
    if field is not None:
        assert [r["id"] for r in records] == [0, 1, 2]
    if "--quiet" in command:
        assert result.stderr == ""
    else:
        assert "loading model..." in result.stderr  # the spinner, on the terminal only
        assert "{" not in result.stderr  # no result strayed to the terminal


def test_piped_script_is_the_prompt_and_a_stray_sigpipe_is_ignored():
    # `cat script.py | phi generate --max-new-tokens 100`; SIGPIPE is ignored (a closed pipe shows as EPIPE). The
    # embedded model samples (its generation_config.json): a seed keeps the text, and so the test, the same.
    result = run_phi(
        ["generate", "--max-new-tokens", "100", "--seed", "1"],
        stdin=SCRIPT,
        send=Signal(signal.SIGPIPE, 0.5),
        stderr="pipe",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and result.stderr == ""


def test_piped_lines_are_classified_as_jsonl():
    # `printf 'x = 1\nThis is prose.\n' | phi classify --json`: JSONL only when asked (or with --input), as in
    # every command; a pipe alone gets the same table a terminal does.
    table = run_phi(["classify"], stdin="x = 1\nThis is prose.\n")
    assert table.returncode == 0 and "This is prose." in table.stdout and not table.stdout.startswith("{")
    result = run_phi(["classify", "--json"], stdin="x = 1\nThis is prose.\n")
    assert result.returncode == 0, result.stderr
    assert [r["text"] for r in json_lines(result.stdout)] == ["x = 1", "This is prose."]
    assert result.stderr == ""  # stderr is not a terminal: no spinner, no progress bar


# --- Pipes that close, streams that cannot be written -------------------------------------------------------


def test_head_reads_one_line_and_phi_stops_quietly(tmp_path):
    # `phi generate --input prompts.jsonl | head -1`: the later writes hit a closed pipe.
    source = write_jsonl(tmp_path / "in.jsonl", "prompt", [f"def f{i}(x):" for i in range(24)])
    result = run_phi(["generate", "--input", str(source), "--batch-size", "1", "--max-new-tokens", "24"], head=1)
    assert json.loads(result.stdout)["id"] == 0
    assert result.returncode == 0
    assert result.stderr == ""  # no "Exception ignored ... BrokenPipeError" either


def test_closed_stdout_is_one_error_line():
    result = run_phi(["generate", "x", "--max-new-tokens", "2"], stdout="closed")  # phi ... >&-
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "stdout is closed")


def test_full_stdout_is_one_error_line():
    result = run_phi(["generate", "x", "--max-new-tokens", "8"], stdout="full")  # phi ... > /dev/full
    assert result.returncode == 1
    assert_one_error_line(result.stderr, "No space left on device")


# --- Signals --------------------------------------------------------------------------------------------------


def test_ctrl_c_while_torch_is_importing_is_one_line():
    result = run_phi(["generate", "x"], stderr="tty", send=Signal(signal.SIGINT, 0.6))
    assert result.returncode == 130
    assert result.stderr.strip() == "error: interrupted", result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_during_convert_leave_no_partial_folder(lm_checkpoint, tmp_path, signum):
    output = tmp_path / "converted"

    def staging_started() -> bool:
        return any(tmp_path.glob(f".{output.name}.*.partial"))

    result = run_phi(
        ["convert", str(lm_checkpoint), str(output), "--max-shard-size", "1MB", "--verify"],
        send=Signal(signum, staging_started),
    )
    assert result.returncode == 128 + signum, result.stderr
    assert_one_error_line(result.stderr, f"terminated by {signal.Signals(signum).name}")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging folder


def test_signal_whose_exception_c_code_replaced_still_ends_phi_as_terminated(monkeypatch, tmp_path):
    # Seen with SIGTERM inside torch's serialization: the Terminated the handler raised came out as torch's
    # own ValueError ("could not determine the shape of object type ..."), exit code 2 instead of 143.
    def convert_in_c(*args, **kwargs):
        try:
            entry.raise_ending(signal.SIGTERM, None)
        except BaseException:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    monkeypatch.setattr(entry, "received", [])
    monkeypatch.setattr("phi_cli.convert.convert_checkpoint", convert_in_c)
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "in"), str(tmp_path / "out")])
    assert (result.exit_code, result.stderr) == (143, "error: terminated by SIGTERM\n")


# --- What a terminal shows ------------------------------------------------------------------------------------

HOSTILE = "\x1b]0;owned\x07[bold]x[/bold] = 1\x08\x08\x08masked"  # a window title, Rich markup, backspaces


def test_classify_table_shows_user_text_literally():
    result = run_phi(["classify", HOSTILE, "--top-k", "2"], stdout="tty")
    assert result.returncode == 0, result.stderr
    assert "\x07" not in result.stdout and "\x08" not in result.stdout
    assert "\\x1b]0;owned\\x07[bold]x[/bold] = 1\\x08\\x08\\x08masked" in result.stdout


def test_tag_view_without_colour_marks_spans_with_their_labels():
    result = run_phi(["tag", "if x > 0: pass " + HOSTILE], stdout="tty", env={"NO_COLOR": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[if]KEYWORD [x]NAME [>]OP [0]NUMBER"), result.stdout
    assert "\x1b" not in result.stdout  # no colour, so any escape would have come from the text
    assert "\\x1b" in result.stdout and "\\x07" in result.stdout and "[bold]" in result.stdout


# --- Input text and the prompt --------------------------------------------------------------------------------


def test_piped_stdin_and_a_prompt_are_joined_and_bad_bytes_replaced_with_a_notice():
    result = run_phi(
        ["generate", b"def f\xff(x):", "--json", "--max-new-tokens", "2"], stdin=b"import os\xfe\n", stderr="pipe"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["prompt"] == "import os\ufffd\n\ndef f\ufffd(x):"
    assert result.stderr.splitlines() == [
        "note: the prompt is not valid UTF-8; the bytes that are not were replaced by U+FFFD",
        "note: stdin is not valid UTF-8; the bytes that are not were replaced by U+FFFD",
    ]


def test_version_is_the_installed_one():
    result = run_phi(["--version"])
    assert (result.returncode, result.stdout) == (0, f"phi-toolkit {version('phi-toolkit')}\n")


def test_shell_completion_completes_subcommands_and_options():
    # What the script `phi --install-completion` installs for bash asks of phi on each <Tab>.
    bash = {"_PHI_COMPLETE": "complete_bash", "COMP_WORDS": "phi generate --max", "COMP_CWORD": "2"}
    result = run_phi([], env=bash)
    assert (result.returncode, result.stdout.split()) == (0, ["--max-new-tokens"])
    script = CliRunner().invoke(app, ["--show-completion", "bash"])
    assert script.exit_code == 0 and "_PHI_COMPLETE=complete_bash" in script.stdout


# --- Errors: every exception has an exit code; the unexpected ones are one line too ------------------------------


def phi_core_error_classes() -> set[type[PhiError]]:
    """Every subclass of PhiError defined in any phi_core module."""
    found: set[type[PhiError]] = set()
    for module in pkgutil.walk_packages(phi_core.__path__, "phi_core."):
        for _, value in inspect.getmembers(importlib.import_module(module.name), inspect.isclass):
            if issubclass(value, PhiError):
                found.add(value)
    return found


def test_every_exception_the_cli_can_meet_has_an_exit_code():
    classes = phi_core_error_classes()
    assert len(classes) >= 4
    others = [
        OSError("x"),
        FileNotFoundError("x"),
        ValueError("x"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed"),
        MemoryError(),
        RuntimeError("x"),
        AssertionError(),
        KeyError("x"),
        TypeError("x"),
        IndexError("x"),
        NotImplementedError(),
        errors.UsageProblem("x"),
    ]
    for exc in [cls("x") for cls in classes] + others:
        assert exit_code_for(exc) is not None, exc
    assert all(exit_code_for(cls("x")) == 1 for cls in classes)
    assert EXIT_CODES[-1] == (Exception, INTERNAL_ERROR)


def test_cli_that_cannot_be_imported_is_one_internal_error_line(monkeypatch, capsys):
    monkeypatch.setattr(entry, "install_signal_handlers", lambda at_once=False: None)  # pytest keeps its own
    monkeypatch.setitem(sys.modules, "phi_cli.main", None)  # importing it now raises ImportError
    with pytest.raises(SystemExit) as exited:
        entry.main()
    assert exited.value.code == INTERNAL_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: internal error: cannot load the CLI: ModuleNotFoundError: ") and err.count("\n") == 1


def test_a_signal_after_the_command_ended_exits_at_once_without_a_traceback(monkeypatch):
    """Seen by hand: Ctrl-C landing while phi flushed its output after an error raised KeyboardInterrupt out of the
    exit path. Once the command has run, the ending signals leave at once with their one line."""
    saved = {signum: signal.getsignal(signum) for signum in entry.ENDING_SIGNALS}
    handlers = []
    monkeypatch.setattr(entry, "_run_cli", lambda app: 1)
    monkeypatch.setattr(entry, "_flush_stdout", lambda code: handlers.append(signal.getsignal(signal.SIGINT)) or code)
    try:
        with pytest.raises(SystemExit) as exited:
            entry.main()
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    assert exited.value.code == 1
    assert handlers == [entry.exit_at_once]


def test_unexpected_error_is_one_internal_error_line(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr("phi_cli.generate.load_for_task", broken)
    result = CliRunner().invoke(app, ["generate", "x"])
    assert result.exit_code == INTERNAL_ERROR
    assert result.stderr == ("error: internal error: KeyError: 'surprise' (PHI_DEBUG=1 shows the traceback)\n")
    monkeypatch.setenv("PHI_DEBUG", "1")
    result = CliRunner().invoke(app, ["generate", "x"])
    assert isinstance(result.exception, KeyError)
