"""What an attempt did to each recipient, and the one place that decides what a reply means.

Pure: no I/O.  An attempt yields, per recipient, `Delivered`, `TempFailed` or `PermFailed`
(DESIGN invariant 4: remote behaviour never raises).  `classify()` turns an SMTP reply seen
at some stage of a session into a `Verdict`: the outcome kind, whether to try the next MX
host for it, and whether the failure says something about the whole destination (so its
queued mail waits for the destination's retry, not each message separately).

The rules follow RFC 5321 4.2.1 and 4.5.4.1 and Postfix's smtp_trouble.c: a failure to
connect or a 4xx/5xx greeting, EHLO, STARTTLS or AUTH is a site failure (try the next MX;
throttle the destination if it was the last) and never bounces, except a 521/556 greeting
(RFC 7504: the host accepts no mail); a 5xx at MAIL, RCPT or end of DATA is permanent for
the recipients concerned; a 4xx there is temporary for them and tells nothing about the
site.  Callers classify positive replies only at the end of the data (DOT).
"""
# test: tests/test_outcome.py

from __future__ import annotations

from dataclasses import dataclass, field

from txmta.reply import Reply

# Stages of a client session, in order.
CONNECT = "connect"
GREETING = "greeting"
EHLO = "ehlo"
STARTTLS = "starttls"
AUTH = "auth"
MAIL = "mail"
RCPT = "rcpt"
DATA = "data"       # the reply to the DATA command (354 expected)
DOT = "dot"         # the reply after the message content
ROUTE = "route"     # before any session: DNS and routing
STAGES = (ROUTE, CONNECT, GREETING, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, DOT)
SESSION_STAGES = frozenset({CONNECT, GREETING, EHLO, STARTTLS, AUTH})


@dataclass(frozen=True, slots=True)
class Delivered:
    reply: Reply
    host: str = ""            # remote MX name
    address: str = ""         # remote IP
    tls: str = ""             # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    remote_dsn: bool = False  # the next hop took DSN parameters (else a "relayed" DSN is owed)
    stage: str = "dot"


@dataclass(frozen=True, slots=True)
class TempFailed:
    reply: Reply
    host: str = ""
    address: str = ""
    tls: str = ""
    stage: str = ""
    greylisted: bool = False
    retry_after: float | None = None   # seconds the reply asked us to wait, if it said


@dataclass(frozen=True, slots=True)
class PermFailed:
    reply: Reply
    host: str = ""
    address: str = ""
    tls: str = ""
    stage: str = ""


Outcome = Delivered | TempFailed | PermFailed


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: type                 # Delivered, TempFailed or PermFailed
    next_mx: bool = False      # try the recipients at the next MX host / address
    site_failure: bool = False # the destination itself is failing (throttle it when last MX)
    notes: tuple[str, ...] = field(default_factory=tuple)


def classify(reply: Reply, stage: str, last_mx: bool = True) -> Verdict:
    """Decide what `reply`, received at `stage`, means for the recipients it concerns."""
    if stage in SESSION_STAGES:
        # Nothing was said about any recipient: the host failed, another MX may work, and
        # at the last MX the mail waits, as with Postfix's smtp_skip_5xx_greeting and
        # smtp_sasl_auth_soft_bounce (a 535 is our credentials' fault, not the mail's).
        # Only a server that says it never accepts mail (RFC 7504: 521, 556) bounces.
        if reply.code < 400:
            return Verdict(Delivered)
        if reply.code in (521, 556) and last_mx and stage in (GREETING, CONNECT):
            return Verdict(PermFailed, site_failure=True)
        return Verdict(TempFailed, next_mx=not last_mx, site_failure=True)
    if stage == ROUTE:
        return Verdict(PermFailed if reply.permanent else TempFailed, site_failure=True)
    if reply.code < 400:
        return Verdict(Delivered)
    if stage == MAIL and reply.enhanced == "5.7.10" and not last_mx:
        # RFC 8689 4.2.1: REQUIRETLS could not be met by this host; another MX may meet it
        return Verdict(PermFailed, next_mx=True)
    if reply.permanent:
        return Verdict(PermFailed)
    # 4xx at MAIL/RCPT/DATA/DOT: temporary for these recipients. A 421 means the server is
    # closing the session: a site problem, and another MX may take the mail.
    if reply.code == 421:
        return Verdict(TempFailed, next_mx=not last_mx, site_failure=True)
    return Verdict(TempFailed)
