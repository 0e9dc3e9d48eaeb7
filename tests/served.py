"""Shardon as a user runs it: ``shardon serve`` in a subprocess, and a command in a pseudo-terminal.

`serving` starts gateways on free ports with their data (request log, lifecycle state) in a
temporary folder and stops them (SIGTERM: they drain and stop their backends) at the end.
`Terminal` runs a command with a pseudo-terminal as its stdin/stdout/stderr, as in a shell.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.conftest import free_port, wait_until

Start = Callable[..., tuple[subprocess.Popen[bytes], int]]


def health(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _up(port: int) -> bool:
    try:
        return health(port) == 200
    except OSError:
        return False


@contextlib.contextmanager
def serving(tmp_path: Path) -> Iterator[Start]:
    """``start(*args, env=...)`` → (process, port). By default without the demo models and with an
    empty ``models_dir``, so the built-in mock serves; ``env`` overrides that. The gateway's log is
    ``tmp_path/serve-N.log``."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        log_path = tmp_path / f"serve-{len(procs)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "shardon", "serve", "--port", str(port), *args],
                env={
                    **os.environ,
                    "XDG_DATA_HOME": str(tmp_path),
                    "SHARDON_DEMO": "false",
                    "SHARDON_MODELS_DIR": str(tmp_path / "no-models"),
                    **(env or {}),
                },
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        procs.append(proc)
        wait_until(lambda: _up(port) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, log_path.read_text()
        return proc, port

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()  # drains and stops the backends it started
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.wait(10)


class Terminal:
    """A command whose stdin, stdout and stderr are a pseudo-terminal; what it printed is kept, with
    the time each piece was read."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        master, slave = os.openpty()
        self.fd = master
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True, close_fds=True
        )
        os.close(slave)
        self.reads: list[tuple[float, bytes]] = []

    @property
    def output(self) -> bytes:
        return b"".join(data for _, data in self.reads)

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def expect(self, text: bytes, timeout: float, start: int = 0) -> int:
        """Read until ``text`` appears in the output past offset ``start``; its offset."""
        deadline = time.monotonic() + timeout
        while (at := self.output.find(text, start)) < 0:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"{text!r} not printed within {timeout}s; output: {self.output!r}")
        return at

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the command exited and the terminal is closed
            return False
        if data:
            self.reads.append((time.monotonic(), data))
        return bool(data)

    def wait(self, timeout: float) -> int:
        """The exit status, once the command has ended (what it printed last is read)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.05)
        while self._read(0.05):
            pass
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        os.close(self.fd)
