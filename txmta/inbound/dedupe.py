"""The SMTP intake's duplicate check ([intake] dedupe_window): which earlier message a new
one repeats.

An application that retries after a timeout or an ambiguous 4xx sends the same message
again.  Its key: the client (the authenticated user, else the client address), the
message's own Message-ID header field, the envelope sender and the recipients in sorted
order.  The recipients belong to it because an MTA that splits one message's recipients
over several transactions sends the same Message-ID in each.  The key is hashed and
namespaced: the HTTP API's Idempotency-Key entries (32 octets, txmta/api/server.py) share
the spool's index and can never be taken for one of these.

Pure: no I/O, no clock; the receiver passes the time.  The spool commits the key with the
message (`Idempotency`), so two sessions racing with one message end with one stored.
"""
# test: tests/test_dedupe.py

from __future__ import annotations

import hashlib
import json

from twisted.logger import Logger

from txmta.message import Envelope, Idempotency
from txmta.reply import Reply

log = Logger()

PREFIX = b"smtp-dedupe/"    # 44-octet keys: an API key is 32 octets, so none is ever equal


def client_identity(auth_user: str | None, client_ip: str) -> str:
    """Who sent it: the authenticated user, else the client address."""
    return f"user:{auth_user}" if auth_user else f"ip:{client_ip}"


def dedupe_key(client: str, header_id: str, envelope: Envelope) -> bytes:
    """The index key of a message from `client` with Message-ID `header_id`."""
    fields = [client, header_id, str(envelope.sender),
              sorted(str(r.address) for r in envelope.recipients)]
    digest = hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode("utf-8",
                                                                          "surrogatepass"))
    return PREFIX + digest.digest()


def dedupe(client: str, header_id: str, envelope: Envelope, message_id: str, now: float,
           window: float) -> Idempotency | None:
    """What the put of queue id `message_id` stores to find its repeats within `window`
    seconds of `now`; None when the check is off (window 0) or the message had no
    Message-ID of its own (`header_id` "")."""
    if window <= 0 or not header_id:
        return None
    return Idempotency(dedupe_key(client, header_id, envelope), message_id.encode("ascii"),
                       now - window)


def duplicate_reply(first: bytes) -> Reply:
    """The answer to a repeat: success, with the queue id of the message stored first."""
    return Reply(250, "2.0.0", f"Ok: queued as {first.decode('ascii', 'replace')} (duplicate)")


def log_duplicate(first: str, client: dict[str, str], sender: str, nrcpt: int,
                  header_id: str) -> None:
    """The daemon log's line for a repeat (the receiver's default; worker.py passes the
    mail log's `MailLog.duplicate`, which writes the same words)."""
    log.info("{first}: duplicate client={client} from=<{sender}> nrcpt={nrcpt} "
             "message-id={mid} (not stored again)", first=first,
             client=client.get("address", ""), sender=sender, nrcpt=nrcpt, mid=header_id)
