"""Encodes spool records to bytes and back.  Versioned, JSON inside, never pickle.

Each record starts with one format byte.  A record this version cannot decode raises
`CorruptRecord` (the caller sets it aside and logs it; it is never fatal).  Pure: no I/O.
"""
# test: tests/test_codec.py

from __future__ import annotations

import json
from typing import Any

from txmta.message import NO_LABELS, Address, Envelope, Labels, Recipient
from txmta.reply import Reply
from txmta.message import Event, MessageFacts, OutboxRecord, RecipientState, StoredMessage, Suppression

VERSION = 1
_V = bytes([VERSION])


class CorruptRecord(ValueError):
    pass


def _dumps(obj: Any) -> bytes:
    return _V + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _constant(name: str) -> float:
    """JSON's non-numbers: infinities are kept, NaN (which no record holds and which no
    time comparison survives) makes the record corrupt."""
    if name == "NaN":
        raise ValueError("NaN in a record")
    return float(name)


def _loads(data: bytes) -> Any:
    if not data or data[0] != VERSION:
        raise CorruptRecord(f"unknown record version {data[:1]!r}")
    try:
        return json.loads(bytes(data[1:]).decode("utf-8"), parse_constant=_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: deep nesting
        raise CorruptRecord(str(e)) from e


def _is(value: Any, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    """`value` if it is a `kind` (or None when `optional`): a record whose JSON has the
    wrong type in a field is corrupt, not a value with a list where a string belongs."""
    if (value is None and optional) or (isinstance(value, kind) and not (
            isinstance(value, bool) and kind is int)):
        return value
    raise TypeError(f"{value!r:.40} is not {kind}")


def _strings(value: Any) -> dict[str, str]:
    """A JSON object of strings (the client facts, the envelope's extra parameters)."""
    _is(value, dict)
    for k, v in value.items():
        _is(v, str)
    return dict(value)


def encode_message(m: StoredMessage) -> bytes:
    e = m.envelope
    record = {
        "id": m.id, "arrival": m.arrival, "size": m.size, "file": m.body_in_file,
        "client": m.client,
        "from": str(e.sender),
        "rcpt": [[str(r.address), list(r.notify), r.orcpt] for r in e.recipients],
        "esize": e.size, "body": e.body, "utf8": e.smtputf8, "ret": e.ret, "envid": e.envid,
        "auth": e.auth, "extra": e.extra, "hid": m.header_id, "rtls": int(e.requiretls),
        "tlsno": int(e.tls_optional),
    }
    if m.labels:
        record["lab"] = [m.labels.tag, [list(kv) for kv in m.labels.metadata], m.labels.stream]
    if m.lane:
        record["lane"] = m.lane
    if m.expires is not None:
        record["exp"] = m.expires
    if m.priority:
        record["pri"] = m.priority
    return _dumps(record)


def message_lane(data: bytes) -> str:
    """The lane of an encoded message, without decoding the rest."""
    d = _loads(data)
    if not isinstance(d, dict):
        raise CorruptRecord("a message record is not an object")
    lane = d.get("lane", "")
    return lane if isinstance(lane, str) else ""


def decode_message(data: bytes, states: tuple[RecipientState, ...] | None = None) -> StoredMessage:
    d = _loads(data)
    try:
        rcpts = tuple(Recipient(Address.parse_stored(_is(a, str)),
                                tuple(_is(x, str) for x in _is(n, list)), _is(o, str, True))
                      for a, n, o in d["rcpt"])
        env = Envelope(Address.parse_stored(_is(d["from"], str)), rcpts, _is(d["esize"], int, True),
                       _is(d["body"], str), _is(d["utf8"], bool), _is(d["ret"], str, True),
                       _is(d["envid"], str, True), _is(d["auth"], str, True), _strings(d["extra"]),
                       bool(d.get("rtls", 0)), bool(d.get("tlsno", 0)))
        if states is None:
            states = tuple(RecipientState() for _ in rcpts)
        labels = NO_LABELS
        if "lab" in d:
            tag, metadata, stream = d["lab"]
            labels = Labels(str(tag), tuple((str(k), str(v)) for k, v in metadata), str(stream))
        return StoredMessage(_is(d["id"], str), env, float(d["arrival"]), int(d["size"]), states,
                             _strings(d["client"]), bool(d["file"]), str(d.get("hid", "")), labels,
                             str(d.get("lane", "")),
                             float(d["exp"]) if d.get("exp") is not None else None,
                             int(d.get("pri", 0)))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise CorruptRecord(f"bad message record: {e}") from e


def encode_recipient(r: RecipientState) -> bytes:
    return _dumps([r.state, r.attempts, r.next_attempt,
                   r.last_reply.as_dict() if r.last_reply else None, int(r.greylisted), r.remote,
                   int(r.warned), r.category, r.source])


def decode_recipient(data: bytes) -> RecipientState:
    d = _loads(data)
    try:
        state, attempts, next_attempt, reply = d[:4]
        greylisted, remote = (bool(d[4]), str(d[5])) if len(d) >= 6 else (False, "")
        warned, category = (bool(d[6]), str(d[7])) if len(d) >= 8 else (False, "")
        source = str(d[8]) if len(d) >= 9 else ""
        return RecipientState(str(state), int(attempts), float(next_attempt),
                              Reply.from_dict(reply) if reply else None, greylisted, remote,
                              warned, category, source)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        raise CorruptRecord(f"bad recipient record: {e}") from e


def encode_event(e: "Event") -> bytes:
    return _dumps(e.as_dict())


def decode_event(data: bytes) -> "Event":
    d = _loads(data)
    try:
        return Event(float(d["time"]), str(d["event"]), str(d.get("rcpt", "")),
                     str(d.get("text", "")), str(d.get("remote", "")), str(d.get("category", "")),
                     str(d.get("tls", "")))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise CorruptRecord(f"bad event record: {e}") from e


def encode_history(m: StoredMessage, finished: float) -> bytes:
    """A finished message: its envelope record, its final recipient states, when it finished."""
    return _dumps({"message": encode_message(m)[1:].decode("utf-8"),
                   "states": [encode_recipient(r)[1:].decode("utf-8") for r in m.recipients],
                   "finished": finished})


def decode_history(data: bytes) -> tuple[StoredMessage, float]:
    d = _loads(data)
    try:
        states = tuple(decode_recipient(_V + s.encode("utf-8")) for s in d["states"])
        m = decode_message(_V + d["message"].encode("utf-8"), states)
        return m, float(d["finished"])
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise CorruptRecord(f"bad history record: {e}") from e


def encode_suppression(s: "Suppression") -> bytes:
    return _dumps([s.reason, s.since, s.expires, s.reply])


def decode_suppression(address: str, data: bytes) -> "Suppression":
    d = _loads(data)
    try:
        reason, since, expires, reply = d
        return Suppression(address, str(reason), float(since), float(expires), str(reply))
    except (TypeError, ValueError, OverflowError) as e:
        raise CorruptRecord(f"bad suppression record: {e}") from e


def encode_outbox(r: OutboxRecord) -> bytes:
    """An outbox record: a list in field order, trailing empty fields left out."""
    facts = None
    if r.facts is not None:
        f = r.facts
        facts = {"s": f.sender, "h": f.header_id, "t": f.tag, "m": [list(kv) for kv in f.metadata],
                 "l": f.stream, "k": f.token}
    fields = [r.kind, r.time, r.message_id, r.index, r.rcpt, r.reply, r.remote, r.category,
              r.tls, r.attempts, r.text, facts]
    defaults = ["", 0.0, "", -1, "", None, "", "", "", 0, "", None]
    while len(fields) > 2 and fields[-1] == defaults[len(fields) - 1]:
        fields.pop()
    return _dumps(fields)


def decode_outbox(data: bytes) -> OutboxRecord:
    d = _loads(data)
    if not isinstance(d, list) or not 2 <= len(d) <= 12:
        raise CorruptRecord(f"bad outbox record: {d!r:.80}")
    try:
        kind, when = str(d[0]), float(d[1])
        rest = list(d[2:]) + [None] * (10 - len(d[2:]))
        mid, index, rcpt, reply, remote, category, tls, attempts, text, f = rest[:10]
        facts = None
        if f:
            facts = MessageFacts(str(f["s"]), str(f["h"]), str(f["t"]),
                                 tuple((str(k), str(v)) for k, v in f["m"]), str(f["l"]),
                                 str(f["k"]))
        return OutboxRecord(kind, when, str(mid or ""), -1 if index is None else int(index),
                            str(rcpt or ""), dict(reply) if reply else None, str(remote or ""),
                            str(category or ""), str(tls or ""), int(attempts or 0),
                            str(text or ""), facts)
    except (IndexError, KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise CorruptRecord(f"bad outbox record: {e}") from e
