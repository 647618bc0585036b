"""Spool records round-trip through the codec, and anything else is a CorruptRecord.

A record the codec cannot decode must raise `CorruptRecord` and nothing else: the queue
sets such a record aside and logs it, and any other exception would stop the start-up walk
of the spool (STYLE habit 4).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txmta.message import NOTIFY_VALUES, Address, Envelope, Recipient
from txmta.reply import Reply
from txmta.spool import codec
from txmta.spool.codec import CorruptRecord
from txmta.message import BOUNCED, DELETED, DELIVERED, EXPIRED, HELD, QUEUED, RecipientState, StoredMessage
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
local_part = text.filter(lambda s: s and "@" not in s)
domain = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="@"),
                 min_size=1, max_size=30)
mailbox = st.builds(Address, local_part, domain)
sender = st.one_of(st.just(Address("", "")), mailbox)
recipient = st.builds(
    Recipient, mailbox,
    st.lists(st.sampled_from(sorted(NOTIFY_VALUES)), unique=True, max_size=3).map(tuple),
    st.none() | text)
envelope = st.builds(
    Envelope, sender, st.lists(recipient, min_size=1, max_size=4).map(tuple),
    st.none() | st.integers(0, 2**40), st.sampled_from(["7BIT", "8BITMIME"]), st.booleans(),
    st.none() | st.sampled_from(["FULL", "HDRS"]), st.none() | text, st.none() | text,
    st.dictionaries(text, text, max_size=3), st.booleans(), st.booleans())
finite = st.floats(allow_nan=False, allow_infinity=False)
reply = st.builds(Reply, st.integers(200, 599), st.sampled_from(["", "2.0.0", "4.7.1", "5.1.1"]),
                  text)
recipient_state = st.builds(
    RecipientState, st.sampled_from([QUEUED, HELD, DELIVERED, BOUNCED, EXPIRED, DELETED]),
    st.integers(0, 10_000), finite, st.none() | reply, greylisted=st.booleans(),
    source=st.sampled_from(["", "192.0.2.10", "2001:db8::10"]))


@st.composite
def stored_message(draw: st.DrawFn) -> StoredMessage:
    env = draw(envelope)
    states = tuple(draw(recipient_state) for _ in env.recipients)
    return StoredMessage(draw(st.text("0123456789BCDFGHJKLMNPQRSTVWXZ", min_size=1, max_size=15)),
                         env, draw(finite), draw(st.integers(0, 2**40)), states,
                         draw(st.dictionaries(text, text, max_size=4)), draw(st.booleans()))


@given(stored_message())
def test_message_round_trips(m):
    """decode_message(encode_message(m), states) == m for any envelope, unicode addresses and
    optional ESMTP parameters included."""
    assert codec.decode_message(codec.encode_message(m), m.recipients) == m


@given(stored_message())
def test_message_without_states_decodes_with_fresh_queued_recipients(m):
    """Decoding a message record alone gives one fresh QUEUED state per recipient."""
    got = codec.decode_message(codec.encode_message(m))
    assert got.envelope == m.envelope
    assert got.recipients == tuple(RecipientState() for _ in m.envelope.recipients)


@given(recipient_state)
def test_recipient_state_round_trips(r):
    """decode_recipient(encode_recipient(r)) == r, last reply included."""
    assert codec.decode_recipient(codec.encode_recipient(r)) == r


@given(stored_message(), recipient_state)
def test_records_start_with_the_format_version(m, r):
    """Every record's first octet is the codec's format version."""
    assert codec.encode_message(m)[0] == codec.VERSION
    assert codec.encode_recipient(r)[0] == codec.VERSION


def test_a_recipient_record_from_before_source_addresses_decodes_without_one():
    """Records written before the greylisting source address was kept (8 fields) still
    decode, with no source address."""
    old = b'\x01["queued",1,60.0,null,1,"mx[192.0.2.1]",0,"greylisted"]'
    r = codec.decode_recipient(old)
    assert (r.greylisted, r.remote, r.category, r.source) == (True, "mx[192.0.2.1]",
                                                              "greylisted", "")


DECODERS = [codec.decode_message, codec.decode_recipient]


def corrupt_only(decode, data: bytes) -> None:
    try:
        decode(data)
    except CorruptRecord:
        pass


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("version", [0, 2, 0x7B, 0xFF])
def test_unknown_version_byte_is_corrupt(decode, version):
    """A record whose first octet is not a known version raises CorruptRecord."""
    good = codec.encode_recipient(RecipientState())[1:]
    with pytest.raises(CorruptRecord):
        decode(bytes([version]) + good)


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("data", [
    b"", b"\x01", b"\x01{", b"\x01\xff\xfe", b"\x01null", b"\x01[]", b"\x01{}", b"\x01\"x\"",
    pytest.param(b"\x01" + b"[" * 100_000, id="nested-past-recursion-limit"),
    b'\x01["queued",Infinity,0,null]', b'\x01["queued",1e999,0,null]',
    b'\x01["queued",0,"soon",null]', b'\x01["queued",0,0,{"code":99}]', b'\x01["queued",0,0,7]',
    b'\x01{"rcpt":[[1,[],null]],"from":""}', b'\x01{"rcpt":[["a@b",7,null]],"from":""}',
], ids=repr)
def test_malformed_record_is_corrupt(decode, data):
    """Truncated, non-UTF-8, non-JSON, badly shaped or overflowing records raise CorruptRecord."""
    with pytest.raises(CorruptRecord):
        decode(data)


def test_message_record_with_wrong_field_types_is_corrupt():
    """A message record whose fields have the wrong JSON types raises CorruptRecord."""
    good = json.loads(codec.encode_message(StoredMessage(
        "X1", Envelope(Address("a", "b"), (Recipient(Address("c", "d")),)), 1.0, 1,
        (RecipientState(),), {}))[1:])
    for key, bad in [("from", 5), ("from", ["a"]), ("rcpt", 3), ("rcpt", [["a@b"]]),
                     ("arrival", "noon"), ("size", float("inf")), ("client", 7),
                     ("extra", [1, 2, 3]),
                     # these used to come back as values of the wrong type
                     ("id", 5), ("esize", "big"), ("esize", True), ("body", ["7BIT"]),
                     ("utf8", [1]), ("ret", 0), ("envid", {}), ("auth", False),
                     ("client", {"address": 7}), ("extra", {"X": None}),
                     ("rcpt", [["a@b", "NOTIFY", None]]), ("rcpt", [["a@b", [1], None]]),
                     ("rcpt", [["a@b", [], 5]]), ("arrival", float("nan"))]:
        record = b"\x01" + json.dumps({**good, key: bad}).encode()
        with pytest.raises(CorruptRecord):
            codec.decode_message(record)


@pytest.mark.parametrize("data", [
    b'\x01["bounced",1e300,' + b"1" * 400 + b',""]',      # a number too big for a float
    b'\x01["bounced",NaN,1,""]',
], ids=["overflow", "nan"])
def test_suppression_record_with_numbers_out_of_range_is_corrupt(data):
    """A suppression record whose times are not numbers a float can hold is corrupt."""
    with pytest.raises(CorruptRecord):
        codec.decode_suppression("a@example.org", data)


def test_nan_makes_a_record_corrupt_and_infinity_does_not():
    """NaN compares with nothing, so no time in a record may be NaN; an infinite time is
    still a time."""
    with pytest.raises(CorruptRecord):
        codec.decode_recipient(b'\x01["queued",0,NaN,null]')
    assert codec.decode_recipient(b'\x01["queued",0,Infinity,null]').next_attempt == float("inf")


json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300)
@given(st.sampled_from(DECODERS), st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_corrupt_record(decode, data):
    """Arbitrary octets either decode or raise CorruptRecord, never another exception."""
    corrupt_only(decode, data)
    corrupt_only(decode, b"\x01" + data)


@settings(max_examples=300)
@given(st.sampled_from(DECODERS), st.one_of(
    json_value,
    st.fixed_dictionaries({k: json_value for k in (
        "id", "arrival", "size", "file", "client", "from", "rcpt", "esize", "body", "utf8",
        "ret", "envid", "auth", "extra")}),
    st.lists(json_value, min_size=4, max_size=4)))
def test_well_formed_json_of_the_wrong_shape_is_corrupt_record(decode, value):
    """Valid JSON behind the version byte, but not a record, decodes or raises CorruptRecord."""
    corrupt_only(decode, b"\x01" + json.dumps(value).encode())


def test_event_keeps_the_tls_of_the_attempt() -> None:
    """An attempt's TLS line survives the codec; an old event without one reads as ""."""
    from txmta.spool.codec import decode_event, encode_event
    from txmta.message import Event
    e = Event(1.5, "delivered", "a@example.org", "250 2.0.0 Ok", "mx[192.0.2.1]", "",
              "TLSv1.3 TLS_AES_256_GCM_SHA384 dane-ee")
    assert decode_event(encode_event(e)) == e
    old = Event(1.5, "deferred", "a@example.org", "451 4.4.1 no")
    assert decode_event(encode_event(old)).tls == ""
