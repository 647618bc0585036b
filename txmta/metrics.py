"""Prometheus metrics: what txmta counts, and `GET /metrics` in the Prometheus text format.

`Metrics` creates the series (prometheus-client) and is fed three ways: as a subscriber of
the queue's event stream (`heard`, subscribed to `HEARS`: received messages, recipient
outcomes, TLS outcomes, DSNs, suppressions, admin actions), by calls from the parts that
measure time or hold connections (`observe_eod`, `observe_commit`, `observe_attempt`,
`inbound_opened`, `outbound_opened`, `observe_api`, `webhook_failure`, `relay_state`, ...), and by
samplers (`QueueSampler`: queue depth and oldest message age per lane; `webhook_backlog`).
`render` writes the exposition, `MetricsResource` serves it, `totals` sums the main series
for a dashboard.

Labels are bounded, always: a label value is one of a fixed set (result, category, TLS
verdict, TLS level, status class), or a configured name (lane, listener, API endpoint, relayhost)
mapped through `Names`, which lets through a few more values that look like names and
turns everything else into "other".  No label ever holds an address, a domain, an IP or an
id: a name with a dot, a colon or an "@" cannot pass, nor one with more than five digits.

Processes.  A master and N workers each count for themselves; prometheus-client's
multiprocess mode keeps every process's values in memory-mapped files of one directory,
and the exposition merges the files of all processes:

* the directory is `<spool.path>/metrics/`; whoever starts first wipes it
  (`prepare_directory`): the master at its start, or the daemon itself with `workers = 1`
  (no master: it is worker 0, in multiprocess mode all the same, so there is one code path
  and `totals` works the same way);
* each worker calls `setup_multiprocess(directory, worker)` before it creates `Metrics`;
  it allocates the disk blocks of the worker's value files (`preallocate`), so that a full
  spool disk cannot kill the worker with SIGBUS when a new series is stored.
  The files are named after the worker's index, not its pid: a worker restarted by the
  master takes over the files of the one that died, so its counters go on from where they
  were (no counter goes back, no file is left behind per restart); the restarted worker
  drops the dead one's current values (gauges), and so does `worker_died(directory,
  worker)`, which the master calls when a worker exits (also for workers that are not
  restarted, when the number of workers shrinks);
* counters and histograms are summed over the processes.  Gauges: open connections are
  "livesum" (each process counts its own); the queue depth, the oldest message age and
  the webhook backlog are "livemax": they are read from the shared spool, so every process
  that samples them sees the same values (whether one worker samples or all do, the
  maximum is right; a sum would count the queue once per worker).

What it doesn't: read the configuration (plain values come in), touch the spool or the
queue (`QueueSampler` gets a `read` callable), or decide anything about mail.
"""
# test: tests/test_metrics.py

from __future__ import annotations

import glob
import os
import re
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
                               values)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from txmta import events
from txmta.categories import CATEGORIES
from txmta.outcome import Delivered, Outcome, PermFailed

log = Logger()

ENV = "PROMETHEUS_MULTIPROC_DIR"
# The text format generate_latest writes (our names need none of the newer escaping), named
# by the version every Prometheus understands.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "other"
NONE = "none"
DEFAULT_LANE = "default"

RESULTS = ("delivered", "deferred", "bounced", "expired", "suppressed", "deleted")
ATTEMPT_RESULTS = ("delivered", "deferred", "bounced", "mixed")
# The verdicts of the TLS peer check (outbound/tlspolicy.py `_verdict`, `_check_dane`;
# outbound/client.py `UNVERIFIED`), as they end the `tls` text of an outcome.
TLS_VERDICTS = ("verified", "unverified", "dane", "dane-ee", "dane-ta", "dane-fail",
                "sts-enforce", "sts-testing", "sts-testing unverified")
TLS_LABELS = tuple(v.replace(" ", "-") for v in TLS_VERDICTS) + ("encrypted", "failed", NONE,
                                                                  OTHER)
TLS_LEVELS = ("none", "may", "encrypt", "verify", "dane", "mta-sts")    # tlspolicy.LEVELS
DSN_ACTIONS = ("failed", "delayed", "relayed")
ADMIN_ACTIONS = ("hold", "release", "requeue", "flush")
WEBHOOK_REASONS = ("gone", "3xx", "4xx", "5xx", "timeout", "connection")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
RELAY_STATES = {"closed": 0, "half-open": 1, "open": 2}   # txmta_relay_state's values
_SESSION_STAGES = ("mail", "rcpt", "data", "dot")   # outcome stages after a session began

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
_FILE_ID = re.compile(r"[0-9]{1,4}")

# Buckets, in seconds (or messages): a 250 after the end of data should come within a few
# milliseconds to a second (one synced commit); an attempt takes up to minutes (timeouts).
EOD_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0)
COMMIT_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ATTEMPT_BUCKETS = (.05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


# -- bounded label values ---------------------------------------------------------------------

# the HTTP API's endpoints, as the api_requests_total series names them
API_ENDPOINTS = ("email", "email-batch", "templates", "messages", "status", "admin", "metrics",
                 "dashboard", "other")


def looks_like_name(value: str) -> bool:
    """A name a label may carry: a letter, then letters, digits, "-" or "_" (at most 32, at
    most 5 digits).  An address, a domain, an IP or an id cannot be one."""
    return bool(_NAME.fullmatch(value)) and sum(c.isdigit() for c in value) <= 5


class Names:
    """The values of one label that names configured things (lanes, listeners, endpoints).

    `known` maps what the code sees (a listen address, a lane name) to the label (or lists
    label values that map to themselves).  Any other value that `looks_like_name` gets
    through as itself, up to `spare` distinct ones; past them, and for anything that is not
    a name, "other".  So a label has at most len(known) + spare + 1 values."""

    def __init__(self, known: Mapping[str, str] | Iterable[str] = (), spare: int = 8) -> None:
        self.known = dict(known) if isinstance(known, Mapping) else {k: k for k in known}
        for label in self.known.values():
            if not looks_like_name(label):
                raise ValueError(f"{label!r} is not a metric label name")
        self.spare = spare
        self._extra: set[str] = set()

    def __call__(self, value: str) -> str:
        label = self.known.get(value)
        if label is not None:
            return label
        if value in self._extra:
            return value
        if looks_like_name(value) and len(self._extra) < self.spare:
            self._extra.add(value)
            return value
        return OTHER


def listener_labels(listen: Iterable[Any] = (), http: Iterable[Any] = ()) -> dict[str, str]:
    """The label of each listener, by what a session or an API request names it by: an SMTP
    listener (`[[listen]]`: `.address`, `.port`) is "smtp-PORT", whatever its address; an
    HTTP listener (`[[http]]`: `.address`, `.name`) is its name ("httpN" by default), or
    "httpN" when the name is not fit for a label.  Messages the daemon makes itself come
    from "dsn"."""
    out = {"dsn": "dsn"}
    for item in listen:
        out[item.address] = f"smtp-{item.port}"
    for i, item in enumerate(http):
        name = getattr(item, "name", "")
        label = name if looks_like_name(name) else f"http{i}"
        out[item.address] = label
        if name:
            out[name] = label
    return out


def category_label(category: str) -> str:
    """A bounce category (categories.CATEGORIES), "none" for none, "other" for the rest."""
    if not category:
        return NONE
    return category if category in CATEGORIES else OTHER


def tls_label(tls: str) -> str:
    """The TLS verdict an outcome's `tls` text ends with ("TLSv1.3 TLS_AES_256_GCM_SHA384
    dane-ee" -> "dane-ee"); "encrypted" for TLS without a verdict, "none" for plaintext."""
    if not tls:
        return NONE
    for verdict in sorted(TLS_VERDICTS, key=len, reverse=True):
        if tls == verdict or tls.endswith(" " + verdict):
            return verdict.replace(" ", "-")
    if tls.startswith("TLS"):
        return "encrypted"
    return OTHER


def _tls_of(outcome: Outcome) -> str:
    """The TLS label of an attempt's outcome: its verdict; "failed" when it ended at STARTTLS
    before any verdict (handshake failure, STARTTLS refused or not offered where required);
    "none" for a plaintext session; "" (not counted) when no session got that far."""
    if outcome.tls:
        return tls_label(outcome.tls)
    if outcome.stage == "starttls":
        return "failed"
    return NONE if outcome.stage in _SESSION_STAGES else ""


def _one_of(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


def attempt_result(outcomes: Iterable[Outcome]) -> str:
    """What one attempt came to, over its recipients: "delivered", "deferred" or "bounced"
    when all recipients had that outcome, "mixed" otherwise."""
    kinds = {"delivered" if isinstance(o, Delivered) else
             "bounced" if isinstance(o, PermFailed) else "deferred" for o in outcomes}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def webhook_reason(status: int | None, error: str = "") -> str:
    """Why a webhook POST failed, as a label: "gone" (410), the status class of any other
    answer, "timeout", or "connection" (no answer)."""
    if status == 410:
        return "gone"
    if status is not None:
        return _one_of(f"{status // 100}xx", WEBHOOK_REASONS)
    return "timeout" if "time" in error.lower() else "connection"


def status_class(status: int) -> str:
    return _one_of(f"{status // 100}xx", STATUS_CLASSES)


# -- processes ----------------------------------------------------------------------------------

def _file_id(worker: int) -> str:
    text = str(worker)
    if not _FILE_ID.fullmatch(text):
        raise ValueError(f"worker index {worker!r}: must be 0..9999")
    return text


def prepare_directory(directory: str) -> str:
    """Create the multiprocess directory (mode 0700) or empty it of old values: the master
    calls it at its start, a daemon with `workers = 1` at its own, before any worker
    counts.  Returns the directory."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.remove(path)
    return directory


def setup_multiprocess(directory: str, worker: int) -> None:
    """Make this process (worker number `worker`) keep its values in `directory`.

    Call it once, before creating `Metrics`.  It sets PROMETHEUS_MULTIPROC_DIR (for any
    other user of prometheus-client in the process) and gives prometheus-client the value
    class that writes files named after the worker (not the pid: see the module's
    docstring), so it works whenever prometheus_client was imported.  The current values
    (gauges) a dead predecessor left in the directory are dropped; its counts are taken
    over."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.environ[ENV] = directory
    ident = _file_id(worker)
    worker_died(directory, worker)
    preallocate(directory, ident)
    values.ValueClass = values.MultiProcessValue(lambda: ident)


# The files prometheus-client writes for our series (type, and the gauges' modes), and the
# room each gets on disk at start.  prometheus-client maps them and grows them as sparse
# files: a store into a page the filesystem cannot then allocate (the spool's disk full)
# kills the process with SIGBUS.  Blocks allocated at start make that impossible up to
# this size (far more than the series of one process take).
VALUE_FILES = ("counter", "histogram", "gauge_livesum", "gauge_livemax", "gauge_livemin")
PREALLOCATE = 1024 * 1024


def preallocate(directory: str, ident: str) -> None:
    """Allocate the disk blocks of this process's value files (keeping what they hold):
    prometheus-client takes a file's size as its capacity and zeros as "empty"."""
    for prefix in VALUE_FILES:
        path = os.path.join(directory, f"{prefix}_{ident}.db")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, max(PREALLOCATE, os.fstat(fd).st_size))
            finally:
                os.close(fd)
        except OSError as e:
            log.warn("metrics: cannot allocate {path}: {e}", path=path, e=e)


def worker_died(directory: str, worker: int) -> None:
    """The master's call when worker `worker` exited: its current values (open connections,
    gauges) stop counting; its counts stay in the totals."""
    mark_process_dead(_file_id(worker), directory)


# -- the series -------------------------------------------------------------------------------

class Metrics:
    """The series of one process.  Created after `setup_multiprocess` (with several
    processes); `registry` None makes a private registry (never prometheus-client's global
    one), so that several `Metrics` can live in one process (tests).

    `lanes`: the configured lane names (the lane "" of a message, stored before lanes
    were, is "default");
    `listeners`: `listener_labels(...)`; `endpoints`: the API's endpoint names.  Other
    values are bounded by `Names`.

    Every method is safe to call from any thread (prometheus-client locks its values), but
    the label mappings (`Names`) belong to the reactor thread: `observe_commit`, the one
    call the spool's writer thread makes, has no labels."""

    HEARS = (events.Received, *events.ATTEMPTED, events.Suppressed, events.Deleted,
             events.DsnQueued, events.SuppressionAdded, events.AdminAction)

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 lanes: Iterable[str] = (), listeners: Mapping[str, str] | None = None,
                 endpoints: Iterable[str] = (), providers: Iterable[str] = (),
                 relays: Iterable[str] = ()) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.provider = Names({p: p for p in providers if looks_like_name(p)})
        self.relay = Names([name for name in relays if looks_like_name(name)])
        self.lane = Names({"": DEFAULT_LANE, DEFAULT_LANE: DEFAULT_LANE,
                           **{lane: lane for lane in lanes if looks_like_name(lane)}})
        self.listener = Names(listeners if listeners is not None else {"dsn": "dsn"})
        self.endpoint = Names(endpoints)
        r = self.registry

        # intake
        self.received = Counter(
            "txmta_messages_received", "Messages accepted and committed to the spool, by "
            "listener and source (smtp or api).", ["listener", "source"], registry=r)
        self.received_recipients = Counter(
            "txmta_received_recipients", "Recipients of the messages accepted, by source.",
            ["source"], registry=r)
        self.received_bytes = Counter(
            "txmta_received_bytes", "Octets of the messages accepted (as stored), by source.",
            ["source"], registry=r)
        self.eod_to_250_seconds = Histogram(
            "txmta_eod_to_250_seconds", "From the end of a message's data (or the API "
            "request) to the positive reply after its commit, by listener.", ["listener"],
            buckets=EOD_BUCKETS, registry=r)
        self.connections_in = Gauge(
            "txmta_connections_in_open", "Inbound SMTP connections open now, by listener.",
            ["listener"], multiprocess_mode="livesum", registry=r)
        self.connections_in_total = Counter(
            "txmta_connections_in", "Inbound SMTP connections accepted, by listener.",
            ["listener"], registry=r)
        self.api_requests = Counter(
            "txmta_api_requests", "HTTP API requests answered, by endpoint and status class.",
            ["endpoint", "status"], registry=r)

        # delivery
        self.recipients = Counter(
            "txmta_recipients", "Recipient outcomes committed: delivered, deferred, "
            "bounced, expired, suppressed, deleted; by lane and bounce category.",
            ["result", "lane", "category"], registry=r)
        self.attempt_seconds = Histogram(
            "txmta_attempt_duration_seconds", "Duration of delivery attempts (one batch of "
            "recipients to one destination), by result.", ["result"],
            buckets=ATTEMPT_BUCKETS, registry=r)
        self.tls_outcomes = Counter(
            "txmta_tls_outcomes", "TLS of outbound sessions, counted with each recipient "
            "outcome: the peer check's verdict, encrypted (no verdict), failed (at STARTTLS, "
            "before a verdict), or none (plaintext).",
            ["tls"], registry=r)
        self.connections_out = Gauge(
            "txmta_connections_out_open", "Outbound SMTP connections open now, by TLS level.",
            ["tls_level"], multiprocess_mode="livesum", registry=r)
        self.connections_out_total = Counter(
            "txmta_connections_out", "Outbound SMTP connections opened, by TLS level.",
            ["tls_level"], registry=r)
        self.shaping_backoffs = Counter(
            "txmta_shaping_backoffs", "Times a provider ([[shaping]] rule) asked us to slow "
            "down and got a cool-down, by provider.", ["provider"], registry=r)
        self.shaping_factor = Gauge(
            "txmta_shaping_factor", "The part of its connections and rate a provider gets "
            "after slow-downs (1 = all), by provider.", ["provider"],
            multiprocess_mode="livemin", registry=r)
        self.dsns = Counter(
            "txmta_dsn_queued", "Delivery status notifications queued, by action.",
            ["action"], registry=r)
        self.suppressions_added = Counter(
            "txmta_suppressions_added", "Addresses put on the suppression list by a bounce, "
            "by category.", ["category"], registry=r)
        self.admin_actions = Counter(
            "txmta_admin_actions", "Administrator actions on messages (hold, release, "
            "requeue, flush).", ["action"], registry=r)
        self.relay_state_gauge = Gauge(
            "txmta_relay_state", "Each relayhost's circuit: 0 closed, 1 half-open (one trial), "
            "2 open (cooling down); the worst over the workers, each of which has its own.",
            ["relay"], multiprocess_mode="livemax", registry=r)
        self.relay_failures = Counter(
            "txmta_relay_failures", "Attempts a relayhost failed as a relay (not reached, "
            "failed before the mail transaction, 421, its own trouble), by relay.",
            ["relay"], registry=r)
        self.relay_opened = Counter(
            "txmta_relay_opened", "Times a relayhost's circuit opened, by relay.", ["relay"],
            registry=r)

        # queue and spool
        self.queue_depth = Gauge(
            "txmta_queue_depth", "Messages in the spool, by lane (sampled).", ["lane"],
            multiprocess_mode="livemax", registry=r)
        self.oldest_age_seconds = Gauge(
            "txmta_queue_oldest_age_seconds", "Age of the oldest message in the spool, by "
            "lane (sampled).", ["lane"], multiprocess_mode="livemax", registry=r)
        self.commit_seconds = Histogram(
            "txmta_spool_commit_duration_seconds", "Duration of the spool's synced write "
            "transactions (group commits).", buckets=COMMIT_BUCKETS, registry=r)
        self.commit_batch = Histogram(
            "txmta_spool_commit_batch_size", "Changes committed together in one spool write "
            "transaction.", buckets=BATCH_BUCKETS, registry=r)

        # webhooks
        self.webhook_backlog_gauge = Gauge(
            "txmta_webhook_backlog", "Events in the outbox not yet sent to the webhooks "
            "(sampled).", multiprocess_mode="livemax", registry=r)
        self.webhook_sent = Counter(
            "txmta_webhook_events_sent", "Events the webhooks took (a 2xx answer).",
            registry=r)
        self.webhook_failures = Counter(
            "txmta_webhook_failures", "Webhook POSTs that failed, by reason.", ["reason"],
            registry=r)

    # -- the event stream ---------------------------------------------------------------------

    def heard(self, event: Any) -> None:
        """Count a committed event of the queue's stream (subscribed to `HEARS`)."""
        if isinstance(event, events.Received):
            m = event.message
            source = "api" if "token" in m.client else "smtp"
            self.received.labels(self.listener(m.client.get("listener", "")), source).inc()
            self.received_recipients.labels(source).inc(len(m.envelope.recipients))
            self.received_bytes.labels(source).inc(m.size)
        elif isinstance(event, (*events.ATTEMPTED, events.Suppressed, events.Deleted)):
            m = event.message
            state = m.recipients[event.index]
            result = {events.Suppressed: "suppressed", events.Deleted: "deleted"}.get(
                type(event), getattr(event, "kind", ""))
            self.recipients.labels(_one_of(result, RESULTS), self.lane(m.lane),
                                   category_label(state.category)).inc()
            if isinstance(event, events.ATTEMPTED):
                tls = _tls_of(event.outcome)
                if tls:
                    self.tls_outcomes.labels(tls).inc()
        elif isinstance(event, events.DsnQueued):
            self.dsns.labels(_one_of(event.action, DSN_ACTIONS)).inc()
        elif isinstance(event, events.SuppressionAdded):
            self.suppressions_added.labels(category_label(event.entry.reason)).inc()
        elif isinstance(event, events.AdminAction):
            self.admin_actions.labels(_one_of(event.action, ADMIN_ACTIONS)).inc()

    # -- calls from the parts -----------------------------------------------------------------

    def observe_eod(self, seconds: float, listener: str) -> None:
        """The receiver: from the end of data to the positive reply (after the commit)."""
        self.eod_to_250_seconds.labels(self.listener(listener)).observe(seconds)

    def observe_commit(self, seconds: float, batch_size: int) -> None:
        """The spool's writer thread: one write transaction committed `batch_size` changes."""
        self.commit_seconds.observe(seconds)
        self.commit_batch.observe(batch_size)

    def observe_backoff(self, provider: str, factor: float) -> None:
        """Shaping: `provider` asked us to slow down; its factor is now `factor`."""
        label = self.provider(provider)
        self.shaping_backoffs.labels(label).inc()
        self.shaping_factor.labels(label).set(factor)

    def observe_attempt(self, seconds: float, result: str) -> None:
        """The dispatcher: one attempt took `seconds`; `result` as `attempt_result` says."""
        self.attempt_seconds.labels(_one_of(result, ATTEMPT_RESULTS)).observe(seconds)

    def inbound_opened(self, listener: str) -> None:
        label = self.listener(listener)
        self.connections_in.labels(label).inc()
        self.connections_in_total.labels(label).inc()

    def inbound_closed(self, listener: str) -> None:
        self.connections_in.labels(self.listener(listener)).dec()

    def outbound_opened(self, tls_level: str) -> None:
        label = _one_of(tls_level, TLS_LEVELS)
        self.connections_out.labels(label).inc()
        self.connections_out_total.labels(label).inc()

    def outbound_closed(self, tls_level: str) -> None:
        self.connections_out.labels(_one_of(tls_level, TLS_LEVELS)).dec()

    def relay_state(self, relay: str, state: str) -> None:
        """A relayhost's circuit (outbound/circuit.py) is now `state`."""
        label = self.relay(relay)
        self.relay_state_gauge.labels(label).set(RELAY_STATES.get(state, 0))
        if state == "open":
            self.relay_opened.labels(label).inc()

    def relay_failure(self, relay: str) -> None:
        """An attempt counted against a relayhost's circuit."""
        self.relay_failures.labels(self.relay(relay)).inc()

    def observe_api(self, endpoint: str, status: int) -> None:
        """The HTTP API answered a request to `endpoint` (a name, never a path with ids)."""
        self.api_requests.labels(self.endpoint(endpoint), status_class(status)).inc()

    def set_queue(self, lane: str, depth: int, oldest_age: float) -> None:
        """A sample of the spool: `depth` messages in `lane`, the oldest `oldest_age` old."""
        label = self.lane(lane)
        self.queue_depth.labels(label).set(depth)
        self.oldest_age_seconds.labels(label).set(oldest_age)

    def webhook_backlog(self, n: int) -> None:
        self.webhook_backlog_gauge.set(n)

    def webhook_success(self, n: int = 1) -> None:
        self.webhook_sent.inc(n)

    def webhook_failure(self, reason: str) -> None:
        """A POST failed; `reason` as `webhook_reason` gives it."""
        self.webhook_failures.labels(_one_of(reason, WEBHOOK_REASONS + (OTHER,))).inc()


class QueueSampler:
    """Every `interval` seconds, `read()` (a Deferred of {lane: (depth, oldest age)}, for the
    whole spool) and `metrics.set_queue` for each lane; a lane that was seen before and is
    missing now is set to zero (multiprocess series cannot be removed).  A read still under
    way when the next is due is not doubled; a failed read is logged and leaves the last
    values."""

    def __init__(self, metrics: Metrics, reactor: IReactorTime,
                 read: Callable[[], Deferred[dict[str, tuple[int, float]]]],
                 interval: float = 15.0) -> None:
        self.metrics = metrics
        self.read = read
        self.interval = interval
        self._loop = LoopingCall(self.sample)
        self._loop.clock = reactor
        self._busy = False
        self._seen: set[str] = set()

    def start(self) -> None:
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def sample(self) -> Deferred[None] | None:
        if self._busy:
            return None
        self._busy = True

        def got(lanes: dict[str, tuple[int, float]]) -> None:
            for lane in self._seen - set(lanes):
                self.metrics.set_queue(lane, 0, 0.0)
            for lane, (depth, oldest) in lanes.items():
                self.metrics.set_queue(lane, depth, oldest)
            self._seen = set(lanes)

        def done(result: Any) -> None:
            self._busy = False
            if isinstance(result, Failure):
                log.failure("sampling the queue for metrics failed", result)

        d = maybeDeferred(self.read)
        d.addCallback(lambda lanes: (got(lanes), lanes)[1])
        d.addBoth(done)
        return None     # the LoopingCall never waits for (nor dies with) a read


# -- exposition -------------------------------------------------------------------------------

def _registry(source: str | CollectorRegistry) -> CollectorRegistry:
    if isinstance(source, CollectorRegistry):
        return source
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=source)
    return registry


def render(source: str | CollectorRegistry) -> tuple[bytes, str]:
    """The exposition (Prometheus text format 0.0.4) and its content type: of every process
    when `source` is the multiprocess directory, else of the registry given."""
    return generate_latest(_registry(source)), CONTENT_TYPE


def totals(source: str | CollectorRegistry) -> dict[str, float]:
    """The main series summed over processes, lanes and categories, for a dashboard:
    received, delivered, deferred, bounced, expired, suppressed, deleted, queue_depth,
    oldest_age (the largest), webhook_backlog."""
    out: dict[str, float] = {k: 0.0 for k in ("received", *RESULTS, "queue_depth", "oldest_age",
                                               "webhook_backlog")}
    for family in _registry(source).collect():
        for s in family.samples:
            if s.name == "txmta_messages_received_total":
                out["received"] += s.value
            elif s.name == "txmta_recipients_total" and s.labels.get("result") in RESULTS:
                out[s.labels["result"]] += s.value
            elif s.name == "txmta_queue_depth":
                out["queue_depth"] += s.value
            elif s.name == "txmta_queue_oldest_age_seconds":
                out["oldest_age"] = max(out["oldest_age"], s.value)
            elif s.name == "txmta_webhook_backlog":
                out["webhook_backlog"] += s.value
    return out


class MetricsResource(Resource):
    """`GET /metrics`: the exposition of `source` (the multiprocess directory, or a
    registry), built anew for each request."""

    isLeaf = True

    def __init__(self, source: str | CollectorRegistry) -> None:
        super().__init__()
        self.source = source

    def render_GET(self, request: Any) -> bytes:
        try:
            body, content_type = render(self.source)
        except Exception:
            log.failure("rendering the metrics failed")
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"metrics unavailable\n"
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body

    def render(self, request: Any) -> bytes:
        if request.method in (b"GET", b"HEAD"):
            return self.render_GET(request)
        request.setResponseCode(405)
        request.setHeader(b"allow", b"GET, HEAD")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"only GET\n"
