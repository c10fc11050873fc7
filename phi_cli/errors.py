"""Exceptions become one-line messages on stderr in one place, with the exit code each kind deserves.

Set ``PHI_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from phi_core.errors import PhiError


class UsageProblem(Exception):
    """Bad command-line input that the option parser could not catch (exit code 2)."""


# (exception type, exit code): first match wins.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (UsageProblem, 2),
    (ValueError, 2),
    (PhiError, 1),
    (OSError, 1),
    (MemoryError, 1),
    (RuntimeError, 1),
)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    sys.exit(code)


def exit_code_for(exc: BaseException) -> int | None:
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return None


def message_of(exc: BaseException) -> str:
    if isinstance(exc, typer.TyperException):
        return exc.format_message()
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split("\n"))


class PhiGroup(TyperGroup):
    """The root command: runs subcommands without click's own error printing, so errors stay one line."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except BrokenPipeError:
            # The reader went away (`phi generate ... | head -1`): stop quietly.
            sys.stderr.close()
            sys.exit(0)
        except (KeyboardInterrupt, typer.Abort):
            fail("interrupted", 130)
        except typer.TyperException as exc:  # the parser's usage errors
            message = message_of(exc)
            if not message.strip():  # `phi` alone: the help was printed, nothing went wrong
                sys.exit(0)
            fail(message, exc.exit_code)
        except Exception as exc:
            code = exit_code_for(exc)
            if code is None or os.environ.get("PHI_DEBUG"):
                raise
            fail(message_of(exc), code)
        code = result if isinstance(result, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code
