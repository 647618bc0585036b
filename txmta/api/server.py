"""The HTTP listener: the sending API (Postmark-compatible and native), on `twisted.web`.

    POST /email                   one message, Postmark's fields and answers (postmark.py)
    POST /email/batch             up to 500 of them; one answer per message, in order
    POST /email/withTemplate, POST /email/batchWithTemplates, /templates...
                                  422: templates are not supported
    POST /v1/messages             the native API (native.py): fields, or a raw message
                                  and its envelope
    GET /v1/messages..., /v1/queue/flush, /v1/suppressions...
                                  message status and queue admin (status.py)

A token comes in `X-Postmark-Server-Token` (as Postmark clients send it) or
`Authorization: Bearer TOKEN`; a missing or unknown one gets 401 with Postmark's ErrorCode 10.
Each token has a rate limit (429 with Retry-After).  A request body over what a message of
`[spool] max_message_size` can need (its attachments base64-encoded: 4/3 of it, and the rest
of the JSON) gets 413 before it is read into memory; a built message over the limit gets 413
too.  Nothing is stored for a refused request, and a 200 is sent only after the commit.

Which paths a listener answers is `[[http]] serve`: the API paths with "api"; /metrics
and the dashboard are added by their own modules.  Everything else is 404 with a JSON error.
"""
# test: tests/test_api_server.py, tests/integration/test_api.py

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from txmta.api import mime
from txmta.api import native as N
from txmta.api import postmark as P
from txmta.api.submission import InvalidRequest, Submission, deadline_of
from txmta.api.submit import BadAddress, Client, Submitter, crlf, envelope_for
from txmta.api.tokens import RateLimiter, Token, TokenStore
from txmta.message import AlreadySubmitted, Idempotency, Labels
from txmta.reply import DEADLINE_PASSED

log = Logger()

JSON = b"application/json; charset=utf-8"
MAX_BATCH = 500


class ApiRequest(server.Request):
    """A request whose body may not exceed the site's `max_body`: past it the rest is
    dropped as it arrives and the request is answered 413."""

    too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        limit = self.channel.site.max_body    # type: ignore[union-attr]
        if length is not None and length > limit:
            self.too_large = True
            length = 0
        server.Request.gotLength(self, length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body:     # type: ignore[union-attr]
            self.too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        server.Request.handleContentChunk(self, data)

    def write(self, data: bytes) -> None:
        # the first write sends the header lines too: both in one send (txmta.tcp), not
        # buffered until the reactor's next turn
        corked = None if self.startedWriting else getattr(self.channel.transport, "corked", None)
        if corked is None:
            server.Request.write(self, data)
            return
        with corked():
            server.Request.write(self, data)


class ApiSite(server.Site):
    """A twisted.web site without an access log (the mail log has what matters), and
    without form parsing: every body is JSON, and twisted.web's parse of the Content-Type of
    each POST (to look for a form) cost about 3 % of an API submission's CPU."""

    noisy = False

    requestFactory = ApiRequest

    def __init__(self, resource: Resource, max_body: int, **kw: Any) -> None:
        kw.setdefault("parsePOSTFormSubmission", False)
        server.Site.__init__(self, resource, **kw)
        self.max_body = max_body

    def log(self, request: Any) -> None:
        pass


def respond(request: Any, status: int, body: Any, headers: dict[str, str] | None = None) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON)
    for k, v in (headers or {}).items():
        request.setHeader(k.encode(), v.encode())
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def finish(request: Any, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    """Answer a request that is still open (after a Deferred); a client that left is fine."""
    if request.finished or request._disconnected:
        return
    data = respond(request, status, body, headers)
    # a length, so that HTTP/1.0 keep-alive clients keep the connection
    request.setHeader(b"content-length", b"%d" % len(data))
    request.write(data)
    request.finish()


def presented_token(request: Any) -> str | None:
    token = request.getHeader("x-postmark-server-token")
    if token:
        return token.strip()
    auth = request.getHeader("authorization") or ""
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def client_of(request: Any, listener: str, token: Token) -> Client:
    address = request.getClientAddress()
    ip = getattr(address, "host", "") or "unknown"
    port = getattr(address, "port", 0) or 0
    version = cipher = bits = None
    if request.isSecure():
        try:
            conn = request.channel.transport.getHandle()
            version, cipher = conn.get_protocol_version_name(), conn.get_cipher_name()
            bits = conn.get_cipher_bits()
        except Exception:
            version = "TLS"
    return Client(ip, port, listener, token.name, version, cipher, bits)


class ApiResource(Resource):
    """Every API path, dispatched on the method and the path."""

    isLeaf = True

    def __init__(self, submitter: Submitter, tokens: TokenStore, limiter: RateLimiter, *,
                 listener: str, hostname: str, clock: Any,
                 extra: dict[tuple[bytes, bytes], Callable[[Any], Any]] | None = None,
                 serve_api: bool = True, idempotency_window: float = 86400.0,
                 metrics: Any = None, status: Any = None) -> None:
        Resource.__init__(self)
        self.submitter = submitter
        self.tokens = tokens
        self.limiter = limiter
        self.listener = listener
        self.hostname = hostname
        self.clock = clock
        self.idempotency_window = idempotency_window
        self.metrics = metrics          # txmta.metrics.Metrics: requests by endpoint, status
        self._idem_busy: dict[bytes, list[Deferred[None]]] = {}
        self.routes: dict[tuple[bytes, bytes], Callable[[Any], Any]] = {}
        if serve_api:
            self.routes.update({
                (b"POST", b"/email"): self.email,
                (b"POST", b"/email/batch"): self.batch,
                (b"POST", b"/email/withtemplate"): self.templates,
                (b"POST", b"/email/batchwithtemplates"): self.templates,
                (b"POST", b"/v1/messages"): self.native,
            })
        self.routes.update(extra or {})
        # the status and admin endpoints (status.py), with an id or an address in the path
        self.status = status if serve_api else None

    def render(self, request: Any) -> Any:
        path = request.path.rstrip(b"/").lower() or b"/"
        if self.metrics is not None:
            name = endpoint_name(path)
            request.notifyFinish().addBoth(
                lambda _: self.metrics.observe_api(name, request.code))
        handler = self.routes.get((request.method, path))
        if handler is None and self.status is not None:
            raw = request.path.rstrip(b"/")
            handler = self.status.route(request.method, raw)
            if handler is None and self.status.known(raw):
                return respond(request, 405, {"ErrorCode": 405, "Message": "Method not allowed"})
        if handler is None:
            if path.startswith(b"/templates") and (b"POST", b"/email") in self.routes:
                return self.templates(request)
            if any(p == path for _, p in self.routes):
                return respond(request, 405, {"ErrorCode": 405, "Message": "Method not allowed"})
            return respond(request, 404, {"ErrorCode": 404, "Message": "Not found"})
        try:
            return handler(request)
        except Exception:
            log.failure("API request {path} failed", path=request.path)
            return respond(request, 500, {"ErrorCode": 500, "Message": "Internal error",
                                          "MessageID": "", "SubmittedAt": "", "To": ""})

    # -- the steps every submission takes ------------------------------------------------

    def _authorize(self, request: Any) -> Token | bytes:
        """The request's token, or the response that refuses it (401, 413, 429)."""
        token = self.tokens.check(presented_token(request))
        if token is None:
            err = P.bad_token()
            return respond(request, err.status, P.error_response(err))
        if "send" not in token.scopes:
            return respond(request, 403, {"ErrorCode": 10, "Message": f"Token {token.name!r} may "
                                          "not send (its scope)", "MessageID": "",
                                          "SubmittedAt": "", "To": ""})
        wait = self.limiter.take(token.name, self.clock.seconds())
        if wait > 0:
            return respond(request, 429, {"ErrorCode": 429, "Message": "Rate limit exceeded",
                                          "MessageID": "", "SubmittedAt": "", "To": ""},
                           {"Retry-After": str(max(1, math.ceil(wait)))})
        if request.too_large:
            return respond(request, 413, P.error_response(self._too_large()))
        return token

    def _too_large(self) -> InvalidRequest:
        return P.too_large(self.submitter.max_message_size)

    def _json(self, request: Any) -> Any:
        """The request's JSON document; InvalidRequest (402, or 409 for a body that is not
        JSON by its content type) when it cannot be read."""
        kind = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
        if kind and kind != "application/json" and not kind.endswith("+json") and kind != "text/json":
            raise P.json_required()
        request.content.seek(0)
        try:
            return json.loads(request.content.read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise P.invalid_json() from None

    def _envelope(self, token: Token, sender: str, recipients: Sequence[str], *,
                  from_field: str = "From", to_field: str = "To", status: int = 422) -> Any:
        """The envelope of a message to be sent with `token`.  Raises InvalidRequest: an
        address the SMTP grammar refuses, a From domain the token may not use, a recipient
        on the suppression list (with [suppression] action = "reject")."""
        if sender and not token.may_send_from(sender.rpartition("@")[2]):
            raise sender_not_allowed(sender, from_field)
        try:
            envelope = envelope_for(sender, recipients, b"", from_field, to_field)
        except BadAddress as e:
            raise InvalidRequest(300, str(e), e.field, status) from None
        inactive = self.submitter.inactive(envelope)
        if inactive:
            raise P.inactive_recipients(inactive)
        return envelope

    def _store(self, request: Any, token: Token, sub: Submission) -> Deferred[dict[str, Any]]:
        """Check, build and commit one Postmark-style message; fires with its answer (the
        status is in the "status" key, removed by the caller)."""
        submitted = self.clock.seconds()
        to = ", ".join(sub.to)
        labels = Labels(sub.tag, tuple(sorted(sub.metadata.items())), token.lane or sub.stream)
        try:
            envelope = self._envelope(token, sub.envelope_sender(), sub.envelope_recipients())
            expires = deadline_of(sub.expires_at, sub.ttl, submitted)
        except InvalidRequest as e:
            return succeed(dict(P.error_response(e, to, submitted), status=e.status))
        if token.test:      # validated as for a real token: the build may refuse it too
            try:
                data = mime.build_message(sub, message_id="test", date=submitted,
                                          hostname=self.hostname)
                if len(data) > self.submitter.max_message_size:
                    raise self._too_large()
            except InvalidRequest as e:
                return succeed(dict(P.error_response(e, to, submitted), status=e.status))
            fake = self.submitter.receiver.queue.new_message_id(submitted)
            return succeed(dict(P.ok_response(P.queue_id_to_uuid(fake), to, submitted), status=200))
        intake = self.submitter.begin(client_of(request, self.listener, token), envelope)
        intake.token_lane = token.lane
        try:
            data = mime.build_message(sub, message_id=intake.message_id, date=intake.arrival,
                                      hostname=self.hostname)
        except InvalidRequest as e:
            intake.abort()
            return succeed(dict(P.error_response(e, to, submitted), status=e.status))
        if len(data) > self.submitter.max_message_size:
            intake.abort()
            e = self._too_large()
            return succeed(dict(P.error_response(e, to, submitted), status=e.status))
        intake.expires = expires
        d = self.submitter.finish(intake, data, labels)

        def stored(reply: Any) -> dict[str, Any]:
            if reply.code == 250 and self.metrics is not None:
                self.metrics.observe_eod(self.clock.seconds() - submitted, self.listener)
            if reply.code == 250:
                return dict(P.ok_response(P.queue_id_to_uuid(intake.message_id), to,
                                          intake.arrival), status=200)
            if reply == DEADLINE_PASSED:
                e = header_deadline_passed("Headers")
                return dict(P.error_response(e, to, submitted), status=e.status)
            return dict(P.error_response(not_stored(reply), to, submitted), status=503)

        return d.addCallback(stored)

    # -- Postmark ---------------------------------------------------------------------------

    def email(self, request: Any) -> Any:
        token = self._authorize(request)
        if isinstance(token, bytes):
            return token
        try:
            sub = P.parse_email(self._json(request))
        except InvalidRequest as e:
            return respond(request, e.status, P.error_response(e, "", self.clock.seconds()))

        def answer(result: dict[str, Any]) -> None:
            status = result.pop("status")
            finish(request, status, result, {"Retry-After": "60"} if status == 503 else None)

        self._store(request, token, sub).addCallback(answer).addErrback(self._failed, request)
        return server.NOT_DONE_YET

    def batch(self, request: Any) -> Any:
        token = self._authorize(request)
        if isinstance(token, bytes):
            return token
        try:
            items = P.parse_batch(self._json(request))
        except InvalidRequest as e:
            return respond(request, e.status, P.error_response(e, "", self.clock.seconds()))
        now = self.clock.seconds()
        answers: list[Deferred[dict[str, Any]]] = []
        for item in items:
            if isinstance(item, InvalidRequest):
                answers.append(succeed(dict(P.error_response(item, "", now), status=item.status)))
            else:
                answers.append(self._store(request, token, item))

        def answer(results: list[dict[str, Any]]) -> None:
            for r in results:
                r.pop("status")
            finish(request, 200, results)

        gatherResults(answers, consumeErrors=True).addCallback(answer).addErrback(
            self._failed, request)
        return server.NOT_DONE_YET

    def templates(self, request: Any) -> Any:
        token = self._authorize(request)
        if isinstance(token, bytes):
            return token
        err = P.templates_unsupported()
        return respond(request, err.status, P.error_response(err, "", self.clock.seconds()))

    def _failed(self, f: Failure, request: Any) -> None:
        log.failure("API request {path} failed", f, path=request.path)
        finish(request, 500, {"ErrorCode": 500, "Message": "Internal error", "MessageID": "",
                              "SubmittedAt": "", "To": ""})

    # -- native -----------------------------------------------------------------------------

    def native(self, request: Any) -> Any:
        token = self._authorize(request)
        if isinstance(token, bytes):
            return token
        key = request.getHeader("idempotency-key")
        try:
            parsed = N.parse_native(self._json(request))
            if key is not None:
                key = key.strip()
                if not key or len(key) > 255 or not key.isprintable():
                    raise InvalidRequest(300, "Idempotency-Key must be 1 to 255 printable "
                                         "characters.", "Idempotency-Key", 400)
        except InvalidRequest as e:
            return respond(request, e.status, e.to_json())
        if key is None or token.test:
            d = self._native(request, token, parsed, None)
        else:
            d = self._idempotent(request, token, parsed, key)
        d.addCallback(lambda answer: finish(request, *answer))
        d.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    def _idempotent(self, request: Any, token: Token, parsed: Any, key: str
                    ) -> Deferred[tuple[int, Any, dict[str, str] | None]]:
        """A request with an Idempotency-Key: the first submission's answer when the token
        used the key within [api] idempotency_window (nothing new is stored), else the
        submission, its answer stored with the message in one commit.  Requests with one
        key wait for each other in a worker; across workers the commit decides."""
        k = hashlib.sha256(f"{token.name}\0{key}".encode("utf-8")).digest()
        not_before = self.clock.seconds() - self.idempotency_window
        busy = self._idem_busy.get(k)
        if busy is not None:
            waiter: Deferred[None] = Deferred()
            busy.append(waiter)
            return waiter.addCallback(lambda _: self._idempotent(request, token, parsed, key))
        self._idem_busy[k] = []

        def replay(result: bytes) -> tuple[int, Any, dict[str, str]]:
            return 200, json.loads(result), {"Idempotent-Replayed": "true"}

        def looked(found: bytes | None) -> Any:
            if found is not None:
                return replay(found)
            return self._native(request, token, parsed, Idempotent(k, not_before))

        def already(f: Failure) -> Any:
            f.trap(AlreadySubmitted)
            return replay(f.value.result)

        def release(result: Any) -> Any:
            for waiter in self._idem_busy.pop(k, []):
                waiter.callback(None)
            return result

        d = self.submitter.receiver.queue.idempotent_get(k, not_before)
        return d.addCallback(looked).addErrback(already).addBoth(release)

    def _native(self, request: Any, token: Token, parsed: Any, idempotent: "Idempotent | None"
                ) -> Deferred[tuple[int, Any, dict[str, str] | None]]:
        """Check, build and commit one native request; fires with (status, body, headers)."""
        try:
            labels = Labels(parsed.tag, tuple(sorted(parsed.metadata.items())),
                            token.lane or parsed.stream)
            if parsed.raw is not None:
                data = crlf(parsed.raw)
                envelope = self._envelope(token, parsed.sender, parsed.recipients,
                                          from_field="envelope.from", to_field="envelope.to",
                                          status=400)
            else:
                data = b""
                envelope = self._envelope(token, parsed.sender, parsed.recipients,
                                          from_field="from", to_field="to", status=400)
                if token.test:  # validated as for a real token: the build may refuse it
                    data = mime.build_message(parsed.submission, message_id="test",
                                              date=self.clock.seconds(), hostname=self.hostname)
            if len(data) > self.submitter.max_message_size:
                raise self._too_large()
            submitted = self.clock.seconds()
            expires = deadline_of(parsed.expires_at, parsed.ttl, submitted,
                                  ("expires_at", "ttl"))
        except InvalidRequest as e:
            return succeed((e.status, e.to_json(), None))
        if token.test:
            return succeed((200, native_answer("", envelope, submitted, test=True), None))
        intake = self.submitter.begin(client_of(request, self.listener, token), envelope)
        intake.token_lane = token.lane
        try:
            if parsed.submission is not None:
                data = mime.build_message(parsed.submission, message_id=intake.message_id,
                                          date=intake.arrival, hostname=self.hostname)
            if len(data) > self.submitter.max_message_size:
                raise self._too_large()
        except InvalidRequest as e:
            intake.abort()
            return succeed((e.status, e.to_json(), None))
        intake.expires = expires
        if idempotent is not None:
            intake.idempotency = lambda it: Idempotency(
                idempotent.key, json.dumps(answer_of(it)).encode("utf-8"), idempotent.not_before)

        def stored(reply: Any) -> tuple[int, Any, dict[str, str] | None]:
            if reply.code == 250 and self.metrics is not None:
                self.metrics.observe_eod(self.clock.seconds() - submitted, self.listener)
            if reply.code == 250:
                return 200, answer_of(intake), None
            if reply == DEADLINE_PASSED:
                e = header_deadline_passed("raw" if parsed.raw is not None else "headers")
                return e.status, e.to_json(), None
            return 503, {"error": "not_stored", "message": reply.text}, {"Retry-After": "60"}

        return self.submitter.finish(intake, data, labels).addCallback(stored)


@dataclass(frozen=True)
class Idempotent:
    key: bytes
    not_before: float


def answer_of(intake: Any) -> dict[str, Any]:
    return native_answer(intake.message_id, intake.envelope, intake.arrival,
                         header_id=intake.header_id)


def endpoint_name(path: bytes) -> str:
    """The bounded name of an API path for the metrics (never the path itself)."""
    if path == b"/email":
        return "email"
    if path == b"/email/batch":
        return "email-batch"
    if path.startswith(b"/email/") or path.startswith(b"/templates"):
        return "templates"
    if path == b"/v1/messages":
        return "messages"
    if path.startswith(b"/v1/messages/"):
        return "status"
    if path.startswith(b"/v1/"):
        return "admin"
    if path == b"/metrics":
        return "metrics"
    if path == b"/":
        return "dashboard"
    return "other"


def sender_not_allowed(sender: str, field: str = "From") -> InvalidRequest:
    """Postmark's answer to a From address outside the sender signatures: here, outside
    the domains the token may use."""
    return InvalidRequest(400, f"The '{field}' address you supplied ({sender}) is not a Sender "
                               "Signature on your account: this token may not send from "
                               "its domain.", field)


def header_deadline_passed(field: str) -> InvalidRequest:
    """The message's own X-Txmta-Expires field named a time already past (HTTP 422)."""
    return InvalidRequest(300, "The message's X-Txmta-Expires header field has already "
                               "passed: it would never be delivered in time.", field)


def not_stored(reply: Any) -> InvalidRequest:
    """The commit failed (spool full, disk error): try again later (HTTP 503)."""
    return InvalidRequest(500, f"Not stored, try again later: {reply.text}", "", 503)


def native_answer(message_id: str, envelope: Any, submitted: float, *, test: bool = False,
                  header_id: str = "") -> dict[str, Any]:
    return {"id": message_id, "test": test, "submitted_at": P.format_submitted_at(submitted),
            "message_id_header": header_id,
            "recipients": [{"id": f"{message_id}.{i}" if message_id else "",
                            "address": str(r.address)}
                           for i, r in enumerate(envelope.recipients)]}


def max_body(max_message_size: int) -> int:
    """The largest request body worth reading: a message of max_message_size as base64
    (4/3) in JSON, with room for the rest of the document."""
    return max_message_size * 4 // 3 + 1024 * 1024


def build_site(resource: Resource, max_message_size: int, reactor: Any) -> ApiSite:
    site = ApiSite(resource, max_body(max_message_size), reactor=reactor)
    site.displayTracebacks = False
    return site

