"""An HTTPS server for MTA-STS policies in the integration tests, on twisted.web, loopback only.

`python stsserver.py --listen 127.0.5.43:443 --cert C --key K --policies P.json` serves
`/.well-known/mta-sts.txt` for each Host in P.json ({"mta-sts.example.test": "version: ..."})
as text/plain, 404 for anything else, and prints `ready HOST:PORT` once listening.  Each
request is printed as `GET <host> <path> <code>` (the test can count fetches).
`running(...)` is a context manager doing exactly that and yielding (host, port).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Iterator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--policies", required=True)
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    assert host.startswith("127."), "test peers stay on loopback"
    with open(args.policies, encoding="utf-8") as f:
        policies: dict[str, str] = json.load(f)

    from twisted.internet import reactor, ssl
    from twisted.web import resource, server

    class Policy(resource.Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            name = (request.getRequestHostname() or b"").decode("ascii", "replace").lower()
            text = policies.get(name)
            ok = request.path == b"/.well-known/mta-sts.txt" and text is not None
            request.setResponseCode(200 if ok else 404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            print(f"GET {name} {request.path.decode('ascii', 'replace')} {200 if ok else 404}",
                  flush=True)
            return text.encode("utf-8") if ok and text is not None else b"not found\n"

    with open(args.cert, "rb") as f:
        pem = f.read()
    with open(args.key, "rb") as f:
        key = f.read()
    blocks = [b"-----BEGIN CERTIFICATE-----" + p for p in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]]
    leaf = ssl.PrivateCertificate.loadPEM(blocks[0] + b"\n" + key)
    extra = [ssl.Certificate.loadPEM(b).original for b in blocks[1:]]
    options = ssl.CertificateOptions(privateKey=leaf.privateKey.original,
                                     certificate=leaf.original, extraCertChain=extra)
    listening = reactor.listenSSL(int(port), server.Site(Policy()), options,  # type: ignore[attr-defined]
                                  interface=host)
    print(f"ready {host}:{listening.getHost().port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


@contextlib.contextmanager
def running(policies: dict[str, str], cert: str, key: str, listen: str,
            timeout: float = 10.0) -> Iterator[tuple[str, int, list[str]]]:
    """Run the server as a separate process; yields (host, port, request lines so far)."""
    fd, path = tempfile.mkstemp(suffix=".json", prefix="stspolicies")
    with os.fdopen(fd, "w") as f:
        json.dump(policies, f)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--listen", listen,
                             "--cert", cert, "--key", key, "--policies", path],
                            stdout=subprocess.PIPE, text=True)
    requests: list[str] = []
    try:
        import select
        import threading
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("ready "):
            raise RuntimeError(f"stsserver did not start: {line!r}")
        out = proc.stdout

        def collect() -> None:
            for request in out:
                requests.append(request.strip())
        threading.Thread(target=collect, daemon=True).start()
        h, _, p = line.split()[1].rpartition(":")
        yield h, int(p), requests
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(path)


if __name__ == "__main__":
    main()
