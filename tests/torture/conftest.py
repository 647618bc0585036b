"""The torture suite (issue 14): faults, floods, fuzzing and scale.

`make test` runs the short version of every test here; `make torture` sets
`TXMTA_TORTURE=long` and runs the long ones (more kills, more connections, ten minutes of
fuzzing).  A test picks its size with `torturelib.size(short, long)`.

The integration fixtures (`start_daemon`, `module_daemons`, `tls_cert`, `users_file`) and
helpers (`itlib`) are shared with tests/integration.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "integration"))

_spec = importlib.util.spec_from_file_location("_integration_conftest",
                                               HERE.parent / "integration" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_integration = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_integration)

start_daemon = _integration.start_daemon
module_daemons = _integration.module_daemons
tls_cert = _integration.tls_cert
users_file = _integration.users_file
pytest_runtest_makereport = _integration.pytest_runtest_makereport


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.torture)
            item.add_marker(pytest.mark.integration)
