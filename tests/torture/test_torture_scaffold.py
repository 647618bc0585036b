"""The torture suite's own switch: short sizes unless `make torture` asks for the long ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torturelib

HERE = Path(__file__).resolve().parent


def test_size_picks_the_short_value_by_default() -> None:
    assert torturelib.LONG == (os.environ.get("TXMTA_TORTURE") == "long")
    assert torturelib.size(1, 100) == (100 if torturelib.LONG else 1)


def test_long_is_chosen_by_the_environment() -> None:
    code = "import torturelib; print(torturelib.size('short', 'long'))"
    for env, want in ((None, "short"), ("long", "long"), ("yes", "short")):
        environ = {k: v for k, v in os.environ.items() if k != "TXMTA_TORTURE"}
        if env is not None:
            environ["TXMTA_TORTURE"] = env
        out = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=environ,
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == want
