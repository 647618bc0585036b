"""Replies render per RFC 5321 4.2.1 with enhanced codes per RFC 2034."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txmta.reply import Reply


def test_single_line_reply_carries_enhanced_code():
    """A one-line reply is `code SP enhanced SP text CRLF`."""
    assert Reply(250, "2.1.0", "Sender OK").to_bytes() == b"250 2.1.0 Sender OK\r\n"


def test_multiline_reply_repeats_code_and_enhanced_code():
    """Every line but the last uses `-`; each carries the enhanced code (RFC 2034 3)."""
    assert Reply(550, "5.7.1", "one\ntwo").to_bytes() == b"550-5.7.1 one\r\n550 5.7.1 two\r\n"


def test_greeting_style_reply_without_enhanced_code():
    """EHLO and greeting replies are exempt from enhanced codes."""
    assert Reply(250, "", "host\nPIPELINING").to_bytes() == b"250-host\r\n250 PIPELINING\r\n"


@pytest.mark.parametrize("code", [199, 600, 0])
def test_code_out_of_range_is_refused(code):
    """A reply code outside 2xx-5xx is a programming error."""
    with pytest.raises(ValueError):
        Reply(code, "2.0.0", "x")


@pytest.mark.parametrize("enhanced, text, stated", [
    ("4.7.1", "Greylisted", "4.7.1"),
    ("", "4.2.0 Greylisted, try again later", "4.2.0"),
    ("", "  5.1.1 no such user", "5.1.1"),
    ("", "Greylisted for 300 seconds", ""),
    ("", "4.2 is not a code", ""),
])
def test_stated_enhanced_reads_a_code_left_at_the_start_of_the_text(enhanced: str, text: str,
                                                                     stated: str) -> None:
    assert Reply(451, enhanced, text).stated_enhanced == stated


@given(st.text(), st.integers(min_value=3, max_value=600))
def test_cut_keeps_text_within_its_octets(text, octets):
    """reply.cut: short text unchanged; a longer one a prefix of it within `octets` octets of
    UTF-8, ending in "..." (never a broken character)."""
    from txmta.reply import cut
    shown = cut(text, octets)
    if len(text.encode("utf-8")) <= octets:
        assert shown == text
    else:
        assert shown.endswith("...") and text.startswith(shown[:-3])
        assert len(shown.encode("utf-8")) <= octets
