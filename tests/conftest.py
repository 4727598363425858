"""Fixtures every test module shares.

Tests are hermetic: whatever the machine running them has set (a developer's own teacher in
``TEACHER_MODEL_*``, a corporate proxy, a CA bundle) is taken out of the environment for each
test, so no test depends on it or sends anything through it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from engine.config import ENV_KEYS
from engine.pipeline.stats import Stats
from engine.testing.simulator import RunningSimulator, running_simulator
from tests.support.cli import NETWORK_VARIABLES


@pytest.fixture(autouse=True)
def hermetic_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without the machine's teacher, proxy and certificate settings."""
    for name in [*ENV_KEYS, *NETWORK_VARIABLES]:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_dotenv(tmp_path: Path) -> Path:
    """A .env path that does not exist, so no file on this machine is read."""
    return tmp_path / "absent.env"


@pytest.fixture
def stats() -> Stats:
    """A run's statistics, empty."""
    return Stats()


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    """The project's simulated teacher with its defaults, on a free port of 127.0.0.1."""
    async with running_simulator() as running:
        yield running


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A throwaway certificate authority (trustme), for local HTTPS servers and CA bundles."""
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    """``ca``'s certificate as a PEM file: a private CA bundle."""
    path = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path
