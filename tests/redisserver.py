"""A real redis-server for the [cluster] tests: started on a free loopback port, without
persistence, stopped at the end (never the system's service).

`RedisServer(port)`: `start()` (waits, bounded, until it answers PING), `stop()` (SIGTERM,
then SIGKILL), `url` (redis://127.0.0.1:PORT/0) and `cli(*args)` (one command through a
plain socket: the reply, decoded simply).  `running()` is the context manager.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _encode(*args: Any) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _read(f: Any) -> Any:
    line = f.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]
        return data.decode()
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read(f) for _ in range(n)]
    raise RuntimeError(f"unexpected reply {line!r}")


class RedisServer:
    def __init__(self, port: int | None = None, workdir: Path | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        if not Path(SERVER).exists():
            pytest.fail("redis-server is not installed (make debs installs it)")
        self.port = port or free_port()
        self.workdir = workdir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        cmd = [SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--protected-mode", "yes", *self.extra]
        self.proc = subprocess.Popen(cmd, cwd=str(self.workdir) if self.workdir else None,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.cli("PING") == "PONG":
                    return self
            except OSError:
                pass
            except RuntimeError as e:       # it answers, and wants a password
                if str(e).startswith("NOAUTH"):
                    return self
                raise
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def cli(self, *args: Any, password: str | None = None) -> Any:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            f = s.makefile("rb")
            if password is not None:
                s.sendall(_encode("AUTH", password))
                _read(f)
            s.sendall(_encode(*args))
            return _read(f)


@contextmanager
def running(**kw: Any) -> Iterator[RedisServer]:
    server = RedisServer(**kw).start()
    try:
        yield server
    finally:
        server.stop()
