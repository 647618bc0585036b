"""The JSON forms of messages, timelines and suppressions, shared by `txmta queue list/show
--json`, `txmta history --json`, `txmta suppression list --json` and the HTTP API's status
endpoints (api/status.py), so that both speak the same shapes.  Pure: no I/O, no clock."""
# test: tests/test_cli.py, tests/test_api_status.py

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from txmta.message import QUEUED, Event, StoredMessage, Suppression


def iso_utc(when: float) -> str:
    """"2026-11-28T07:14:23Z"."""
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sender(m: StoredMessage) -> str:
    return str(m.envelope.sender) or "<>"


def _reply_text(reply: Any) -> str:
    return " ".join(str(x) for x in (reply.code, reply.enhanced, reply.text) if x != "")


def message_json(m: StoredMessage) -> dict[str, Any]:
    """The `queue list --json` form of one message."""
    rcpts = []
    for r, st in zip(m.envelope.recipients, m.recipients):
        reply = st.last_reply
        rcpts.append({
            "address": str(r.address),
            "state": st.state,
            "attempts": st.attempts,
            "next_attempt": iso_utc(st.next_attempt) if st.state == QUEUED else None,
            "last_reply": (None if reply is None else
                           {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text}),
        })
    return {"id": m.id, "arrival": iso_utc(m.arrival), "size": m.size, "sender": _sender(m),
            "lane": m.lane or None,
            "expires": iso_utc(m.expires) if m.expires is not None else None,
            "recipients": rcpts}


def summary_json(m: StoredMessage, finished: float | None) -> dict[str, Any]:
    """One message of the HTTP API's message list: the `queue list --json` form, with when
    it finished (None while queued) and what the application attached to it."""
    return dict(message_json(m), finished=iso_utc(finished) if finished is not None else None,
                tag=m.labels.tag or None, stream=m.labels.stream or None,
                token=m.client.get("token") or None)


def header_section(body: bytes) -> str:
    """The message header section: everything up to the first empty line, with LF endings."""
    text = body.decode("utf-8", "replace").replace("\r\n", "\n")
    head, _, _ = text.partition("\n\n")
    return head


@dataclass(frozen=True)
class Shown:
    """What `queue show` and `history` print: a live or finished message, its timeline and,
    for a live message, its header section (None with the reason when it cannot be read)."""
    message: StoredMessage
    finished: float | None            # when it finished; None while it is in the queue
    events: list[Event]
    headers: str | None
    headers_missing: str = ""


def event_json(e: Event) -> dict[str, Any]:
    out = {"time": iso_utc(e.time), "event": e.kind, "rcpt": e.rcpt, "text": e.text,
           "remote": e.remote, "category": e.category}
    if e.tls:   # an attempt over TLS: version, cipher, verification
        out["tls"] = e.tls
    return out


def _reply_json(reply: Any) -> dict[str, Any] | None:
    return None if reply is None else {"code": reply.code, "enhanced": reply.enhanced,
                                       "text": reply.text}


def shown_json(s: Shown) -> dict[str, Any]:
    """The `queue show --json` form: envelope, client, recipients, timeline, header section."""
    m, e = s.message, s.message.envelope
    rcpts = []
    for r, st in zip(e.recipients, m.recipients):
        rcpts.append({
            "address": str(r.address),
            "state": st.state,
            "attempts": st.attempts,
            "next_attempt": iso_utc(st.next_attempt) if st.state == QUEUED else None,
            "notify": list(r.notify) if r.notify else [],
            "orcpt": r.orcpt or None,
            "last_reply": _reply_json(st.last_reply),
            "remote": st.remote or None,
            "category": st.category or None,
        })
    return {"id": m.id, "arrival": iso_utc(m.arrival), "size": m.size, "sender": _sender(m),
            "message_id": m.header_id or None, "body": e.body, "smtputf8": bool(e.smtputf8),
            "ret": e.ret or None, "envid": e.envid or None, "declared_size": e.size,
            "requiretls": bool(e.requiretls), "tls_required_no": bool(e.tls_optional),
            "auth": e.auth, "parameters": dict(sorted(e.extra.items())),
            "client": dict(sorted(m.client.items())),
            "finished": iso_utc(s.finished) if s.finished is not None else None,
            "tag": m.labels.tag or None, "metadata": dict(m.labels.metadata),
            "stream": m.labels.stream or None, "token": m.client.get("token") or None,
            "recipients": rcpts, "events": [event_json(ev) for ev in s.events],
            "headers": s.headers}


def suppression_json(s: Suppression, now: float) -> dict[str, Any]:
    return {"address": s.address, "reason": s.reason, "since": iso_utc(s.since),
            "expires": iso_utc(s.expires), "reply": s.reply, "expired": s.expires <= now}


def check_address(address: str) -> str:
    """A light check of an address given to suppression add/remove/import: it must have an
    "@" and no white space or control characters.  Returns it without surrounding space."""
    a = address.strip()
    if not a:
        raise ValueError("empty address")
    if "@" not in a:
        raise ValueError(f"bad address {a!r}: no @")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in a):
        raise ValueError(f"bad address {a!r}: no spaces or control characters allowed")
    return a
