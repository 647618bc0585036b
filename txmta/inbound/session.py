"""Facts about one inbound SMTP connection (or one HTTP API request, or one local submission
through txmta-sendmail), shared by the protocol and the receiver."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Session:
    client_ip: str
    client_port: int
    listener: str                  # the listen address it came in on
    helo: str | None = None
    esmtp: bool = False
    tls_version: str | None = None     # e.g. "TLSv1.3" once TLS is up
    tls_cipher: str | None = None
    tls_bits: int | None = None
    auth_user: str | None = None
    api_token: str | None = None       # the HTTP API: the token's name (then helo is None)
    relay_client: bool = False         # the client's address is in relay.networks
    local_user: str | None = None      # submitted by this local user through txmta-sendmail

    @property
    def trusted(self) -> bool:
        """Whether the client may give the X-Txmta-* control header fields: authenticated
        (SMTP AUTH or an API token), in relay.networks, or a local user of txmta-sendmail
        (who can write the spool anyway)."""
        return (self.relay_client or self.auth_user is not None or self.api_token is not None
                or self.local_user is not None)

    @property
    def tls(self) -> bool:
        return self.tls_version is not None

    def client_info(self) -> dict[str, str]:
        info = {"address": self.client_ip, "helo": self.helo or "", "listener": self.listener}
        if self.tls_version:
            info["tls"] = f"{self.tls_version} {self.tls_cipher}"
        if self.auth_user:
            info["auth"] = self.auth_user
        if self.api_token is not None:
            info["token"] = self.api_token
        if self.local_user is not None:
            info["user"] = self.local_user
        return info
