"""Sizes for the torture suite: short under `make test`, long under `make torture`."""

from __future__ import annotations

import os
from typing import TypeVar

T = TypeVar("T")

LONG = os.environ.get("TXMTA_TORTURE") == "long"


def size(short: T, long: T) -> T:
    """`short` in `make test`, `long` in `make torture`."""
    return long if LONG else short
