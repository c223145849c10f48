"""Broadcast bus events to WebSocket clients, as GatheRing's ``websocket.integration`` does.

Only needed with ``serve(..., broadcast=False)``; ``serve()``'s default, the CLI
and ``gl.start()`` already broadcast every event::

    from gathering_lab.websocket.integration import setup_websocket_broadcasting
    setup_websocket_broadcasting(event_types=[EventType.TASK_CREATED])

Calling a setup function again for the same type replaces the earlier setting
instead of adding a second subscription, and an event routed to the manager by
several subscriptions is still sent once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from ..events import Event, EventBus, EventType, event_bus
from .manager import ConnectionManager, manager_for

__all__ = [
    "DEFAULT_BROADCAST_EVENTS",
    "setup_custom_broadcasting",
    "setup_websocket_broadcasting",
    "teardown_broadcasting",
]

logger = logging.getLogger("gathering_lab.websocket.integration")

#: What :func:`setup_websocket_broadcasting` broadcasts when given no types.
DEFAULT_BROADCAST_EVENTS: tuple[EventType, ...] = (
    EventType.AGENT_STARTED,
    EventType.AGENT_STOPPED,
    EventType.AGENT_TASK_ASSIGNED,
    EventType.AGENT_TASK_COMPLETED,
    EventType.AGENT_TASK_FAILED,
    EventType.CIRCLE_CREATED,
    EventType.CIRCLE_STARTED,
    EventType.CIRCLE_STOPPED,
    EventType.CIRCLE_MEMBER_ADDED,
    EventType.CIRCLE_MEMBER_REMOVED,
    EventType.TASK_CREATED,
    EventType.TASK_ASSIGNED,
    EventType.TASK_STARTED,
    EventType.TASK_COMPLETED,
    EventType.TASK_FAILED,
    EventType.TASK_CONFLICT_DETECTED,
    EventType.CONVERSATION_MESSAGE,
    EventType.CONVERSATION_TURN_COMPLETE,
    EventType.SYSTEM_ERROR,
    EventType.SYSTEM_WARNING,
)

# (bus, manager, event type) -> subscription id
_active: dict[tuple[int, int, str], tuple[EventBus, ConnectionManager, str]] = {}


def _setup(
    event_type: EventType | str,
    filter_fn: Callable[[Event], bool] | None,
    bus: EventBus,
    manager: ConnectionManager,
) -> str:
    type_name = event_type.value if isinstance(event_type, EventType) else event_type
    key = (id(bus), id(manager), type_name)
    previous = _active.pop(key, None)
    if previous is not None:
        previous[1].detach(previous[2])
    sub_id = manager.attach(bus, type_name, filter_fn)
    _active[key] = (bus, manager, sub_id)
    return sub_id


def setup_websocket_broadcasting(
    event_types: Iterable[EventType | str] | None = None,
    *,
    bus: EventBus | None = None,
    manager: ConnectionManager | None = None,
) -> list[str]:
    """Broadcast these event types (default :data:`DEFAULT_BROADCAST_EVENTS`) to clients.

    Returns the bus subscription ids.
    """
    if isinstance(event_types, str):
        raise TypeError("event_types must be a list of event types, not a string")
    types = list(DEFAULT_BROADCAST_EVENTS if event_types is None else event_types)
    bus = bus if bus is not None else event_bus
    manager = manager if manager is not None else manager_for(bus)
    ids = [_setup(t, None, bus, manager) for t in types]
    logger.info("broadcasting %d event type(s)", len(ids))
    return ids


def setup_custom_broadcasting(
    event_type: EventType | str,
    filter_fn: Callable[[Event], bool] | None = None,
    *,
    bus: EventBus | None = None,
    manager: ConnectionManager | None = None,
) -> str:
    """Broadcast one event type, only the events ``filter_fn`` accepts; returns the id."""
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable, not {type(filter_fn).__name__}")
    bus = bus if bus is not None else event_bus
    return _setup(event_type, filter_fn, bus, manager if manager is not None else manager_for(bus))


def teardown_broadcasting(*, bus: EventBus | None = None) -> int:
    """Undo every setup function call (for ``bus``, or all); returns how many were removed."""
    removed = 0
    for key, (sub_bus, manager, sub_id) in list(_active.items()):
        if bus is None or sub_bus is bus:
            manager.detach(sub_id)
            del _active[key]
            removed += 1
    return removed
