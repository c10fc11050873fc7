"""Exceptions become one-line messages on stderr in one place, with the exit code each kind deserves.

Set ``PHI_DEBUG=1`` to see the traceback instead. An exception nobody expected is still one line, an
"internal error" with exit code 70 (EX_SOFTWARE), rather than a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click
import typer
from typer.core import TyperGroup

from phi_cli import entry
from phi_cli.entry import INTERNAL_ERROR, Terminated
from phi_core.errors import PhiError


class UsageProblem(Exception):
    """Bad command-line input that the option parser could not catch (exit code 2)."""


class ReaderGone(Exception):
    """stdout's reader went away (`phi ... | head -1`). Not an OSError, so that click's own EPIPE handling (exit
    code 1) never sees it."""


class Interrupted(Exception):
    """Ctrl-C while a command ran; raised in place of KeyboardInterrupt so that click prints nothing of its own."""


# (exception type, exit code): first match wins; the last row catches what nobody expected.
USAGE_ERROR = 2  # what the user typed is wrong: the message says what, a traceback would add nothing
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (UsageProblem, USAGE_ERROR),
    (ValueError, USAGE_ERROR),  # UnicodeError too: text that cannot be read as the input it should be
    (PhiError, 1),
    (OSError, 1),
    (MemoryError, 1),
    (RuntimeError, 1),  # torch's errors: out of memory on a device, a kernel missing for a dtype
    (Exception, INTERNAL_ERROR),
)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    sys.exit(code)


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code for ``exc`` from :data:`EXIT_CODES`; None for what is not an Exception (SystemExit...)."""
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return None


def message_of(exc: BaseException) -> str:
    """``exc`` as one line; an unexpected exception says it is a bug and how to see its traceback."""
    if isinstance(exc, typer.TyperException):
        return exc.format_message()
    text = " ".join(str(exc).strip().split("\n"))
    if exit_code_for(exc) == INTERNAL_ERROR:
        detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        return f"internal error: {detail}"
    return text or type(exc).__name__


DEBUG_HINT = "PHI_DEBUG=1 shows the traceback"


def with_debug_hint(message: str) -> str:
    """An error message that says how to see where it came from (usage errors need no traceback and get none)."""
    return message if DEBUG_HINT in message else f"{message} ({DEBUG_HINT})"


class PhiGroup(TyperGroup):
    """The root command: runs subcommands without click's own error printing, so errors stay one line."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except ReaderGone:
            sys.exit(0)  # `phi ... | head -1`: the reader has what it wanted; stop quietly, as Unix tools do
        except Interrupted:
            if sys.stderr.isatty():
                sys.stderr.write("\n")  # end the line the terminal's ^C echo is on
            fail("interrupted", 130)
        except typer.Abort:
            fail("interrupted", 130)
        except Terminated as exc:
            fail(*entry.ending(exc.signum))
        except typer.TyperException as exc:  # the parser's usage errors
            message = message_of(exc)
            if not message.strip():  # `phi` alone: the help was printed, nothing went wrong
                sys.exit(0)
            fail(message, exc.exit_code)
        except Exception as exc:
            if entry.received:  # the signal's exception, replaced on its way out by C code's own error
                fail(*entry.ending(entry.received[0]))
            if os.environ.get("PHI_DEBUG"):
                raise
            code = exit_code_for(exc) or INTERNAL_ERROR
            fail(message_of(exc) if code == USAGE_ERROR else with_debug_hint(message_of(exc)), code)
        code = result if isinstance(result, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise ReaderGone() from None
        except KeyboardInterrupt:
            raise Interrupted() from None
