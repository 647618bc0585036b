"""The mail log: one line per mail event, apart from the debug log.

Each event names the queue id first, then the words operators grep for
(`client=`, `from=<…>`, `nrcpt=`, `size=`, `tls=`, `to=<…>`, `relay=`, `status=`).
Where the lines go is the caller's choice of sink:

* `LoggerSink` (the default, `[log] maillog = ""`): twisted.logger events under the
  namespace "txmta.maillog", with the values as structured fields;
* `FileSink` (`[log] maillog = PATH` or "-"): our own lines, text or one JSON object per
  line, written in batches (a mail log line is not mail: it is flushed within a second,
  not fsynced), so the busy path does not pay for a formatted, flushed log event.  A file
  is reopened by `reopen()` (SIGUSR1 and SIGHUP, after logrotate renamed it);
* `SyslogSink` (`[log] maillog = "syslog"`): the text lines to syslog, facility mail,
  ident "txmta" with the process id, as Postfix's lines are.

Besides the queue's events it tells of failed SMTP AUTH (`auth_failed`: the client address
and the user name tried, never the password; the line etc/fail2ban/filter.d/txmta.conf
matches) and of recipients postponed because their destination is throttled (a
"status=deferred" line with the throttle's reply).

The mail log is a subscriber of the queue's event stream: `MailLog.heard` turns the
committed events (txmta/events.py) into lines; worker.py subscribes it.
"""
# test: tests/test_maillog.py

from __future__ import annotations

import json
import os
import time
from typing import IO, Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txmta import events
from txmta.outcome import Delivered, Outcome, PermFailed
from txmta.message import EXPIRED, QUEUED, StoredMessage


class Sink(Protocol):
    def emit(self, fields: dict[str, Any], line: str) -> None: ...


class LoggerSink:
    def __init__(self, logger: Logger | None = None) -> None:
        self.log = logger or Logger(namespace="txmta.maillog")

    def emit(self, fields: dict[str, Any], line: str) -> None:
        self.log.info("{line}", line=line, **fields)


class FileSink:
    """Appends lines to `out`; `flush_after` seconds after the first unflushed line, it flushes.
    With several workers each line names its `worker` (a " worker=K" field at the end of a
    text line, "worker": K in JSON); with one worker (None) lines are as they always were."""

    def __init__(self, out: IO[str], clock: IReactorTime, fmt: str = "text",
                 flush_after: float = 0.5, worker: int | None = None,
                 path: str | None = None) -> None:
        self.out = out
        self.path = path            # the file `out` is, reopened by `reopen`; None: stdout
        self.worker = worker
        self.clock = clock
        self.json = fmt == "json"
        self.flush_after = flush_after
        self._pending: list[str] = []
        self._timer: Any = None

    def emit(self, fields: dict[str, Any], line: str) -> None:
        now = time.time()
        if self.json:
            record = dict(fields)
            if self.worker is not None:
                record["worker"] = self.worker
            record["time"] = round(now, 3)
            record["text"] = line
            self._pending.append(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            tail = f" worker={self.worker}" if self.worker is not None else ""
            self._pending.append(f"{stamp}.{int(now % 1 * 1000):03d}Z {line}{tail}\n")
        if self._timer is None:
            self._timer = self.clock.callLater(self.flush_after, self.flush)

    def flush(self) -> None:
        self._timer = None
        if self._pending:
            lines, self._pending = self._pending, []
            self.out.write("".join(lines))
            self.out.flush()

    def close(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.flush()

    def reopen(self) -> None:
        """Write what is pending to the file open now, then open `path` again (a new file if
        logrotate renamed the old one).  If it cannot be opened the old file stays in use."""
        if self.path is None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.flush()
        try:
            out = open_file(self.path)
        except OSError as e:
            LoggerSink().log.error("mail log {path}: cannot reopen: {error}; still writing "
                                   "to the file open before", path=self.path, error=e)
            return
        old, self.out = self.out, out
        old.close()
        LoggerSink().log.info("mail log {path} reopened", path=self.path)


def open_file(path: str) -> IO[str]:
    """The mail log file, opened for appending (created 0640: it names addresses)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    return os.fdopen(fd, "a", encoding="utf-8")


class SyslogSink:
    """Each line at once to syslog (facility mail, priority info; ident "txmta[PID]")."""

    def __init__(self, worker: int | None = None, fmt: str = "text") -> None:
        import syslog
        self._syslog = syslog
        self.worker = worker
        self.json = fmt == "json"
        syslog.openlog("txmta", syslog.LOG_PID, syslog.LOG_MAIL)

    def emit(self, fields: dict[str, Any], line: str) -> None:
        if self.json:
            record = dict(fields)
            if self.worker is not None:
                record["worker"] = self.worker
            record["text"] = line
            text = json.dumps(record, ensure_ascii=False, default=str)
        else:
            text = line + (f" worker={self.worker}" if self.worker is not None else "")
        self._syslog.syslog(self._syslog.LOG_INFO, text)


def printable(value: str, limit: int = 64) -> str:
    """A value a client chose (a user name), safe on a log line: at most `limit` characters,
    spaces and control characters escaped, so that it never looks like another field."""
    return "".join(c if c.isprintable() and not c.isspace() else f"\\x{ord(c):02x}"
                   for c in value[:limit])


class MailLog:
    def __init__(self, sink: Sink | Logger | None = None) -> None:
        if sink is None or isinstance(sink, Logger):
            sink = LoggerSink(sink)
        self.sink = sink

    HEARS = (events.Received, events.Suppressed, *events.ATTEMPTED, events.DsnQueued,
             events.Postponed)

    def reopen(self) -> None:
        """SIGUSR1 / SIGHUP: a file sink opens its file again (after logrotate)."""
        reopen = getattr(self.sink, "reopen", None)
        if reopen is not None:
            reopen()

    def heard(self, event: Any) -> None:
        """A line for an event of the queue's stream (subscribed to `HEARS`)."""
        if isinstance(event, events.Received):
            self.received(event.message)
        elif isinstance(event, events.ATTEMPTED):
            self.outcome(event.message, event.index, event.outcome, event.at)
        elif isinstance(event, events.DsnQueued):
            self.dsn(event.message, event.report)
        elif isinstance(event, events.Suppressed):
            self.suppressed(event.message, event.index)
        elif isinstance(event, events.Postponed):
            self.postponed(event.message, event.index, event.reply, event.at)

    def received(self, m: StoredMessage) -> None:
        c = m.client
        fields: dict[str, Any] = {
            "event": "received", "id": m.id, "client": c.get("address", ""),
            "helo": c.get("helo", ""), "sender": str(m.envelope.sender),
            "nrcpt": len(m.envelope.recipients), "size": m.size, "tls": c.get("tls", "none"),
        }
        text = (f"{m.id}: received client={fields['client']} helo={fields['helo']} "
                f"from=<{fields['sender']}> nrcpt={fields['nrcpt']} size={m.size} tls={fields['tls']}")
        if m.envelope.requiretls:
            fields["requiretls"] = True
            text += " requiretls=yes"
        if "auth" in c:             # SMTP AUTH, as Postfix's smtpd says it
            fields["sasl_username"] = c["auth"]
            text += f" sasl_username={printable(c['auth'], 256)}"
        if "token" in c:            # from the HTTP API
            fields["token"] = c["token"]
            text += f" token={c['token']}"
            if m.labels.tag:
                fields["tag"] = m.labels.tag
                text += f" tag={json.dumps(m.labels.tag, ensure_ascii=False)}"
        self.sink.emit(fields, text)

    def duplicate(self, first: str, client: dict[str, str], sender: str, nrcpt: int,
                  header_id: str) -> None:
        """A message the SMTP intake answered as a duplicate of `first` (the queue id of
        the one stored; [intake] dedupe_window): not stored, so no event tells of it."""
        fields: dict[str, Any] = {
            "event": "duplicate", "id": first, "client": client.get("address", ""),
            "helo": client.get("helo", ""), "sender": sender, "nrcpt": nrcpt,
            "message_id": header_id,
        }
        text = (f"{first}: duplicate client={fields['client']} helo={fields['helo']} "
                f"from=<{sender}> nrcpt={nrcpt} message-id={header_id}")
        if "auth" in client:
            fields["auth"] = client["auth"]
            text += f" auth={client['auth']}"
        self.sink.emit(fields, text + " (not stored again)")

    def outcome(self, m: StoredMessage, index: int, outcome: Outcome, now: float) -> None:
        """One line per recipient per attempt, Postfix style: to, relay, delay, status."""
        state = m.recipients[index]
        if isinstance(outcome, Delivered):
            status = "sent"
        elif isinstance(outcome, PermFailed):
            status = "bounced"
        elif state.state == EXPIRED:
            status = "expired"
        else:
            status = "deferred"
        relay = f"{outcome.host}[{outcome.address}]" if outcome.address else (outcome.host or "none")
        rcpt = str(m.envelope.recipients[index].address)
        delay = round(now - m.arrival, 3)
        tls = outcome.tls or "none"
        fields: dict[str, Any] = {
            "event": status, "id": m.id, "rcpt": rcpt, "relay": relay, "delay": delay,
            "tls": tls, "attempts": state.attempts, "reply": str(outcome.reply),
        }
        if state.category:
            fields["category"] = state.category
        line = (f"{m.id}: to=<{rcpt}> relay={relay} delay={delay} tls={tls} "
                f"attempts={state.attempts} status={status} ({outcome.reply})")
        if state.category:
            line += f" category={state.category}"
        if state.state == QUEUED:
            fields["next_attempt"] = state.next_attempt
            line += f" next_attempt_in={round(state.next_attempt - now)}s"
        self.sink.emit(fields, line)

    def postponed(self, m: StoredMessage, index: int, reply: Any, now: float) -> None:
        """A recipient not tried because its destination is throttled: deferred until its
        next attempt, with the throttle's reply (no attempt counted)."""
        state = m.recipients[index]
        rcpt = str(m.envelope.recipients[index].address)
        delay = round(now - m.arrival, 3)
        fields: dict[str, Any] = {
            "event": "deferred", "id": m.id, "rcpt": rcpt, "relay": "none", "delay": delay,
            "tls": "none", "attempts": state.attempts, "reply": str(reply), "postponed": True,
            "next_attempt": state.next_attempt,
        }
        self.sink.emit(fields, f"{m.id}: to=<{rcpt}> relay=none delay={delay} tls=none "
                               f"attempts={state.attempts} status=deferred ({reply}) "
                               f"next_attempt_in={round(state.next_attempt - now)}s")

    def auth_failed(self, client: str, user: str, mechanism: str) -> None:
        """A failed SMTP AUTH: the client address and the user name tried (never the
        password).  etc/fail2ban/filter.d/txmta.conf matches this line."""
        fields: dict[str, Any] = {"event": "auth_failed", "client": client, "user": user,
                                  "mechanism": mechanism}
        self.sink.emit(fields, f"AUTH failed: client=[{client}] mechanism={mechanism} "
                               f"user={printable(user)}")

    def timeout(self, client: str, after: str, limit: str, seconds: float,
                octets: int | None) -> None:
        """An SMTP session closed with 421 4.4.2 by a time limit: the client, the last
        command (or "TLS handshake"), the [server] key that ended it; inside a message,
        the octets received of it (nothing of it is stored)."""
        fields: dict[str, Any] = {"event": "timeout", "client": client, "after": after,
                                  "limit": limit, "seconds": seconds}
        text = f"timeout after {after}: client=[{client}] {limit}={seconds:g}s"
        if octets is not None:
            fields["octets"] = octets
            text += f" octets={octets} (message not stored)"
        self.sink.emit(fields, text)

    def dsn(self, m: StoredMessage, report: StoredMessage) -> None:
        """A delivery status notification was queued for message `m` (as message `report`)."""
        to = ", ".join(str(r.address) for r in report.envelope.recipients)
        fields: dict[str, Any] = {"event": "dsn", "id": m.id, "dsn_id": report.id, "to": to}
        self.sink.emit(fields, f"{m.id}: sender delivery status notification: {report.id} to=<{to}>")

    def suppressed(self, m: StoredMessage, index: int) -> None:
        """A recipient ended at intake because its address is on the suppression list."""
        state = m.recipients[index]
        rcpt = str(m.envelope.recipients[index].address)
        fields: dict[str, Any] = {"event": "suppressed", "id": m.id, "rcpt": rcpt,
                                  "reply": str(state.last_reply or ""), "category": state.category}
        self.sink.emit(fields, f"{m.id}: to=<{rcpt}> relay=none delay=0 tls=none attempts=0 "
                               f"status=suppressed ({state.last_reply})")
