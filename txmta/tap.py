"""`twistd txmta`: the master.  Loads the configuration, binds every listener, runs the workers.

With `[server] workers = N` (N > 1) the master binds each [[listen]] socket itself (as root,
when started as root), starts N worker processes (`python -m txmta.worker`, see worker.py)
with those sockets as inherited file descriptors and an AMP channel to each over a
socketpair, re-logs their output line by line ("worker K") into its own log, restarts a
worker that exits (at once; with a growing delay, up to 30 s, while it keeps dying), and
serves the admin control socket, fanning each command out to the workers concerned
(control/channel.py).  SIGTERM: stop restarting, SIGTERM each worker (its graceful stop),
wait for them, exit.  SIGHUP: every worker reopens its mail log file and reloads; SIGUSR1:
every worker reopens its mail log file.  The master never opens the spool.

With `workers = 1` there is no child process: the daemon builds the one worker in its own
process, exactly as it always did.

The only module that imports the global reactor (DESIGN "Layout"); the worker process asks
it for the reactor through `global_reactor()`.  Parts get plain values and the reactor as
their clock; nothing else reads the config.
"""
# test: tests/integration/test_daemon.py, tests/integration/test_workers.py, tests/test_master.py

from __future__ import annotations

import gc
import os
import resource
import signal
import socket
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python import usage

from txmta import config as C
from txmta.worker import bind_to_cpu, build, divide_limits, drop_privileges, user_ids

log = Logger(namespace="txmta.master")

STOP_TIMEOUT = 40.0     # seconds the master waits for the workers' graceful stop before SIGKILL
BACKOFF_MAX = 30.0      # the longest wait before restarting a worker that keeps dying
BACKOFF_RESET = 60.0    # a worker that ran this long starts afresh: restarted at once


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Runs the txmta mail transfer agent.  Without --config it reads "
                f"{C.DEFAULT_PATH} if present, else built-in defaults.")
    optParameters = [["config", "c", None, "the configuration file (TOML)"]]


# -- supervision ------------------------------------------------------------------------------

class Backoff:
    """When to restart a worker that exited: at once, then after 1, 2, 4 ... up to
    BACKOFF_MAX seconds while it keeps dying; a worker that ran BACKOFF_RESET seconds
    counts as healthy again.  Pure: the caller passes the time."""

    def __init__(self, maximum: float = BACKOFF_MAX, reset_after: float = BACKOFF_RESET) -> None:
        self.maximum = maximum
        self.reset_after = reset_after
        self.failures = 0
        self.started_at: float | None = None

    def started(self, now: float) -> None:
        self.started_at = now

    def exited(self, now: float) -> float:
        """The delay before the next start."""
        if self.started_at is not None and now - self.started_at >= self.reset_after:
            self.failures = 0
        delay = 0.0 if self.failures == 0 else min(self.maximum, 2.0 ** (self.failures - 1))
        self.failures += 1
        return delay


def describe_exit(reason: Any) -> str:
    """'exited with status 3' / 'was killed by signal 9 (SIGKILL)' from processEnded's reason."""
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "?"
        return f"was killed by signal {sig} ({name})"
    code = getattr(value, "exitCode", None)
    return f"exited with status {code if code is not None else 0}"


class WorkerProcess(ProcessProtocol):
    """One worker process seen from the master: its output, re-logged line by line with
    "worker K" as the log system, and its end."""

    def __init__(self, master: "Master", index: int) -> None:
        self.master = master
        self.index = index
        self.buffers = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        buf = self.buffers.get(fd, b"") + data
        *lines, rest = buf.split(b"\n")
        self.buffers[fd] = rest
        for line in lines:
            self._relog(fd, line)

    def _relog(self, fd: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text:
            (log.info if fd == 1 else log.warn)("{line}", line=text,
                                                 log_system=f"worker {self.index}")

    def processEnded(self, reason: Any) -> None:
        for fd, rest in self.buffers.items():
            if rest:
                self._relog(fd, rest)
        self.buffers = {1: b"", 2: b""}
        self.master.worker_ended(self, reason)


class Master(service.Service):
    """Runs `workers` worker processes on the listening `sockets` (one per [[listen]] table,
    already bound), keeps one AMP channel to each, restarts them, and serves the control
    socket.  `spawn` is reactor.spawnProcess (tests pass a fake); `clock` schedules restarts."""

    def __init__(self, cfg: C.Config, reactor: Any, sockets: list[socket.socket], *,
                 workers: int, ids: tuple[str, int, int] | None = None,
                 spawn: Any = None, clock: Any = None,
                 worker_command: list[str] | None = None) -> None:
        from txmta.control.channel import FanOut
        self.cfg = cfg
        self.reactor = reactor
        self.clock = clock or reactor
        self.sockets = sockets
        self.workers = workers
        self.ids = ids
        self.spawn = spawn or reactor.spawnProcess
        self.worker_command = worker_command or [sys.executable, "-m", "txmta.worker"]
        # the workers' connection counts on the sockets they share (tcp.AcceptBalance)
        from txmta.tcp import map_counts, shared_counts
        self.accept_counts = shared_counts(len(sockets), workers) if workers > 1 else None
        self._counts = map_counts(self.accept_counts) if self.accept_counts is not None else None
        self.channels: list[Any] = [None] * workers
        self.fanout = FanOut(self.channels)
        self.processes: list[Any] = [None] * workers       # IProcessTransport per index
        self.backoff = [Backoff() for _ in range(workers)]
        self.restarts: list[Any] = [None] * workers        # pending restart (IDelayedCall)
        self.stopping = False
        self._stopped: defer.Deferred[None] | None = None
        self._control: Any = None
        self._pickup: Any = None
        self._hup_previous: Any = None
        self._usr1_previous: Any = None

    # -- starting and restarting workers -------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)
        from txmta.control.amp import ControlService, control_socket_path, pickup_socket_path
        path = control_socket_path(self.cfg.spool.path)
        self._control = ControlService(self.reactor, path, self.fanout)
        self._control.startService()
        self._pickup = ControlService(self.reactor, pickup_socket_path(self.cfg.spool.path),
                                      self.fanout, pickup=True)
        self._pickup.startService()
        if self.ids is not None and os.getuid() == 0:
            os.chown(path, self.ids[1], self.ids[2])     # the workers' user may use it too
        from txmta import metrics
        self.metrics_dir = metrics.prepare_directory(os.path.join(self.cfg.spool.path, "metrics"))
        if self.ids is not None and os.getuid() == 0:
            os.chown(self.metrics_dir, self.ids[1], self.ids[2])
        self.reactor.callWhenRunning(self._install_hup)
        stop_once_on_sigterm(self.reactor)
        for k in range(self.workers):
            self.start_worker(k)

    def start_worker(self, index: int) -> None:
        from txmta.control.channel import CHANNEL_FD, MasterChannel
        self.restarts[index] = None
        if self.stopping:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.set_inheritable(True)   # kept in the child even where it already sits at its number
        for s in self.sockets:
            s.set_inheritable(True)
        first = CHANNEL_FD + 1
        fds = {0: self._devnull(), 1: "r", 2: "r", CHANNEL_FD: theirs.fileno()}
        for i, s in enumerate(self.sockets):
            fds[first + i] = s.fileno()
        args = list(self.worker_command) + [
            "--index", str(index), "--workers", str(self.workers),
            "--fds", ",".join(str(first + i) for i in range(len(self.sockets))),
            "--master", str(os.getpid())]
        if self.accept_counts is not None:      # after the sockets
            fds[first + len(self.sockets)] = self.accept_counts
            args += ["--balance", str(first + len(self.sockets))]
        if self.cfg.path is not None:
            args += ["--config", self.cfg.path]
        channel = MasterChannel(index, self.fanout.relay, on_lost=self._channel_lost)
        try:
            self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                               Factory.forProtocol(lambda: channel))
            process = self.spawn(WorkerProcess(self, index), args[0], args,
                                 env=dict(os.environ), childFDs=fds)
        finally:
            ours.close()          # Twisted holds its own duplicate; the worker has `theirs`
            theirs.close()
        self.processes[index] = process
        self.channels[index] = channel
        self.backoff[index].started(self.clock.seconds())
        log.info("worker {index} started (pid {pid})", index=index, pid=process.pid)

    def _devnull(self) -> int:
        if not hasattr(self, "_null"):
            self._null = os.open(os.devnull, os.O_RDWR)
        return self._null

    def _channel_lost(self, channel: Any) -> None:
        if self.channels[channel.index] is channel:
            self.channels[channel.index] = None

    def worker_ended(self, process: WorkerProcess, reason: Any) -> None:
        k = process.index
        from txmta import metrics
        metrics.worker_died(self.metrics_dir, k)   # its gauges go, its counts stay
        if self._counts is not None:
            from txmta.tcp import worker_gone
            worker_gone(self._counts, k, self.workers)
        self.processes[k] = None
        self.channels[k] = None
        why = describe_exit(reason)
        if self.stopping:
            log.info("worker {index} {why}", index=k, why=why)
            if not any(self.processes) and self._stopped is not None and not self._stopped.called:
                self._stopped.callback(None)
            return
        delay = self.backoff[k].exited(self.clock.seconds())
        log.error("worker {index} {why}; restarting it {when}", index=k, why=why,
                  when="now" if delay == 0 else f"in {delay:g} s")
        self.restarts[k] = self.clock.callLater(delay, self.start_worker, k)

    # -- signals ---------------------------------------------------------------------------------

    def _install_hup(self) -> None:
        if self.running:
            self._hup_previous = signal.signal(signal.SIGHUP, self._on_hup)
            self._usr1_previous = signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def _on_usr1(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reopen)
        if callable(self._usr1_previous):     # twistd's own log file rotation
            self._usr1_previous(signum, frame)

    def reopen(self) -> None:
        """SIGUSR1: every running worker reopens its mail log file (each writes its own
        lines to it)."""
        for process in self.processes:
            if process is not None:
                try:
                    process.signalProcess(signal.SIGUSR1)   # names: only KILL, TERM, INT
                except error.ProcessExitedAlready:
                    pass

    def reload(self) -> defer.Deferred[None]:
        """SIGHUP: every running worker reloads (its own ReloadService logs what changed)."""
        from txmta.control.channel import Reload
        running = [c for c in self.channels if c is not None]
        log.info("SIGHUP: asking {n} worker(s) to reload", n=len(running))
        ds = [c.callRemote(Reload).addErrback(
            lambda f: log.failure("a worker could not reload", f)) for c in running]
        return defer.gatherResults(ds).addCallback(lambda _: None)

    def stopService(self) -> Any:
        """Stop restarting; SIGTERM every worker (its graceful stop) and wait for them (SIGKILL
        after STOP_TIMEOUT); then close the control socket and the listeners."""
        service.Service.stopService(self)
        self.stopping = True
        if self._hup_previous is not None:
            signal.signal(signal.SIGHUP, self._hup_previous)
            self._hup_previous = None
        if self._usr1_previous is not None:
            signal.signal(signal.SIGUSR1, self._usr1_previous)
            self._usr1_previous = None
        for k, call in enumerate(self.restarts):
            if call is not None and call.active():
                call.cancel()
            self.restarts[k] = None
        self._stopped = defer.Deferred()
        if not any(self.processes):
            self._stopped.callback(None)
        for process in self.processes:
            if process is not None:
                try:
                    process.signalProcess("TERM")
                except error.ProcessExitedAlready:
                    pass
        killer = self.clock.callLater(STOP_TIMEOUT, self._kill_all)

        def done(_: Any) -> Any:
            if killer.active():
                killer.cancel()
            for s in self.sockets:
                s.close()
            control, self._control = self._control, None
            pickup, self._pickup = self._pickup, None
            if pickup is not None:
                pickup.stopService()
            return control.stopService() if control is not None else None
        return self._stopped.addCallback(done)

    def _kill_all(self) -> None:
        for k, process in enumerate(self.processes):
            if process is not None:
                log.error("worker {index} did not stop within {t:g} s: SIGKILL", index=k,
                          t=STOP_TIMEOUT)
                try:
                    process.signalProcess("KILL")
                except error.ProcessExitedAlready:
                    pass


class DroppingWorker(service.MultiService):
    """`workers = 1` started as root with [server] user: the listeners are bound as root
    (in makeService), and the one worker is built only in privilegedStartService, after
    twistd has opened its log and pid files as root, right after dropping to the user (so
    the spool is opened, and every file the daemon writes is created, as that user)."""

    def __init__(self, cfg: C.Config, reactor: Any, sockets: list[socket.socket],
                 ids: tuple[str, int, int]) -> None:
        service.MultiService.__init__(self)
        self.cfg = cfg
        self.reactor = reactor
        self.sockets = sockets          # kept open: the worker adopts them
        self.ids = ids

    def privilegedStartService(self) -> None:
        try:
            give_spool(self.cfg.spool.path, self.ids[1], self.ids[2])
            drop_privileges(self.ids)
            build(self.cfg, self.reactor,
                  inherited=[s.fileno() for s in self.sockets]).setServiceParent(self)
        except C.ConfigError as e:
            raise SystemExit(f"txmta: {e}")
        tune_runtime()
        service.MultiService.privilegedStartService(self)


# -- start ------------------------------------------------------------------------------------

def bind_listeners(cfg: C.Config) -> list[socket.socket]:
    """Every [[listen]] socket, then every [[http]] one, bound and listening; ConfigError
    naming the one that fails."""
    from txmta.tcp import listening_socket
    sockets: list[socket.socket] = []
    wanted = C.named_listeners(cfg)
    try:
        for name, lst in wanted:
            try:
                sockets.append(listening_socket(lst.host, lst.port, backlog=1024))
            except OSError as e:
                raise C.ConfigError(f"{cfg.path or '<defaults>'}: {name}.address = "
                                    f"\"{lst.address}\": cannot listen: {e.strerror or e}") from None
    except BaseException:
        for s in sockets:
            s.close()
        raise
    return sockets


def quiet_twisted_logs() -> None:
    """The log twistd is about to begin leaves out what Twisted says of every port and
    channel we open and close ("... starting on ...", "connection established"): the startup
    summary names the listeners.  (twistd begins logging after makeService.)"""
    from twisted.logger import (FilteringLogObserver, PredicateResult, globalLogBeginner)
    from txmta.worker import is_noise
    begin = globalLogBeginner.beginLoggingTo
    if getattr(begin, "quiet", False):
        return

    def predicate(event: dict[str, Any]) -> PredicateResult:
        return PredicateResult.no if is_noise(event) else PredicateResult.maybe

    def quiet_begin(observers: Any, *args: Any, **kwargs: Any) -> Any:
        return begin([FilteringLogObserver(o, [predicate]) for o in observers], *args, **kwargs)
    quiet_begin.quiet = True        # type: ignore[attr-defined]
    globalLogBeginner.beginLoggingTo = quiet_begin     # type: ignore[method-assign]


def startup_summary(cfg: C.Config) -> str:
    """What the daemon starts with, said once: version, configuration file, listeners, spool,
    workers, where mail goes, the TLS certificate's subject and expiry."""
    import txmta
    d = cfg.delivery
    listeners = ", ".join(
        [f"{lst.address} (smtp, tls {lst.tls}, auth {lst.auth})" for lst in cfg.listen]
        + [f"{h.address} (http {'+'.join(h.serve)}, tls {h.tls})" for h in cfg.http]) or "none"
    where = (f"relayhost {d.relayhost}" if d.relayhost else "MX delivery")
    parts = [f"txmta {txmta.__version__} starting", f"config {cfg.path or '(built-in defaults)'}",
             f"listeners {listeners}", f"spool {os.path.abspath(cfg.spool.path)}",
             f"workers {cfg.server.workers}", f"hostname {cfg.server.hostname}", where,
             f"tls {certificate_summary(cfg.tls.cert) if cfg.tls.cert else 'no certificate'}"]
    return "; ".join(parts)


def certificate_summary(path: str) -> str:
    """"certificate CN=... (expires 2027-03-01)" of the PEM file at `path`, or why not."""
    try:
        from cryptography import x509
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        expires = cert.not_valid_after_utc.strftime("%Y-%m-%d")
        return f"certificate {cert.subject.rfc4514_string()} (expires {expires})"
    except Exception as e:      # the start checks the material itself, with a clear error
        return f"certificate {path} (unreadable: {e})"


def check_spool(cfg: C.Config) -> None:
    """The spool directory exists (made if missing) and this process can write in it;
    ConfigError naming spool.path, the directory and the reason."""
    path = cfg.spool.path
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise C.ConfigError(f"{cfg.path or '<defaults>'}: spool.path = \"{path}\": cannot use "
                            f"{os.path.abspath(path)}: {e.strerror or e}") from None


def give_spool(path: str, uid: int, gid: int) -> None:
    """A spool directory that belongs to root becomes the workers' user's, with what root
    left in it (a spool used by a daemon that ran as root before)."""
    if os.stat(path).st_uid != 0:
        return
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            if os.lstat(p).st_uid == 0:
                os.lchown(p, uid, gid)


def check_material(cfg: C.Config) -> None:
    """What a worker reads at start (TLS certificate and key, DKIM keys, API tokens): read it
    once here, so a bad file stops the master with its message rather than making workers
    die."""
    if cfg.tls.cert and cfg.tls.key:
        from txmta.inbound.tlscontext import load_server_context
        load_server_context(cfg.tls, cfg.path)
    if cfg.dkim:
        from txmta.dkim import Signer
        Signer.from_config(cfg)
    if cfg.http and cfg.api.tokens:
        from txmta.api.tokens import TokenFileError, TokenStore
        try:
            TokenStore(cfg.api.tokens, lambda: 0.0)
        except TokenFileError as e:
            raise C.ConfigError(f"{cfg.path or '<defaults>'}: api.tokens = "
                                f"\"{cfg.api.tokens}\": {e}") from None


def raise_file_limit(cfg: C.Config) -> str | None:
    """Lift the soft RLIMIT_NOFILE to the hard one, for this process and the workers it
    starts (they inherit it): an SMTP session holds a descriptor, and another for its body
    file past inline_body_limit, and a shell's usual soft limit of 1024 is below the default
    max_connections.  Returns a warning when even the hard limit is below what one worker's
    share of [server] and [delivery] max_connections may need, else None."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        # an unlimited hard limit is capped by the kernel (fs.nr_open): ask for 2^20
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    share = divide_limits(cfg, cfg.server.workers)
    need = 2 * share.server.max_connections + share.delivery.max_connections + 100
    if soft != resource.RLIM_INFINITY and soft < need:
        return (f"open file limit {soft} is below the {need} descriptors each worker may need "
                f"for [server] max_connections = {cfg.server.max_connections} and [delivery] "
                f"max_connections = {cfg.delivery.max_connections}: clients past it are "
                f"closed without a reply; raise the limit (LimitNOFILE=, ulimit -n) or lower "
                f"max_connections")
    return None


def tune_runtime() -> None:
    # The objects built at start live as long as the daemon: keep the cyclic collector from
    # walking them again and again, and let it run less often (a full collection under load
    # was a visible share of the end-of-data -> 250 tail latency).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 20)
    # The spool's writer thread needs the GIL for a moment after each commit, to hand the
    # results (the 250s) to the reactor.  With the default 5 ms switch interval a busy reactor
    # thread keeps it that long before yielding; 1 ms keeps that wait off the reply latency.
    sys.setswitchinterval(0.001)


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor
    try:
        cfg = C.load(options["config"])
        check_spool(cfg)
        quiet_twisted_logs()
        log.info("{summary}", summary=startup_summary(cfg))
        short = raise_file_limit(cfg)
        if short is not None:
            log.warn("{warning}", warning=short)
        ids = user_ids(cfg)
        if ids is not None and os.getuid() not in (0, ids[1]):
            raise C.ConfigError(f"{cfg.path}: server.user = \"{cfg.server.user}\": switching "
                                f"to another user needs root (running as uid {os.getuid()})")
        as_root = ids is not None and os.getuid() == 0
        if cfg.server.workers == 1:
            bind_to_cpu(cfg, 0)                # before the spool's thread starts
            stop_once_on_sigterm(reactor)
            if not as_root:
                # bound now, so that a listener that cannot listen stops the start with one
                # line instead of a traceback and a daemon without that listener
                sockets = bind_listeners(cfg)
                try:
                    top = build(cfg, reactor, inherited=[s.fileno() for s in sockets])
                except BaseException:   # reads the TLS material: bad files are ConfigErrors
                    for sock in sockets:
                        sock.close()
                    raise
                top.listening_sockets = sockets        # type: ignore[attr-defined]
                tune_runtime()
                return top
            check_material(cfg)
            return DroppingWorker(cfg, reactor, bind_listeners(cfg), ids)  # type: ignore[arg-type]
        check_material(cfg)
        sockets = bind_listeners(cfg)
        if as_root:
            give_spool(cfg.spool.path, ids[1], ids[2])          # type: ignore[index]
    except C.ConfigError as e:
        raise SystemExit(f"txmta: {e}")
    return Master(cfg, reactor, sockets, workers=cfg.server.workers, ids=ids)


def stop_once_on_sigterm(reactor: Any) -> None:
    """Once the reactor runs: SIGTERM (and SIGINT) stop it the first time and are only noted
    after that.  Twisted's own handler calls reactor.stop() again for a second signal, which
    logs a ReactorNotRunning traceback; a second signal is common (systemd and `timeout`
    signal the whole process group, so a worker hears its master's SIGTERM and its own)."""
    def install() -> None:
        stopping = [False]

        def handler(signum: int, frame: Any) -> None:
            if stopping[0]:
                return
            stopping[0] = True
            log.info("received {name}, shutting down", name=signal.Signals(signum).name)
            reactor.callFromThread(reactor.stop)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
    reactor.callWhenRunning(install)


def global_reactor() -> Any:
    """The global reactor, for the `txmta` commands that run Twisted code once (doctor) and
    for the worker process: this module stays its only importer."""
    from twisted.internet import reactor
    return reactor
