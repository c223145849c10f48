"""Baseline peer (a): the guide's stack done the usual way -- FastAPI + uvicorn + ConnectionManager.

This mirrors the original GatheRing server (``gathering/websocket/manager.py`` and
``gathering/api/routers/websocket.py`` as its docs show them): a ``ConnectionManager`` keeps a dict
of ``WebSocket -> info``, and ``broadcast(message)`` sends the message dict to every client with
``await websocket.send_json(message)`` -- so the event is serialised once *per client* -- wrapped in
``asyncio.gather`` of one coroutine per client, with per-client error isolation and stats.
``--fanout loop`` swaps the gather for a plain sequential ``for`` loop (the other common variant).

Protocol subset (see DESIGN.md section 3)::

    WS /ws/dashboard?client_id=ID
    -> {"type":"connection.established","data":{"client_id":ID,"message":...},"timestamp":TS}
    <- {"type":"ping"}                      -> {"type":"pong","timestamp":TS}
    <- {"type":"publish","data":{"type":T,"data":{...},"source_agent_id":..,...}}
    => every connected client (publisher included) gets the event envelope

Run: ``python benchmarks/peers/fastapi_manager.py --port 8765``
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
from datetime import UTC, datetime
from typing import Any

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect


def now_iso() -> str:
    """Return the current UTC time as ISO-8601 with microseconds and a ``Z`` suffix."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ConnectionManager:
    """The original GatheRing ConnectionManager: a registry of sockets plus per-client fan-out."""

    def __init__(self, fanout: str = "gather") -> None:
        self.active_connections: dict[WebSocket, dict[str, Any]] = {}
        self.total_connections = 0
        self.total_messages_sent = 0
        self.total_broadcasts = 0
        self.fanout = fanout

    async def connect(self, websocket: WebSocket, client_id: str | None = None) -> None:
        """Accept a new connection and register it."""
        await websocket.accept()
        self.active_connections[websocket] = {
            "client_id": client_id or f"client_{id(websocket)}",
            "connected_at": datetime.now(UTC),
            "messages_received": 0,
            "messages_sent": 0,
        }
        self.total_connections += 1

    async def disconnect(self, websocket: WebSocket) -> None:
        """Forget a connection."""
        self.active_connections.pop(websocket, None)

    async def send_personal(self, message: dict[str, Any], websocket: WebSocket) -> bool:
        """Send one message to one client; drop the client on failure."""
        message.setdefault("timestamp", now_iso())
        try:
            await websocket.send_json(message)
        except Exception:
            await self.disconnect(websocket)
            return False
        self._count_sent(websocket)
        return True

    async def broadcast(self, message: dict[str, Any]) -> int:
        """Send ``message`` to every client; one failing client never stops the others."""
        if not self.active_connections:
            return 0
        message.setdefault("timestamp", now_iso())
        clients = list(self.active_connections)
        if self.fanout == "gather":
            results = await asyncio.gather(
                *(self._send_with_error_handling(ws, message) for ws in clients),
                return_exceptions=True,
            )
            successful = sum(1 for r in results if r is True)
        else:
            successful = 0
            for ws in clients:
                successful += await self._send_with_error_handling(ws, message)
        self.total_broadcasts += 1
        return successful

    async def _send_with_error_handling(
        self, websocket: WebSocket, message: dict[str, Any]
    ) -> bool:
        try:
            await websocket.send_json(message)  # json.dumps per client, as in the original
        except Exception:
            return False
        self._count_sent(websocket)
        return True

    def _count_sent(self, websocket: WebSocket) -> None:
        info = self.active_connections.get(websocket)
        if info is not None:
            info["messages_sent"] += 1
        self.total_messages_sent += 1


def build_event(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the GatheRing event envelope (``Event.to_dict()``) from a ``publish`` message."""
    return {
        "type": spec["type"],
        "data": spec.get("data") or {},
        "source_agent_id": spec.get("source_agent_id"),
        "circle_id": spec.get("circle_id"),
        "project_id": spec.get("project_id"),
        "event_id": "evt_" + secrets.token_hex(8),
        "timestamp": now_iso(),
    }


def create_app(fanout: str = "gather") -> FastAPI:
    """Build the FastAPI app with the ``/ws/dashboard`` route and the stats route."""
    app = FastAPI()
    manager = ConnectionManager(fanout)

    @app.websocket("/ws/dashboard")
    async def websocket_dashboard(websocket: WebSocket, client_id: str | None = None) -> None:
        await manager.connect(websocket, client_id=client_id)
        try:
            await manager.send_personal(
                {
                    "type": "connection.established",
                    "data": {"client_id": client_id, "message": "Connected to GatheRing WebSocket"},
                },
                websocket,
            )
            while True:
                try:
                    data = await websocket.receive_json()
                except ValueError:
                    continue
                info = manager.active_connections.get(websocket)
                if info is not None:
                    info["messages_received"] += 1
                kind = data.get("type") if isinstance(data, dict) else None
                if kind == "ping":
                    await manager.send_personal({"type": "pong", "timestamp": now_iso()}, websocket)
                elif kind == "publish" and isinstance(data.get("data"), dict):
                    await manager.broadcast(build_event(data["data"]))
        except WebSocketDisconnect:
            pass
        finally:
            await manager.disconnect(websocket)

    @app.get("/admin/websocket/stats")
    async def websocket_stats() -> dict[str, Any]:
        return {
            "active_connections": len(manager.active_connections),
            "total_connections": manager.total_connections,
            "total_messages_sent": manager.total_messages_sent,
            "total_broadcasts": manager.total_broadcasts,
        }

    return app


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--fanout", choices=("gather", "loop"), default="gather")
    parser.add_argument("--compression", choices=("none", "deflate"), default="none")
    parser.add_argument("--ping-interval", type=float, default=20.0)
    parser.add_argument("--ping-timeout", type=float, default=20.0)
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    uvicorn.run(
        create_app(arguments.fanout),
        host=arguments.host,
        port=arguments.port,
        log_level=arguments.log_level,
        lifespan="off",
        ws_per_message_deflate=arguments.compression == "deflate",
        ws_ping_interval=arguments.ping_interval,
        ws_ping_timeout=arguments.ping_timeout,
        ws_max_size=2**20,
    )
