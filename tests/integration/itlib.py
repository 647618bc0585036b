"""Helpers for the integration tests: real twistd processes and real sockets, loopback only.

`start_daemon(**overrides)` writes a txmta.toml into a fresh directory under tmp_path
(free ports found by binding port 0 on 127.0.0.1), starts
`twistd -n --pidfile= -l LOG txmta --config FILE` with PYTHONPATH = the repository root,
waits (bounded) for the 220 banner on every listener, and returns a `Daemon`.  Every daemon
still running at teardown gets SIGTERM, then SIGKILL; when the test failed, its twistd log
is printed (pytest shows it under "Captured stdout teardown").

Other helpers: a self-signed certificate for mx.test.invalid made at test time with
`cryptography`, an AUTH users file made with `txmta.passwords.hash_password`, a reader of
the spool through `LmdbView`, and `Received` header helpers.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
HOSTNAME = "mx.test.invalid"
BANNER_TIMEOUT = 20.0
SWAKS = "/usr/bin/swaks"
# the second loopback address the "remote" clients bind to (127.0.0.0/8 is all loopback
# on Linux, so binding to it needs no setup)
OTHER_IP = "127.0.0.66"
RECEIVED_RE = re.compile(
    rb"\AReceived: from (?P<helo>[^ ]+) \(\[(?P<ip>[^\]]+)\]\)\r\n"
    rb"\tby " + HOSTNAME.encode() + rb" \(txmta\) with (?P<proto>[A-Z0-9]+) id (?P<id>\w+)"
    rb"(?P<rest>;?\r\n(?:\t[^\r\n]*\r\n)*)")


# -- helpers -------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def common_free_port(*hosts: str) -> int:
    """A port free on every address in `hosts` (sinks that share one port number)."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {', '.join(hosts)}")


def twistd_command() -> list[str]:
    sibling = Path(sys.executable).with_name("twistd")
    if sibling.exists():
        return [str(sibling)]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; "
            "sys.argv[0] = 'twistd'; run()"]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):   # an inline table, e.g. in policy = [{domain = ..., level = ...}]
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def render_toml(sections: dict[str, dict[str, Any]], listeners: list[dict[str, Any]]) -> str:
    out: list[str] = []
    for name, table in sections.items():
        for t in table if isinstance(table, list) else [table]:   # a list: [[name]] tables
            out.append(f"[[{name}]]" if isinstance(table, list) else f"[{name}]")
            out += [f"{k} = {toml_value(v)}" for k, v in t.items()]
            out.append("")
    for lst in listeners:
        out.append("[[listen]]")
        out += [f"{k} = {toml_value(v)}" for k, v in lst.items()]
        out.append("")
    return "\n".join(out)


def read_banner(host: str, port: int, timeout: float = 5.0, tls_context: Any = None) -> bytes:
    """The first reply line on a fresh connection (over TLS when tls_context is given)."""
    with socket.create_connection((host, port), timeout=timeout) as raw:
        sock: Any = raw
        if tls_context is not None:
            sock = tls_context.wrap_socket(raw, server_hostname=HOSTNAME)
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        try:
            sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        return data


def split_received(body: bytes) -> tuple[re.Match[bytes], bytes]:
    """(match of our Received header at the top, the rest of the stored body)."""
    m = RECEIVED_RE.match(body)
    assert m is not None, f"stored body does not start with our Received header: {body[:400]!r}"
    return m, body[m.end():]


def queued_id(reply: bytes | str) -> str:
    text = reply.decode() if isinstance(reply, bytes) else reply
    m = re.search(r"queued as (\w+)", text)
    assert m is not None, f"no queue id in {text!r}"
    return m.group(1)


# -- the daemon ----------------------------------------------------------------------

@dataclass
class Daemon:
    dir: Path
    config_path: Path
    log_path: Path
    spool_path: Path
    maillog_path: Path
    listeners: list[dict[str, Any]]
    proc: subprocess.Popen[bytes] | None = None
    ports: list[int] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no twistd log: {e})"

    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = BANNER_TIMEOUT) -> "Daemon":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        out = open(self.dir / "twistd.stdout", "ab")
        self.proc = subprocess.Popen(
            twistd_command() + ["-n", "--pidfile=", "-l", str(self.log_path), "txmta",
                                "--config", str(self.config_path)],
            cwd=str(self.dir), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + timeout
        for lst in self.listeners:
            host, port = lst["address"].rsplit(":", 1)
            ctx = None
            if lst.get("tls") == "implicit":
                import ssl
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"twistd exited with {self.proc.returncode} before its banner\n"
                                       + self.diagnostics())
                try:
                    banner = read_banner(host, int(port), timeout=2.0, tls_context=ctx)
                except OSError:
                    banner = b""
                if banner.startswith(b"220 "):
                    break
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"no 220 banner from {lst['address']} within {timeout}s "
                                       f"(got {banner!r})\n" + self.diagnostics())
                time.sleep(0.05)
        return self

    def diagnostics(self) -> str:
        try:
            out = (self.dir / "twistd.stdout").read_text(errors="replace")
        except OSError:
            out = ""
        return (f"--- config {self.config_path}:\n{self.config_path.read_text()}\n"
                f"--- twistd stdout/stderr:\n{out}\n--- twistd log {self.log_path}:\n{self.log()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def view(self) -> Any:
        from txmta.spool.view import LmdbView
        return LmdbView(str(self.spool_path))

    def stored(self, message_id: str) -> tuple[Any, bytes]:
        """(StoredMessage, body) of one message, read through LmdbView."""
        v = self.view()
        try:
            m = v.get(message_id)
            assert m is not None, f"message {message_id} is not in the spool {v.ids()}"
            return m, v.read_body(message_id)
        finally:
            v.close()

    def spool_ids(self) -> list[str]:
        v = self.view()
        try:
            return list(v.ids())
        finally:
            v.close()


def make_daemon(base: Path, *, listeners: list[dict[str, Any]] | None = None,
                spool_path: Path | None = None, **sections: dict[str, Any]) -> Daemon:
    """A `Daemon` (not started) with a config in a fresh directory under `base`.

    `listeners`: [[listen]] tables; an "address" of "127.0.0.1:0" or a missing one gets a
    free port.  `spool_path`: the spool directory (default: a fresh one).  Other keywords: sections to merge over the defaults, e.g.
    relay={"networks": [...]}, log={"format": "json"}."""
    base.mkdir(parents=True, exist_ok=True)
    n = 0
    while (base / f"d{n}").exists():
        n += 1
    d = base / f"d{n}"
    d.mkdir()
    listeners = [dict(lst) for lst in (listeners or [{"tls": "none"}])]
    ports = []
    for lst in listeners:
        addr = lst.get("address", "127.0.0.1:0")
        host, port = addr.rsplit(":", 1)
        if port == "0":
            port = str(free_port(host))
        lst["address"] = f"{host}:{port}"
        ports.append(int(port))
    spool_path = spool_path or d / "spool"
    conf: dict[str, dict[str, Any]] = {
        # one process, as the daemon always was; the worker tests ask for more
        "server": {"hostname": HOSTNAME, "workers": 1},
        "relay": {"networks": ["127.0.0.1/32"]},
        "spool": {"path": str(spool_path)},
        # Never deliver anywhere: a closed loopback port keeps every message queued (deferred)
        # should delivery be switched on.
        "delivery": {"relayhost": f"127.0.0.1:{free_port()}"},
        # and never ask the machine's resolver: tests send traffic to loopback only
        "dns": {"nameservers": ["127.0.0.1:9"]},
        "log": {"maillog": str(d / "mail.log"), "format": "text"},
    }
    for name, table in sections.items():
        if isinstance(table, list):     # an array of tables, e.g. dkim=[{...}, {...}]
            conf[name] = table          # type: ignore[assignment]
        else:
            conf.setdefault(name, {}).update(table)
    config_path = d / "txmta.toml"
    config_path.write_text(render_toml(conf, listeners))
    return Daemon(dir=d, config_path=config_path, log_path=d / "twistd.log", spool_path=Path(spool_path),
                  maillog_path=Path(conf["log"]["maillog"]), listeners=listeners, ports=ports)


class DaemonPool:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.daemons: list[Daemon] = []

    def __call__(self, **kw: Any) -> Daemon:
        d = make_daemon(self.base, **kw)
        self.daemons.append(d)
        return d.start()

    def teardown(self, failed: bool) -> None:
        for d in self.daemons:
            status = d.stop()
            if failed:
                print(f"\n===== twistd (exit {status}) in {d.dir} =====\n{d.diagnostics()}")


# -- TLS and AUTH material -------------------------------------------------------------

@dataclass
class Cert:
    cert: Path
    key: Path

    def client_context(self) -> Any:
        """An SSLContext that trusts exactly this certificate and checks the host name."""
        import ssl
        ctx = ssl.create_default_context(cafile=str(self.cert))
        ctx.check_hostname = True
        return ctx


USERS = {"alice": "correct horse battery", "bob@example.org": "s3cret-ünï"}


def swaks(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run swaks; the result has .returncode and .stdout (the transcript, stderr merged)."""
    if not os.path.exists(SWAKS):
        pytest.skip("swaks is not installed")
    return subprocess.run([SWAKS, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def swaks_queue_id(out: str) -> str:
    m = re.findall(r"<[-~] +250 2\.0\.0 Ok: queued as (\w+)", out)
    assert len(m) == 1, f"expected one 'queued as' reply in the swaks transcript:\n{out}"
    return m[0]


class Raw:
    """A line-level SMTP client over a plain socket, for what smtplib cannot send."""

    def __init__(self, port: int, source: str | None = None, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10,
                                             source_address=(source, 0) if source else None)
        self.buf = b""
        banner = self.reply()
        assert banner.startswith(b"220 "), banner

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One complete (possibly multi-line) reply."""
        lines: list[bytes] = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed; got {lines!r} + {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return b"\r\n".join(lines)

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        except OSError:
            pass
        self.sock.close()


def find_by_token(daemon: Daemon, token: str | bytes) -> list[str]:
    """Ids of the stored messages whose body contains `token`."""
    t = token.encode() if isinstance(token, str) else token
    v = daemon.view()
    try:
        return [mid for mid in v.ids() if t in v.read_body(mid)]
    finally:
        v.close()


# -- delivery helpers (test_delivery*.py, test_crash_delivery.py) ------------------------------

MAILLOG_RE = re.compile(
    r"(?P<id>\w+): to=<(?P<to>[^>]*)> relay=(?P<relay>\S+) delay=(?P<delay>[\d.]+) "
    r"tls=(?P<tls>.*?) attempts=(?P<attempts>\d+) status=(?P<status>\w+) \((?P<reply>.*)\)"
    r"(?: category=(?P<category>[\w-]+))?(?: next_attempt_in=(?P<next>-?\d+)s)?(?: worker=(?P<worker>\d+))?$")


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05,
               diagnose: Callable[[], str] | None = None) -> Any:
    """Poll `pred` until it returns something true (which is returned); AssertionError
    naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = "\n" + diagnose() if diagnose is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def maillog_events(daemon: Daemon) -> list[dict[str, str]]:
    """The delivery lines of the daemon's text mail log, parsed (id, to, relay, tls, attempts,
    status, reply, next)."""
    out = []
    for line in daemon.maillog().splitlines():
        _, _, rest = line.partition(" ")
        m = MAILLOG_RE.match(rest)
        if m is not None:
            out.append(m.groupdict())
    return out


def statuses(daemon: Daemon, message_id: str | None = None, rcpt: str | None = None) -> list[str]:
    """The statuses (sent, deferred, bounced, expired) logged, in order, for a message and/or
    recipient."""
    return [e["status"] for e in maillog_events(daemon)
            if (message_id is None or e["id"] == message_id) and (rcpt is None or e["to"] == rcpt)]


def txmta_cli(daemon: Daemon, *args: str, timeout: float = 20.0,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the `txmta` command against the daemon's configuration (`--config` appended)."""
    exe = Path(sys.executable).with_name("txmta")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "txmta.cli"]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run(cmd + list(args) + ["--config", str(daemon.config_path)], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, cwd=str(daemon.dir))
    if check:
        assert p.returncode == 0, f"txmta {' '.join(args)} exited {p.returncode}: {p.stderr}{p.stdout}"
    return p


def queue_json(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """`txmta queue list --json`, keyed by message id."""
    import json
    return {m["id"]: m for m in json.loads(txmta_cli(daemon, "queue", "list", "--json").stdout)}


def submit(daemon: Daemon, sender: str, rcpts: list[str] | tuple[str, ...], body: bytes | str,
           timeout: float = 10.0) -> str:
    """Send one message to the daemon with smtplib; its queue id."""
    import smtplib
    if isinstance(body, str):
        body = body.encode()
    with smtplib.SMTP(daemon.host, daemon.port, timeout=timeout) as s:
        s.ehlo("client.test.invalid")
        code, resp = s.mail(sender)
        assert code == 250, (code, resp)
        for r in rcpts:
            code, resp = s.rcpt(r)
            assert code == 250, (r, code, resp)
        code, resp = s.data(body)
        assert code == 250, (code, resp)
    return queued_id(resp)


def delivery_sections(smtp_port: int, dns: tuple[str, int] | None = None, *,
                      schedule: tuple[str, ...] = ("1s", "2s"), **delivery: Any) -> dict[str, dict[str, Any]]:
    """Config sections for a daemon that really delivers: MX delivery (relayhost "") on
    `smtp_port`, the test DNS server as resolver, a short retry schedule; `delivery`
    keywords override [delivery] keys (e.g. relayhost=...)."""
    sections: dict[str, dict[str, Any]] = {
        "delivery": {"relayhost": "", "smtp_port": smtp_port, "connect_timeout": "5s",
                     "idle_timeout": "5s", **delivery},
        "retry": {"schedule": list(schedule), "max_lifetime": "1h"},
    }
    if dns is not None:
        sections["dns"] = {"nameservers": [f"{dns[0]}:{dns[1]}"]}
    return sections
