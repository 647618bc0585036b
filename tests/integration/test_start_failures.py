"""Start failures with a real twistd: one line naming the key, the value and the reason, and
a non-zero exit, never a traceback and a daemon that runs without a listener or a spool.
Loopback only."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from itlib import REPO, make_daemon

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


def check_config(path: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("txmta")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([str(exe), "check-config", str(path)], env=env, capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_check_config_runs_the_start_checks_and_reports_every_error(tmp_path: Path):
    """The command, as an operator runs it before a start: two bad keys, a busy listener and a
    spool under a file are four lines; with the daemon of that configuration running, its
    listeners are not reported as busy."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        conf = tmp_path / "t.toml"
        conf.write_text(f'[server]\nhostname = "mx.example.org"\nmax_errors = 0\n'
                        f'[retry]\nschedule = ["soon"]\n[spool]\npath = "{blocker}/spool"\n'
                        f'[[listen]]\naddress = "127.0.0.1:{port}"\n')
        p = check_config(conf)
    assert p.returncode == 1 and p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 4, p.stderr
    assert lines[0].startswith(f"{conf}: server.max_errors = 0: ")
    assert lines[1].startswith(f'{conf}: retry.schedule = ["soon"]: ')
    assert lines[2].startswith(f'{conf}: spool.path = "{blocker}/spool": cannot write')
    assert lines[3] == (f'{conf}: listen[0].address = "127.0.0.1:{port}": cannot listen: '
                        "Address already in use")
    d = make_daemon(tmp_path)
    d.start()
    try:
        p = check_config(d.config_path)
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith(f"{d.config_path}: OK")
    finally:
        d.stop()
