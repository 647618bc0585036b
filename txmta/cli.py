"""The `txmta` command: administration of a txmta installation.

Its grammar is ONE table (`COMMANDS`): each entry names a subcommand, its arguments
and the function that runs it.  Implemented here:

    txmta check-config [FILE]            validate a configuration file
    txmta passwd [USER]                  print a `USER:HASH` line for the AUTH users file
    txmta doctor DOMAIN [--address IP]... [--json]   check DOMAIN's SPF, DKIM, DMARC, MX,
                                         reverse DNS, MTA-STS and TLS-RPT records in DNS
    txmta queue list [--json] [--lane L] [--limit N] [--after ID]   the queue, like Postfix
                                         mailq (--limit: one page, read alone)
    txmta queue show ID [--json] [--body]    one message, queued or finished: envelope,
                                         states, timeline, header section (--body: the whole
                                         stored message, like postcat -q)
    txmta history --message-id ID [--json]   the same, found by its Message-ID header
    txmta history --recipient|--sender ADDR [--limit N] [--json]   the newest messages to
                                         or from ADDR, queued or finished (lookup index)
    txmta --version                      the version
    txmta suppression list [--all] [--json]  the suppressed addresses
    txmta queue flush [ID] [--domain D]  make deferred recipients due now
    txmta queue hold|release ID          stop / resume delivery attempts for a message
    txmta queue requeue ID               retry a message now with a fresh retry schedule
    txmta queue delete ID                remove a message, without a bounce
    txmta status [--json]                the running daemon's status
    txmta suppression add ADDRESS [--reason TEXT]   suppress mail to an address
    txmta suppression remove ADDRESS     take it off the list
    txmta suppression import FILE        suppress each `address[,reason]` line of FILE
    txmta api-token NAME [--scope S]... [--domain D]... [--lane L] [--test] [--file PATH]
                                         make an HTTP API token (printed once; the tokens
                                         file keeps its hash)
    txmta webhook list [--json]          the [[webhook]] endpoints, what waits for each
    txmta webhook replay ID              send a message's events (or one, by webhook-id) again
    txmta webhook test URL [--secret FILE]   POST a signed test event, show the answer
    txmta dkim keygen --domain D --selector S [--algorithm A] [--bits N] [--key PATH]
                                         write a DKIM private key, print the DNS record

`queue list`, `queue show`, `history` and `suppression list` read the spool read-only
(`LmdbView`, short read transactions), so they work while the daemon runs and never change
anything.
Commands that change the queue or the suppression list go through the running daemon's
control socket (`txmta.control.amp`, `control.sock` in the spool directory), never straight
to the spool: the daemon is the spool's only writer.  Each maps to one AMP command
(`suppression import` sends a long file as several SuppressionImport requests).
The daemon itself is started by `twistd -n txmta --config FILE`, not by this command.
"""
# test: tests/test_cli.py

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Sequence

from txmta import config
from txmta.config import ConfigError
from txmta.passwords import hash_password
from txmta.message import HELD, QUEUED, UNFINISHED, Event, StoredMessage
from txmta.messagejson import (Shown, _reply_text, _sender, check_address, header_section,
                               iso_utc, message_json, shown_json, suppression_json)
from txmta.spool.interface import SpoolError


class CommandFailed(Exception):
    """A subcommand cannot do its job; the message goes to stderr and the exit status is 1."""


@dataclass(frozen=True)
class Command:
    words: str                                          # "queue list"
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- check-config ---------------------------------------------------------------------

def _args_check_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", default=config.DEFAULT_PATH,
                   help=f"configuration file (default {config.DEFAULT_PATH})")


def check_config(args: argparse.Namespace) -> int:
    """Every error, each on its own line (not only the first), then warnings; exit 1 when
    there is an error."""
    cfg, found = config.all_errors(args.file)
    errors = [str(e) for e in found]
    warnings: list[str] = []
    if cfg is not None:
        for check in (_check_tls, _check_dkim, _check_tokens, _check_source_addresses,
                      _check_spool, _check_listeners):
            try:
                check(cfg, args.file)
            except (CommandFailed, ConfigError) as e:
                errors.append(str(e))
            except Exception as e:      # a check's own failure: say which, go on
                errors.append(f"{args.file}: {check.__name__[7:]}: {e}")
        warnings += _hostname_warnings(cfg, args.file)
    for line in errors:
        print(line, file=sys.stderr)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if errors:
        return 1
    print(f"{args.file}: OK" + (f" ({len(warnings)} warning{'s' * (len(warnings) != 1)})"
                                if warnings else ""))
    return 0


def _check_tls(cfg: config.Config, file: str) -> None:
    if cfg.tls.cert and cfg.tls.key:  # the daemon would refuse to start on bad TLS material
        from txmta.inbound.tlscontext import load_server_context
        load_server_context(cfg.tls, cfg.path)


def _check_dkim(cfg: config.Config, file: str) -> None:
    from txmta.dkim import Signer
    Signer.from_config(cfg)           # the [[dkim]] key files, as the daemon reads them


def _check_tokens(cfg: config.Config, file: str) -> None:
    if cfg.http and cfg.api.tokens:   # the API tokens file, as the workers read it
        from txmta.api.tokens import TokenFileError, TokenStore
        try:
            TokenStore(cfg.api.tokens, time.time)
        except TokenFileError as e:
            raise CommandFailed(f"{file}: api.tokens = \"{cfg.api.tokens}\": {e}") from None


def _check_spool(cfg: config.Config, file: str) -> None:
    """The spool directory exists (or can be made) and is writable."""
    path = cfg.spool.path
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".check-config.{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise CommandFailed(f"{file}: spool.path = \"{path}\": cannot write to "
                            f"{os.path.abspath(path)}: {e.strerror or e}") from None


def _daemon_running(cfg: config.Config) -> bool:
    import socket
    from txmta.control import amp as control
    path = control.control_socket_path(cfg.spool.path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            s.connect(path)
        return True
    except OSError:
        return False


def _check_listeners(cfg: config.Config, file: str) -> None:
    """Every [[listen]] and [[http]] address can be bound, unless the daemon is running
    (then it holds them)."""
    if _daemon_running(cfg):
        return
    from txmta.tcp import listening_socket
    problems = []
    wanted = config.named_listeners(cfg)
    for name, lst in wanted:
        try:
            listening_socket(lst.host, lst.port).close()
        except OSError as e:
            problems.append(f"{file}: {name}.address = \"{lst.address}\": cannot listen: "
                            f"{e.strerror or e}")
    if problems:
        raise CommandFailed("\n".join(problems))


def _hostname_warnings(cfg: config.Config, file: str) -> list[str]:
    name = cfg.server.hostname.rstrip(".").lower()
    if name == "localhost" or name.startswith("localhost.") or "." not in name:
        return [f"{file}: server.hostname = \"{cfg.server.hostname}\": not a fully qualified "
                "name; other servers greet and bounce by it: set server.hostname = "
                "\"mail.example.com\" (the name the host's address resolves back to)"]
    return []


def _check_source_addresses(cfg: config.Config, file: str) -> None:
    """Every source address (delivery.source_address, the [[pool]] addresses) is one of this
    host's: a connection can be bound to it."""
    import socket
    wanted = [("delivery.source_address", cfg.delivery.source_address)] if (
        cfg.delivery.source_address) else []
    wanted += [(f"pool[{n}].addresses", a.address)
               for n, pool in enumerate(cfg.pools) for a in pool.addresses]
    for key, address in wanted:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((address, 0))
        except OSError as e:
            raise CommandFailed(f"{file}: {key}: {address} is not an address of this host "
                                f"({e.strerror or e})") from None


# -- passwd ---------------------------------------------------------------------------

def _args_passwd(p: argparse.ArgumentParser) -> None:
    p.add_argument("user", nargs="?", default=None, help="user name (default: your login name)")


def passwd(args: argparse.Namespace) -> int:
    user = args.user if args.user is not None else getpass.getuser()
    if not user or ":" in user or any(c.isspace() for c in user):
        raise CommandFailed(f"bad user name {user!r}: no colon or white space allowed")
    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {user}: ")
        again = getpass.getpass("Again: ")
        if password != again:
            raise CommandFailed("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CommandFailed("empty password")
    print(f"{user}:{hash_password(password)}")
    return 0


# -- doctor ---------------------------------------------------------------------------

def _args_doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="the sending domain (the From domain of your mail)")
    p.add_argument("--address", metavar="IP", action="append", default=[],
                   help="an address mail leaves from (repeatable; default "
                        "delivery.source_address and the [[pool]] addresses, else the "
                        "addresses of server.hostname)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    _args_config(p)


def doctor(args: argparse.Namespace) -> int:
    """Check DOMAIN's DNS as receivers will (txmta.doctor): exit 0 when no check failed, 1
    when one did, 2 on a usage or configuration error.  The one subcommand that runs the
    Twisted reactor; it asks `dns.nameservers`."""
    from txmta import doctor as checks
    from txmta.tap import global_reactor    # only this command needs one
    from txmta.outbound.dns import parse_nameserver
    try:
        cfg = config.load(args.config)
        setup = checks.Setup.from_config(cfg, args.domain, args.address)
    except (ConfigError, ValueError) as e:
        print(f"txmta doctor: {e}", file=sys.stderr)
        return 2
    try:
        rows = checks.run(global_reactor(), setup, [parse_nameserver(n) for n in cfg.dns.nameservers])
    except RuntimeError as e:
        raise CommandFailed(f"txmta doctor: {e}") from e
    if args.json:
        print(json.dumps(checks.report_json(setup.domain, rows), indent=2, ensure_ascii=False))
    else:
        print(checks.report_text(setup.domain, rows))
    return 1 if checks.failed(rows) else 0


# -- queue list / queue show ------------------------------------------------------------

def _args_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"configuration file (default {config.DEFAULT_PATH} if it exists)")


def _args_queue_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list of messages")
    p.add_argument("--lane", metavar="L", default=None,
                   help="only the messages of this lane ([[lane]] name)")
    p.add_argument("--limit", metavar="N", type=int, default=None,
                   help="only the first N messages (a page; reads only those)")
    p.add_argument("--after", metavar="ID", default=None,
                   help="only messages after queue id ID (the next page: the last id shown)")
    _args_config(p)


def _args_queue_show(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", help="queue id (of a queued message, or a finished one still in the "
                              "history)")
    p.add_argument("--json", action="store_true", help="print the message as JSON")
    p.add_argument("--body", action="store_true",
                   help="print the whole stored message, header section and body, like "
                        "postcat -q (a queued message: the body is not kept after it finished)")
    _args_config(p)


def _open_view(args: argparse.Namespace) -> Any:
    """The read-only spool of the configuration in --config."""
    from txmta.spool.view import LmdbView      # lmdb is only needed by the queue commands
    cfg = config.load(args.config)
    try:
        return LmdbView(cfg.spool.path)
    except SpoolError as e:
        raise CommandFailed(f"cannot open the spool: {e}") from e
    except Exception as e:      # lmdb.Error and OSError: permissions, a lock file, ...
        raise CommandFailed(f"cannot open the spool at {cfg.spool.path}: {e}") from e


_RCPT_COLUMN = 46                # under the sender: 16 (id) + 8 (size) + 1 + 20 (time) + 1


def _mailq_entry(m: StoredMessage) -> list[str]:
    """One message in Postfix mailq layout; the id is marked `!` when every pending
    recipient is held (as mailq marks the hold queue)."""
    pending = [st.state for st in m.recipients if st.state in UNFINISHED]
    mark = "!" if pending and all(s == HELD for s in pending) else " "
    arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(m.arrival))
    lines = [f"{m.id + mark:<16}{m.size:>8} {arrival:<20} {_sender(m)}"]
    pad = " " * _RCPT_COLUMN
    for r, st in zip(m.envelope.recipients, m.recipients):
        if st.last_reply is not None:
            lines.append(f"{pad}({_reply_text(st.last_reply)})")
        detail = st.state
        if st.attempts:
            detail += f", {st.attempts} attempt{'s' if st.attempts != 1 else ''}"
        lines.append(f"{pad}{r.address}  [{detail}]")
    return lines


def queue_list(args: argparse.Namespace) -> int:
    lanes = None
    if args.lane is not None:
        lanes = config.load(args.config).lanes
        if args.lane not in lanes:
            raise CommandFailed(f"--lane {args.lane}: no such lane (configured: "
                                + ", ".join(lane.name for lane in lanes) + ")")
    if args.limit is not None and args.limit < 1:
        raise CommandFailed("--limit: at least 1")
    view = _open_view(args)
    try:
        page = 500 if args.limit is None or lanes is not None else args.limit + 1
        found = view.messages(after=args.after, chunk=min(500, page))
        if lanes is not None:   # mail stored in a lane no longer configured is in the default lane
            found = (m for m in found if lanes.name_of(m.lane) == args.lane)
        # a page reads one message past it, to know whether there is more
        messages = list(islice(found, None if args.limit is None else args.limit + 1))
        more = args.limit is not None and len(messages) > args.limit
        del messages[args.limit if more else len(messages):]
        queued = view.count() if more else len(messages)
    finally:
        view.close()
    if args.json:
        print(json.dumps([message_json(m) for m in messages], indent=2, ensure_ascii=False))
        return 0
    if not messages:
        print("Mail queue is empty")
        return 0
    print(f"{'-Queue ID-':<16}{'--Size--':>8} {'----Arrival Time----':<20} -Sender/Recipient-------")
    for m in messages:
        print("\n".join(_mailq_entry(m)))
        print()
    total = sum(m.size for m in messages)
    print(f"-- {(total + 1023) // 1024} Kbytes in {len(messages)} "
          f"Request{'s' if len(messages) != 1 else ''}.")
    if more:
        print(f"-- {queued} messages in the queue; the next page: --after {messages[-1].id}")
    return 0


def _lookup(view: Any, message_id: str) -> Shown:
    """The message `message_id` from the queue, else from the history of finished messages."""
    try:
        m = view.get(message_id)
        finished = None
        if m is None:
            kept = view.history(message_id)
            if kept is not None:
                m, finished = kept
    except ValueError as e:     # codec.CorruptRecord
        raise CommandFailed(f"{message_id}: the spool record cannot be decoded: {e}") from e
    if m is None:
        raise CommandFailed(f"{message_id}: no such message in the queue or its history")
    events = list(view.events(message_id))
    headers, missing = None, ""
    if finished is not None:
        missing = "the body is not kept after the message finished"
    else:
        try:
            headers = header_section(view.read_body(message_id))
        except OSError as e:
            missing = f"body unreadable: {e}"
    return Shown(m, finished, events, headers, missing)


def _event_line(e: Event) -> str:
    """One timeline line: time, kind, recipient, text, remote host, bounce category."""
    parts = [iso_utc(e.time), f"{e.kind:<9}"]
    if e.rcpt:
        parts.append(e.rcpt)
    if e.text:
        parts.append(e.text)
    if e.remote:
        parts.append(f"remote={e.remote}")
    if e.tls:
        parts.append(f"tls={e.tls}")
    if e.category:
        parts.append(f"category={e.category}")
    return "  " + " ".join(parts)


def shown_text(s: Shown) -> str:
    """The `queue show` text: envelope and recipients, the timeline, the header section."""
    m, e = s.message, s.message.envelope
    out = [f"id: {m.id}",
           f"arrival: {iso_utc(m.arrival)}"]
    if s.finished is not None:
        out.append(f"finished at: {iso_utc(s.finished)} (no longer queued; from the history)")
    out += [f"size: {m.size}",
            f"sender: {_sender(m)}",
            f"message-id: {m.header_id or '-'}",
            f"body: {e.body}",
            f"smtputf8: {'yes' if e.smtputf8 else 'no'}",
            f"ret: {e.ret or '-'}",
            f"envid: {e.envid or '-'}",
            f"requiretls: {'yes' if e.requiretls else 'no'}"]
    if e.tls_optional:
        out.append("tls-required: no (the recipient domain's TLS policy gives way)")
    if e.size is not None:
        out.append(f"declared size: {e.size}")
    if e.auth is not None:
        out.append(f"auth: {e.auth}")
    for k, v in sorted(e.extra.items()):
        out.append(f"parameter {k}: {v}")
    for k, v in sorted(m.client.items()):
        out.append(f"client {k}: {v}")
    for i, (r, st) in enumerate(zip(e.recipients, m.recipients)):
        out.append(f"recipient {i}: {r.address}")
        out.append(f"  state: {st.state}")
        out.append(f"  attempts: {st.attempts}")
        out.append(f"  next attempt: {iso_utc(st.next_attempt) if st.state == QUEUED else '-'}")
        out.append(f"  notify: {','.join(r.notify) if r.notify else '-'}")
        out.append(f"  orcpt: {r.orcpt or '-'}")
        out.append(f"  last reply: {_reply_text(st.last_reply) if st.last_reply else '-'}")
        out.append(f"  remote: {st.remote or '-'}")
        out.append(f"  category: {st.category or '-'}")
    out.append("")
    out.append("timeline:")
    out += [_event_line(ev) for ev in s.events] or ["  (no events recorded)"]
    out.append("")
    out.append(s.headers if s.headers is not None else f"({s.headers_missing})")
    return "\n".join(out)


def _show(args: argparse.Namespace, find: Callable[[Any], str]) -> int:
    """Print the message `find(view)` names, as text or (--json) JSON; with --body, the
    stored message after it."""
    view = _open_view(args)
    body: bytes | None = None
    try:
        shown = _lookup(view, find(view))
        if getattr(args, "body", False):
            body = _stored_body(view, shown)
    finally:
        view.close()
    if args.json:
        out = shown_json(shown)
        if body is not None:
            out["message"] = body.decode("utf-8", "replace")
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    if body is None:
        print(shown_text(shown))
        return 0
    # like postcat -q: the envelope, then the message as stored, lines ended with LF
    m = shown.message
    print(shown_text(replace_headers(shown)))
    print(f"*** MESSAGE CONTENTS {m.id} ***")
    sys.stdout.flush()
    sys.stdout.buffer.write(body.replace(b"\r\n", b"\n"))
    if body and not body.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.buffer.flush()
    print(f"*** END OF MESSAGE {m.id} ***")
    return 0


def _stored_body(view: Any, shown: Shown) -> bytes:
    """The whole stored message of a queued message (CommandFailed for a finished one)."""
    if shown.finished is not None:
        raise CommandFailed(f"{shown.message.id}: finished; its body is not kept after the "
                            "message finished (only its envelope and timeline)")
    try:
        return bytes(view.read_body(shown.message.id))
    except OSError as e:
        raise CommandFailed(f"{shown.message.id}: body unreadable: {e}") from e


def replace_headers(shown: Shown) -> Shown:
    """`shown` without its header section (--body prints the whole message instead)."""
    from dataclasses import replace
    return replace(shown, headers="")


def queue_show(args: argparse.Namespace) -> int:
    return _show(args, lambda view: str(args.id))


# -- history ----------------------------------------------------------------------------------

def _args_history(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--message-id", metavar="ID",
                       help="the Message-ID header, with or without its angle brackets")
    which.add_argument("--recipient", metavar="ADDR",
                       help="list the newest messages to ADDR (any case)")
    which.add_argument("--sender", metavar="ADDR",
                       help="list the newest messages from ADDR (the envelope sender)")
    p.add_argument("--limit", metavar="N", type=int, default=20,
                   help="with --recipient or --sender: at most N messages (default 20)")
    p.add_argument("--json", action="store_true", help="print the message(s) as JSON")
    _args_config(p)


def header_id_forms(value: str) -> list[str]:
    """The spellings to look a Message-ID up by: with angle brackets first (as the header
    has them and the spool indexes them), then as given."""
    bare = value.strip()
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1].strip()
    forms = [f"<{bare}>", value.strip(), bare]
    return [f for i, f in enumerate(forms) if f and f not in forms[:i]]


def history(args: argparse.Namespace) -> int:
    if args.message_id is None:
        return history_list(args)
    forms = header_id_forms(args.message_id)
    if not forms or forms == ["<>"]:
        raise CommandFailed("--message-id: empty Message-ID")

    def find(view: Any) -> str:
        for form in forms:
            found = view.find_by_header_id(form)
            if found is not None:
                return str(found)
        raise CommandFailed(f"{forms[0]}: no message with this Message-ID in the queue or "
                            f"its history")
    return _show(args, find)


def _state_summary(m: StoredMessage) -> str:
    """The recipients' states, counted: "delivered 2, queued 1"."""
    counts: dict[str, int] = {}
    for st in m.recipients:
        counts[st.state] = counts.get(st.state, 0) + 1
    return ", ".join(f"{state} {n}" for state, n in counts.items())


def history_list(args: argparse.Namespace) -> int:
    """The newest messages to (--recipient) or from (--sender) an address, from the spool's
    lookup index: queued ones and finished ones still in the history."""
    from txmta.spool.view import LOOKUP_RECIPIENT, LOOKUP_SENDER, lookup_recent
    kind, value = ((LOOKUP_RECIPIENT, args.recipient) if args.recipient is not None
                   else (LOOKUP_SENDER, args.sender))
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    if not value:
        raise CommandFailed("give an address")
    if args.limit < 1:
        raise CommandFailed("--limit: at least 1")
    view = _open_view(args)
    try:
        found = view.read(lambda txn, dbs: lookup_recent(txn, dbs, kind, value, args.limit))
    finally:
        view.close()
    if args.json:
        rows = [dict(message_json(m), finished=iso_utc(f) if f is not None else None)
                for m, f in found]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    if not found:
        print(f"no message {'to' if kind == LOOKUP_RECIPIENT else 'from'} {value} in the queue "
              "or its history")
        return 0
    for m, finished in found:
        rcpts = ", ".join(str(r.address) for r in m.envelope.recipients)
        print(f"{m.id}  {iso_utc(m.arrival)}  {'finished' if finished is not None else 'queued'}"
              f"  {_state_summary(m)}")
        print(f"    from <{_sender(m)}> to {rcpts}")
        print(f"    message-id: {m.header_id or '-'}")
    return 0


# -- commands through the daemon's control socket ------------------------------------------

def _control_call(args: argparse.Namespace, command_name: str, **kwargs: Any) -> dict[str, Any]:
    """Send one control command to the daemon of the configuration in --config."""
    from txmta.control import amp as control    # Twisted's AMP is only needed here
    cfg = config.load(args.config)
    path = control.control_socket_path(cfg.spool.path)
    try:
        return control.call(path, getattr(control, command_name), **kwargs)
    except control.ControlError as e:
        raise CommandFailed(str(e)) from e


def _args_queue_flush(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", nargs="?", default=None, help="queue id (default: every message)")
    p.add_argument("--domain", metavar="D", default=None,
                   help="only recipients at domain D")
    p.add_argument("--json", action="store_true", help='print {"count": N} instead of N')
    _args_config(p)


def queue_flush(args: argparse.Namespace) -> int:
    """Prints the daemon's count: the messages that had recipients made due."""
    count = _control_call(args, "Flush", message_id=args.id, domain=args.domain)["count"]
    print(json.dumps({"count": count}) if args.json else count)
    return 0


def _args_queue_id(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", help="queue id")
    _args_config(p)


def _by_id(command_name: str, done: str) -> Callable[[argparse.Namespace], int]:
    """The run function of a control command that acts on one message."""
    def run(args: argparse.Namespace) -> int:
        if not _control_call(args, command_name, message_id=args.id)["found"]:
            raise CommandFailed(f"{args.id}: no such message in the queue")
        print(f"{args.id}: {done}")
        return 0
    run.__name__ = f"queue_{command_name.lower()}"
    return run


queue_hold = _by_id("Hold", "held")
queue_release = _by_id("Release", "released")
queue_requeue = _by_id("Requeue", "requeued")
queue_delete = _by_id("Delete", "deleted")


def _args_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the daemon's JSON status")
    _args_config(p)


def status(args: argparse.Namespace) -> int:
    """The daemon's status, and each listener's: exit 1 when one does not answer."""
    text = _control_call(args, "Status")["json"]
    try:
        fields = json.loads(text)
    except ValueError as e:
        raise CommandFailed(f"the daemon's status is not JSON: {e}") from e
    listeners = listener_states(config.load(args.config))
    fields["listeners"] = [{"name": name, "address": address, "up": up}
                           for name, address, up in listeners]
    if args.json:
        print(json.dumps(fields, sort_keys=True))
        return 0 if all(up for _, _, up in listeners) else 1
    relays = fields.pop("relays", None)
    workers = fields.get("worker")
    if isinstance(workers, list):     # each worker's own relayhost circuits
        fields["worker"] = [{k: v for k, v in w.items() if k != "relays"} for w in workers]
    for key in sorted(fields):
        if key != "listeners":
            print(f"{key}: {fields[key]}")
    if relays:
        print("relayhosts:")
        print("\n".join(relay_lines(relays)))
    for w in workers if isinstance(workers, list) else []:
        if w.get("relays"):
            print(f"relayhosts of worker {w.get('index')}:")
            print("\n".join(relay_lines(w["relays"])))
    for name, address, up in listeners:
        print(f"{name} {address}: {'listening' if up else 'NOT ANSWERING'}")
    return 0 if all(up for _, _, up in listeners) else 1


def listener_states(cfg: config.Config, timeout: float = 2.0) -> list[tuple[str, str, bool]]:
    """(name, address, answers a TCP connection) of every [[listen]] and [[http]] table; a
    wildcard address is tried on loopback."""
    import socket
    out = []
    wanted = config.named_listeners(cfg)
    for name, lst in wanted:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(lst.host, lst.host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect((host, lst.port))
            up = True
        except OSError:
            up = False
        out.append((name, lst.address, up))
    return out


def relay_lines(relays: list[dict[str, Any]], now: float | None = None) -> list[str]:
    """One line per relayhost circuit of `txmta status`: name, relay, state, and for an open
    one how long it stays open."""
    now = time.time() if now is None else now
    out = []
    for r in relays:
        line = f"  {r.get('name')} {r.get('relay')}: {r.get('state')}"
        if r.get("state") == "open" and r.get("open_until") is not None:
            line += f" for {max(0.0, float(r['open_until']) - now):.0f}s more"
        line += f", {r.get('failures', 0)} recent failure(s), opened {r.get('opened', 0)} time(s)"
        out.append(line)
    return out


# -- suppression ------------------------------------------------------------------------------

def _args_suppression_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="also the entries that have expired")
    p.add_argument("--json", action="store_true", help="print a JSON list of entries")
    _args_config(p)


def suppression_list(args: argparse.Namespace) -> int:
    """The suppression list, read from the spool: entries whose `expires` has passed no
    longer suppress anything (the daemon's own rule) and are left out unless --all."""
    view = _open_view(args)
    try:
        entries = view.suppressions()
    finally:
        view.close()
    now = time.time()
    shown = sorted((s for s in entries if args.all or s.expires > now), key=lambda s: s.address)
    if args.json:
        print(json.dumps([suppression_json(s, now) for s in shown], indent=2, ensure_ascii=False))
        return 0
    if not shown:
        print("Suppression list is empty")
        return 0
    rows = [("ADDRESS", "REASON", "SINCE", "EXPIRES", "REPLY")]
    rows += [(s.address, s.reason or "-", iso_utc(s.since),
              iso_utc(s.expires) + (" (expired)" if s.expires <= now else ""), s.reply or "-")
             for s in shown]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    return 0


def _checked(address: str) -> str:
    try:
        return check_address(address)
    except ValueError as e:
        raise CommandFailed(str(e)) from e


def _args_suppression_add(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", help="the address to suppress")
    p.add_argument("--reason", metavar="TEXT", default=None,
                   help='why (default "manual"); shown by suppression list')
    _args_config(p)


def suppression_add(args: argparse.Namespace) -> int:
    address = _checked(args.address)
    reason = args.reason.strip() if args.reason is not None else None
    if reason is not None and (not reason or "\n" in reason or "\r" in reason):
        raise CommandFailed("--reason: give one line of text")
    if not _control_call(args, "SuppressionAdd", address=address, reason=reason)["ok"]:
        raise CommandFailed(f"{address}: the daemon did not add it")
    print(f"{address}: suppressed")
    return 0


def _args_suppression_remove(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", help="the address to take off the suppression list")
    _args_config(p)


def suppression_remove(args: argparse.Namespace) -> int:
    address = _checked(args.address)
    if not _control_call(args, "SuppressionRemove", address=address)["found"]:
        raise CommandFailed(f"{address}: not on the suppression list")
    print(f"{address}: removed")
    return 0


def _args_suppression_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help='one "address" or "address,reason" per line; "#" starts a '
                                'comment line; "-" reads standard input')
    _args_config(p)


def parse_import(lines: Sequence[str], name: str = "-") -> list[tuple[str, str]]:
    """(address, reason) of each line "address[,reason]"; blank lines and lines starting
    with "#" are skipped; a bad address is an error naming the file and line."""
    entries = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        address, _, reason = text.partition(",")
        try:
            entries.append((check_address(address), reason.strip()))
        except ValueError as e:
            raise CommandFailed(f"{name}:{number}: {e}") from e
    return entries


# A SuppressionImport request carries at most this many octets of lines (AMP values are
# limited to 65535 octets); a longer file is sent in several requests.
IMPORT_BATCH_OCTETS = 60000


def import_batches(entries: Sequence[tuple[str, str]],
                   limit: int = IMPORT_BATCH_OCTETS) -> list[str]:
    """The newline-joined "address,reason" lines of `entries`, cut into batches of at most
    `limit` octets."""
    batches: list[str] = []
    batch: list[str] = []
    size = 0
    for address, reason in entries:
        line = f"{address},{reason}" if reason else address
        n = len(line.encode("utf-8"))
        if n > limit:
            raise CommandFailed(f"{address}: the line is too long to send ({n} octets)")
        if batch and size + 1 + n > limit:       # 1: the newline before it
            batches.append("\n".join(batch))
            batch, size = [], 0
        size += n + 1 if batch else n
        batch.append(line)
    if batch:
        batches.append("\n".join(batch))
    return batches


def suppression_import(args: argparse.Namespace) -> int:
    """Prints how many entries the daemon stored."""
    try:
        if args.file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.file, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CommandFailed(f"cannot read {args.file}: {e}") from e
    entries = parse_import(lines, args.file)
    count = 0
    for batch in import_batches(entries):
        count += _control_call(args, "SuppressionImport", lines=batch)["count"]
    print(count)
    return 0


# -- dkim keygen ----------------------------------------------------------------------

def _args_dkim_keygen(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domain", required=True, help="the signing domain (d=)")
    p.add_argument("--selector", required=True, help="the selector (s=), e.g. mail2026")
    p.add_argument("--algorithm", choices=config.DKIM_ALGORITHMS, default="rsa-sha256",
                   help="rsa-sha256 (default) or ed25519-sha256")
    p.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    p.add_argument("--key", metavar="PATH", default=None,
                   help="where to write the private key (default ./DOMAIN.SELECTOR.pem)")


def dkim_keygen(args: argparse.Namespace) -> int:
    """Write a new private key (mode 0600, never over an existing file) and print the TXT
    record to publish and the [[dkim]] table to paste."""
    from txmta import dkim
    try:
        domain = config._domain(args.domain)
    except ValueError as e:
        raise CommandFailed(f"--domain {args.domain}: {e}") from None
    if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", args.selector):
        raise CommandFailed(f"--selector {args.selector}: must be a DNS label, e.g. mail2026")
    try:
        key = dkim.generate_key(args.algorithm, args.bits)
    except ValueError as e:
        raise CommandFailed(f"--bits {args.bits}: {e}") from None
    path = os.path.abspath(args.key or f"{domain}.{args.selector}.pem")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CommandFailed(f"{path}: exists; not overwritten (choose another --key)") from None
    except OSError as e:
        raise CommandFailed(f"{path}: {e.strerror or e}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(dkim.private_pem(key))
    print(f"; private key written to {path}")
    print(f"; publish in the DNS zone of {domain}:")
    print(dkim.zone_record(domain, args.selector, dkim.txt_value(key)))
    print()
    print("# and add to txmta.toml:")
    print("[[dkim]]")
    print(f"domain = {json.dumps(domain)}")
    print(f"selector = {json.dumps(args.selector)}")
    print(f"key = {json.dumps(path)}")
    print(f"algorithm = {json.dumps(args.algorithm)}")
    return 0


# -- api-token --------------------------------------------------------------------------

def _args_api_token(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the token's name, used in history, metrics and events")
    p.add_argument("--scope", action="append", default=None, metavar="SCOPE",
                   help="send (default), admin, dashboard; repeat for several")
    p.add_argument("--domain", action="append", default=[], metavar="DOMAIN",
                   help="a sender (From) domain the token may use, with its subdomains; "
                        "repeat for several (default: any)")
    p.add_argument("--lane", default="", help="the one lane the token's mail goes to")
    p.add_argument("--test", action="store_true",
                   help="a test token: requests are validated and answered, nothing is sent")
    p.add_argument("--file", metavar="PATH", default=None,
                   help="the tokens file (default: [api] tokens of the configuration)")
    _args_config(p)


def api_token(args: argparse.Namespace) -> int:
    """Add a token to the tokens file and print it, once: the file keeps only its hash."""
    from txmta.api.tokens import TokenFileError, add_token
    path = args.file
    if path is None:
        path = config.load(args.config).api.tokens
        if not path:
            raise CommandFailed("no tokens file: set [api] tokens in the configuration or "
                                "give --file")
    domains = []
    for d in args.domain:
        try:
            domains.append(config._domain(d))
        except ValueError as e:
            raise CommandFailed(f"--domain {d}: {e}") from None
    try:
        token = add_token(path, args.name, tuple(args.scope or ("send",)), tuple(domains),
                          args.lane, args.test)
    except (ValueError, TokenFileError) as e:
        raise CommandFailed(str(e)) from None
    except OSError as e:
        raise CommandFailed(f"{path}: {e.strerror or e}") from None
    print(token)
    print(f"# added {args.name!r} to {path}; the token is shown only now", file=sys.stderr)
    return 0


# -- webhook list / replay / test -------------------------------------------------------------

def _args_webhook_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list")
    _args_config(p)


def webhook_list(args: argparse.Namespace) -> int:
    """The [[webhook]] endpoints with what waits for each in the spool (read-only)."""
    from txmta.webhooks.service import endpoint_id
    cfg = config.load(args.config)
    stats: dict[bytes, tuple[int, int, float]] = {}
    if cfg.webhooks:
        view = _open_view(args)
        try:
            stats = view.hook_stats()
        finally:
            view.close()
    now = time.time()
    rows = []
    for w in cfg.webhooks:
        n, failing, oldest = stats.get(endpoint_id(w.url), (0, 0, float("inf")))
        rows.append({"url": w.url, "events": list(w.events), "format": w.format,
                     "pending": n, "retrying": failing,
                     "oldest_age": round(now - oldest, 1) if n else None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no [[webhook]] endpoints configured")
    for r in rows:
        age = f", oldest {r['oldest_age']:.0f} s" if r["pending"] else ""
        print(f"{r['url']}  ({r['format']}: {', '.join(r['events'])})")
        print(f"    {r['pending']} waiting, {r['retrying']} being retried{age}")
    return 0


def _args_webhook_replay(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", help="a queue id (all its events) or a webhook-id msg_... (one event)")
    _args_config(p)


def webhook_replay(args: argparse.Namespace) -> int:
    """Send the events again (same webhook-ids) to the endpoints that want them."""
    which = "event_id" if args.id.startswith("msg_") else "message_id"
    count = _control_call(args, "WebhookReplay", **{which: args.id})["count"]
    if not count:
        raise CommandFailed(f"{args.id}: no event of it in the outbox for a [[webhook]] "
                            f"endpoint (events are kept for [history] retention)")
    print(count)
    return 0


def _args_webhook_test(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the endpoint to send a test event to")
    p.add_argument("--secret", metavar="FILE", default=None,
                   help="the secret file (default: that of the [[webhook]] with this url)")
    p.add_argument("--format", choices=("txmta", "postmark"), default=None,
                   help="the body's format (default: the [[webhook]]'s, else txmta)")
    _args_config(p)


def webhook_test(args: argparse.Namespace) -> int:
    """POST one signed test event to URL and print the answer; exit 0 on a 2xx."""
    import urllib.error
    import urllib.request

    from txmta.message import MessageFacts, OutboxRecord
    from txmta.webhooks import sign
    from txmta.webhooks.service import Endpoint, body_for
    cfg = config.load(args.config)
    table = next((w for w in cfg.webhooks if w.url == args.url), None)
    secret_file = args.secret or (table.secret if table else None)
    if not secret_file:
        raise CommandFailed(f"{args.url}: not a [[webhook]] url of the configuration; "
                            "give --secret FILE")
    try:
        secret = sign.load_secret(secret_file)
    except ValueError as e:
        raise CommandFailed(str(e)) from None
    fmt = args.format or (table.format if table else "txmta")
    now = time.time()
    from txmta.events import EventIds, event_id
    eid = event_id(EventIds(0).base(now), 0)
    record = OutboxRecord("delivered", now, "0000000000000000", 0, "test@example.invalid",
                          {"code": 250, "enhanced": "2.0.0", "text": "test event from txmta"},
                          "test.invalid[192.0.2.1]", "", "", 1,
                          facts=MessageFacts("sender@example.invalid", "<test@example.invalid>",
                                             "webhook-test"))
    endpoint = Endpoint(args.url, frozenset({"delivered"}), fmt, secret, 10.0)
    body = body_for(endpoint, eid, record) or b"{}"
    headers = sign.headers(secret, sign.msg_id_for(eid), int(now), body)
    request = urllib.request.Request(args.url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        raise CommandFailed(f"{args.url}: {getattr(e, 'reason', e)}") from None
    print(f"{args.url}: HTTP {status} (webhook-id {headers['webhook-id']})")
    return 0 if 200 <= status < 300 else 1


# -- the table ------------------------------------------------------------------------

COMMANDS: tuple[Command, ...] = (
    Command("check-config", "validate a configuration file", _args_check_config, check_config),
    Command("passwd", "print a USER:HASH line for the AUTH users file", _args_passwd, passwd),
    Command("doctor", "check a sending domain's DNS (SPF, DKIM, DMARC, MX, reverse DNS, ...)",
            _args_doctor, doctor),
    Command("queue list", "list the queued messages (read-only, like mailq)", _args_queue_list,
            queue_list),
    Command("queue show", "show one message (queued or finished): envelope, states, timeline",
            _args_queue_show, queue_show),
    Command("history", "a queued or finished message by its Message-ID, or the newest to or "
            "from an address", _args_history, history),
    Command("suppression list", "list the suppressed addresses (read-only)",
            _args_suppression_list, suppression_list),
    # Through the daemon's control socket (txmta.control.amp), never the spool directly:
    Command("queue flush", "make deferred recipients due now (one message, one domain, or all)",
            _args_queue_flush, queue_flush),
    Command("queue hold", "stop delivery attempts for a message until released",
            _args_queue_id, queue_hold),
    Command("queue release", "resume delivery of a held message now", _args_queue_id,
            queue_release),
    Command("queue requeue", "retry a message now with a fresh retry schedule", _args_queue_id,
            queue_requeue),
    Command("queue delete", "remove a message from the queue, without a bounce",
            _args_queue_id, queue_delete),
    Command("status", "show the running daemon's status", _args_status, status),
    Command("suppression add", "suppress mail to an address", _args_suppression_add,
            suppression_add),
    Command("suppression remove", "take an address off the suppression list",
            _args_suppression_remove, suppression_remove),
    Command("suppression import", "suppress every address of a file (address[,reason] lines)",
            _args_suppression_import, suppression_import),
    Command("api-token", "make an HTTP API token, add its hash to the tokens file, print it",
            _args_api_token, api_token),
    Command("webhook list", "the [[webhook]] endpoints and the deliveries waiting for each",
            _args_webhook_list, webhook_list),
    Command("webhook replay", "send a message's events (or one event) to the webhooks again",
            _args_webhook_replay, webhook_replay),
    Command("webhook test", "POST a signed test event to a URL and show the answer",
            _args_webhook_test, webhook_test),
    Command("dkim keygen", "write a new DKIM private key and print the DNS TXT record to publish",
            _args_dkim_keygen, dkim_keygen),
)


def build_parser() -> argparse.ArgumentParser:
    """argparse parsers built from COMMANDS; multi-word commands nest ("queue" -> "list")."""
    import txmta
    root = argparse.ArgumentParser(prog="txmta", description="Administer the txmta mail transfer agent.")
    root.add_argument("--version", action="version", version=f"txmta {txmta.__version__}")
    groups: dict[tuple[str, ...], Any] = {(): root.add_subparsers(dest="command", metavar="COMMAND")}
    groups[()].required = True
    for cmd in COMMANDS:
        words = tuple(cmd.words.split())
        for depth in range(1, len(words)):
            prefix = words[:depth]
            if prefix not in groups:
                parent = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{' '.join(prefix)} commands")
                groups[prefix] = parent.add_subparsers(dest="_".join(prefix), metavar="COMMAND")
                groups[prefix].required = True
        p = groups[words[:-1]].add_parser(words[-1], help=cmd.help, description=cmd.help)
        cmd.arguments(p)
        p.set_defaults(run=cmd.run)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; 0 on success, 1 on failure (message on stderr), 2 on bad usage."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.run(args))
    except (ConfigError, CommandFailed) as e:
        print(str(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `txmta queue list | head`: the reader left; not an error
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
