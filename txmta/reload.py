"""SIGHUP: reload what can change while the daemon runs.

On SIGHUP the daemon first reopens its mail log file (for logrotate; SIGUSR1 does only
that), then reads its configuration file again and offers the new `Config` to each
reloadable part: the inbound TLS context (txmta/inbound/tlscontext.py), the DKIM keys and
the outbound TLS policy tables (tap.py's SigningReload and TLSPolicyReload).  Each
part builds its new state from it in a worker thread (reading files, parsing keys: nothing
that may hold the reactor) and hands back the step that installs it, which runs in the
reactor thread.  A file that does not load, or a part that refuses its new settings, is
logged as an error naming the file, key and value, and that part keeps what it had: a bad
reload never stops the daemon and never drops a connection.  Settings no part takes (listen
addresses, spool, limits...) need a restart; they are not compared or applied.

The signal handler itself only asks the reactor to reload (`callFromThread`, which is safe
from a signal handler); SIGHUPs that arrive during a reload start one more afterwards.
"""
# test: tests/test_reload.py, tests/integration/test_tls_reload.py

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application import service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from txmta import config as C

log = Logger()


class Reloadable(Protocol):
    name: str

    def prepare(self, cfg: C.Config) -> Callable[[], str]:
        """Build the new state from `cfg` (in a worker thread; raise ConfigError to refuse
        it); return the step that installs it (run in the reactor thread), which returns a
        line for the log."""
        ...


RunInThread = Callable[[Callable[[], Any]], "Deferred[Any]"]


class ReloadService(service.Service):
    """Installs the SIGHUP handler once the reactor runs; `reload()` does one reload."""

    def __init__(self, reactor: Any, config_path: str | None, parts: Sequence[Reloadable],
                 run_in_thread: RunInThread | None = None, signum: int = signal.SIGHUP,
                 reopen: Callable[[], None] | None = None) -> None:
        self.reactor = reactor
        self.reopen = reopen        # the mail log file, reopened first (logrotate)
        self.config_path = config_path
        self.parts = list(parts)
        self.signum = signum
        self._run: RunInThread = run_in_thread or (lambda f: maybeDeferred(f))
        self._previous: Any = None
        self._installed = False
        self._busy: Deferred[None] | None = None
        self._again = False

    # -- the signal ------------------------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)
        # after the reactor has installed its own handlers, so that ours is the one in place
        self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        if not self.running or self._installed:
            return
        self._previous = signal.signal(self.signum, self._on_signal)
        self._installed = True

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def stopService(self) -> Any:
        service.Service.stopService(self)
        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
        return None

    # -- the work --------------------------------------------------------------------------

    def reload(self) -> Deferred[None]:
        """Reload once (or once more after the one in progress); fires when done, never fails."""
        if self.reopen is not None:
            try:
                self.reopen()
            except Exception:
                log.failure("reopening the mail log failed")
        if self._busy is not None:
            self._again = True
            return self._busy
        log.info("SIGHUP: reloading {path}", path=self.config_path or "(built-in defaults)")
        d: Deferred[None] = self._run(self._prepare_all).addCallback(self._install_all)
        d.addErrback(self._failed)
        self._busy = d

        def done(_: Any) -> None:
            self._busy = None
            if self._again:
                self._again = False
                self.reload()
        d.addBoth(done)
        return d

    def _prepare_all(self) -> list[tuple[str, Callable[[], str] | None, str]]:
        """In a worker thread: load the file, let each part build its new state.  Returns
        (part, install step or None, error) per part; logging waits for the reactor thread."""
        try:
            cfg = C.load(self.config_path)
        except C.ConfigError as e:
            return [("configuration", None, f"{e}; nothing changed")]
        results: list[tuple[str, Callable[[], str] | None, str]] = []
        for part in self.parts:
            try:
                results.append((part.name, part.prepare(cfg), ""))
            except C.ConfigError as e:
                results.append((part.name, None, f"{e}; keeping the running one"))
            except Exception as e:  # our bug: say so, keep serving
                results.append((part.name, None, f"{type(e).__name__}: {e}; keeping the running one"))
        return results

    def _install_all(self, results: list[tuple[str, Callable[[], str] | None, str]]) -> None:
        """In the reactor thread: put each part's new state in place, log what happened."""
        if not self.parts:
            log.info("reload: nothing reloads (no reloadable parts); settings take effect at the next restart")
        for name, install, error in results:
            if install is None:
                log.error("reload of {part} failed: {error}", part=name, error=error)
                continue
            try:
                log.info("{part}: {what}", part=name, what=install())
            except Exception:
                log.failure("reload of {part} failed while installing it", part=name)

    def _failed(self, f: Failure) -> None:
        log.failure("reload failed", f)
