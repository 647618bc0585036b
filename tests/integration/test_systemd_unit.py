"""etc/txmta.service as systemd would run it, without systemd: its ExecStart command line
as written (the installed twistd and configuration path replaced by this checkout's and the
test's) serves SMTP in the foreground, logging to standard output; its ExecReload
($MAINPID filled in) is a SIGHUP, which reopens the mail log and reloads."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from itlib import REPO, make_daemon, read_banner, submit, wait_until

pytestmark = pytest.mark.integration

UNIT = REPO / "etc" / "txmta.service"


def directives(section: str) -> dict[str, list[str]]:
    """The unit's `section` as {key: [values in order]} (systemd allows repeated keys)."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        if current == section:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def banner(port: int) -> bool:
    try:
        return read_banner("127.0.0.1", port).startswith(b"220 ")
    except OSError:
        return False


def test_the_unit_says_what_the_server_needs() -> None:
    service = directives("Service")
    assert service["Type"] == ["simple"]            # twistd --nodaemon: the main process
    assert service["Restart"] == ["on-failure"]
    assert "User" not in service                     # the master binds port 25 as root
    caps = service["CapabilityBoundingSet"][0].split()
    assert {"CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID", "CAP_KILL"} <= set(caps)
    assert service["ReadWritePaths"][0].split() == ["/var/spool/txmta", "/var/log/txmta"]
    assert directives("Install")["WantedBy"] == ["multi-user.target"]


def test_execstart_as_written_serves_smtp_and_execreload_is_a_sighup(tmp_path: Path) -> None:
    service = directives("Service")
    argv = shlex.split(service["ExecStart"][0])
    assert argv[0] == "/opt/txmta/bin/twistd" and argv[-2:] == ["--config", "/etc/txmta/txmta.toml"]
    d = make_daemon(tmp_path, server={"workers": 2})
    twistd = Path(sys.executable).with_name("twistd")
    if not twistd.exists():
        pytest.skip(f"no twistd beside {sys.executable}")
    argv = [str(twistd)] + argv[1:-1] + [str(d.config_path)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = open(d.dir / "stdout", "wb")
    proc = subprocess.Popen(argv, cwd="/", env=env, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT)
    out.close()
    log = lambda: (d.dir / "stdout").read_text(errors="replace")    # noqa: E731
    try:
        wait_until(lambda: proc.poll() is not None or banner(d.port), 20, "the banner",
                   diagnose=log)
        assert proc.poll() is None, log()
        assert not (Path("/") / "twistd.pid").exists()     # --pidfile= : none written
        mid = submit(d, "app@example.com", ["rcpt@example.org"], b"Subject: unit\r\n\r\nhi\r\n")
        wait_until(lambda: f"{mid}: received" in d.maillog(), 10, "the mail log line",
                   diagnose=log)
        assert "worker 1 started" in log()      # the daemon's log: standard output
        # ExecReload with $MAINPID filled in, as systemd runs it
        reload = shlex.split(service["ExecReload"][0].replace("$MAINPID", str(proc.pid)))
        d.maillog_path.rename(d.maillog_path.with_name("mail.log.1"))
        assert subprocess.run(reload, timeout=10).returncode == 0
        wait_until(lambda: log().count("SIGHUP: reloading") == 2
                   and log().count("reopened") == 2, 20,
                   "both workers reloaded and reopened the mail log", diagnose=log)
        later = submit(d, "app@example.com", ["rcpt@example.org"], b"Subject: 2\r\n\r\nhi\r\n")
        wait_until(lambda: f"{later}: received" in d.maillog(), 10, "a line in the new file",
                   diagnose=log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)      # what systemd's stop sends (KillMode=mixed)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    assert proc.returncode in (0, -signal.SIGTERM), log()[-3000:]
