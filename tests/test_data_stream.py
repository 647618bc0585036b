"""The DATA and BDAT byte streams (txmta/inbound/data.py), checked with hypothesis.

Promises: CRLF "." CRLF ends DATA and nothing else does (RFC 5321 4.1.1.4, 2.3.8); a
leading "." is removed from every other line (RFC 5321 4.5.2); bytes after the end are
handed back as pipelined commands (RFC 2920); a bare CR or LF is flagged or turned into
CRLF; and how the stream is cut into packets never changes any of it.  BDAT (RFC 3030)
carries raw octets with the same bare CR/LF handling.
"""

from __future__ import annotations

import re
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txmta.inbound import data as data_module
from txmta.inbound.data import BdatStream, DataStream, fix_bare, has_bare

FAST = settings(max_examples=300, deadline=None)
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")

# -- strategies --------------------------------------------------------------------------

line_text = st.lists(st.sampled_from([b"a", b".", b" ", b"x.y", b"\x00", b"\xff", b"..", b"-"]),
                     max_size=6).map(b"".join)
crlf_body = st.lists(line_text, max_size=8).map(lambda lines: b"".join(l + b"\r\n" for l in lines))
# raw bytes rich in the characters that matter, bare CR and LF included
tricky = st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b".\r\n",
                                   b"\r\n.\r", b"\n.\n"]), max_size=16).map(b"".join)
trailer = st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@b.c>\r\nRCPT", b".\r\n", b"\r\n.\r\n"])


def stuff(body: bytes) -> bytes:
    """Dot-stuff CRLF lines as a client does (RFC 5321 4.5.2)."""
    return b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n"
                    for l in body.split(b"\r\n")[:-1])


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    edges = [0] + points + [len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def run_data(chunks: list[bytes], fix: bool) -> tuple[bytes, bytes, bool, bool, int]:
    """Feed chunks as the server does; (content, leftover, done, bare, size)."""
    s = DataStream(fix=fix)
    content, leftover = [], []
    for chunk in chunks:
        out, rest = s.feed(chunk)
        content.append(out)
        leftover.append(rest)
    return b"".join(content), b"".join(leftover), s.done, s.bare, s.size


def reference(wire: bytes, fix: bool) -> tuple[bytes, bytes, bool, bool, int]:
    """What RFC 5321 says, computed on the whole input at once."""
    s = b"\r\n" + wire
    end = s.find(b"\r\n.\r\n")
    assert end >= 0
    raw = s[2:end + 2] if end > 0 else b""
    content = (b"\r\n" + raw).replace(b"\r\n.", b"\r\n")[2:]
    bare = has_bare(content)
    if fix:
        content = fix_bare(content)
    return content, s[end + 5:], True, bare, len(content)


# -- DATA --------------------------------------------------------------------------------

@FAST
@given(body=crlf_body, after=trailer, points=st.lists(st.integers(0, 10_000), max_size=12))
def test_stuffed_body_round_trips_whatever_the_split(body, after, points):
    """Dot-stuffed CRLF lines then ".CRLF", cut anywhere, give back exactly the body; the
    bytes after the end come back as leftover (RFC 5321 4.5.2, RFC 2920)."""
    wire = stuff(body) + b".\r\n" + after
    for fix in (False, True):
        content, leftover, done, bare, size = run_data(cut(wire, points), fix)
        assert (content, leftover, done, bare, size) == (body, after, True, False, len(body))


@FAST
@given(raw=tricky, after=trailer, points=st.lists(st.integers(0, 10_000), max_size=12),
       fix=st.booleans())
def test_any_bytes_match_the_whole_input_reference_whatever_the_split(raw, after, points, fix):
    """For any bytes (bare CR/LF included) the stream ends at the first CRLF.CRLF, unstuffs,
    flags or fixes bare CR/LF exactly as the whole-input reference, for any split."""
    wire = raw + b"\r\n.\r\n" + after
    got = run_data(cut(wire, points), fix)
    assert got == reference(wire, fix)
    if fix:
        assert BARE.search(got[0]) is None


@FAST
@given(raw=tricky, after=trailer, points=st.lists(st.integers(0, 10_000), max_size=12),
       fix=st.booleans(), limit=st.integers(2, 6))
def test_long_partial_lines_do_not_change_the_output(raw, after, points, fix, limit):
    """Lines longer than MAX_PARTIAL are passed on in pieces without changing the result.

    (MAX_PARTIAL is patched down to reach that path; below 2 it could flush the ".CR" of
    the end line itself, which the real 64 KiB limit never can.)"""
    wire = raw + b"\r\n.\r\n" + after
    with mock.patch.object(data_module, "MAX_PARTIAL", limit):
        got = run_data(cut(wire, points), fix)
    assert got == reference(wire, fix)


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n",
                                      b"\r\n.\r", b"\n.\r"])
def test_fake_ends_never_end_data(fake_end):
    """Bare CR or LF around a dot is not the end of DATA (RFC 5321 2.3.8, CVE-2023-51764)."""
    for fix in (False, True):
        s = DataStream(fix=fix)
        for i in range(len(fake_end)):          # and not byte by byte either
            s.feed(fake_end[i:i + 1])
        out, rest = s.feed(b"MAIL FROM:<x@y.z>\r\n")
        assert not s.done and rest == b""
        assert s.bare


def test_end_at_the_very_start():
    """".CRLF" right after 354 is an empty message."""
    s = DataStream()
    assert s.feed(b".\r\nQUIT\r\n") == (b"", b"QUIT\r\n")
    assert s.done and s.size == 0


def test_feed_after_done_returns_everything_as_leftover():
    """Once done, further input is handed back untouched."""
    s = DataStream()
    s.feed(b"x\r\n.\r\n")
    assert s.feed(b"NOOP\r\n") == (b"", b"NOOP\r\n")


def test_a_very_long_line_is_passed_on_before_it_ends():
    """A line longer than MAX_PARTIAL does not stay buffered: memory stays bounded."""
    s = DataStream()
    line = b"x" * (data_module.MAX_PARTIAL + 10)
    out, rest = s.feed(line)
    assert out == line[:-1] and rest == b""
    out, rest = s.feed(b"\r\n.\r\n")
    assert out == b"x\r\n" and s.done


# -- BDAT ---------------------------------------------------------------------------------

def run_bdat(chunks: list[bytes], fix: bool) -> tuple[bytes, bool, int]:
    s = BdatStream(fix=fix)
    out = b"".join(s.feed(c) for c in chunks) + s.finish()
    return out, s.bare, s.size


@FAST
@given(raw=tricky, points=st.lists(st.integers(0, 10_000), max_size=12))
def test_bdat_output_is_the_input_whatever_the_chunking(raw, points):
    """BDAT octets are passed on unchanged (no dot-stuffing, RFC 3030 2) for any chunking;
    bare CR/LF are flagged exactly when present."""
    out, bare, size = run_bdat(cut(raw, points), fix=False)
    assert (out, bare, size) == (raw, has_bare(raw), len(raw))


@FAST
@given(raw=tricky, points=st.lists(st.integers(0, 10_000), max_size=12))
def test_bdat_fix_mode_is_the_whole_input_fixed_whatever_the_chunking(raw, points):
    """In fix mode BDAT output is the whole input with bare CR/LF turned into CRLF."""
    out, bare, size = run_bdat(cut(raw, points), fix=True)
    assert (out, bare, size) == (fix_bare(raw), has_bare(raw), len(fix_bare(raw)))
    assert BARE.search(out) is None


def test_bdat_crlf_split_across_chunks_is_not_bare():
    """CR at the end of one chunk and LF at the start of the next is a CRLF (RFC 3030 2)."""
    assert run_bdat([b"a\r", b"\nb"], fix=False) == (b"a\r\nb", False, 4)


def test_bdat_trailing_cr_at_the_end_is_bare():
    """A CR ending the last chunk is a bare CR."""
    assert run_bdat([b"a\r"], fix=False) == (b"a\r", True, 2)
    assert run_bdat([b"a\r"], fix=True) == (b"a\r\n", True, 3)
