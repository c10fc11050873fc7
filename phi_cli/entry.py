"""The `phi` console script. It sets up signals and the standard streams before importing anything heavy.

Importing the CLI imports torch, which takes seconds; a Ctrl-C or SIGTERM in that time must still end in one
line, not a traceback. So this module imports only the standard library, and imports the CLI inside ``main``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable

# Signals that end phi. Once the CLI is imported, an exception unwinds the stack so that `finally` blocks (a
# half-written `phi convert` staging folder) clean up: KeyboardInterrupt for SIGINT, Terminated for the others.
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
INTERNAL_ERROR = 70  # EX_SOFTWARE: a bug in phi (or a broken installation), not in what the user asked


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived. A BaseException, like KeyboardInterrupt, so that no `except Exception`
    swallows it on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# The ending signals that arrived. The exception a handler raises can be replaced on its way out: C code that
# called back into Python (torch, safetensors) may report its own error instead. This list still tells.
received: list[int] = []


def ending(signum: int) -> tuple[str, int]:
    """The one-line message and the exit code for a run that ``signum`` ended."""
    if signum == signal.SIGINT:
        return "interrupted", 130
    return f"terminated by {signal.Signals(signum).name}", 128 + signum  # the shell's convention: 143, 129


def raise_ending(signum: int, _frame: object) -> None:
    received.append(signum)
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def exit_at_once(signum: int, _frame: object) -> None:
    """While the CLI imports, and once the command has ended, there is nothing to clean up (and an exception
    raised inside torch's import can abort the process: C++ code calling back into Python), so leave at once,
    with the same one line."""
    message, code = ending(signum)
    newline = "\n" if os.isatty(2) else ""  # end the line the terminal's ^C echo is on
    with contextlib.suppress(OSError):  # stderr closed: the exit code still tells
        os.write(2, f"{newline}error: {message}\n".encode())
    os._exit(code)


def install_signal_handlers(at_once: bool = False) -> None:
    """Handlers for SIGINT, SIGTERM and SIGHUP (those the parent left ignored stay ignored: `nohup phi ...`):
    :func:`exit_at_once` with ``at_once`` (importing, or the command over), else :func:`raise_ending`."""
    for signum in ENDING_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, exit_at_once if at_once else raise_ending)


def main() -> None:
    """Run the `phi` command: ``phi --help`` lists the subcommands."""
    install_signal_handlers(at_once=True)
    if not _is_open(1):
        _print_error("stdout is closed (results are written there; redirect it to a file or /dev/null instead)")
        sys.exit(1)
    _replace_missing_streams()
    try:
        from phi_cli.main import app
    except Exception as exc:  # a broken installation is one line too
        if os.environ.get("PHI_DEBUG"):
            raise
        _print_error(f"internal error: cannot load the CLI: {type(exc).__name__}: {exc} (PHI_DEBUG=1 shows where)")
        sys.exit(INTERNAL_ERROR)
    install_signal_handlers()
    code = _run_cli(app)
    # The command is over: a signal now (a Ctrl-C while the last output flushes) must not raise out of the
    # interpreter's exit as a traceback.
    install_signal_handlers(at_once=True)
    sys.exit(_flush_stdout(code))


def _run_cli(app: Callable[[], object]) -> int:
    """The exit code of the CLI (PhiGroup turns errors into one line; an interrupt can come before it runs)."""
    try:
        app()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except KeyboardInterrupt:
        message, code = ending(signal.SIGINT)
    except Terminated as exc:
        message, code = ending(exc.signum)
    else:
        return 0
    _print_error(message)
    return code


def _flush_stdout(code: int) -> int:
    """Flush stdout, then point fd 1 at /dev/null if it failed, so the interpreter's own flush at exit has
    nothing left to fail on (it would print "Exception ignored ... BrokenPipeError")."""
    try:
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        pass  # the reader went away: what it read was all it wanted
    except OSError as exc:  # a full disk, for one
        if code == 0:
            _print_error(f"cannot write to stdout: {exc.strerror or exc}")
            code = 1
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    return code


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _replace_missing_streams() -> None:
    """A closed stdin or stderr (`<&-`, `2>&-`) reads as empty and writes nowhere, instead of failing later."""
    if sys.stdin is None:
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 (lives as long as the process)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115


def _print_error(message: str) -> None:
    if sys.stderr is not None:
        print(f"error: {message}", file=sys.stderr, flush=True)
