"""Building the RFC 5322 message of a Submission: structure (RFC 2046), header fields,
encodings (RFC 2047, RFC 2231, RFC 6532), line limits (RFC 5322 2.1.1).  Every message is
parsed back with the standard library and compared with what was submitted."""

from __future__ import annotations

import email
import email.policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txmta.api.mime import build_message, is_8bit, message_id_header
from txmta.api.submission import (
    Attachment,
    InvalidRequest,
    Submission,
    parse_mailbox,
    render_mailbox,
)

DATE = 1700000000.0     # Tue, 14 Nov 2023 22:13:20 +0000


def build(sub: Submission) -> bytes:
    return build_message(sub, message_id="0152rwhVZ0t09xR", date=DATE,
                         hostname="mta.example.com")


def parse(data: bytes) -> EmailMessage:
    """The standard library's reading of `data`; a UTF-8 header (RFC 6532) is decoded first,
    since its bytes parser reads header octets as ASCII."""
    if is_8bit(data):
        msg = email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
    else:
        msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def assert_wire_form(data: bytes) -> None:
    """CRLF line endings only, and no line over 998 octets (RFC 5322 2.1.1, 2.3)."""
    assert data.endswith(b"\r\n")
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert b"\0" not in data


def structure(part: EmailMessage) -> object:
    if part.is_multipart():
        return (part.get_content_type(), [structure(p) for p in part.iter_parts()])
    return part.get_content_type()


def squash(text: str) -> str:
    return "".join(text.split())


def normal(text: str) -> str:
    """A body as it comes back: line breaks are CRLF on the wire, the last line ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


def body(part: EmailMessage) -> str:
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


SUB = Submission(sender="Shop <shop@example.com>", to=("ann@example.net",), subject="Hi",
                 text="Hello")
PDF = Attachment("r.pdf", b"%PDF-1.4", "application/pdf")
LOGO = Attachment("logo.png", b"\x89PNG", "image/png", "logo@example.com")


# --- structure (RFC 2046) --------------------------------------------------------------------

@pytest.mark.parametrize("text, html, attachments, expected", [
    ("t", None, (), "text/plain"),
    (None, "<p>h</p>", (), "text/html"),
    ("t", "<p>h</p>", (), ("multipart/alternative", ["text/plain", "text/html"])),
    ("t", None, (PDF,), ("multipart/mixed", ["text/plain", "application/pdf"])),
    ("t", "<p>h</p>", (PDF,),
     ("multipart/mixed", [("multipart/alternative", ["text/plain", "text/html"]),
                          "application/pdf"])),
    (None, "<img src=cid:logo@example.com>", (LOGO,),
     ("multipart/related", ["text/html", "image/png"])),
    ("t", "<img>", (LOGO, PDF),
     ("multipart/mixed", [("multipart/alternative",
                           ["text/plain", ("multipart/related", ["text/html", "image/png"])]),
                          "application/pdf"])),
    # an inline part with no HTML to show it in is an ordinary attachment
    ("t", None, (LOGO,), ("multipart/mixed", ["text/plain", "image/png"])),
])
def test_structure(text: str | None, html: str | None, attachments: tuple[Attachment, ...],
                   expected: object) -> None:
    data = build(Submission(sender="a@example.com", to=("b@example.com",), text=text, html=html,
                            attachments=attachments))
    assert_wire_form(data)
    msg = parse(data)
    assert structure(msg) == expected
    assert msg["MIME-Version"] == "1.0"
    assert sum(1 for name, _ in msg.items() if name.lower() == "mime-version") == 1
    for part in msg.walk():
        if part is not msg:
            assert "MIME-Version" not in part


def test_inline_part_has_content_id_and_inline_disposition() -> None:
    msg = parse(build(Submission(sender="a@example.com", to=("b@example.com",), html="<img>",
                                 attachments=(LOGO, PDF))))
    parts = {p.get_content_type(): p for p in msg.walk()}
    logo, pdf = parts["image/png"], parts["application/pdf"]
    assert logo["Content-ID"] == "<logo@example.com>"
    assert logo.get_content_disposition() == "inline" and logo.get_filename() == "logo.png"
    assert logo.get_payload(decode=True) == b"\x89PNG"
    assert pdf.get_content_disposition() == "attachment" and "Content-ID" not in pdf
    assert pdf.get_payload(decode=True) == b"%PDF-1.4"


def test_long_content_id_is_not_encoded() -> None:
    """A Content-ID is a msg-id: an encoded-word there would break every cid: reference."""
    cid = "x" * 200 + "@example.com"
    msg = parse(build(Submission(sender="a@example.com", to=("b@example.com",), html="<img>",
                                 attachments=(Attachment("i.png", b"i", "image/png", cid),))))
    assert [p["Content-ID"] for p in msg.walk() if p.get_content_type() == "image/png"] == [
        f"<{cid}>"]


def test_message_rfc822_attachment_is_not_base64_when_7bit_clean() -> None:
    """RFC 2046 5.2.1: message/rfc822 allows no encoding but 7bit, 8bit, binary."""
    inner = b"From: x@example.com\r\nSubject: inner\r\n\r\nbody\r\n"
    msg = parse(build(Submission(sender="a@example.com", to=("b@example.com",), text="t",
                                 attachments=(Attachment("m.eml", inner, "message/rfc822"),))))
    part = msg.get_payload()[1]
    assert part["Content-Transfer-Encoding"] == "7bit"
    assert part.get_content()["Subject"] == "inner"
    eight = Attachment("m.eml", b"Subject: \xc3\xa9\r\n\r\nb\r\n", "message/rfc822")
    data = build(Submission(sender="a@example.com", to=("b@example.com",), text="t",
                            attachments=(eight,)))
    assert parse(data).get_payload()[1]["Content-Transfer-Encoding"] == "base64"
    assert not is_8bit(data)


# --- header fields ---------------------------------------------------------------------------

def test_header_fields_and_their_order() -> None:
    """From, To, Cc, Reply-To, Subject, Date, Message-ID, extras, MIME-Version; no Bcc."""
    sub = Submission(sender="Shop <shop@example.com>", to=("ann@example.net", "b@example.net"),
                     cc=("c@example.org",), bcc=("secret@example.org",), subject="Receipt",
                     text="t", reply_to=("help@example.com",),
                     headers=(("X-Order", "42"), ("X-Other", "x")))
    data = build(sub)
    msg = parse(data)
    names = [name for name, _ in msg.items()]
    assert names[:10] == ["From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID",
                          "X-Order", "X-Other", "MIME-Version"]
    assert b"secret" not in data and "Bcc" not in msg
    assert msg["From"] == "Shop <shop@example.com>"
    assert msg["To"] == "ann@example.net, b@example.net"
    assert msg["Message-ID"] == "<0152rwhVZ0t09xR@mta.example.com>"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == DATE
    assert msg["Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert message_id_header(sub, message_id="0152rwhVZ0t09xR",
                             hostname="mta.example.com") == msg["Message-ID"]


def test_empty_subject_is_left_out() -> None:
    assert "Subject" not in parse(build(Submission(sender="a@example.com", to=("b@x.example",),
                                                   text="t")))


def test_submission_date_and_message_id_are_kept() -> None:
    sub = Submission(sender="a@example.com", to=("b@example.com",), text="t", headers=(
        ("Message-ID", "<own-id@app.example>"), ("date", "Mon, 20 Nov 1995 19:12:08 -0500")))
    msg = parse(build(sub))
    assert msg.get_all("Message-ID") == ["<own-id@app.example>"]
    assert msg.get_all("Date") == ["Mon, 20 Nov 1995 19:12:08 -0500"]
    assert message_id_header(sub, message_id="x", hostname="h") == "<own-id@app.example>"


def test_long_ascii_header_is_kept_verbatim() -> None:
    """List-Unsubscribe and References keep their URLs and msg-ids, folded only at spaces."""
    url = "<https://example.com/unsubscribe?token=" + "a" * 300 + ">"
    refs = " ".join(f"<{'r' * 40}{i}@example.com>" for i in range(30))
    data = build(Submission(sender="a@example.com", to=("b@example.com",), text="t", headers=(
        ("List-Unsubscribe", url), ("References", refs), ("X-Spaces", "a   b  "))))
    assert_wire_form(data)
    assert b"=?" not in data
    msg = parse(data)
    assert msg["List-Unsubscribe"] == url
    assert msg["References"] == refs
    assert msg["X-Spaces"] == "a   b  "
    assert max(len(line) for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")
               if line.startswith((b"References", b" <r"))) <= 78


def test_header_word_longer_than_a_line_is_refused() -> None:
    with pytest.raises(InvalidRequest) as info:
        build(Submission(sender="a@example.com", to=("b@example.com",), text="t",
                         headers=(("X-Long", "x" * 1000),)))
    assert (info.value.error_code, info.value.field) == (300, "Headers")


def test_a_word_too_long_is_refused_naming_the_field_it_came_in() -> None:
    """A Subject (or a Content-ID) that cannot be folded within 998 octets names the field
    the request gave it in, not Headers."""
    with pytest.raises(InvalidRequest) as info:
        build(Submission(sender="a@example.com", to=("b@example.com",), text="t",
                         subject="y" * 1000))
    assert (info.value.error_code, info.value.field) == (300, "Subject")
    with pytest.raises(InvalidRequest) as info:
        build(Submission(sender="a@example.com", to=("b@example.com",), text="t",
                         attachments=(Attachment("a.txt", b"x", "text/plain", "c" * 1000),)))
    assert (info.value.error_code, info.value.field) == (300, "Attachments")


def test_non_ascii_extra_header_is_rfc2047_encoded() -> None:
    data = build(Submission(sender="a@example.com", to=("b@example.com",), text="t",
                            headers=(("X-Mood", "très bien ☀"),)))
    assert b"=?utf-8?" in data and not is_8bit(data)
    assert parse(data)["X-Mood"] == "très bien ☀"


@pytest.mark.parametrize("headers", [
    (("From", "x@example.com"),), (("TO", "x@example.com"),), (("Bcc", "x@example.com"),),
    (("Subject", "x"),), (("Reply-To", "x@example.com"),), (("Content-Type", "text/html"),),
    (("MIME-Version", "1.0"),), (("Content-Transfer-Encoding", "8bit"),),
    (("Bad Name", "x"),), (("X-A", "a\r\nBcc: x@example.com"),), (("X-A", "a\nb"),),
    (("Date", "not a date"),), (("Message-ID", "no-brackets@example.com"),),
    (("Message-ID", "<a@b>"), ("message-id", "<c@d>")),
    (("Date", "Mon, 20 Nov 1995 19:12:08 -0500"), ("Date", "Mon, 20 Nov 1995 19:12:08 -0500")),
])
def test_refused_extra_headers(headers: tuple[tuple[str, str], ...]) -> None:
    """Extra headers may not set the message's structural fields, smuggle a line break, or
    give an unparsable or second Date / Message-ID."""
    with pytest.raises(InvalidRequest) as info:
        build(Submission(sender="a@example.com", to=("b@example.com",), text="t",
                         headers=headers))
    assert (info.value.error_code, info.value.status) == (300, 422)


def test_smtputf8_message_keeps_utf8_in_the_header() -> None:
    """A non-ASCII addr-spec cannot be RFC 2047-encoded: the header is UTF-8 (RFC 6532)."""
    sub = Submission(sender="Jörg <jörg@bücher.example>", to=("用户@例子.广告",),
                     subject="Grüße", text="Hallo", headers=(("X-Note", "héllo"),))
    data = build(sub)
    assert_wire_form(data)
    assert is_8bit(data)
    header = data.split(b"\r\n\r\n")[0]
    assert "From: Jörg <jörg@bücher.example>".encode() in header
    assert "To: 用户@例子.广告".encode() in header
    assert "Subject: Grüße".encode() in header and b"=?" not in header
    msg = parse(data)
    assert msg["Subject"] == "Grüße" and msg["X-Note"] == "héllo"
    assert msg["From"].addresses[0].addr_spec == "jörg@bücher.example"


def test_ascii_addresses_give_a_7bit_message() -> None:
    data = build(Submission(sender="Jörg <j@example.com>", to=("b@example.com",),
                            subject="Grüße", text="é" * 10, html="<p>ü</p>",
                            attachments=(Attachment("ñ.txt", b"\xff", "text/plain"),)))
    assert not is_8bit(data)
    assert_wire_form(data)


def test_is_8bit() -> None:
    assert not is_8bit(b"ascii\r\n") and is_8bit(b"\x80") and not is_8bit(b"")


def test_nul_in_a_body_is_encoded() -> None:
    """7bit data may not carry NUL (RFC 2045 2.7): such a body is quoted-printable."""
    data = build(Submission(sender="a@example.com", to=("b@example.com",), text="a\0b"))
    assert_wire_form(data)
    assert body(parse(data)) == "a\0b\n"


# --- round trips -----------------------------------------------------------------------------

# Text for header fields: no control characters but HTAB, no line separators, no lone
# surrogates.
header_text = st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp"),
                                    include_characters="\t"), max_size=120)
display_names = header_text.filter(lambda s: "=?" not in s)
body_lines = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=80),
    st.builds(lambda s: "." + s, st.text(max_size=20)),
    st.builds(lambda s: "From " + s, st.text(max_size=20)),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=990, max_size=2100),
    st.just(""), st.just("."),
)
bodies = st.lists(body_lines, min_size=1, max_size=8).map("\n".join).filter(bool)
# The parsers trim file names, and the standard library's reads "<x>" as "x" and decodes
# "=?...?=" even inside RFC 2231 values: names of those shapes cannot be compared.
file_names = st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")),
                     min_size=1, max_size=120).filter(
    lambda s: s.strip() == s and "=?" not in s and not (s[0] == "<" and s[-1] == ">"))
content_types = st.sampled_from(["application/pdf", "application/octet-stream", "image/png",
                                 "text/plain", "text/csv", "audio/mpeg"])
attachments = st.builds(Attachment, file_names, st.binary(max_size=3000), content_types,
                        st.sampled_from(["", "", "img1@example.com", "logo"]))
local_parts = st.sampled_from(["a", "john.doe", "o'neil", "x+tag", "jörg", "用户"])
domains = st.sampled_from(["example.com", "mail.example.net", "bücher.example"])
mailboxes = st.builds(lambda n, l, d: render_mailbox(n, f"{l}@{d}"), display_names,
                      local_parts, domains)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sender=mailboxes, to=st.lists(mailboxes, min_size=1, max_size=4),
       cc=st.lists(mailboxes, max_size=3), subject=header_text,
       text=st.one_of(st.none(), bodies), html=st.one_of(st.none(), bodies),
       files=st.lists(attachments, max_size=4))
def test_built_message_parses_back_to_the_submission(
        sender: str, to: list[str], cc: list[str], subject: str, text: str | None,
        html: str | None, files: list[Attachment]) -> None:
    """Whatever the names, subject, bodies and files, the message parses back to them and
    keeps to the wire form: CRLF only, lines of at most 998 octets."""
    if text is None and html is None:
        text = "fallback"
    sub = Submission(sender=sender, to=tuple(to), cc=tuple(cc), subject=subject, text=text,
                     html=html, attachments=tuple(files))
    data = build(sub)
    assert_wire_form(data)
    assert is_8bit(data) == sub.needs_smtputf8()
    msg = parse(data)

    # The standard library's address parser puts a space between two adjacent encoded-words
    # of a display name (RFC 2047 6.2 says to drop the white space between them), so names
    # are compared without white space here; test_long_display_name_decodes_exactly checks
    # the encoding itself.
    def addresses(field: str) -> list[tuple[str, str]]:
        return [(squash(a.display_name), a.addr_spec) for a in msg[field].addresses]

    def submitted(mailboxes: list[str]) -> list[tuple[str, str]]:
        return [(squash(name), addr) for name, addr in (parse_mailbox(m, "To") for m in mailboxes)]

    assert addresses("From") == submitted([sender])
    assert addresses("To") == submitted(to)
    if cc:
        assert addresses("Cc") == submitted(cc)
    if subject.strip(" \t"):
        assert msg["Subject"].rstrip(" \t") == subject.strip(" \t")
    parts = list(msg.walk())
    texts = [p for p in parts if p.get_content_type() == "text/plain"
             and p.get_content_disposition() is None]
    htmls = [p for p in parts if p.get_content_type() == "text/html"
             and p.get_content_disposition() is None]
    assert [body(p) for p in texts] == ([normal(text)] if text is not None else [])
    assert [body(p) for p in htmls] == ([normal(html)] if html is not None else [])
    got = [(p.get_filename(), p.get_payload(decode=True), p.get_content_type(),
            (p["Content-ID"] or "<>")[1:-1]) for p in parts if p.get_content_disposition()]
    # inline parts sit in multipart/related before the others; compare as multisets
    want = [(a.name, a.content, a.content_type, a.content_id) for a in files]
    assert sorted(got, key=repr) == sorted(want, key=repr)


@pytest.mark.parametrize("name", [
    "00\xa0\xa0\xa0\xa0\xa0\xa0\xa0\xa0\xa0\xa0𐀀𐀀𐀀𐀀𐀀𐀀",
    "Ünïcödé Display Name That Is Rather Long, Really Quite Long Indeed (Sales)",
    "山田太郎" * 20,
])
def test_long_display_name_decodes_exactly(name: str) -> None:
    """A long non-ASCII display name is split into several encoded-words; an RFC 2047
    decoder (email.header) gets the name back exactly."""
    data = build(Submission(sender=render_mailbox(name, "a@example.com"), to=("b@x.example",),
                            text="t"))
    assert_wire_form(data)
    raw = email.message_from_bytes(data, policy=email.policy.compat32)["From"]
    assert str(make_header(decode_header(raw))) == f"{name} <a@example.com>"


def test_every_mailbox_of_a_list_survives_folding() -> None:
    """Python 3.11 folds a list whose first display name ends in an encoded-word at the end of
    a line by encoding the comma too, and the mailboxes after it are lost; each mailbox is
    folded on its own."""
    first = render_mailbox("00000\xa0\xa0\xa0\xa0\xa0\xa0\xa0𐀀𐀀𐀀", "o'neil@example.com")
    data = build(Submission(sender="a@example.com", to=(first, "b@example.com", "c@example.com"),
                            text="t"))
    assert_wire_form(data)
    assert [a.addr_spec for a in parse(data)["To"].addresses] == [
        "o'neil@example.com", "b@example.com", "c@example.com"]


@settings(max_examples=300, deadline=None)
@given(header_text)
def test_subject_parses_back(subject: str) -> None:
    """The subject comes back as submitted, but for white space at its ends."""
    msg = parse(build(Submission(sender="a@example.com", to=("b@example.com",), subject=subject,
                                 text="t")))
    if subject.strip(" \t"):
        assert msg["Subject"].rstrip(" \t") == subject.strip(" \t")


@settings(max_examples=300, deadline=None)
@given(header_text, st.booleans())
def test_extra_header_parses_back(value: str, smtputf8: bool) -> None:
    """An extra header's value comes back as submitted (but for white space at its ends),
    in an ASCII message (RFC 2047 when needed) and in an SMTPUTF8 one (UTF-8 as is)."""
    sender = "jörg@example.com" if smtputf8 else "a@example.com"
    data = build(Submission(sender=sender, to=("b@example.com",), text="t",
                            headers=(("X-Test", value),)))
    assert_wire_form(data)
    assert parse(data)["X-Test"].rstrip(" \t") == value.strip(" \t")


@given(display_names, local_parts, domains)
def test_rendered_mailbox_parses_back(name: str, local: str, domain: str) -> None:
    """The mailbox string a Submission keeps parses to the same name (but for runs of white
    space outside quotes) and address, and rendering it again changes nothing."""
    addr = f"{local}@{domain}"
    parsed = parse_mailbox(render_mailbox(name, addr), "To")
    assert parsed[1] == addr
    assert parsed[0].split() == name.split()   # runs of white space may be collapsed
    assert parse_mailbox(render_mailbox(*parsed), "To") == parsed


@given(st.text(alphabet=st.characters(max_codepoint=0x7f), max_size=400),
       st.sampled_from(["TextBody", "HtmlBody"]))
def test_single_part_shortcut_equals_set_content(text, field):
    """A one-part message built by the shortcut for plain 7-bit text is what set_content
    makes of the same text: the same header fields and the same body octets."""
    from email.message import MIMEPart
    from txmta.api import mime as M
    from txmta.api.postmark import parse_email
    from txmta.api.submission import InvalidRequest
    doc = {"From": "a@example.com", "To": "b@example.net", "Subject": "s", field: text}
    try:
        sub = parse_email(doc)
    except InvalidRequest:
        return
    built = M.build_message(sub, message_id="0152abcdefghijk", date=1.8e9, hostname="h.test")
    reference = MIMEPart(policy=M._ASCII)
    reference.set_content(text, subtype="plain" if field == "TextBody" else "html",
                          **M._text_kwargs(text))
    ref_bytes = reference.as_bytes(policy=M._ASCII)
    ref_head, _, ref_body = ref_bytes.partition(b"\r\n\r\n")
    head, _, body = built.partition(b"\r\n\r\n")
    assert body == ref_body
    for line in ref_head.split(b"\r\n"):
        assert line in head.split(b"\r\n")
    # and the whole message is what the email package's generator writes of it
    again = email.message_from_bytes(built, policy=M._ASCII)
    assert again.as_bytes(policy=M._ASCII) == built
