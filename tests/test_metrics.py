"""Metrics: counting the event stream, bounded labels, the exposition, several processes,
GET /metrics over a real twisted.web server on 127.0.0.1, and the queue sampler on a Clock.

The multiprocess tests start real Python processes (no network); this test process never
switches prometheus-client to multiprocess mode itself (that is process-wide), it only
reads the directory the children wrote."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from txmta import events, metrics
from txmta import outcome as O
from txmta.categories import CATEGORIES
from txmta.message import (BOUNCED, DELIVERED, EXPIRED, QUEUED, SUPPRESSED, Address, Envelope,
                           Recipient, RecipientState, StoredMessage, Suppression)
from txmta.metrics import Metrics, Names
from txmta.reply import Reply

OK = Reply(250, "2.0.0", "OK")
LATER = Reply(451, "4.7.1", "greylisted, try again in 5 minutes")
NO_USER = Reply(550, "5.1.1", "no such user")
EID = b"e" * 15
WORKTREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Listen:          # what metrics.listener_labels reads of a [[listen]] table
    address: str
    port: int


@dataclass(frozen=True)
class Http:            # ... and of an [[http]] table
    address: str
    port: int
    name: str = ""


LISTENERS = metrics.listener_labels([Listen("192.0.2.1:25", 25), Listen("[::1]:587", 587)],
                                    [Http("127.0.0.1:8025", 8025, "api")])


def message(*states: RecipientState, client: dict[str, str] | None = None,
            lane: str = "", size: int = 42) -> StoredMessage:
    env = Envelope(Address("app", "example.com"),
                   tuple(Recipient(Address(f"u{i}", "example.net")) for i in range(len(states))))
    return StoredMessage("0000000000B1234", env, 1000.0, size, states,
                         client if client is not None else
                         {"address": "192.0.2.9", "helo": "client.example.com",
                          "listener": "192.0.2.1:25"},
                         lane=lane)


def value(m: Metrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def label_values(registry: CollectorRegistry, label: str) -> set[str]:
    return {s.labels[label] for f in registry.collect() for s in f.samples if label in s.labels}


# -- counting the event stream -------------------------------------------------------------------

def test_received_messages_count_by_listener_and_source() -> None:
    """A message from an SMTP listener counts under the listener's name (its port, never its
    address); one with an API token counts as source "api" under the HTTP listener."""
    m = Metrics(listeners=LISTENERS)
    m.heard(events.Received(EID, message(RecipientState(), RecipientState(), size=1000)))
    m.heard(events.Received(EID, message(RecipientState(), client={
        "address": "198.51.100.7", "helo": "", "listener": "api", "token": "shop"})))
    m.heard(events.Received(EID, message(RecipientState(), client={
        "address": "::1", "helo": "x", "listener": "[::1]:587"})))
    assert value(m, "txmta_messages_received_total", listener="smtp-25", source="smtp") == 1
    assert value(m, "txmta_messages_received_total", listener="smtp-587", source="smtp") == 1
    assert value(m, "txmta_messages_received_total", listener="api", source="api") == 1
    assert value(m, "txmta_received_recipients_total", source="smtp") == 3
    assert value(m, "txmta_received_bytes_total", source="smtp") == 1042
    assert value(m, "txmta_received_bytes_total", source="api") == 42


def test_recipient_outcomes_count_by_result_lane_and_category() -> None:
    """Every terminal event and every deferral counts once, with its lane ("" is "default")
    and the recipient's bounce category ("" is "none")."""
    m = Metrics(lanes=["bulk"])
    deferred = message(RecipientState(QUEUED, 1, 1300.0, LATER, category="greylisted"),
                       lane="bulk")
    bounced = message(RecipientState(BOUNCED, 1, 0.0, NO_USER, category="invalid-recipient"))
    delivered = message(RecipientState(DELIVERED, 1, 0.0, OK))
    expired = message(RecipientState(EXPIRED, 9, 0.0, LATER, category="greylisted"),
                      lane="bulk")
    suppressed = message(RecipientState(SUPPRESSED, 0, 0.0, NO_USER,
                                        category="invalid-recipient"))
    m.heard(events.Deferred(EID, deferred, 0, O.TempFailed(LATER, "mx", "192.0.2.5"), 1.0))
    m.heard(events.Bounced(EID, bounced, 0, O.PermFailed(NO_USER, "mx", "192.0.2.5"), 1.0))
    m.heard(events.Delivered(EID, delivered, 0, O.Delivered(OK, "mx", "192.0.2.5"), 1.0))
    m.heard(events.Delivered(EID, delivered, 0, O.Delivered(OK, "mx", "192.0.2.5"), 1.0))
    m.heard(events.Expired(EID, expired, 0, O.TempFailed(LATER), 1.0))
    m.heard(events.Suppressed(EID, suppressed, 0))
    m.heard(events.Deleted(EID, deferred, 0, 2.0))
    r = "txmta_recipients_total"
    assert value(m, r, result="deferred", lane="bulk", category="greylisted") == 1
    assert value(m, r, result="bounced", lane="default", category="invalid-recipient") == 1
    assert value(m, r, result="delivered", lane="default", category="none") == 2
    assert value(m, r, result="expired", lane="bulk", category="greylisted") == 1
    assert value(m, r, result="suppressed", lane="default", category="invalid-recipient") == 1
    assert value(m, r, result="deleted", lane="bulk", category="greylisted") == 1
    assert metrics.totals(m.registry) == {
        "received": 0, "delivered": 2, "deferred": 1, "bounced": 1, "expired": 1,
        "suppressed": 1, "deleted": 1, "queue_depth": 0, "oldest_age": 0,
        "webhook_backlog": 0}


@pytest.mark.parametrize("tls, stage, label", [
    ("TLSv1.3 TLS_AES_256_GCM_SHA384 dane-ee", "dot", "dane-ee"),
    ("TLSv1.3 TLS_AES_256_GCM_SHA384 dane-ta", "rcpt", "dane-ta"),
    ("TLS verified", "dot", "verified"),
    ("TLSv1.2 ECDHE-RSA-AES256-GCM-SHA384 unverified", "dot", "unverified"),
    ("TLSv1.3 TLS_AES_128_GCM_SHA256 sts-testing unverified", "dot", "sts-testing-unverified"),
    ("TLSv1.3 TLS_AES_128_GCM_SHA256 sts-enforce", "mail", "sts-enforce"),
    ("TLSv1.3 TLS_AES_128_GCM_SHA256 dane-fail", "starttls", "dane-fail"),
    ("TLSv1.3 TLS_AES_128_GCM_SHA256", "dot", "encrypted"),
    ("", "dot", "none"),            # a plaintext session
    ("", "starttls", "failed"),     # a handshake that failed, STARTTLS refused
    ("weird", "dot", "other"),
])
def test_tls_outcomes_count_the_verdict(tls: str, stage: str, label: str) -> None:
    """The TLS text of an outcome counts under the peer check's verdict it ends with."""
    m = Metrics()
    m.heard(events.Delivered(EID, message(RecipientState(DELIVERED)), 0,
                             O.Delivered(OK, "mx", "192.0.2.5", tls=tls, stage=stage), 1.0))
    assert value(m, "txmta_tls_outcomes_total", tls=label) == 1
    assert label_values(m.registry, "tls") == {label}


@pytest.mark.parametrize("stage", ["route", "connect", "greeting", ""])
def test_no_tls_outcome_without_a_session(stage: str) -> None:
    """A recipient deferred before any session (DNS, connect, greeting) says nothing of TLS."""
    m = Metrics()
    m.heard(events.Deferred(EID, message(RecipientState()), 0,
                            O.TempFailed(LATER, "mx", "192.0.2.5", stage=stage), 1.0))
    assert label_values(m.registry, "tls") == set()
    assert value(m, "txmta_recipients_total", result="deferred", lane="default",
                 category="none") == 1


def test_dsn_suppression_and_admin_events_count() -> None:
    m = Metrics()
    msg = message(RecipientState(BOUNCED))
    m.heard(events.DsnQueued(EID, msg, msg, "failed"))
    m.heard(events.DsnQueued(EID, msg, msg, "delayed"))
    m.heard(events.SuppressionAdded(EID, Suppression("u0@example.net", "invalid-recipient",
                                                     1.0, 2.0)))
    m.heard(events.AdminAction(EID, msg, "hold", 1.0))
    assert value(m, "txmta_dsn_queued_total", action="failed") == 1
    assert value(m, "txmta_dsn_queued_total", action="delayed") == 1
    assert value(m, "txmta_suppressions_added_total", category="invalid-recipient") == 1
    assert value(m, "txmta_admin_actions_total", action="hold") == 1


def test_subscribed_to_the_stream_it_hears_only_committed_facts() -> None:
    """Subscribed with HEARS, the metrics count what the queue publishes and ignore signals."""
    stream = events.EventStream()
    m = Metrics()
    stream.subscribe(m.heard, *Metrics.HEARS)
    stream.publish_all([events.Received(EID, message(RecipientState())), events.Due(5.0),
                        events.RetryNow(None)])
    assert metrics.totals(m.registry)["received"] == 1


# -- calls from the parts ------------------------------------------------------------------------

def test_measurements_from_the_parts() -> None:
    """Latency, commits, attempts, connections, API answers and webhooks land in their series."""
    m = Metrics(listeners=LISTENERS, endpoints=["email", "batch"])
    m.observe_eod(0.004, "192.0.2.1:25")
    m.observe_commit(0.002, 17)
    m.observe_attempt(1.5, "delivered")
    m.observe_attempt(3.0, "no such result")
    m.inbound_opened("192.0.2.1:25")
    m.inbound_opened("192.0.2.1:25")
    m.inbound_closed("192.0.2.1:25")
    m.outbound_opened("dane")
    m.outbound_opened("bogus-level")
    m.observe_api("email", 200)
    m.observe_api("batch", 503)
    m.webhook_backlog(12)
    m.webhook_success(3)
    m.webhook_failure(metrics.webhook_reason(None, "timed out after 10 s"))
    m.webhook_failure(metrics.webhook_reason(410))
    m.set_queue("", 5, 60.0)
    assert value(m, "txmta_eod_to_250_seconds_count", listener="smtp-25") == 1
    assert value(m, "txmta_eod_to_250_seconds_bucket", listener="smtp-25", le="0.005") == 1
    assert value(m, "txmta_eod_to_250_seconds_bucket", listener="smtp-25", le="0.0025") == 0
    assert value(m, "txmta_spool_commit_batch_size_sum") == 17
    assert value(m, "txmta_spool_commit_duration_seconds_count") == 1
    assert value(m, "txmta_attempt_duration_seconds_count", result="delivered") == 1
    assert value(m, "txmta_attempt_duration_seconds_count", result="other") == 1
    assert value(m, "txmta_connections_in_open", listener="smtp-25") == 1
    assert value(m, "txmta_connections_in_total", listener="smtp-25") == 2
    assert value(m, "txmta_connections_out_open", tls_level="dane") == 1
    assert value(m, "txmta_connections_out_open", tls_level="other") == 1
    assert value(m, "txmta_api_requests_total", endpoint="email", status="2xx") == 1
    assert value(m, "txmta_api_requests_total", endpoint="batch", status="5xx") == 1
    assert value(m, "txmta_webhook_events_sent_total") == 3
    assert value(m, "txmta_webhook_failures_total", reason="timeout") == 1
    assert value(m, "txmta_webhook_failures_total", reason="gone") == 1
    t = metrics.totals(m.registry)
    assert (t["queue_depth"], t["oldest_age"], t["webhook_backlog"]) == (5, 60.0, 12)


def test_relay_circuits_by_relay_name() -> None:
    """Each relayhost's circuit state (0 closed, 1 half-open, 2 open), its faults and its
    openings, labelled by the relay's configured name."""
    m = Metrics(relays=["relay0", "backup"])
    m.relay_state("relay0", "closed")
    m.relay_state("backup", "closed")
    m.relay_failure("relay0")
    m.relay_failure("relay0")
    m.relay_state("relay0", "open")
    assert value(m, "txmta_relay_state", relay="relay0") == 2
    assert value(m, "txmta_relay_failures_total", relay="relay0") == 2
    assert value(m, "txmta_relay_opened_total", relay="relay0") == 1
    m.relay_state("relay0", "half-open")
    assert value(m, "txmta_relay_state", relay="relay0") == 1
    m.relay_state("relay0", "closed")
    assert value(m, "txmta_relay_state", relay="relay0") == 0
    assert value(m, "txmta_relay_state", relay="backup") == 0
    assert value(m, "txmta_relay_opened_total", relay="relay0") == 1


@pytest.mark.parametrize("kinds, result", [
    ([O.Delivered(OK)], "delivered"),
    ([O.Delivered(OK), O.Delivered(OK)], "delivered"),
    ([O.TempFailed(LATER)], "deferred"),
    ([O.PermFailed(NO_USER), O.PermFailed(NO_USER)], "bounced"),
    ([O.Delivered(OK), O.PermFailed(NO_USER)], "mixed"),
])
def test_attempt_result(kinds: list[Any], result: str) -> None:
    assert metrics.attempt_result(kinds) == result


@pytest.mark.parametrize("status, error, reason", [
    (410, "", "gone"), (500, "", "5xx"), (404, "", "4xx"), (302, "", "3xx"),
    (None, "timed out after 10 s", "timeout"), (None, "connection refused", "connection"),
])
def test_webhook_reason(status: int | None, error: str, reason: str) -> None:
    assert metrics.webhook_reason(status, error) == reason


# -- bounded labels ----------------------------------------------------------------------------

_LOOKS_PRIVATE = re.compile(r"[@.:]|\d{6}|^[0-9a-f]{8,}$", re.IGNORECASE)


def test_names_let_a_few_names_through_and_nothing_else() -> None:
    """Configured values map; a few unknown names pass; addresses, domains, IPs and ids are
    "other", and past the spare ones so is everything."""
    names = Names({"192.0.2.1:25": "smtp-25"}, spare=2)
    assert names("192.0.2.1:25") == "smtp-25"
    for private in ("user@example.com", "example.com", "192.0.2.1", "::1", "[::1]:25",
                    "0000000000B1234", "1f9c2a7e-5d55-4a1c-9f7b-3c4a2b1e0d99", "", " x"):
        assert names(private) == "other", private
    assert [names("bulk"), names("promo"), names("third"), names("bulk")] == \
        ["bulk", "promo", "other", "bulk"]


def test_listener_labels_name_listeners_without_their_addresses() -> None:
    """SMTP listeners are named by port, HTTP listeners by their name, or "httpN" when the
    name would not do as a label; the map is keyed by what sessions and requests carry."""
    labels = metrics.listener_labels(
        [Listen("192.0.2.1:25", 25), Listen("[2001:db8::1]:25", 25), Listen("0.0.0.0:465", 465)],
        [Http("127.0.0.1:8025", 8025, "api"), Http("[::1]:8080", 8080, "api.example.com")])
    assert labels == {"dsn": "dsn", "192.0.2.1:25": "smtp-25", "[2001:db8::1]:25": "smtp-25",
                      "0.0.0.0:465": "smtp-465", "127.0.0.1:8025": "api", "api": "api",
                      "[::1]:8080": "http1", "api.example.com": "http1"}
    Metrics(listeners=labels)       # every label is fit for Names


def test_a_configured_label_must_be_a_name() -> None:
    with pytest.raises(ValueError):
        Names({"x": "mx.example.com"})


texts = st.one_of(st.text(max_size=40), st.sampled_from(
    ["", "none", "greylisted", "TLSv1.3 X dane-ee", "bulk", "user@example.com", "192.0.2.1",
     "192.0.2.1:25", "example.net", "0000000000B1234"]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(texts, texts, texts, texts, texts), min_size=1, max_size=40))
def test_arbitrary_values_never_widen_the_labels(rows: list[tuple[str, ...]]) -> None:
    """Whatever categories, TLS texts, lanes, listeners and endpoints come in, each label keeps
    to its bounded set and no value looks like an address, a domain, an IP or an id."""
    m = Metrics(lanes=["bulk"], listeners=LISTENERS)
    for category, tls, lane, listener, endpoint in rows:
        msg = message(RecipientState(QUEUED, 1, 0.0, LATER, category=category), lane=lane,
                      client={"listener": listener, "address": "192.0.2.9"})
        m.heard(events.Received(EID, msg))
        m.heard(events.Deferred(EID, msg, 0, O.TempFailed(LATER, "mx.example.net",
                                                          "192.0.2.5", tls=tls, stage="rcpt"),
                                1.0))
        m.observe_api(endpoint, 200)
        m.set_queue(lane, 1, 1.0)
    r = m.registry
    assert label_values(r, "category") <= set(CATEGORIES) | {"none", "other"}
    assert label_values(r, "tls") <= set(metrics.TLS_LABELS)
    spare = m.lane.spare + 1
    assert len(label_values(r, "lane") - {"default", "bulk"}) <= spare
    assert len(label_values(r, "listener") - set(LISTENERS.values())) <= spare
    assert len(label_values(r, "endpoint")) <= spare
    for label in ("lane", "listener", "endpoint", "category", "tls"):
        for v in label_values(r, label):
            assert not _LOOKS_PRIVATE.search(v), (label, v)


# -- the exposition ------------------------------------------------------------------------------

SERIES = {
    "txmta_messages_received": "counter", "txmta_received_recipients": "counter",
    "txmta_received_bytes": "counter", "txmta_eod_to_250_seconds": "histogram",
    "txmta_connections_in_open": "gauge", "txmta_connections_in": "counter",
    "txmta_api_requests": "counter", "txmta_recipients": "counter",
    "txmta_attempt_duration_seconds": "histogram", "txmta_tls_outcomes": "counter",
    "txmta_connections_out_open": "gauge", "txmta_connections_out": "counter",
    "txmta_dsn_queued": "counter", "txmta_suppressions_added": "counter",
    "txmta_admin_actions": "counter", "txmta_queue_depth": "gauge",
    "txmta_queue_oldest_age_seconds": "gauge", "txmta_spool_commit_duration_seconds": "histogram",
    "txmta_spool_commit_batch_size": "histogram", "txmta_webhook_backlog": "gauge",
    "txmta_webhook_events_sent": "counter", "txmta_webhook_failures": "counter",
    "txmta_shaping_backoffs": "counter", "txmta_shaping_factor": "gauge",
    "txmta_relay_state": "gauge", "txmta_relay_failures": "counter",
    "txmta_relay_opened": "counter",
}


def busy_metrics() -> Metrics:
    """Metrics that heard every kind of event and call, all with addresses and ids about."""
    m = Metrics(lanes=["bulk"], listeners=LISTENERS, endpoints=["email"], providers=["google"],
                relays=["backup"])
    m.observe_backoff("google", 0.5)
    m.relay_state("backup", "open")
    m.relay_failure("backup")
    m.relay_failure("smtp.example.net:587")
    msg = message(RecipientState(DELIVERED, 1, 0.0, OK), lane="bulk")
    m.heard(events.Received(EID, msg))
    m.heard(events.Delivered(EID, msg, 0, O.Delivered(OK, "mx.example.net", "192.0.2.5",
                                                        tls="TLSv1.3 X verified"), 1.0))
    m.heard(events.Bounced(EID, msg, 0, O.PermFailed(NO_USER, "mx.example.net", "192.0.2.5",
                                                     stage="rcpt"), 1.0))
    m.heard(events.DsnQueued(EID, msg, msg, "failed"))
    m.heard(events.SuppressionAdded(EID, Suppression("u0@example.net", "policy", 1.0, 2.0)))
    m.heard(events.AdminAction(EID, msg, "flush", 1.0))
    m.observe_eod(0.01, "192.0.2.1:25")
    m.observe_commit(0.003, 4)
    m.observe_attempt(0.7, "delivered")
    m.inbound_opened("192.0.2.1:25")
    m.outbound_opened("may")
    m.observe_api("email", 200)
    m.set_queue("bulk", 3, 12.0)
    m.webhook_backlog(2)
    m.webhook_success()
    m.webhook_failure("5xx")
    return m


def test_exposition_parses_with_the_expected_series_and_help() -> None:
    """The text exposition parses; it has every series, with its type and a help text, and no
    label value that looks like an address, a domain, an IP or an id."""
    body, content_type = metrics.render(busy_metrics().registry)
    assert content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {n: families[n].type for n in SERIES if n in families} == SERIES
    assert all(families[n].documentation for n in SERIES)
    assert all(n.startswith("txmta_") for n in families)
    for f in families.values():
        for s in f.samples:
            if f.type == "counter" and not s.name.endswith("_created"):
                assert s.name.endswith("_total"), s.name
            for k, v in s.labels.items():
                if k != "le":
                    assert not _LOOKS_PRIVATE.search(v), (s.name, k, v)
    assert b"192.0.2" not in body and b"example" not in body and b"B1234" not in body


# -- several processes ----------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    from txmta import events, metrics
    from txmta.message import (Address, Envelope, Recipient, RecipientState, StoredMessage,
                               DELIVERED)
    from txmta import outcome as O
    from txmta.reply import Reply
    directory, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    metrics.setup_multiprocess(directory, worker)
    m = metrics.Metrics(listeners={"192.0.2.1:25": "smtp-25"})
    env = Envelope(Address("a", "example.com"), (Recipient(Address("b", "example.net")),))
    msg = StoredMessage("0000000000B1234", env, 1.0, 10, (RecipientState(DELIVERED),),
                        {"listener": "192.0.2.1:25", "address": "192.0.2.9"})
    ok = Reply(250, "2.0.0", "OK")
    for _ in range(n):
        m.heard(events.Received(b"e" * 15, msg))
        m.heard(events.Delivered(b"e" * 15, msg, 0, O.Delivered(ok, "mx", "192.0.2.5"), 2.0))
        m.observe_commit(0.001, 2)
    m.inbound_opened("192.0.2.1:25")
    m.set_queue("", 7 + worker, 30.0 * (worker + 1))
    m.webhook_backlog(4)
""")


def run_worker(directory: str, worker: int, n: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != metrics.ENV}
    env["PYTHONPATH"] = WORKTREE + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", CHILD, directory, str(worker), str(n)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def exposition(directory: str) -> dict[str, Any]:
    body, _ = metrics.render(directory)
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def sample(families: dict[str, Any], family: str, name: str, **labels: str) -> float:
    found = [s.value for s in families[family].samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, families[family].samples)
    return found[0]


def test_two_processes_add_up_in_one_exposition(tmp_path: Any) -> None:
    """Two worker processes count into one directory; the exposition sums their counters and
    histograms, sums open connections, and takes the queue's largest sample."""
    directory = metrics.prepare_directory(str(tmp_path / "metrics"))
    run_worker(directory, 0, 2)
    run_worker(directory, 1, 3)
    f = exposition(directory)
    assert sample(f, "txmta_messages_received", "txmta_messages_received_total",
                  listener="smtp-25", source="smtp") == 5
    assert sample(f, "txmta_spool_commit_batch_size", "txmta_spool_commit_batch_size_sum") == 10
    assert sample(f, "txmta_spool_commit_batch_size", "txmta_spool_commit_batch_size_count") == 5
    assert sample(f, "txmta_connections_in_open", "txmta_connections_in_open",
                  listener="smtp-25") == 2
    assert sample(f, "txmta_queue_depth", "txmta_queue_depth", lane="default") == 8
    assert not any("pid" in s.labels for fam in f.values() for s in fam.samples)
    assert metrics.totals(directory) == {
        "received": 5, "delivered": 5, "deferred": 0, "bounced": 0, "expired": 0,
        "suppressed": 0, "deleted": 0, "queue_depth": 8, "oldest_age": 60.0,
        "webhook_backlog": 4}


def test_a_dead_worker_keeps_its_counts_and_loses_its_gauges(tmp_path: Any) -> None:
    """After worker_died, a worker's open connections and samples leave the exposition but its
    counts stay; the worker restarted in its place counts on from them."""
    directory = metrics.prepare_directory(str(tmp_path / "metrics"))
    run_worker(directory, 0, 1)
    run_worker(directory, 1, 4)
    metrics.worker_died(directory, 1)
    f = exposition(directory)
    assert sample(f, "txmta_connections_in_open", "txmta_connections_in_open",
                  listener="smtp-25") == 1
    assert sample(f, "txmta_queue_depth", "txmta_queue_depth", lane="default") == 7
    assert metrics.totals(directory)["received"] == 5
    run_worker(directory, 1, 2)                 # the restarted worker 1
    f = exposition(directory)
    assert sample(f, "txmta_messages_received", "txmta_messages_received_total",
                  listener="smtp-25", source="smtp") == 7
    assert sample(f, "txmta_connections_in_open", "txmta_connections_in_open",
                  listener="smtp-25") == 2
    # the value files of each worker (metrics.VALUE_FILES, allocated at its start): none
    # more per restart
    assert len(os.listdir(directory)) == 2 * len(metrics.VALUE_FILES)


def test_prepare_directory_forgets_the_last_run(tmp_path: Any) -> None:
    directory = metrics.prepare_directory(str(tmp_path / "metrics"))
    run_worker(directory, 0, 1)
    metrics.prepare_directory(directory)
    assert metrics.totals(directory)["received"] == 0
    assert os.stat(directory).st_mode & 0o777 == 0o700


# -- GET /metrics over HTTP ------------------------------------------------------------------------

class Fetch(Protocol):
    """Sends one HTTP/1.0 request and keeps everything the server answers until it closes."""

    def __init__(self, request: bytes, done: defer.Deferred[bytes]) -> None:
        self.request, self.done, self.data = request, done, b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


@pytest.fixture
def web() -> Iterator[tuple[Any, int, Metrics]]:
    """A private epoll reactor serving /metrics of a registry on 127.0.0.1."""
    reactor = EPollReactor()
    m = busy_metrics()
    root = Resource()
    root.putChild(b"metrics", metrics.MetricsResource(m.registry))
    ports: list[Any] = []
    TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root)) \
        .addCallback(ports.append)
    yield reactor, ports[0].getHost().port, m
    ports[0].stopListening()
    for _ in range(10):
        reactor.iterate(0)


def get(reactor: Any, port: int, method: bytes = b"GET") -> tuple[bytes, bytes]:
    done: defer.Deferred[bytes] = defer.Deferred()
    request = method + b" /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        Factory.forProtocol(lambda: Fetch(request, done)))
    box: list[bytes] = []
    done.addCallback(box.append)
    end = time.monotonic() + 10
    while not box and time.monotonic() < end:
        reactor.iterate(0.01)
    assert box, "no answer from the server"
    head, _, body = box[0].partition(b"\r\n\r\n")
    return head, body


def test_metrics_resource_serves_the_exposition(web: tuple[Any, int, Metrics]) -> None:
    """GET /metrics answers 200 with the text format, which parses and shows the counts."""
    reactor, port, m = web
    head, body = get(reactor, port)
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert b"content-type: text/plain; version=0.0.4" in head.lower()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert set(SERIES) <= set(families)
    assert sample(families, "txmta_messages_received", "txmta_messages_received_total",
                  listener="smtp-25", source="smtp") == 1
    m.heard(events.Received(EID, message(RecipientState())))
    _, body = get(reactor, port)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert sample(families, "txmta_messages_received", "txmta_messages_received_total",
                  listener="smtp-25", source="smtp") == 2


def test_metrics_resource_refuses_other_methods(web: tuple[Any, int, Metrics]) -> None:
    reactor, port, _ = web
    head, _ = get(reactor, port, b"POST")
    assert b" 405 " in head.split(b"\r\n")[0]


# -- the queue sampler ------------------------------------------------------------------------------

class Reads:
    """A `read` whose answers the test gives, one Deferred per call."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[dict[str, tuple[int, float]]]] = []

    def __call__(self) -> defer.Deferred[dict[str, tuple[int, float]]]:
        d: defer.Deferred[dict[str, tuple[int, float]]] = defer.Deferred()
        self.pending.append(d)
        return d


def test_queue_sampler_samples_every_interval() -> None:
    """A read at start, then one per interval; each answer sets depth and age per lane, and a
    lane that disappears goes to zero."""
    clock, reads, m = Clock(), Reads(), Metrics(lanes=["bulk"])
    sampler = metrics.QueueSampler(m, clock, reads, interval=10.0)
    sampler.start()
    assert len(reads.pending) == 1
    reads.pending[0].callback({"": (4, 90.0), "bulk": (2, 5.0)})
    assert value(m, "txmta_queue_depth", lane="default") == 4
    assert value(m, "txmta_queue_oldest_age_seconds", lane="bulk") == 5.0
    clock.advance(9.9)
    assert len(reads.pending) == 1
    clock.advance(0.1)
    assert len(reads.pending) == 2
    reads.pending[1].callback({"": (1, 3.0)})
    assert value(m, "txmta_queue_depth", lane="default") == 1
    assert value(m, "txmta_queue_depth", lane="bulk") == 0
    assert value(m, "txmta_queue_oldest_age_seconds", lane="bulk") == 0
    sampler.stop()
    clock.advance(100.0)
    assert len(reads.pending) == 2


def test_queue_sampler_does_not_pile_up_slow_reads() -> None:
    """While a read is under way, the next ticks start no other."""
    clock, reads, m = Clock(), Reads(), Metrics()
    sampler = metrics.QueueSampler(m, clock, reads, interval=10.0)
    sampler.start()
    clock.advance(35.0)
    assert len(reads.pending) == 1
    reads.pending[0].callback({"": (9, 1.0)})
    clock.advance(5.0)
    assert len(reads.pending) == 2
    sampler.stop()


def test_queue_sampler_survives_a_failed_read() -> None:
    """A failed read is logged, keeps the last values, and sampling goes on."""
    clock, reads, m = Clock(), Reads(), Metrics()
    logged: list[dict[str, Any]] = []
    sampler = metrics.QueueSampler(m, clock, reads, interval=10.0)
    globalLogPublisher.addObserver(logged.append)
    try:
        sampler.start()
        reads.pending[0].callback({"": (6, 2.0)})
        clock.advance(10.0)
        reads.pending[1].errback(RuntimeError("spool closed"))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert value(m, "txmta_queue_depth", lane="default") == 6
    assert [e for e in logged if "log_failure" in e][0]["log_failure"].check(RuntimeError)
    clock.advance(10.0)
    assert len(reads.pending) == 3
    sampler.stop()


def test_value_files_are_allocated_on_disk_at_start(tmp_path: Any) -> None:
    """prometheus-client grows its mapped files as sparse files: a store into an unallocated
    page on a full disk is SIGBUS.  setup_multiprocess allocates each value file's blocks
    (PREALLOCATE), keeping what a predecessor counted, and prometheus-client takes the file
    as its capacity."""
    directory = metrics.prepare_directory(str(tmp_path / "metrics"))
    run_worker(directory, 0, 3)
    before = metrics.totals(directory)["received"]
    assert before == 3
    saved = os.environ.get(metrics.ENV), metrics.values.ValueClass
    try:
        metrics.setup_multiprocess(directory, 0)        # restarted: the files are kept
    finally:
        if saved[0] is None:
            os.environ.pop(metrics.ENV, None)
        else:
            os.environ[metrics.ENV] = saved[0]
        metrics.values.ValueClass = saved[1]
    for prefix in metrics.VALUE_FILES:
        st = os.stat(os.path.join(directory, f"{prefix}_0.db"))
        assert st.st_size >= metrics.PREALLOCATE
        assert st.st_blocks * 512 >= metrics.PREALLOCATE     # allocated, not a hole
    assert metrics.totals(directory)["received"] == before

