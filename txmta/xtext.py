"""xtext (RFC 3461 4): the encoding of ENVID, ORCPT and AUTH= values in SMTP commands.

Pure.  Encoding lives here, below both sides, because the outbound client writes xtext
and the inbound grammar reads it (decoding, with its 501 replies, stays in the grammar).
"""
# test: tests/test_grammar.py

from __future__ import annotations


def xtext_encode(s: str) -> str:
    """Encode text as RFC 3461 xtext: printable ASCII stays, except "+" and "=";
    everything else becomes "+XX" per UTF-8 octet (upper-case hex)."""
    out = []
    for byte in s.encode("utf-8", "surrogatepass"):
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)
