"""Shared fixtures: every test gets its own bus and connection manager."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gathering_lab.events import EventBus
from gathering_lab.testing import running_server
from gathering_lab.websocket import ConnectionManager, Server


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
