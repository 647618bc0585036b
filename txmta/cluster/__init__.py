"""Several nodes: what they share through Valkey/Redis ([cluster] redis).

`build(cfg, reactor, worker=, workers=, position_path=)` gives one worker's `Shared` parts:

* `rate_limiter`: a `txmta.limits.RateLimiter`: shared (`RedisRateLimiter`) with a
  [cluster] redis URL, else the local one;
* `leases`: a `txmta.limits.ConnectionLeases`: shared (`RedisConnectionLeases`) or local;
* `suppression`: the `SuppressionSync` that carries the suppression list between nodes, on
  worker 0 only (the node's other workers hear of changes through the master), else None;
* `service`: starts and stops the connections (None without a cluster).

Without Redis configured nothing here connects anywhere and the parts are this process's
own.  Each worker has one command connection (limits, leases, publishing); worker 0 has a
second one that waits for the other nodes' suppression changes.  While Redis is down the
limits fall back to 1/(nodes x workers) of each limit in every worker (cluster/limits.py).
"""
# test: tests/test_cluster.py

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from twisted.application import service

from txmta.limits import (ConnectionLeases, LocalConnectionLeases, LocalRateLimiter,
                          RateLimiter)

PREFIX = "txmta:"


@dataclass
class Shared:
    rate_limiter: RateLimiter
    leases: ConnectionLeases
    suppression: Any = None         # a SuppressionSync, on worker 0 of a cluster
    service: Any = None             # an IService to start with the worker

    def __iter__(self) -> Iterator[Any]:
        """`rate_limiter, leases, suppression = cluster.build(...)`."""
        return iter((self.rate_limiter, self.leases, self.suppression))


class ClusterService(service.Service):
    """Opens the connections at start, closes them at stop."""

    def __init__(self, connection: Any, leases: Any, sync: Any) -> None:
        self.connection = connection
        self.leases = leases
        self.sync = sync

    def startService(self) -> None:
        service.Service.startService(self)
        if self.sync is not None:
            self.sync.start()          # also starts `connection`: it is the sync's commands
        else:
            self.connection.start()
        self.leases.start()

    def stopService(self) -> Any:
        service.Service.stopService(self)
        self.leases.stop()
        if self.sync is not None:
            return self.sync.stop()
        return self.connection.stop()


def build(cfg: Any, reactor: Any, *, worker: int = 0, workers: int = 1,
          position_path: str | None = None) -> Shared:
    """Worker `worker`'s shared parts (see the module's text); `position_path`: where worker
    0 keeps its position in the suppression log (None: `suppression-log-position` in the
    spool directory)."""
    c = cfg.cluster
    if not c.redis:
        return Shared(LocalRateLimiter(), LocalConnectionLeases())
    import os

    from txmta.cluster.limits import RedisConnectionLeases, RedisRateLimiter
    from txmta.cluster.redis import Connection, parse_url
    address = parse_url(c.redis)
    name = f"{c.node}/{worker}"
    connection = Connection(address, reactor, timeout=c.timeout, name=f"cluster {name}",
                            ca_file=c.ca_file)
    divisor = c.nodes * workers
    limiter = RedisRateLimiter(connection, prefix=PREFIX, divisor=divisor)
    leases = RedisConnectionLeases(connection, reactor, owner=name, ttl=c.lease_ttl,
                                   prefix=PREFIX, divisor=divisor)
    sync = None
    if worker == 0:
        from txmta.cluster.suppression import SuppressionSync
        block = 1.0
        reader = Connection(address, reactor, timeout=c.timeout,
                            name=f"cluster {name} (suppression log)", ca_file=c.ca_file,
                            reply_timeout=block + c.timeout)
        sync = SuppressionSync(connection, reader, reactor, node=c.node, prefix=PREFIX,
                               position_path=position_path or os.path.join(
                                   cfg.spool.path, "suppression-log-position"),
                               block=block)
    return Shared(limiter, leases, sync, ClusterService(connection, leases, sync))
