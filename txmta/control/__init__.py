"""The running daemon's admin interface: AMP commands on a UNIX socket (see `amp`)."""
