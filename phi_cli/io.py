"""Reading inputs (argument, stdin, JSONL) and writing results (plain text, JSONL) for the commands."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from phi_cli.errors import UsageProblem

stderr = Console(stderr=True)


def stdout_console() -> Console:
    """A console for results on stdout; wide when stdout is a file or pipe, so tables are not squeezed."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=160)


def read_jsonl(source: str, field: str) -> list[dict[str, Any]]:
    """Records of a JSONL file (``-`` = stdin), each an object with a string ``field``; blank lines skipped."""
    handle = sys.stdin if source == "-" else _open(source)
    records = []
    with handle if source != "-" else _nullcontext(handle):
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageProblem(f"{_name(source)} line {number}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise UsageProblem(f"{_name(source)} line {number}: expected an object with a string {field!r}")
            records.append(record)
    if not records:
        raise UsageProblem(f"{_name(source)}: no records")
    return records


def texts_from_stdin_lines() -> list[str]:
    """Non-empty lines of stdin (trailing newline removed)."""
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


def stdin_is_piped() -> bool:
    return sys.stdin is not None and not sys.stdin.isatty()


def write_json_line(record: dict[str, Any], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()


@contextmanager
def progress_bar(total: int, description: str, enabled: bool) -> Iterator[Any]:
    """A Rich progress bar on stderr, or a no-op when disabled or stderr is not a terminal."""
    if not enabled or not stderr.is_terminal:
        yield lambda advance=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda advance=1: progress.advance(task, advance)


def _open(path: str) -> TextIO:
    try:
        return Path(path).open(encoding="utf-8")
    except OSError as exc:
        raise UsageProblem(f"{path}: cannot be read ({exc.strerror})") from None


def _name(source: str) -> str:
    return "stdin" if source == "-" else source


@contextmanager
def _nullcontext(value: TextIO) -> Iterator[TextIO]:
    yield value
