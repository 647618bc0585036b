"""The dashboard in a real browser: headless Chromium loads the page from a twisted.web
server on 127.0.0.1 (dashboard_server.py), its DOM holds the six plots with their points,
the console stays silent, and screenshots at desktop and phone widths are not blank and
show the plots' colours.  The same console check on a page whose script fails proves the
check can see an error.  Chromium is told to resolve no name and fetch nothing by itself,
so it talks to loopback only."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Iterator

import pytest

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
HERE = Path(__file__).resolve().parent
QUIET = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--no-default-browser-check",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
         "--disable-client-side-phishing-detection", "--no-proxy-server", "--hide-scrollbars",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
         "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed: `make debs` (run by `make test`) installs it")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE.parent.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.Popen([sys.executable, str(HERE / "dashboard_server.py")],
                            stdout=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip().isdigit(), "the dashboard server did not start"
        yield f"http://127.0.0.1:{line.strip()}"
    finally:
        proc.terminate()
        proc.wait(10)


def chromium(tmp_path: Path, *args: str) -> tuple[str, str]:
    """Run headless Chromium with its own profile; (stdout, stderr)."""
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    done = subprocess.run([CHROMIUM, *QUIET, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    return done.stdout, done.stderr


def console_lines(stderr: str) -> list[str]:
    """What the page wrote to the console: errors, uncaught exceptions, refused loads."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_console_check_sees_a_script_error(server, tmp_path):
    """The check below is not blind: a page whose script fails shows up in it."""
    _, err = chromium(tmp_path, "--dump-dom", server + "/broken")
    assert any("no_such_function" in line for line in console_lines(err)), err[-3000:]


def test_page_loads_with_plots_and_no_console_output(server, tmp_path):
    dom, err = chromium(tmp_path, "--dump-dom", server + "/")
    assert console_lines(err) == []
    assert "txmta on mx1.example.net" in dom
    points = [int(n) for n in re.findall(r'<svg[^>]*class="plot"[^>]*data-points="(\d+)"', dom)]
    assert len(points) == 6 and all(n > 0 for n in points), points
    assert "&lt;script&gt;alert" in dom and "<script" not in dom


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) pixels) of an 8-bit PNG, with the standard library."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert depth == 8 and colour in (2, 6), (depth, colour)
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):             # PNG 9.2: undo the row's filter
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def colours(path: Path) -> tuple[int, int, set[bytes]]:
    width, height, rows = read_png(path)
    bpp = len(rows[0]) // width
    seen = {row[i:i + 3] for row in rows for i in range(0, len(row), bpp)}
    return width, height, seen


def near(seen: set[bytes], rgb: tuple[int, int, int], slack: int = 12) -> bool:
    return any(all(abs(p[k] - rgb[k]) <= slack for k in range(3)) for p in seen)


@pytest.mark.parametrize("size", ["1280,1000", "390,1400"])
def test_screenshot_is_not_blank_and_shows_the_plots(server, tmp_path, size):
    shot = tmp_path / "dashboard.png"
    _, err = chromium(tmp_path, f"--screenshot={shot}", f"--window-size={size}", server + "/")
    assert shot.exists(), err[-3000:]
    assert console_lines(err) == []
    width, height, seen = colours(shot)
    assert (width, height) == tuple(int(n) for n in size.split(","))
    assert len(seen) > 20                           # not one colour: text, plots, panels
    assert near(seen, (0x26, 0x32, 0x38))           # the header bar
    assert near(seen, (0x2e, 0x7d, 0x32))           # the delivered line
    assert near(seen, (0x15, 0x65, 0xc0))           # the queue depth line
