"""The mail log for operators, against running daemons: fail2ban's filter
(etc/fail2ban/filter.d/txmta.conf) matches the line a real failed AUTH writes, checked with
fail2ban-regex (Debian's fail2ban, installed by `make debs`); a successful AUTH shows as
sasl_username= on the received line; the mail log file is reopened on SIGUSR1 and SIGHUP
after logrotate renamed it, with one worker and with two (each writes its own lines)."""

from __future__ import annotations

import base64
import shutil
import signal
import smtplib
import subprocess
from pathlib import Path

import pytest

from itlib import OTHER_IP, REPO, USERS, Daemon, make_daemon, queued_id, submit, wait_until

pytestmark = pytest.mark.integration

FILTER = REPO / "etc" / "fail2ban" / "filter.d" / "txmta.conf"


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_fail2ban_matches_the_failed_auth_line_and_sasl_username_is_on_the_received_line(
        start_daemon, users_file: Path) -> None:
    exe = shutil.which("fail2ban-regex")
    if exe is None:
        pytest.skip("fail2ban-regex is not installed (make debs)")
    d: Daemon = start_daemon(listeners=[{"tls": "none", "auth": "optional"}],
                             auth={"users": str(users_file)})
    with smtplib.SMTP(d.host, d.port, timeout=10, source_address=(OTHER_IP, 0)) as s:
        s.ehlo("attacker.test.invalid")
        for guess in ("guess-one", "guess-two"):
            code, _ = s.docmd("AUTH", "PLAIN " + plain("alice", guess))
            assert code == 535
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.ehlo("client.test.invalid")
        code, _ = s.docmd("AUTH", "PLAIN " + plain("alice", USERS["alice"]))
        assert code == 235
        s.mail("app@example.com")
        s.rcpt("someone@example.org")
        code, reply = s.data(b"Subject: authed\r\n\r\nhi\r\n")
        assert code == 250, reply
        mid = queued_id(reply)
    log = wait_until(lambda: (lambda t: t if t.count("AUTH failed") == 2
                              and f"{mid}: received" in t else None)(d.maillog()),
                     10, "two AUTH failures and the received line", diagnose=d.diagnostics)
    assert f"AUTH failed: client=[{OTHER_IP}] mechanism=PLAIN user=alice" in log
    assert "guess" not in log and USERS["alice"] not in log     # never a password
    received = next(line for line in log.splitlines() if f"{mid}: received" in line)
    assert received.endswith(" sasl_username=alice"), received
    out = subprocess.run([exe, str(d.maillog_path), str(FILTER)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "Failregex: 2 total" in out.stdout, out.stdout
    assert f"{OTHER_IP}" in subprocess.run(
        [exe, "--print-all-matched", str(d.maillog_path), str(FILTER)], capture_output=True,
        text=True, timeout=60).stdout
    assert "127.0.0.1" not in out.stdout.split("Failregex:")[1].split("Ignoreregex")[0]


def daemon_log(d: Daemon) -> str:
    rotated = d.log_path.with_name(d.log_path.name + ".1")
    return (rotated.read_text(errors="replace") if rotated.exists() else "") + d.log()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGHUP], ids=["USR1", "HUP"])
def test_the_mail_log_file_is_reopened_after_logrotate_renamed_it(
        tmp_path: Path, signum: int, workers: int) -> None:
    d = make_daemon(tmp_path, server={"workers": workers})
    d.start()
    try:
        first = submit(d, "app@example.com", ["a@example.org"], b"Subject: 1\r\n\r\nx\r\n")
        wait_until(lambda: f"{first}: received" in d.maillog(), 10, "the first line",
                   diagnose=d.diagnostics)
        rotated = d.maillog_path.with_name("mail.log.1")
        d.maillog_path.rename(rotated)
        assert d.proc is not None
        d.proc.send_signal(signum)
        # each worker says so in the daemon's log once it writes to the new file (SIGUSR1
        # also rotates twistd's own log file, as twistd always did: read both)
        wait_until(lambda: daemon_log(d).count("reopened") >= workers, 20,
                   f"{workers} reopened mail log(s)", diagnose=d.diagnostics)
        later = [submit(d, "app@example.com", ["b@example.org"], f"Subject: {k}\r\n\r\ny\r\n")
                 for k in range(2 * workers)]
        wait_until(lambda: all(f"{m}: received" in d.maillog() for m in later), 10,
                   "the later lines in the new file", diagnose=d.diagnostics)
        old = rotated.read_text()
        assert f"{first}: received" in old
        assert not any(m in old for m in later)
        assert d.running
    finally:
        d.stop()
