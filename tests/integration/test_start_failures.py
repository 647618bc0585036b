"""Start failures with a real twistd: one line naming the key, the value and the reason, and
a non-zero exit, never a traceback and a daemon that runs without a listener or a spool.
Loopback only."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from itlib import make_daemon

pytestmark = pytest.mark.integration


def start_fails(d) -> str:
    """Start `d`, which must exit non-zero before its banner; its stdout and stderr."""
    with pytest.raises(RuntimeError):
        d.start(timeout=20)
    assert d.proc is not None and d.proc.returncode not in (0, None)
    return (d.dir / "twistd.stdout").read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_listener_that_cannot_listen_stops_the_start_with_one_line(tmp_path: Path, workers):
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        d = make_daemon(tmp_path, listeners=[{"address": f"127.0.0.1:{port}", "tls": "none"}],
                        server={"workers": workers})
        out = start_fails(d)
    assert f'listen[0].address = "127.0.0.1:{port}": cannot listen: Address already in use' \
        in out, out
    assert "Traceback" not in out + d.log()
    assert len([line for line in out.splitlines() if "listen[0]" in line]) == 1


def test_a_spool_that_cannot_be_used_stops_the_start_with_one_line(tmp_path: Path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    d = make_daemon(tmp_path, spool_path=blocker / "spool")
    out = start_fails(d)
    assert f'spool.path = "{blocker / "spool"}": cannot use {blocker / "spool"}: ' \
        "Not a directory" in out, out
    assert "Traceback" not in out + d.log()
