"""Reading inputs (argument, stdin, JSONL) and writing results (plain text, JSONL) for the commands.

Text policy: a JSONL input must be valid UTF-8 (a bad line is an error naming the line); a plain-text argument
or stdin is read leniently, its bytes that are not UTF-8 replaced by U+FFFD with a notice on stderr.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from phi_cli.errors import UsageProblem
from phi_core.records import BadRecord, is_blank, json_line, parse_record

stderr = Console(stderr=True)
# Python hands over argv bytes that are not UTF-8 as lone surrogates (surrogateescape); JSON can spell them too.
SURROGATE = re.compile("[\ud800-\udfff]")
# C0 and C1 control characters but tab and newline: ESC and CSI could drive the terminal, CR overwrite a line.
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def stdout_console() -> Console:
    """A console for results on stdout; wide when stdout is a file or pipe, so tables are not squeezed."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=160)


def visible(text: str) -> str:
    """``text`` safe to show on a terminal: control characters (but tab and newline) as ``\\x1b``-style escapes."""
    return CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def notice(message: str, quiet: bool) -> None:
    """A one-line ``note:`` on stderr, unless --quiet."""
    if not quiet:
        print(f"note: {message}", file=sys.stderr, flush=True)


def argument_text(text: str, what: str, quiet: bool) -> str:
    """A text from the command line, its bytes that were not UTF-8 (lone surrogates) replaced by U+FFFD."""
    if not SURROGATE.search(text):
        return text
    notice(f"{what} is not valid UTF-8; the bytes that are not were replaced by U+FFFD", quiet)
    return SURROGATE.sub("\ufffd", text)


def stdin_has_input() -> bool:
    """Whether stdin is something to read (a pipe, a file, a socket), not a terminal or /dev/null."""
    if sys.stdin is None:
        return False
    try:
        return not stat.S_ISCHR(os.fstat(sys.stdin.fileno()).st_mode)
    except (OSError, ValueError):  # no file descriptor: an in-memory stdin (Typer's CliRunner)
        return not sys.stdin.isatty()


def read_stdin_text(quiet: bool) -> str:
    """All of stdin as text; bytes that are not UTF-8 become U+FFFD, with a notice."""
    raw = _stdin_bytes().read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        notice("stdin is not valid UTF-8; the bytes that are not were replaced by U+FFFD", quiet)
        return raw.decode("utf-8", errors="replace")


def texts_from_stdin_lines(quiet: bool) -> list[str]:
    """Non-empty lines of stdin (line ends removed)."""
    return [line.rstrip("\r") for line in read_stdin_text(quiet).split("\n") if line.strip()]


def read_jsonl(source: str, field: str) -> list[dict[str, Any]]:
    """Records of a JSONL file (``-`` = stdin), each an object with a string ``field``; blank lines skipped."""
    if source == "-":
        records = _parse_jsonl(_stdin_bytes(), "stdin", field)
    else:
        with _open(source) as handle:
            records = _parse_jsonl(handle, source, field)
    if not records:
        raise UsageProblem(f"{_name(source)}: no records")
    return records


def write_json_line(record: dict[str, Any], out: TextIO | None = None) -> None:
    """``record`` as one JSON line, flushed so a reader sees it at once."""
    out = out or sys.stdout
    out.write(json_line(record) + "\n")  # the line phi_core.distributed writes too
    out.flush()


@contextmanager
def progress(
    description: str, enabled: bool, total: int | None = None, unit: str = ""
) -> Iterator[Callable[..., None]]:
    """The one progress display of every command, on stderr: a bar counting to ``total``, or with no total a spinner
    (showing bytes done when ``unit == "bytes"``), with the time elapsed. A no-op when disabled or when stderr is not
    a terminal. Yields ``update(advance=1, description=None)``."""
    if not enabled or not stderr.is_terminal:
        yield lambda advance=1, description=None: None
        return
    if total is None:
        sizes = (DownloadColumn(),) if unit == "bytes" else ()
        columns = (SpinnerColumn(), TextColumn("{task.description}"), *sizes, TimeElapsedColumn())
    else:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # redirect_stdout=False: Rich would otherwise send whatever is written to stdout meanwhile to the terminal
    with Progress(*columns, console=stderr, transient=True, redirect_stdout=False) as shown:
        task = shown.add_task(description, total=total)
        yield lambda advance=1, description=None: shown.update(task, advance=advance, description=description)


def _parse_jsonl(lines: Iterable[bytes], name: str, field: str) -> list[dict[str, Any]]:
    """The records of JSONL lines, by the rules a distributed run applies to each row (phi_core.records)."""
    records = []
    for number, raw in enumerate(lines, start=1):
        if is_blank(raw, first=number == 1):  # a byte order mark may open the file
            continue
        try:
            records.append(parse_record(raw, field, first=number == 1))
        except BadRecord as exc:
            raise UsageProblem(f"{name} line {number}: {exc}") from None
    return records


def _stdin_bytes() -> BinaryIO:
    return sys.stdin.buffer  # bytes: the decoding policy above is ours, not the locale's


def _open(path: str) -> BinaryIO:
    try:
        return Path(path).open("rb")
    except OSError as exc:
        raise UsageProblem(f"{path}: cannot be read ({exc.strerror})") from None


def _name(source: str) -> str:
    return "stdin" if source == "-" else source
