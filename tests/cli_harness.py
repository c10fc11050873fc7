"""Run the installed `phi` as a real process: each of stdin/stdout/stderr a pseudo-terminal, a pipe or a file,
with real signals, a reader that hangs up (`| head -1`), a closed stdout (`>&-`) and a full one (`> /dev/full`).

Typer's CliRunner swaps ``sys.stdout`` for a buffer, so it cannot see what a terminal or a pipeline sees; this
harness can. Every wait is bounded: a process still running at its timeout is killed and the test fails with
what it had printed so far.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import pytest

# The console script pip installed beside this interpreter: what a user runs.
PHI = Path(sys.executable).parent / "phi"
COLUMNS, ROWS = 120, 40
# Variables that change what Rich prints or how phi behaves; each run starts without them.
CLEARED_ENV = ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "PHI_DEBUG")

Stdin = Literal["tty", "devnull"] | str | bytes
Stdout = Literal["tty", "pipe", "closed", "full"] | Path
Stderr = Literal["tty", "pipe"]


@dataclass
class Result:
    """What a run left behind; terminal output has its "\\r\\n" turned back into "\\n"."""

    returncode: int
    stdout: str
    stderr: str
    raw_stdout: bytes
    raw_stderr: bytes


@dataclass
class Signal:
    """Send ``signum`` once ``when`` (seconds after the start, or a predicate polled every few ms) is due."""

    signum: int
    when: float | Callable[[], bool]


def run_phi(
    args: list[str | bytes],
    *,
    stdin: Stdin = "tty",
    stdout: Stdout = "pipe",
    stderr: Stderr = "pipe",
    head: int | None = None,
    send: Signal | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 90.0,
) -> Result:
    """Run ``phi *args`` and wait for it. Bytes arguments reach the process as they are, as from a shell; a
    str or bytes ``stdin`` is piped in, then closed; ``head=N`` reads N lines of a piped stdout and then closes
    the read end, as ``| head -N`` does."""
    if not PHI.exists():
        pytest.skip(f"no console script at {PHI}: pip install -e . first")
    streams = _Streams(stdin, stdout, stderr)
    try:
        process = subprocess.Popen(
            [str(PHI), *args],
            stdin=streams.child_stdin,
            stdout=streams.child_stdout,
            stderr=streams.child_stderr,
            env=_environment(env),
            start_new_session=True,  # its own process group, so a timeout can kill everything it started
            preexec_fn=_close_stdout if stdout == "closed" else _as_from_a_terminal,
        )
    finally:
        streams.close_child_ends()
    deadline = time.monotonic() + timeout
    try:
        streams.start(process, stdin, head)
        _deliver(process, send, deadline)
        returncode = process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        _kill(process)
        streams.finish()
        raise AssertionError(f"phi {args} still running after {timeout} s; stderr: {streams.err!r}") from None
    except BaseException:
        _kill(process)
        streams.finish()
        raise
    streams.finish()
    raw_out = stdout.read_bytes() if isinstance(stdout, Path) else streams.out
    return Result(returncode, _text(raw_out), _text(streams.err), raw_out, streams.err)


def _environment(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    env.update(TERM="xterm-256color", HF_HUB_OFFLINE="1")
    env.update(extra or {})
    return env


def _as_from_a_terminal() -> None:
    """Runs in the child just before exec: the ending signals at their defaults, as a shell in a terminal starts a
    command. Under `nohup` (a test run started so) SIGHUP would arrive ignored, and phi keeps an ignored signal
    ignored, by design."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def _close_stdout() -> None:
    _as_from_a_terminal()
    os.close(1)  # runs in the child just before exec: `phi ... >&-`


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n")


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _deliver(process: subprocess.Popen, send: Signal | None, deadline: float) -> None:
    """Wait until ``send`` is due, then send it; fail if phi ends first."""
    if send is None:
        return
    started = time.monotonic()
    while process.poll() is None and time.monotonic() < deadline:
        if send.when() if callable(send.when) else time.monotonic() - started >= send.when:
            process.send_signal(send.signum)
            return
        time.sleep(0.005)
    if process.poll() is None:
        raise subprocess.TimeoutExpired(process.args, deadline - started)
    raise AssertionError(f"phi exited ({process.returncode}) before the signal was due")


class _Streams:
    """The three standard streams of one run: the ends the child gets, and threads draining what it writes."""

    def __init__(self, stdin: Stdin, stdout: Stdout, stderr: Stderr) -> None:
        self._child_fds: list[int] = []  # terminal ends the child inherits; closed here once it has them
        self._files: list[BinaryIO] = []  # files the child writes to (/dev/full, a result file)
        self._masters: dict[str, int] = {}  # our ends of the terminals, by stream name
        self._threads: list[threading.Thread] = []
        self.out, self.err = b"", b""
        self.child_stdin = self._terminal("in") if stdin == "tty" else _STDIN_MODES.get(stdin, subprocess.PIPE)
        self.child_stdout = self._stdout_end(stdout)
        self.child_stderr = self._terminal("err") if stderr == "tty" else subprocess.PIPE

    def _terminal(self, name: str) -> int:
        master, child = os.openpty()
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self._masters[name] = master
        self._child_fds.append(child)
        return child

    def _stdout_end(self, stdout: Stdout) -> int | BinaryIO | None:
        if stdout == "tty":
            return self._terminal("out")
        if stdout == "closed":
            return None  # inherited, then closed by _close_stdout
        if stdout == "pipe":
            return subprocess.PIPE
        self._files.append(open("/dev/full" if stdout == "full" else stdout, "wb"))  # noqa: SIM115
        return self._files[-1]

    def close_child_ends(self) -> None:
        for fd in self._child_fds:
            os.close(fd)
        for handle in self._files:
            handle.close()

    def start(self, process: subprocess.Popen, stdin: Stdin, head: int | None) -> None:
        if process.stdin is not None:
            self._spawn(_feed, process.stdin, stdin.encode() if isinstance(stdin, str) else stdin)
        for name in ("out", "err"):
            if name in self._masters:
                self._spawn(self._drain_terminal, name)
            elif getattr(process, f"std{name}") is not None:
                self._spawn(self._drain_pipe, getattr(process, f"std{name}"), name, head if name == "out" else None)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _drain_terminal(self, name: str) -> None:
        chunks = []
        while True:
            try:
                chunk = os.read(self._masters[name], 65536)
            except OSError:  # EIO: every process has closed the terminal's other end
                break
            if not chunk:
                break
            chunks.append(chunk)
        setattr(self, name, b"".join(chunks))

    def _drain_pipe(self, pipe: BinaryIO, name: str, head: int | None) -> None:
        if head is None:
            setattr(self, name, pipe.read())
        else:
            setattr(self, name, b"".join(pipe.readline() for _ in range(head)))
        pipe.close()  # `| head -N`: the reader goes away

    def finish(self) -> None:
        for thread in self._threads:
            thread.join(timeout=10)
        for master in self._masters.values():
            os.close(master)
        self._masters.clear()


_STDIN_MODES = {"devnull": subprocess.DEVNULL}


def _feed(pipe: BinaryIO, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except BrokenPipeError:
        pass  # phi did not read it all, which is its right
