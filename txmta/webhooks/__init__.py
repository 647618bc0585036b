"""Outgoing webhooks: events from the spool's outbox, signed and posted to HTTP endpoints.

The parts, each usable alone: `sign` (Standard Webhooks secrets and signatures), `payload`
(the JSON bodies: txmta's own shape and Postmark's), `schedule` (when to try again, and the
collapsing of deferral events), `post` (one HTTP POST with treq, its answer as a value).
Reading the outbox and the configuration and wiring these into the daemon happen elsewhere.
"""
