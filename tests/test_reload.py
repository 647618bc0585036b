"""SIGHUP reloads (txmta/reload.py): the configuration is read again and offered to each part;
failures are logged and change nothing; reloads do not overlap; the handler is installed once
the reactor runs and removed at stop.  The signal test sends a real SIGHUP to this process."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.logger import LogLevel, capturedLogs, formatEvent

from txmta import config as C
from txmta.reload import ReloadService


class FakeReactor:
    """callWhenRunning runs at once; callFromThread records and runs, and sets `called`."""

    def __init__(self) -> None:
        self.called = threading.Event()

    def callWhenRunning(self, f: Callable[..., Any], *a: Any) -> None:
        f(*a)

    def callFromThread(self, f: Callable[..., Any], *a: Any) -> None:
        f(*a)
        self.called.set()


class Part:
    """A reloadable part that records what it was given and installed."""

    name = "part"

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.prepared: list[C.Config] = []
        self.installed: list[str | None] = []

    def prepare(self, cfg: C.Config) -> Callable[[], str]:
        self.prepared.append(cfg)
        if self.fail is not None:
            raise self.fail

        def install() -> str:
            self.installed.append(cfg.server.hostname)
            return f"now {cfg.server.hostname}"
        return install


def write_config(path: Path, hostname: str) -> Path:
    path.write_text(f'[server]\nhostname = "{hostname}"\n')
    return path


def messages(events: Any, level: LogLevel | None = None) -> list[str]:
    return [formatEvent(e) for e in events if level is None or e.get("log_level") == level]


def test_reload_reads_the_file_again_and_installs_each_part(tmp_path):
    """A reload loads the file as it is now and installs every part's new state."""
    path = write_config(tmp_path / "t.toml", "one.example")
    a, b = Part(), Part()
    svc = ReloadService(FakeReactor(), str(path), [a, b])
    write_config(path, "two.example")
    with capturedLogs() as events:
        svc.reload()
    assert a.installed == ["two.example"] and b.installed == ["two.example"]
    assert "part: now two.example" in messages(events, LogLevel.info)


def test_unloadable_file_changes_nothing_and_logs_an_error(tmp_path):
    """A syntax error in the file: no part is asked, the error names the file."""
    path = tmp_path / "t.toml"
    path.write_text("[server\n")
    part = Part()
    svc = ReloadService(FakeReactor(), str(path), [part])
    with capturedLogs() as events:
        d = svc.reload()
    assert part.prepared == [] and part.installed == []
    errors = messages(events, LogLevel.error)
    assert len(errors) == 1 and str(path) in errors[0] and "nothing changed" in errors[0]
    assert d.called          # never fails


def test_a_refusing_part_keeps_its_state_and_others_still_reload(tmp_path):
    """One part's ConfigError (or bug) is logged; the other parts still take the new settings."""
    path = write_config(tmp_path / "t.toml", "x.example")
    bad = Part(C.ConfigError.bad_value(str(path), "tls.key", "/k.pem", "does not match"))
    buggy = Part(RuntimeError("boom"))
    good = Part()
    svc = ReloadService(FakeReactor(), str(path), [bad, buggy, good])
    with capturedLogs() as events:
        svc.reload()
    assert bad.installed == [] and buggy.installed == [] and good.installed == ["x.example"]
    errors = messages(events, LogLevel.error)
    assert any('tls.key = "/k.pem": does not match; keeping the running one' in e for e in errors)
    assert any("RuntimeError: boom" in e for e in errors)


def test_reloads_do_not_overlap_and_signals_during_one_give_one_more(tmp_path):
    """While a reload is being prepared, more SIGHUPs coalesce into a single further reload."""
    path = write_config(tmp_path / "t.toml", "x.example")
    pending: list[tuple[Deferred[Any], Callable[[], Any]]] = []

    def run_later(f: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append((d, f))
        return d

    part = Part()
    svc = ReloadService(FakeReactor(), str(path), [part], run_in_thread=run_later)
    svc.reload()
    svc.reload()
    svc.reload()
    assert len(pending) == 1
    d, f = pending.pop()
    d.callback(f())
    assert part.installed == ["x.example"]
    assert len(pending) == 1          # exactly one more
    d, f = pending.pop()
    d.callback(f())
    assert part.installed == ["x.example", "x.example"] and pending == []


def test_without_parts_a_reload_says_what_it_does(tmp_path):
    """With no reloadable parts nothing reloads; the log says so (and SIGHUP does not kill us)."""
    path = write_config(tmp_path / "t.toml", "x.example")
    svc = ReloadService(FakeReactor(), str(path), [])
    with capturedLogs() as events:
        svc.reload()
    assert any("nothing reloads" in m for m in messages(events, LogLevel.info))


def test_sighup_triggers_a_reload_and_stop_restores_the_handler(tmp_path):
    """A real SIGHUP to this process reaches reload() through reactor.callFromThread; after
    stopService the previous handler is back."""
    path = write_config(tmp_path / "t.toml", "sig.example")
    part = Part()
    reactor = FakeReactor()
    seen: list[int] = []
    old_handler_ran = threading.Event()

    def old_handler(signum: int, frame: Any) -> None:
        seen.append(signum)
        old_handler_ran.set()
    previous = signal.signal(signal.SIGHUP, old_handler)
    try:
        svc = ReloadService(reactor, str(path), [part], run_in_thread=lambda f: succeed(f()))
        svc.startService()
        os.kill(os.getpid(), signal.SIGHUP)
        assert reactor.called.wait(10), "the SIGHUP handler did not call the reactor"
        assert part.installed == ["sig.example"]
        assert seen == []            # ours replaced the handler in place before
        svc.stopService()
        os.kill(os.getpid(), signal.SIGHUP)
        assert old_handler_ran.wait(10), "the previous handler was not restored"
        assert seen == [signal.SIGHUP]
        assert part.installed == ["sig.example"]
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_tls_policy_tables_and_level_are_reloaded(tmp_path):
    """TLSPolicyReload puts the new [[tls.policy]] tables and tls_level in place."""
    from twisted.internet.task import Clock

    from txmta.config import load_text
    from txmta.outbound.tlspolicy import TLSPolicy
    from txmta.worker import TLSPolicyReload
    policy = TLSPolicy(Clock(), None, level_for=lambda domain: None, default="auto")
    cfg = load_text('[delivery]\ntls_level = "may"\n'
                    '[[tls.policy]]\ndomain = "bank.example"\nlevel = "verify"\n')
    install = TLSPolicyReload(policy).prepare(cfg)
    assert policy.level("bank.example") == "auto"        # nothing changes before install
    assert "1 [[tls.policy]]" in install()
    assert policy.level("bank.example") == "verify"
    assert policy.level("other.example") == "may"


def test_dkim_keys_are_reloaded_and_a_bad_key_keeps_the_running_ones(tmp_path):
    """SigningReload reads the key files in prepare() (ConfigError when bad: nothing is
    installed) and gives the receiver and the queue the new signer in install()."""
    from types import SimpleNamespace

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from txmta.config import ConfigError, load_text
    from txmta.worker import SigningReload
    key = tmp_path / "k.pem"
    key.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    class Queue:
        sign_report = None

        def set_sign_report(self, sign_report):
            self.sign_report = sign_report

    receiver, queue = SimpleNamespace(signer=None), Queue()
    part = SigningReload(receiver, queue)
    table = f'[[dkim]]\ndomain = "example.com"\nselector = "s1"\nkey = "{key}"\n' \
            'algorithm = "ed25519-sha256"\n'
    install = part.prepare(load_text(table))
    assert receiver.signer is None
    assert "s1._domainkey.example.com" in install()
    assert receiver.signer is not None and queue.sign_report is not None
    signer = receiver.signer
    key.write_text("garbage\n")
    with pytest.raises(ConfigError):
        part.prepare(load_text(table))
    assert receiver.signer is signer
    assert "not signed" in part.prepare(load_text(""))()
    assert receiver.signer is None and queue.sign_report is None


def test_a_reload_reopens_the_mail_log_first_even_when_the_file_does_not_load(tmp_path):
    """SIGHUP reopens the mail log file (logrotate) before it reads the configuration, and
    does so even when the new file is bad; a failing reopen does not stop the reload."""
    path = tmp_path / "t.toml"
    path.write_text("[server\n")
    reopened: list[int] = []
    svc = ReloadService(FakeReactor(), str(path), [Part()], reopen=lambda: reopened.append(1))
    with capturedLogs():
        assert svc.reload().called
    assert reopened == [1]

    def broken() -> None:
        raise OSError("disk gone")
    write_config(path, "mx.example.org")
    part = Part()
    svc = ReloadService(FakeReactor(), str(path), [part], reopen=broken)
    with capturedLogs() as events:
        svc.reload()
    assert len(part.installed) == 1
    assert any("reopening the mail log failed" in m for m in messages(events, LogLevel.critical))
