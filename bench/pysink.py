#!/usr/bin/env python3
"""A minimal SMTP sink that timestamps every message it accepts (stdlib only, asyncio).

Used by bench/run.py as the MTA's relayhost in the end-to-end latency test ("e2e-lat"):

    bench/latency client --> MTA 127.0.0.1:2525 --relayhost--> pysink.py 127.0.0.1:2501

For every message it reads the header section; if there is an `X-Bench-Id: <id>` header it
records time.monotonic() at the moment it has the whole message (the final ".\\r\\n" is in)
and answers 250 right after.  CLOCK_MONOTONIC is system-wide on Linux, so these times can be
compared with the client's times in another process on the same machine.

Like `smtp-sink -c` it writes a running counter "sess=N quit=N mesg=N\\r" to stdout (so the
harness's Sink class can poll it).  On SIGTERM/SIGINT it stops and writes a JSON file (--out):
{"count": N, "arrivals": {id: monotonic seconds}, "duplicates": [...]}.

It advertises PIPELINING and 8BITMIME (commands are processed one line at a time, in order, so
pipelined commands work), and accepts any sender and recipient.  Listens on 127.0.0.1 only.
"""

import argparse
import asyncio
import json
import re
import signal
import sys
import time

HOST = "127.0.0.1"
ID_RE = re.compile(rb"^x-bench-id:[ \t]*(\S+)", re.I | re.M)


class Stats:
    def __init__(self):
        self.sess = self.quit = self.mesg = 0
        self.arrivals = {}
        self.duplicates = []

    def show(self):
        sys.stdout.write("sess=%d quit=%d mesg=%d\r" % (self.sess, self.quit, self.mesg))
        sys.stdout.flush()


class SinkProtocol(asyncio.Protocol):
    def __init__(self, stats, hostname):
        self.stats, self.hostname = stats, hostname
        self.buf = b""
        self.in_data = False
        self.head = b""           # header section of the current message (up to 64 KiB)
        self.head_done = False
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.stats.sess += 1
        transport.write(b"220 %s ESMTP bench sink\r\n" % self.hostname)

    def data_received(self, data):
        self.buf += data
        out = []
        while True:
            i = self.buf.find(b"\n")
            if i < 0:
                break
            line, self.buf = self.buf[:i + 1], self.buf[i + 1:]
            if self.in_data:
                if line == b".\r\n" or line == b".\n":
                    t = time.monotonic()
                    self.in_data = False
                    m = ID_RE.search(self.head)
                    if m:
                        key = m.group(1).decode("latin-1")
                        if key in self.stats.arrivals:
                            self.stats.duplicates.append(key)
                        else:
                            self.stats.arrivals[key] = t
                    self.stats.mesg += 1
                    out.append(b"250 2.0.0 Ok: queued\r\n")
                    self.stats.show()
                elif not self.head_done:
                    if line in (b"\r\n", b"\n") or len(self.head) > 65536:
                        self.head_done = True
                    else:
                        self.head += line
                continue
            out.append(self.command(line.rstrip(b"\r\n")))
            if out[-1] is None:            # QUIT
                out[-1] = b"221 2.0.0 Bye\r\n"
                self.transport.write(b"".join(out))
                self.transport.close()
                self.stats.quit += 1
                return
        if out:
            self.transport.write(b"".join(out))

    def command(self, line):
        verb = line[:4].upper()
        if verb == b"EHLO":
            return (b"250-%s\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 0\r\n"
                    b"250 ENHANCEDSTATUSCODES\r\n" % self.hostname)
        if verb == b"HELO":
            return b"250 %s\r\n" % self.hostname
        if verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
            return b"250 2.0.0 Ok\r\n"
        if verb == b"DATA":
            self.in_data, self.head, self.head_done = True, b"", False
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == b"QUIT":
            return None
        return b"502 5.5.2 Error: command not recognized\r\n"


async def serve(args, stats):
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: SinkProtocol(stats, args.hostname.encode()),
                                      HOST, args.port, backlog=1024, reuse_address=True)
    try:
        await asyncio.wait_for(stop.wait(), args.max_seconds)
    except asyncio.TimeoutError:
        pass
    server.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    ap.add_argument("--out", required=True, help="JSON result written on exit")
    ap.add_argument("--hostname", default="sink.bench.invalid")
    ap.add_argument("--max-seconds", type=float, default=3600.0, help="exit after this long")
    args = ap.parse_args()
    stats = Stats()
    stats.show()
    try:
        asyncio.run(serve(args, stats))
    finally:
        with open(args.out, "w") as f:
            json.dump({"count": stats.mesg, "sessions": stats.sess, "arrivals": stats.arrivals,
                       "duplicates": stats.duplicates[:100]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
