"""The Postmark-compatible API: field mapping, errors (code, HTTP status, sentence), batches,
reply shapes, and the queue id ↔ UUID mapping."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txmta.api.postmark import (
    FORBIDDEN_EXTENSIONS,
    MAX_BATCH,
    bad_token,
    error_response,
    format_submitted_at,
    inactive_recipients,
    invalid_json,
    json_required,
    ok_response,
    parse_batch,
    parse_email,
    queue_id_to_uuid,
    templates_unsupported,
    to_field,
    too_large,
    too_many_messages,
    uuid_to_queue_id,
)
from txmta.api.submission import Attachment, InvalidRequest, Submission
from txmta.message import format_message_id, new_message_id
from txmta.partition import ALPHABET


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def email(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"From": "sender@example.com", "To": "rcpt@example.net",
                            "Subject": "Hi", "TextBody": "Hello"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def refused(obj: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_email(obj)
    return info.value


# --- field mapping ---------------------------------------------------------------------------

def test_every_field_maps_onto_the_submission() -> None:
    """Each Postmark field lands in its Submission field."""
    sub = parse_email({
        "From": '"Sender, Inc." <Sender@Example.COM>',
        "To": 'Ann <ann@example.net>, "Doe, John" <john@example.net>',
        "Cc": "cc@example.org",
        "Bcc": "bcc@example.org",
        "Subject": "Your receipt",
        "TextBody": "text",
        "HtmlBody": "<p>html</p>",
        "ReplyTo": "Help <help@example.com>, other@example.com",
        "Headers": [{"Name": "X-Order", "Value": "42"}, {"Name": "X-Empty", "Value": ""}],
        "Attachments": [
            {"Name": "r.pdf", "Content": b64(b"%PDF"), "ContentType": "application/pdf"},
            {"Name": "logo.png", "Content": b64(b"PNG"), "ContentType": "image/png",
             "ContentID": "cid:logo"},
        ],
        "Tag": "receipt",
        "Metadata": {"order": "42", "count": 3, "ratio": 1.5},
        "MessageStream": "outbound",
        "TrackOpens": True,
        "TrackLinks": "HtmlAndText",
        "InlineCss": False,
        "SomethingNew": {"ignored": True},
    })
    assert sub == Submission(
        sender='"Sender, Inc." <Sender@example.com>',
        to=("Ann <ann@example.net>", '"Doe, John" <john@example.net>'),
        cc=("cc@example.org",), bcc=("bcc@example.org",), subject="Your receipt",
        text="text", html="<p>html</p>",
        reply_to=("Help <help@example.com>", "other@example.com"),
        headers=(("X-Order", "42"), ("X-Empty", "")),
        attachments=(Attachment("r.pdf", b"%PDF", "application/pdf"),
                     Attachment("logo.png", b"PNG", "image/png", "logo")),
        tag="receipt", metadata={"order": "42", "count": "3", "ratio": "1.5"},
        stream="outbound")
    assert sub.envelope_sender() == "Sender@example.com"
    assert sub.envelope_recipients() == ("ann@example.net", "john@example.net",
                                         "cc@example.org", "bcc@example.org")


def test_field_names_match_without_regard_to_case_exact_first() -> None:
    """Postmark's JSON reader ignores case; an exact name wins over another spelling."""
    sub = parse_email({"from": "a@example.com", "TO": "b@example.com", "to": "x@example.com",
                       "textbody": "t", "SUBJECT": "s"})
    assert sub.sender == "a@example.com"
    assert sub.to == ("b@example.com",)     # neither is exact: the first spelling given
    sub = parse_email({"From": "a@example.com", "from": "z@example.com", "To": "b@example.com",
                       "TextBody": "t"})
    assert sub.sender == "a@example.com"


def test_null_fields_are_absent() -> None:
    """JSON null (what many clients send for unset fields) is an absent field."""
    sub = parse_email(email(Cc=None, Bcc=None, HtmlBody=None, Headers=None, Attachments=None,
                            Metadata=None, Tag=None, MessageStream=None, TrackOpens=None))
    assert (sub.cc, sub.html, sub.headers, sub.attachments, sub.metadata, sub.tag) == (
        (), None, (), (), {}, "")


@pytest.mark.parametrize("given, expected", [
    ("cid:logo", "logo"), ("<logo@x>", "logo@x"), ("logo.png", "logo.png"),
    ("CID:a", "a"),
])
def test_content_id_forms(given: str, expected: str) -> None:
    """ContentID may be "cid:x", "<x>" or "x"; the Submission keeps x."""
    sub = parse_email(email(HtmlBody="<img>", Attachments=[
        {"Name": "i.png", "Content": b64(b"x"), "ContentType": "image/png", "ContentID": given}]))
    assert sub.attachments[0].content_id == expected


def test_attachment_name_is_trimmed() -> None:
    """MUAs drop white space around file names; a name of only white space is no name."""
    sub = parse_email(email(Attachments=[{"Name": "  a b.pdf ", "Content": "eA=="}]))
    assert sub.attachments[0].name == "a b.pdf"
    err = refused(email(Attachments=[{"Name": " \t", "Content": "eA=="}]))
    assert (err.error_code, err.field) == (300, "Attachments[0].Name")


def test_attachment_without_content_type_is_octet_stream() -> None:
    sub = parse_email(email(Attachments=[{"Name": "a.dat", "Content": b64(b"\0\1")}]))
    assert sub.attachments[0] == Attachment("a.dat", b"\0\1", "application/octet-stream")


def test_base64_with_line_breaks_is_accepted() -> None:
    """Clients wrap base64 at 76 columns; the breaks are not part of the content."""
    data = bytes(range(256)) * 3
    wrapped = "\r\n".join(b64(data)[i:i + 76] for i in range(0, len(b64(data)), 76))
    sub = parse_email(email(Attachments=[{"Name": "a.bin1", "Content": wrapped}]))
    assert sub.attachments[0].content == data


def test_comma_inside_quoted_display_name_does_not_split() -> None:
    sub = parse_email(email(To='"Smith, Ann" <ann@example.net>, bob@example.net'))
    assert sub.to == ('"Smith, Ann" <ann@example.net>', "bob@example.net")


def test_recipients_are_deduplicated_case_insensitively_keeping_the_first() -> None:
    sub = parse_email(email(To="Ann@Example.net, ann@example.NET", Cc="ANN@example.net",
                            Bcc="b@example.net"))
    assert sub.envelope_recipients() == ("Ann@example.net", "b@example.net")


def test_idn_and_smtputf8_addresses_are_kept_in_utf8() -> None:
    """U-labels and UTF-8 local parts are allowed (RFC 6531); the domain is lower-cased."""
    sub = parse_email(email(From="Jörg <jörg@Bücher.example>", To="用户@例子.广告"))
    assert sub.envelope_sender() == "jörg@bücher.example"
    assert sub.envelope_recipients() == ("用户@例子.广告",)
    assert sub.needs_smtputf8()
    assert not parse_email(email(From="Jörg <j@example.com>")).needs_smtputf8()


def test_to_field_for_replies() -> None:
    assert to_field({"To": "a@b.example, c@d.example"}) == "a@b.example, c@d.example"
    assert to_field({"to": "a@b.example"}) == "a@b.example"
    assert to_field({"To": 3}) == "" and to_field([1]) == "" and to_field({}) == ""


# --- errors ----------------------------------------------------------------------------------

BAD_ADDRESSES = ["foo", "a@b@example.com", "a b@example.com", "@example.com", "a@",
                 "a@-bad-.example", "a@exa mple.com", "a@[192.0.2.1]", "a..b@example.com",
                 ".a@example.com", "Joe Sender, jr <s@example.com>", "a@example.com junk",
                 "a\r\nBcc: x@example.com", "x <a@b_c.example>", "Friends: a@example.com;"]


@pytest.mark.parametrize("bad", BAD_ADDRESSES)
@pytest.mark.parametrize("field", ["From", "To", "Cc", "Bcc", "ReplyTo"])
def test_invalid_address_is_300_naming_field_and_address(field: str, bad: str) -> None:
    """Postmark: ErrorCode 300, "Invalid '<field>' address: '<address>'."."""
    err = refused(email(**{field: bad}))
    assert (err.error_code, err.status, err.field) == (300, 422, field)
    assert err.message.startswith(f"Invalid '{field}' address: '")
    assert err.message.endswith("'.")


@settings(max_examples=300)
@given(st.text(), st.sampled_from(["From", "To", "Cc", "Bcc", "ReplyTo"]))
def test_any_address_text_parses_or_is_refused_with_300(text: str, field: str) -> None:
    """Whatever the text, the result is a Submission or a 300 naming the field, never
    another exception (the standard library's parser raises on some malformed input)."""
    try:
        sub = parse_email(email(**{field: text}))
    except InvalidRequest as err:
        assert err.error_code == 300 and err.field in (field, "To")
    else:
        assert sub.envelope_sender() and sub.envelope_recipients()


def test_invalid_address_names_the_bad_one_of_a_list() -> None:
    err = refused(email(To="good@example.com, foo, other@example.com"))
    assert err.message == "Invalid 'To' address: 'foo'."


@pytest.mark.parametrize("fields, message, field", [
    (email(From=...), "Invalid 'From' value.", "From"),
    (email(From=""), "Invalid 'From' value.", "From"),
    (email(To=...), "Zero recipients specified", "To"),
    (email(To=" , "), "Zero recipients specified", "To"),
    (email(TextBody=...), "Provide either email TextBody or HtmlBody or both.", "TextBody"),
    (email(TextBody="", HtmlBody=""), "Provide either email TextBody or HtmlBody or both.",
     "TextBody"),
    (email(To=", ".join(f"r{i}@example.com" for i in range(40)),
           Cc=", ".join(f"c{i}@example.com" for i in range(11))),
     "Maximum of 50 recipients allowed per email message (To, Cc and Bcc together).", "To"),
    (email(Tag="t" * 1001), "'Tag' is too long: at most 1000 characters.", "Tag"),
    (email(Metadata={f"k{i}": "v" for i in range(11)}),
     "'Metadata' has 11 fields: at most 10 are allowed.", "Metadata"),
    (email(Metadata={"k" * 21: "v"}),
     f"'Metadata' field name '{'k' * 21}' must have 1 to 20 characters.", "Metadata"),
    (email(Metadata={"k": "v" * 81}),
     "'Metadata' value of 'k' is too long: at most 80 characters.", "Metadata"),
    (email(Metadata={"Key": "1", "key": "2"}),
     "'Metadata' has the field name 'key' twice (names are compared without regard to "
     "case).", "Metadata"),
    (email(Subject="a\nb"), "Invalid 'Subject': line breaks and control characters are not "
                            "allowed.", "Subject"),
    (email(TextBody="\ud800"), "Invalid 'TextBody': it is not Unicode text.", "TextBody"),
    (email(Headers=[{"Name": "Bad Name", "Value": "x"}]),
     "Invalid header name in 'Headers': 'Bad Name'.", "Headers"),
    (email(Headers=[{"Name": "X-A", "Value": "a\r\nBcc: evil@example.com"}]),
     "Invalid value of header 'X-A' in 'Headers': line breaks and control characters are not "
     "allowed.", "Headers"),
    (email(Headers=[{"Name": "bcc", "Value": "x@example.com"}]),
     "The header 'bcc' may not be set in 'Headers': it comes from the message's own fields.",
     "Headers"),
    (email(Headers=[{"Value": "x"}]), "Invalid header in 'Headers': 'Headers[0].Name' is empty.",
     "Headers[0].Name"),
    (email(Attachments=[{"Name": "a.txt", "Content": "not base64!"}]),
     "Invalid 'Attachments[0].Content': it is not base64.", "Attachments[0].Content"),
    (email(Attachments=[{"Name": "a.txt"}]),
     "Invalid attachment: 'Attachments[0].Content' is missing.", "Attachments[0].Content"),
    (email(Attachments=[{"Content": "eA=="}]),
     "Invalid attachment: 'Attachments[0].Name' is missing or empty.", "Attachments[0].Name"),
    (email(Attachments=[{"Name": "a", "Content": "eA==", "ContentType": "multipart/mixed"}]),
     "Invalid 'Attachments[0].ContentType': 'multipart/mixed'.", "Attachments[0].ContentType"),
    (email(Attachments=[{"Name": "a", "Content": "eA==", "ContentID": "a b"}]),
     "Invalid 'Attachments[0].ContentID': 'a b'.", "Attachments[0].ContentID"),
    (email(MessageStream="no spaces"), "Invalid 'MessageStream': 'no spaces'.",
     "MessageStream"),
])
def test_invalid_request_errors(fields: dict[str, Any], message: str, field: str) -> None:
    """Every "invalid email request" is ErrorCode 300, HTTP 422, with a sentence naming the
    field."""
    err = refused(fields)
    assert (err.error_code, err.status, err.message, err.field) == (300, 422, message, field)


@pytest.mark.parametrize("fields, field", [
    (email(To=["a@example.com"]), "To"),
    (email(From=1), "From"),
    (email(Subject={"x": 1}), "Subject"),
    (email(TextBody=True), "TextBody"),
    (email(Headers={"X-A": "b"}), "Headers"),
    (email(Headers=["X-A: b"]), "Headers[0]"),
    (email(Headers=[{"Name": "X-A", "Value": 5}]), "Headers[0].Value"),
    (email(Attachments={"Name": "a"}), "Attachments"),
    (email(Attachments=[{"Name": "a", "Content": 5}]), "Attachments[0].Content"),
    (email(Metadata=["a"]), "Metadata"),
    (email(Metadata={"a": True}), "Metadata.a"),
    (email(Metadata={"a": {"b": 1}}), "Metadata.a"),
    (email(TrackOpens="yes"), "TrackOpens"),
    (email(TrackLinks=1), "TrackLinks"),
    (email(Tag=5), "Tag"),
])
def test_wrong_json_type_is_403(fields: dict[str, Any], field: str) -> None:
    """A known field of the wrong JSON type: ErrorCode 403 "Incompatible JSON input"."""
    err = refused(fields)
    assert (err.error_code, err.status, err.field) == (403, 422, field)
    assert err.message.startswith(f"Incompatible JSON input: '{field}' must be ")


@pytest.mark.parametrize("obj", [[], "x", 3, None])
def test_message_that_is_not_an_object_is_403(obj: Any) -> None:
    err = refused(obj)
    assert (err.error_code, err.status) == (403, 422)


@pytest.mark.parametrize("name", sorted(FORBIDDEN_EXTENSIONS))
def test_forbidden_attachment_types_are_411(name: str) -> None:
    """Postmark's list of forbidden extensions, in any case, also behind trailing dots."""
    for filename in (f"file.{name}", f"FILE.{name.upper()}", f"file.{name}. "):
        err = refused(email(Attachments=[{"Name": filename, "Content": "eA=="}]))
        assert (err.error_code, err.status, err.field) == (411, 422, "Attachments[0].Name")
        assert err.message == f"Forbidden attachment type: '{filename.strip()}'."


def test_allowed_attachment_types() -> None:
    sub = parse_email(email(Attachments=[{"Name": n, "Content": "eA=="}
                                         for n in ("exe", "a.exe.pdf", "binary.txt", "a.zip")]))
    assert len(sub.attachments) == 4


def test_error_helpers() -> None:
    """The errors the server raises itself: code, HTTP status and Postmark's sentence."""
    cases = [
        (invalid_json(), 402, 422, "Received invalid JSON input."),
        (json_required(), 409, 422, "JSON data required."),
        (too_many_messages(), 410, 422,
         "You may not send more than 500 messages in a batch request."),
        (bad_token(), 10, 401, "Request does not contain a valid Server token."),
        (inactive_recipients(["a@x.example", "b@y.example"]), 406, 422,
         "You tried to send to recipient(s) that have been marked as inactive. Found inactive "
         "addresses: a@x.example, b@y.example. Inactive recipients are ones that have "
         "generated a hard bounce, a spam complaint, or a manual suppression."),
        (templates_unsupported(), 1101, 422,
         "Templates are not supported by this server: render the message and send it to "
         "/email."),
        (too_large(10_000_000), 300, 413,
         "The request is larger than the limit of 10000000 bytes."),
    ]
    for err, code, status, message in cases:
        assert (err.error_code, err.status, err.message) == (code, status, message)


# --- batches ---------------------------------------------------------------------------------

def test_batch_parses_each_message_on_its_own() -> None:
    """One bad message does not fail the others; results keep the request's order."""
    results = parse_batch([email(), email(To="foo"), "not an object", email(To="b@example.com")])
    assert isinstance(results[0], Submission)
    assert isinstance(results[1], InvalidRequest) and results[1].error_code == 300
    assert isinstance(results[2], InvalidRequest) and results[2].error_code == 403
    assert isinstance(results[3], Submission) and results[3].to == ("b@example.com",)


def test_batch_limit_is_500() -> None:
    assert len(parse_batch([email()] * MAX_BATCH)) == 500
    with pytest.raises(InvalidRequest) as info:
        parse_batch([email()] * (MAX_BATCH + 1))
    assert (info.value.error_code, info.value.status) == (410, 422)


@pytest.mark.parametrize("obj", [email(), "x", None, 5])
def test_batch_that_is_not_an_array_is_403(obj: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_batch(obj)
    assert (info.value.error_code, info.value.status) == (403, 422)


def test_empty_batch() -> None:
    assert parse_batch([]) == []


# --- replies ---------------------------------------------------------------------------------

KEYS = {"To", "SubmittedAt", "MessageID", "ErrorCode", "Message"}


def test_ok_response_shape() -> None:
    reply = ok_response("b7bc2f4a-e38e-8336-af7d-e6c392c2f817", "a@example.com",
                        1392639901.25)
    assert reply == {"To": "a@example.com", "SubmittedAt": "2014-02-17T12:25:01.2500000+00:00",
                     "MessageID": "b7bc2f4a-e38e-8336-af7d-e6c392c2f817", "ErrorCode": 0,
                     "Message": "OK"}


def test_error_response_has_all_five_keys() -> None:
    err = InvalidRequest(300, "Zero recipients specified", "To")
    reply = error_response(err)
    assert set(reply) == KEYS
    assert reply["ErrorCode"] == 300 and reply["Message"] == "Zero recipients specified"
    assert reply["MessageID"] == "" and reply["To"] == ""
    assert datetime.fromisoformat(reply["SubmittedAt"]).year == 1
    reply = error_response(err, "x@example.com", 0.5)
    assert reply["To"] == "x@example.com"
    assert reply["SubmittedAt"] == "1970-01-01T00:00:00.5000000+00:00"


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_submitted_at_parses_back(when: float) -> None:
    """SubmittedAt is ISO 8601 with an offset, within two microseconds of the time given (the
    parser keeps six of its seven digits, and a float of the epoch carries about 0.2 µs)."""
    text = format_submitted_at(when)
    assert text.endswith("+00:00") and len(text.split(".")[1]) == len("4178645+00:00")
    assert abs(datetime.fromisoformat(text).timestamp() - when) < 2e-6


# --- message ids -----------------------------------------------------------------------------

queue_ids = st.text(alphabet=ALPHABET, min_size=15, max_size=15)


@given(queue_ids)
def test_queue_id_uuid_round_trip(qid: str) -> None:
    """Every queue id maps to a version-8 RFC 9562 UUID and back."""
    text = queue_id_to_uuid(qid)
    parsed = uuid.UUID(text)
    assert str(parsed) == text
    assert parsed.version == 8 and parsed.variant == uuid.RFC_4122
    assert uuid_to_queue_id(text) == qid
    assert uuid_to_queue_id(text.upper()) == qid


@given(queue_ids, queue_ids)
def test_uuids_sort_as_queue_ids(a: str, b: str) -> None:
    key = ALPHABET.index
    assert (queue_id_to_uuid(a) < queue_id_to_uuid(b)) == (
        [key(c) for c in a] < [key(c) for c in b])


def test_real_ids_round_trip() -> None:
    for qid in (new_message_id(), format_message_id(0, 0, 0),
                format_message_id(49 ** 11 - 1, 48, 49 ** 3 - 1)):
        assert uuid_to_queue_id(queue_id_to_uuid(qid)) == qid


@given(st.uuids())
def test_foreign_uuids_are_not_ours(u: uuid.UUID) -> None:
    """A random UUID (version 1-5) is never taken for a queue id."""
    assert uuid_to_queue_id(str(u)) is None


@given(st.integers(min_value=0, max_value=2 ** 128 - 1))
def test_any_uuid_text_maps_to_none_or_a_queue_id_that_maps_back(value: int) -> None:
    text = str(uuid.UUID(int=value))
    qid = uuid_to_queue_id(text)
    assert qid is None or queue_id_to_uuid(qid) == text


@pytest.mark.parametrize("text", [
    "", "x", "00118b79-4c03-8f71-a0fb-baa000000000x", "00118b794c038f71a0fbbaa000000000",
    "00118b79-4c03-8f71-a0fb-baa000000001",     # a low bit set
    "00118b79-4c03-4f71-a0fb-baa000000000",     # version 4
    "00118b79-4c03-8f71-c0fb-baa000000000",     # variant 0b11
    "ffffffff-ffff-8fff-bfff-ffe000000000",     # a number past 49**15
    "g0118b79-4c03-8f71-a0fb-baa000000000",
])
def test_invalid_uuid_text_is_none(text: str) -> None:
    assert uuid_to_queue_id(text) is None


@pytest.mark.parametrize("qid", ["", "0" * 14, "0" * 16, "a" * 15, "0" * 14 + "!"])
def test_queue_id_to_uuid_refuses_non_ids(qid: str) -> None:
    with pytest.raises(ValueError):
        queue_id_to_uuid(qid)


@settings(max_examples=50)
@given(st.text(max_size=40))
def test_uuid_to_queue_id_never_raises(text: str) -> None:
    assert uuid_to_queue_id(text) is None or len(uuid_to_queue_id(text) or "") == 15
