"""Duplicate submissions with a real twistd ([intake] dedupe_window, default 24 h).

An application retries a message (same Message-ID, sender and recipients, same client):
the daemon answers `250 2.0.0 Ok: queued as <first id> (duplicate)`, stores it once, and the
relayhost (a `sinks.SmtpSink` on 127.0.0.35) receives it once.  The key is in the spool,
committed with the first message: after the first was delivered and the daemon was stopped
and started again, a third send is still a duplicate.  With one worker and with
two (the workers share the spool's index; the kernel spreads the connections).
"""

from __future__ import annotations

import re
import smtplib
import time
from typing import Any, Callable

import pytest

from itlib import Daemon, common_free_port, delivery_sections, queued_id, wait_until
from sinks import SmtpSink

pytestmark = pytest.mark.integration

SINK_IP = "127.0.0.35"
MESSAGE = (b"From: <app@client.test>\r\nTo: <user@anywhere.test>\r\n"
           b"Message-ID: <reset-42@client.test>\r\nSubject: your password reset\r\n"
           b"\r\nThe link.\r\n")


def send(d: Daemon, body: bytes = MESSAGE) -> str:
    """One message on a fresh connection; the text of the reply to its end of data."""
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.ehlo("client.test.invalid")
        assert s.mail("app@client.test")[0] == 250
        assert s.rcpt("user@anywhere.test")[0] == 250
        code, text = s.data(body)
    assert code == 250, (code, text)
    return text.decode()


def lines(d: Daemon, word: str) -> list[str]:
    return [ln for ln in d.maillog().splitlines() if re.search(rf": {word} ", ln)]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_resubmitted_message_is_stored_and_delivered_once(
        start_daemon: Callable[..., Daemon], workers: int) -> None:
    port = common_free_port(SINK_IP)
    with SmtpSink(SINK_IP, port) as sink:
        sections: dict[str, Any] = delivery_sections(port, None, relayhost=f"{SINK_IP}:{port}")
        d = start_daemon(server={"workers": workers}, **sections)
        first = queued_id(send(d))
        assert send(d) == f"2.0.0 Ok: queued as {first} (duplicate)"
        sink.wait(lambda s: len(s.transactions) >= 1, 15, "the message at the relayhost")
        wait_until(lambda: not d.spool_ids(), 15, "the spool to be empty")
        wait_until(lambda: len(lines(d, "duplicate")) == 1, 5, "the duplicate's mail log line")
        assert len(lines(d, "received")) == 1
        [dup] = lines(d, "duplicate")
        assert f"{first}: duplicate client=127.0.0.1" in dup
        assert "message-id=<reset-42@client.test>" in dup

        assert d.stop() == 0        # the key was committed with the message and outlives it
        d.start()
        assert send(d) == f"2.0.0 Ok: queued as {first} (duplicate)"
        other = queued_id(send(d, MESSAGE.replace(b"reset-42", b"reset-43")))
        assert other != first
        sink.wait(lambda s: len(s.transactions) >= 2, 15, "the other message at the relayhost")
        wait_until(lambda: len(lines(d, "duplicate")) == 2, 5, "the second duplicate's line")
        time.sleep(0.5)             # nothing else arrives
    ids = [re.search(rb"Message-ID: <([^>]+)>", t.data).group(1) for t in sink.snapshot()]
    assert sorted(ids) == [b"reset-42@client.test", b"reset-43@client.test"]
    assert len(lines(d, "received")) == 2
