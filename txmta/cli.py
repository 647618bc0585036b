"""The `txmta` command: administration of a txmta installation.

Its grammar is ONE table (`COMMANDS`): each entry names a subcommand, its arguments
and the function that runs it.  Implemented here:

    txmta check-config [FILE]            validate a configuration file
    txmta passwd [USER]                  print a `USER:HASH` line for the AUTH users file
    txmta queue list [--json]            the queue, like Postfix mailq
    txmta queue show ID                  one message: envelope, states, header section
    txmta queue flush [ID] [--domain D]  make deferred recipients due now
    txmta queue hold|release ID          stop / resume delivery attempts for a message
    txmta queue requeue ID               retry a message now with a fresh retry schedule
    txmta queue delete ID                remove a message, without a bounce
    txmta status [--json]                the running daemon's status

`queue list` and `queue show` read the spool read-only (`LmdbView`, short read
transactions), so they work while the daemon runs and never change anything.
Commands that change the queue go through the running daemon's control socket
(`txmta.control.amp`, `control.sock` in the spool directory), never straight to the
spool: the daemon is the spool's only writer.  Each maps to one AMP command.
The daemon itself is started by `twistd -n txmta --config FILE`, not by this command.
"""
# test: tests/test_cli.py

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from txmta import config
from txmta.config import ConfigError
from txmta.passwords import hash_password
from txmta.spool.interface import HELD, QUEUED, UNFINISHED, SpoolError, StoredMessage


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
    config.load(args.file)      # ConfigError -> stderr, exit 1 (see main)
    print(f"{args.file}: OK")
    return 0


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


# -- queue list / queue show ------------------------------------------------------------

def _args_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"configuration file (default {config.DEFAULT_PATH} if it exists)")


def _args_queue_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list of messages")
    _args_config(p)


def _args_queue_show(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", help="queue id")
    _args_config(p)


def _open_view(args: argparse.Namespace) -> Any:
    """The read-only spool of the configuration in --config."""
    from txmta.spool.lmdb import LmdbView      # lmdb is only needed by the queue commands
    cfg = config.load(args.config)
    try:
        return LmdbView(cfg.spool.path)
    except SpoolError as e:
        raise CommandFailed(f"cannot open the spool: {e}") from e
    except Exception as e:      # lmdb.Error and OSError: permissions, a lock file, ...
        raise CommandFailed(f"cannot open the spool at {cfg.spool.path}: {e}") from e


def iso_utc(when: float) -> str:
    """"2026-11-28T07:14:23Z"."""
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sender(m: StoredMessage) -> str:
    return str(m.envelope.sender) or "<>"


def _reply_text(reply: Any) -> str:
    return " ".join(str(x) for x in (reply.code, reply.enhanced, reply.text) if x != "")


def message_json(m: StoredMessage) -> dict[str, Any]:
    """The `queue list --json` form of one message."""
    rcpts = []
    for r, st in zip(m.envelope.recipients, m.recipients):
        reply = st.last_reply
        rcpts.append({
            "address": str(r.address),
            "state": st.state,
            "attempts": st.attempts,
            "next_attempt": iso_utc(st.next_attempt) if st.state == QUEUED else None,
            "last_reply": (None if reply is None else
                           {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text}),
        })
    return {"id": m.id, "arrival": iso_utc(m.arrival), "size": m.size, "sender": _sender(m),
            "recipients": rcpts}


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
    view = _open_view(args)
    try:
        messages = list(view.messages())
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
    return 0


def header_section(body: bytes) -> str:
    """The message header section: everything up to the first empty line, with LF endings."""
    text = body.decode("utf-8", "replace").replace("\r\n", "\n")
    head, _, _ = text.partition("\n\n")
    return head


def queue_show(args: argparse.Namespace) -> int:
    view = _open_view(args)
    body: bytes | None = None
    body_error = ""
    try:
        try:
            m = view.get(args.id)
        except ValueError as e:     # codec.CorruptRecord
            raise CommandFailed(f"{args.id}: the spool record cannot be decoded: {e}") from e
        if m is None:
            raise CommandFailed(f"{args.id}: no such message in the queue")
        try:
            body = view.read_body(args.id)
        except OSError as e:
            body_error = str(e)
    finally:
        view.close()
    e = m.envelope
    out = [f"id: {m.id}",
           f"arrival: {iso_utc(m.arrival)}",
           f"size: {m.size}",
           f"sender: {_sender(m)}",
           f"body: {e.body}",
           f"smtputf8: {'yes' if e.smtputf8 else 'no'}",
           f"ret: {e.ret or '-'}",
           f"envid: {e.envid or '-'}"]
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
    out.append("")
    if body is None:
        out.append(f"(body unreadable: {body_error})")
    else:
        out.append(header_section(body))
    print("\n".join(out))
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
    text = _control_call(args, "Status")["json"]
    if args.json:
        print(text)
        return 0
    try:
        fields = json.loads(text)
    except ValueError as e:
        raise CommandFailed(f"the daemon's status is not JSON: {e}") from e
    for key in sorted(fields):
        print(f"{key}: {fields[key]}")
    return 0


# -- the table ------------------------------------------------------------------------

COMMANDS: tuple[Command, ...] = (
    Command("check-config", "validate a configuration file", _args_check_config, check_config),
    Command("passwd", "print a USER:HASH line for the AUTH users file", _args_passwd, passwd),
    Command("queue list", "list the queued messages (read-only, like mailq)", _args_queue_list,
            queue_list),
    Command("queue show", "show one queued message's envelope and header section",
            _args_queue_show, queue_show),
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
)


def build_parser() -> argparse.ArgumentParser:
    """argparse parsers built from COMMANDS; multi-word commands nest ("queue" -> "list")."""
    root = argparse.ArgumentParser(prog="txmta", description="Administer the txmta mail transfer agent.")
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
