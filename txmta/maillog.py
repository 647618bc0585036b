"""The mail log: one line per mail event, apart from the debug log.

Each event names the queue id first, then the words operators grep for
(`client=`, `from=<…>`, `nrcpt=`, `size=`, `tls=`).  Events go through twisted.logger
under the namespace "txmta.maillog" with the values as structured fields, so
`[log] format = "json"` ships them as JSON objects (one per line) without parsing text.
"""
# test: tests/test_maillog.py

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from txmta.spool.interface import StoredMessage


class MailLog:
    def __init__(self, logger: Logger | None = None) -> None:
        self.log = logger or Logger(namespace="txmta.maillog")

    def received(self, m: StoredMessage) -> None:
        c = m.client
        fields: dict[str, Any] = {
            "event": "received", "id": m.id, "client": c.get("address", ""),
            "helo": c.get("helo", ""), "sender": str(m.envelope.sender),
            "nrcpt": len(m.envelope.recipients), "size": m.size, "tls": c.get("tls", "none"),
        }
        self.log.info("{id}: received client={client} helo={helo} from=<{sender}> "
                      "nrcpt={nrcpt} size={size} tls={tls}", **fields)
