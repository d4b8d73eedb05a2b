"""The e2e suite runs against one real fleet (namespaces, daemons, runsc).

The fleet gets its own namespace prefix (default `egd-e2e-`, or
EGRESSD_E2E_PREFIX) and run directory, so it never touches a developer's
`egd-` topology. It is torn down at the end of the session, also when tests
fail (test_topology_lifecycle.py checks that `down` leaves nothing behind).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressd.layout import default_layout
from egressd_harness.topology.fleet import DEFAULT_DATAPATH, Fleet

PREFIX = os.environ.get("EGRESSD_E2E_PREFIX", "egd-e2e-")
# The fleet's data path, agents and proxies ("userspace" or "kernel"; make test runs the default).
DATAPATH = os.environ.get("EGRESSD_E2E_DATAPATH", DEFAULT_DATAPATH)


@pytest.fixture(scope="session")
def fleet_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # No dots: libbpf rewrites them in pin paths.
    return tmp_path_factory.mktemp("fleet")


@pytest.fixture(scope="session")
def fleet(fleet_run_dir: Path) -> Iterator[Fleet]:
    if os.geteuid() != 0 or shutil.which("runsc") is None:
        pytest.fail("the e2e suite needs root and runsc (make test installs runsc)")
    the_fleet = Fleet(default_layout(fleet_run_dir, PREFIX), datapath=DATAPATH)
    try:
        the_fleet.up()
        yield the_fleet
    finally:
        the_fleet.down()
