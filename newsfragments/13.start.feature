Start failures are one line and a non-zero exit: a listener that cannot listen (also with
one worker, whose listeners are now bound before the start) and a spool directory that cannot
be used. `txmta check-config` reports every error, not only the first, checks that the spool
can be written and the listeners can be bound, and warns about an unqualified
`server.hostname`. `txmta status` shows each listener and exits 1 when one does not answer.
The startup log says once what the daemon starts with, without Twisted's per-port noise.
