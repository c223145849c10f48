"""Shared fixtures: every test gets its own bus and connection manager.

Hypothesis profiles (``HYPOTHESIS_PROFILE=dev pytest ...`` to pick one):

* ``ci`` (the default): 50 examples per property, derandomized (the same examples on
  every run, so a CI failure reproduces locally), no example database written, no
  per-example deadline (a shared 2-core runner is slow in bursts).
* ``dev``: 200 random examples; failures saved in ``.hypothesis/`` and replayed first;
  the seed of a failure is printed (``--hypothesis-seed`` reruns it).
* ``thorough``: 2,000 random examples, for a long local run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from gathering_lab.events import EventBus
from gathering_lab.testing import RedisServer, running_redis, running_server
from gathering_lab.websocket import ConnectionManager, Server

#: Installed, the package's ``pytest11`` entry point loads it as ``gathering_lab``.
PLUGIN = "gathering_lab.pytest_plugin"


def pytest_configure(config: pytest.Config) -> None:
    """Load the package's pytest plugin if its entry point did not (not installed yet)."""
    manager = config.pluginmanager
    if not manager.has_plugin("gathering_lab") and not manager.has_plugin(PLUGIN):
        manager.import_plugin(PLUGIN)


settings.register_profile(
    "ci", max_examples=50, deadline=None, derandomize=True, database=None, print_blob=True
)
settings.register_profile("dev", max_examples=200, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def manager() -> ConnectionManager:
    return ConnectionManager()


@pytest.fixture
async def server(bus: EventBus, manager: ConnectionManager) -> AsyncIterator[Server]:
    async with running_server(bus=bus, manager=manager) as server:
        yield server


@pytest.fixture(autouse=True, scope="session")
def _close_widgets_before_exit() -> object:
    """Close the widgets tests made while the interpreter is whole.

    Left to interpreter shutdown, ipywidgets' ``Widget.__del__`` runs after its class
    registry is gone and prints an ``AttributeError`` per widget.
    """
    yield
    import sys

    widgets = sys.modules.get("ipywidgets")
    if widgets is not None:
        widgets.Widget.close_all()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, its append-only file in ``tmp_path``."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    with running_redis(tmp_path / "redis") as server:
        yield server
