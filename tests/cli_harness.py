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
from typing import Literal

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
    """Run ``phi *args`` (bytes arguments go to the process as they are, like a shell's); a str/bytes ``stdin``
    is piped in and closed. ``head=N`` reads N lines of a piped
    stdout and then closes the read end, as ``| head -N`` does."""
    streams = _Streams(stdin, stdout, stderr)
    try:
        process = subprocess.Popen(
            [str(PHI), *args],
            stdin=streams.child_stdin,
            stdout=streams.child_stdout,
            stderr=streams.child_stderr,
            env=_environment(env),
            start_new_session=True,  # its own process group, so a timeout can kill everything it started
            preexec_fn=_close_stdout if stdout == "closed" else None,
        )
    finally:
        streams.close_child_ends()
    deadline = time.monotonic() + timeout
    try:
        streams.start(process, stdin, head)
        _deliver(process, send, deadline)
        returncode = process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        streams.finish()
        raise AssertionError(f"phi {args} still running after {timeout} s; stderr: {streams.err!r}") from None
    streams.finish()
    raw_out = stdout.read_bytes() if isinstance(stdout, Path) else streams.out
    return Result(returncode, _text(raw_out), _text(streams.err), raw_out, streams.err)


def _environment(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    env.update(TERM="xterm-256color", HF_HUB_OFFLINE="1")
    env.update(extra or {})
    return env


def _close_stdout() -> None:
    os.close(1)  # runs in the child just before exec: `phi ... >&-`


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n")


def _deliver(process: subprocess.Popen, send: Signal | None, deadline: float) -> None:
    if send is None:
        return
    started = time.monotonic()
    while process.poll() is None and time.monotonic() < deadline:
        due = send.when() if callable(send.when) else time.monotonic() - started >= send.when
        if due:
            process.send_signal(send.signum)
            return
        time.sleep(0.005)
    if process.poll() is None:
        raise subprocess.TimeoutExpired(process.args, deadline - started)
    raise AssertionError(f"phi exited ({process.returncode}) before the signal was due")


class _Streams:
    """The three standard streams of one run: what the child gets, and readers that drain what it writes."""

    def __init__(self, stdin: Stdin, stdout: Stdout, stderr: Stderr) -> None:
        self._child_ends: list[int] = []
        self._threads: list[threading.Thread] = []
        self._stdin_master: int | None = None
        self.out, self.err = b"", b""
        self.child_stdin = self._stdin_end(stdin)
        self.child_stdout = self._stdout_end(stdout)
        self._err_master = self._terminal() if stderr == "tty" else None
        self.child_stderr = self._child_ends[-1] if stderr == "tty" else subprocess.PIPE

    def _terminal(self) -> int:
        master, child = os.openpty()
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self._child_ends.append(child)
        return master

    def _stdin_end(self, stdin: Stdin) -> int:
        if stdin == "tty":
            self._stdin_master = self._terminal()
            return self._child_ends[-1]
        if stdin == "devnull":
            return subprocess.DEVNULL
        return subprocess.PIPE

    def _stdout_end(self, stdout: Stdout) -> int | object:
        self._out_master = None
        if stdout == "tty":
            self._out_master = self._terminal()
            return self._child_ends[-1]
        if stdout == "full":
            self._full = open("/dev/full", "wb")  # noqa: SIM115 (closed in close_child_ends)
            return self._full
        if isinstance(stdout, Path):
            self._file = stdout.open("wb")
            return self._file
        return None if stdout == "closed" else subprocess.PIPE

    def close_child_ends(self) -> None:
        for fd in self._child_ends:
            os.close(fd)
        for name in ("_full", "_file"):
            if hasattr(self, name):
                getattr(self, name).close()

    def start(self, process: subprocess.Popen, stdin: Stdin, head: int | None) -> None:
        if isinstance(stdin, str | bytes) and stdin != "tty" and stdin != "devnull":
            data = stdin.encode() if isinstance(stdin, str) else stdin
            self._spawn(_feed, process.stdin, data)
        if self._out_master is not None:
            self._spawn(self._drain_terminal, self._out_master, "out")
        elif process.stdout is not None:
            self._spawn(self._drain_pipe, process.stdout, "out", head)
        if self._err_master is not None:
            self._spawn(self._drain_terminal, self._err_master, "err")
        else:
            self._spawn(self._drain_pipe, process.stderr, "err", None)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _drain_terminal(self, master: int, name: str) -> None:
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        setattr(self, name, b"".join(chunks))

    def _drain_pipe(self, pipe, name: str, head: int | None) -> None:
        if head is None:
            setattr(self, name, pipe.read())
        else:
            setattr(self, name, b"".join(pipe.readline() for _ in range(head)))
        pipe.close()  # `| head -N`: the reader goes away

    def finish(self) -> None:
        for thread in self._threads:
            thread.join(timeout=10)
        if self._stdin_master is not None:
            os.close(self._stdin_master)


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except BrokenPipeError:
        pass  # phi did not read it all, which is its right
