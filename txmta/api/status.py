"""The HTTP API's status and admin endpoints, beside the sending API (server.py).

    GET    /v1/messages/{id}             one message, queued or kept in the history
    GET    /v1/messages?recipient=&tag=&state=&since=&limit=&after=
                                         messages found by the lookup index (by recipient
                                         or tag) or by id, a page at a time (`next` cursor)
    POST   /v1/messages/{id}/hold | release | flush | requeue       (admin)
    DELETE /v1/messages/{id}                                        (admin)
    POST   /v1/queue/flush {"domain"?}                              (admin)
    GET    /v1/suppressions?after=&limit=
    POST   /v1/suppressions {"address", "reason"?}                  (admin)
    DELETE /v1/suppressions/{address}                               (admin)

Scopes: the reads take a token with `admin` or `dashboard` scope (all mail), or `send`
(only the mail sent with that token: anything else is 404 as if unknown); everything that
changes the queue takes `admin` (403 otherwise).

Reads go through `reads` (txmta.spool.view.SpoolReads, which `build.py` makes over the
spool): functions of one read transaction, run off the reactor on the spool writer's thread
(LMDB allows one environment per process, so not a second, read-only one), each bounded
(a search looks at most at 5000 index entries).  Changes
go through the daemon's control socket exactly as `txmta queue ...` sends them (`control`:
an asynchronous AMP call), so the master fans them out to the worker that owns the message
and every worker's suppression mirror hears of an added address.  This module never writes
the spool itself.
"""
# test: tests/test_api_status.py, tests/integration/test_api.py

from __future__ import annotations

import base64
import json
import re
from typing import Any, Callable
from urllib.parse import unquote

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from txmta.api import postmark as P
from txmta.api.tokens import Token, TokenStore
from txmta.message import FINAL, UNFINISHED, Search
from txmta.messagejson import Shown, check_address, shown_json, summary_json, suppression_json

log = Logger()

JSON = b"application/json; charset=utf-8"
STATES = frozenset(UNFINISHED | FINAL)
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
_MESSAGE = re.compile(rb"^/v1/messages/([^/]+)(?:/(hold|release|flush|requeue))?$")
_SUPPRESSION = re.compile(rb"^/v1/suppressions/([^/]+)$")
ACTIONS = {b"hold": ("Hold", "held"), b"release": ("Release", "released"),
           b"requeue": ("Requeue", "requeued")}


class BadQuery(Exception):
    """A query parameter or request body the endpoint cannot use (400)."""


def queue_id(text: str) -> str:
    """A queue id given as itself or in its UUID form (`postmark.queue_id_to_uuid`)."""
    found = P.uuid_to_queue_id(text)
    return found if found is not None else text


def encode_cursor(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode("ascii").rstrip("=")


def decode_cursor(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (ValueError, TypeError):
        raise BadQuery("after: not a cursor from a previous answer") from None


def _arg(request: Any, name: str) -> str | None:
    values = (request.args or {}).get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise BadQuery(f"{name}: not UTF-8") from None


def parse_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise BadQuery(f"limit: a number from 1 to {MAX_LIMIT}")
    return int(text)


def parse_since(text: str | None) -> float | None:
    """Seconds since the epoch, or an ISO 8601 time ("2026-12-01T10:00:00Z")."""
    if text is None:
        return None
    try:
        when = float(text)
    except ValueError:
        pass
    else:
        if not 0 <= when < 1e11:
            raise BadQuery("since: seconds since the epoch or an ISO 8601 time")
        return when
    from datetime import datetime, timezone
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadQuery("since: seconds since the epoch or an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def search_query(request: Any, token: Token) -> Any:
    """The `Search` a GET /v1/messages asks for."""
    state = _arg(request, "state")
    if state is not None and state not in STATES:
        raise BadQuery(f"state: one of {', '.join(sorted(STATES))}")
    after = _arg(request, "after")
    recipient, tag = _arg(request, "recipient"), _arg(request, "tag")
    return Search(recipient=recipient or None, tag=tag or None, state=state,
                  since=parse_since(_arg(request, "since")),
                  limit=parse_limit(_arg(request, "limit")),
                  after=decode_cursor(after) if after else None,
                  token=None if sees_all(token) else token.name)


def sees_all(token: Token) -> bool:
    return bool({"admin", "dashboard"} & token.scopes)


def respond(request: Any, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON)
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def finish(request: Any, status: int, body: Any) -> None:
    if request.finished or request._disconnected:
        return
    request.write(respond(request, status, body))
    request.finish()


def error(kind: str, message: str) -> dict[str, str]:
    return {"error": kind, "message": message}


class StatusApi:
    """The status and admin endpoints of one listener.  `reads` (txmta.spool.view.SpoolReads)
    has `find(id)`, `search(Search)` and `suppressions(after, limit)`, each firing with its
    result; `control(command_name, **kwargs)` sends one control command and
    fires with its response (txmta.control.amp.call_async); `clock` gives the time."""

    def __init__(self, tokens: TokenStore, reads: Any,
                 control: Callable[..., Deferred[dict[str, Any]]], clock: Any,
                 limiter: Any = None) -> None:
        self.tokens = tokens
        self.reads = reads
        self.control = control
        self.clock = clock
        self.limiter = limiter      # the sending endpoints' per-token rate limit, shared

    def route(self, method: bytes, path: bytes) -> Callable[[Any], Any] | None:
        """The handler of (method, path), or None: the path is as sent (queue ids are case
        sensitive), without a trailing "/"."""
        if path == b"/v1/messages" and method == b"GET":
            return self.list_messages
        if path == b"/v1/suppressions":
            return {b"GET": self.list_suppressions, b"POST": self.add_suppression}.get(method)
        if path == b"/v1/queue/flush" and method == b"POST":
            return self.flush_queue
        m = _MESSAGE.match(path)
        if m is not None:
            mid = queue_id(unquote(m.group(1).decode("ascii", "replace")))
            action = m.group(2)
            if action is None and method == b"GET":
                return lambda request: self.show(request, mid)
            if action is None and method == b"DELETE":
                return lambda request: self.by_id(request, mid, "Delete", "deleted")
            if action == b"flush" and method == b"POST":
                return lambda request: self.flush_message(request, mid)
            if action in ACTIONS and method == b"POST":
                command, done = ACTIONS[action]
                return lambda request: self.by_id(request, mid, command, done)
            return None
        m = _SUPPRESSION.match(path)
        if m is not None and method == b"DELETE":
            address = unquote(m.group(1).decode("utf-8", "replace"))
            return lambda request: self.remove_suppression(request, address)
        return None

    def known(self, path: bytes) -> bool:
        """Whether some method is served at `path` (405 rather than 404)."""
        return any(self.route(m, path) is not None for m in (b"GET", b"POST", b"DELETE"))

    # -- authorization ------------------------------------------------------------------

    def _token(self, request: Any, admin: bool) -> Token | bytes:
        """The request's token, or the answer refusing it: 401 unknown, 403 not admin when
        `admin` (every scope may read; `sees_all` decides how much)."""
        from txmta.api.server import presented_token
        token = self.tokens.check(presented_token(request))
        if token is None:
            return respond(request, 401, error("unauthorized", "a valid API token is required"))
        if admin and "admin" not in token.scopes:
            return respond(request, 403, error("forbidden", f"token {token.name!r} has no "
                                               "admin scope"))
        wait = self.limiter.take(token.name, self.clock.seconds()) if self.limiter else 0.0
        if wait > 0:
            import math
            request.setHeader(b"retry-after", str(max(1, math.ceil(wait))).encode())
            return respond(request, 429, error("rate_limited", "rate limit exceeded"))
        return token

    def _answer(self, request: Any, d: Deferred[tuple[int, Any]]) -> Any:
        def failed(f: Failure) -> None:
            from txmta.control.amp import ControlError
            if f.check(BadQuery, ValueError):
                finish(request, 400, error("invalid_request", f.getErrorMessage()))
            elif f.check(ControlError):
                log.warn("API admin request {path}: {e}", path=request.path,
                         e=f.getErrorMessage())
                finish(request, 503, error("control_unavailable", f.getErrorMessage()))
            else:
                log.failure("API request {path} failed", f, path=request.path)
                finish(request, 500, error("internal", "internal error"))
        d.addCallback(lambda answer: finish(request, *answer)).addErrback(failed)
        return server.NOT_DONE_YET

    # -- reads ----------------------------------------------------------------------------

    def show(self, request: Any, mid: str) -> Any:
        token = self._token(request, admin=False)
        if isinstance(token, bytes):
            return token

        def shown(found: Any) -> tuple[int, Any]:
            if found is None or not (sees_all(token) or
                                     found.message.client.get("token") == token.name):
                return 404, error("not_found", f"no message {mid} in the queue or its history")
            body = shown_json(Shown(found.message, found.finished, found.events, None))
            del body["headers"]
            return 200, body

        return self._answer(request, self.reads.find(mid)
                            .addCallback(shown))

    def list_messages(self, request: Any) -> Any:
        token = self._token(request, admin=False)
        if isinstance(token, bytes):
            return token
        try:
            q = search_query(request, token)
        except BadQuery as e:
            return respond(request, 400, error("invalid_request", str(e)))

        def page(result: Any) -> tuple[int, Any]:
            found, cursor = result
            return 200, {"messages": [summary_json(m, f) for m, f in found],
                         "next": encode_cursor(cursor) if cursor is not None else None}

        try:
            d = self.reads.search(q)
        except ValueError as e:
            return respond(request, 400, error("invalid_request", str(e)))
        return self._answer(request, d.addCallback(page))

    def list_suppressions(self, request: Any) -> Any:
        token = self._token(request, admin=False)
        if isinstance(token, bytes):
            return token
        if not sees_all(token):
            return respond(request, 403, error("forbidden", f"token {token.name!r} may not "
                                               "read the suppression list"))
        try:
            limit = parse_limit(_arg(request, "limit"))
            after = _arg(request, "after")
        except BadQuery as e:
            return respond(request, 400, error("invalid_request", str(e)))
        now = self.clock.seconds()

        def page(result: Any) -> tuple[int, Any]:
            entries, cursor = result
            return 200, {"suppressions": [suppression_json(s, now) for s in entries],
                         "next": cursor}

        return self._answer(request, self.reads.suppressions(after, limit).addCallback(page))

    # -- changes, through the control socket -------------------------------------------------

    def by_id(self, request: Any, mid: str, command: str, done: str) -> Any:
        token = self._token(request, admin=True)
        if isinstance(token, bytes):
            return token

        def answered(response: dict[str, Any]) -> tuple[int, Any]:
            if not response["found"]:
                return 404, error("not_found", f"no message {mid} in the queue")
            return 200, {"id": mid, "result": done}

        return self._answer(request, self.control(command, message_id=mid).addCallback(answered))

    def flush_message(self, request: Any, mid: str) -> Any:
        token = self._token(request, admin=True)
        if isinstance(token, bytes):
            return token
        d = self.control("Flush", message_id=mid)
        return self._answer(request, d.addCallback(
            lambda r: (200, {"id": mid, "result": "flushed", "count": r["count"]})))

    def flush_queue(self, request: Any) -> Any:
        token = self._token(request, admin=True)
        if isinstance(token, bytes):
            return token
        try:
            body = _body(request)
            domain = body.get("domain")
            if domain is not None and (not isinstance(domain, str) or not domain.strip()):
                raise BadQuery("domain: a domain name")
        except BadQuery as e:
            return respond(request, 400, error("invalid_request", str(e)))
        d = self.control("Flush", domain=domain.strip().lower() if domain else None)
        return self._answer(request, d.addCallback(lambda r: (200, {"count": r["count"]})))

    def add_suppression(self, request: Any) -> Any:
        token = self._token(request, admin=True)
        if isinstance(token, bytes):
            return token
        try:
            body = _body(request)
            if not isinstance(body.get("address"), str):
                raise BadQuery("address: required, a string")
            try:
                address = check_address(body["address"])
            except ValueError as e:
                raise BadQuery(f"address: {e}") from None
            reason = body.get("reason")
            if reason is not None and (not isinstance(reason, str) or not reason.strip()
                                       or "\n" in reason or "\r" in reason):
                raise BadQuery("reason: one line of text")
        except BadQuery as e:
            return respond(request, 400, error("invalid_request", str(e)))

        def added(r: dict[str, Any]) -> tuple[int, Any]:
            if not r["ok"]:
                return 503, error("not_stored", f"{address}: the daemon did not add it")
            return 200, {"address": address, "reason": reason.strip() if reason else "manual"}

        d = self.control("SuppressionAdd", address=address,
                         reason=reason.strip() if reason else None)
        return self._answer(request, d.addCallback(added))

    def remove_suppression(self, request: Any, address: str) -> Any:
        token = self._token(request, admin=True)
        if isinstance(token, bytes):
            return token

        def removed(r: dict[str, Any]) -> tuple[int, Any]:
            if not r["found"]:
                return 404, error("not_found", f"{address} is not on the suppression list")
            return 200, {"address": address, "result": "removed"}

        d = self.control("SuppressionRemove", address=address)
        return self._answer(request, d.addCallback(removed))


def _body(request: Any) -> dict[str, Any]:
    request.content.seek(0)
    raw = request.content.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise BadQuery("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadQuery("the body must be a JSON object")
    return body
