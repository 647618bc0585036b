"""Privilege drop: with `[server] user`, the master (root) binds the listeners and the
workers run as that user, over a spool that belongs to it.  Runs when the suite runs as
root (CI does); as another user the test cannot switch users and says so."""

from __future__ import annotations

import os
import pwd
import signal
import smtplib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import itlib
from itlib import REPO, make_daemon, queued_id, wait_until
from test_crash_workers import children

pytestmark = pytest.mark.integration

USER = "nobody"


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[2])     # effective uid
    raise AssertionError(f"no Uid in /proc/{pid}/status")


def runnable_python() -> tuple[str, str]:
    """An interpreter the workers' user can execute, and the PYTHONPATH that gives it txmta
    and its dependencies.  This interpreter when the user can run it; else (it lives under
    /root, mode 0700, as a pyenv build does) the system's python of the same version, given
    this interpreter's site-packages: the same CPython ABI, so the compiled modules load."""
    import site
    import sysconfig
    ok = subprocess.run(["runuser", "-u", USER, "--", sys.executable, "-c", "pass"],
                        capture_output=True, cwd="/").returncode == 0
    if ok:
        return sys.executable, str(REPO)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = Path("/usr/bin") / version
    if not system.exists():
        pytest.skip(f"{USER} cannot run {sys.executable} and there is no {system}")
    paths = [str(REPO), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    paths += [p for p in site.getsitepackages() if p not in paths]
    return str(system), os.pathsep.join(dict.fromkeys(paths))


@pytest.fixture
def open_dir(monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory the workers' user can enter (pytest's own are root's, mode 0700)."""
    if os.getuid() != 0:
        pytest.skip("switching users needs root")
    interpreter, path = runnable_python()
    env = dict(os.environ, PYTHONPATH=path)
    probe = subprocess.run(["runuser", "-u", USER, "--", interpreter, "-c", "import txmta.worker"],
                           env=env, capture_output=True, text=True, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"{USER} cannot run {interpreter} with txmta from {REPO}: "
                    f"{probe.stderr.strip()[-200:]}")
    monkeypatch.setattr(itlib, "twistd_command", lambda: [
        interpreter, "-c", "import sys; from twisted.scripts.twistd import run; "
        "sys.argv[0] = 'twistd'; run()"])
    monkeypatch.setenv("PYTHONPATH", path)
    d = Path(tempfile.mkdtemp(prefix="txmta-priv-"))
    d.chmod(0o755)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_run_as_the_configured_user_and_own_the_spool(open_dir: Path, workers: int) -> None:
    nobody = pwd.getpwnam(USER)
    maillog = open_dir / "log"
    maillog.mkdir()
    maillog.chmod(0o777)
    d = make_daemon(open_dir / "daemon", spool_path=open_dir / "spool",
                    server={"workers": workers, "user": USER},
                    log={"maillog": str(maillog / "mail.log")})
    d.start()
    try:
        assert d.proc is not None
        if workers == 1:
            assert uid_of(d.proc.pid) == nobody.pw_uid      # bound as root, then dropped
        else:
            assert uid_of(d.proc.pid) == 0                   # the master stays root
            # a worker answers the banner while the other may still be starting as root:
            # wait until both have dropped to the user (each does before opening the spool)
            kids = wait_until(lambda: (lambda c: c if len(c) == 2 and all(
                uid_of(k) == nobody.pw_uid for k in c) else None)(children(d.proc.pid)),
                20, "two workers running as " + USER)
            assert [uid_of(k) for k in kids] == [nobody.pw_uid, nobody.pw_uid]
        with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as s:
            s.ehlo()
            s.mail("a@example.com")
            s.rcpt("b@example.org")
            code, reply = s.data(b"Subject: y\r\n\r\nhi\r\n")
            assert code == 250, reply
            mid = queued_id(reply)
        assert mid in d.spool_ids()
        for p in [open_dir / "spool", open_dir / "spool" / "data.mdb", open_dir / "spool" / "lock.mdb"]:
            assert p.stat().st_uid == nobody.pw_uid, p
        wait_until(lambda: mid in (maillog / "mail.log").read_text(), 10, "the mail log line")
    finally:
        assert d.stop() in (0, -signal.SIGTERM), d.log()[-2000:]


def test_drop_privileges_leaves_no_way_back(tmp_path: Path) -> None:
    """In a child process (root): after the drop, uid, gid and groups are the user's and
    setuid(0) fails; give_spool hands root's spool files to the user."""
    if os.getuid() != 0:
        pytest.skip("switching users needs root")
    from txmta.tap import give_spool
    from txmta.worker import drop_privileges
    nobody = pwd.getpwnam(USER)
    spool = tmp_path / "spool"
    (spool / "bodies").mkdir(parents=True)
    (spool / "data.mdb").write_bytes(b"")
    give_spool(str(spool), nobody.pw_uid, nobody.pw_gid)
    assert {p.stat().st_uid for p in [spool, spool / "bodies", spool / "data.mdb"]} == {nobody.pw_uid}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:    # the child: report and exit without running pytest's teardown
        os.close(r)
        try:
            drop_privileges((USER, nobody.pw_uid, nobody.pw_gid))
            try:
                os.setuid(0)
                back = "regained root"
            except PermissionError:
                back = "ok"
            msg = f"{os.getuid()} {os.geteuid()} {os.getgid()} {sorted(os.getgroups())} {back}"
        except BaseException as e:
            msg = f"error {e!r}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    groups = sorted({nobody.pw_gid} | {g.gr_gid for g in __import__("grp").getgrall()
                                      if USER in g.gr_mem})
    assert out == f"{nobody.pw_uid} {nobody.pw_uid} {nobody.pw_gid} {groups} ok"
