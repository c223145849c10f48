"""Baseline peer (b): a bare ``websockets`` asyncio server that serialises once and broadcasts.

This is the floor the fan-out benchmark compares gathering_lab against: the same GatheRing wire
protocol subset, no bus, no filters, no backpressure -- one ``json.dumps`` per event and one
``websockets.asyncio.server.broadcast()`` call that writes the same bytes to every connection.

Protocol subset (see DESIGN.md section 3)::

    WS /ws/dashboard?client_id=ID
    -> {"type":"connection.established","data":{"client_id":ID,"message":...},"timestamp":TS}
    <- {"type":"ping"}                      -> {"type":"pong","timestamp":TS}
    <- {"type":"publish","data":{"type":T,"data":{...},"source_agent_id":..,...}}
    => every connected client (publisher included) gets the event envelope

Run: ``python benchmarks/peers/bare_websockets.py --port 8765``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import signal
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

WS_PATH = "/ws/dashboard"
CLIENTS: set[ServerConnection] = set()


def now_iso() -> str:
    """Return the current UTC time as ISO-8601 with microseconds and a ``Z`` suffix."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_event(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the GatheRing event envelope from the ``data`` of a client ``publish`` message."""
    return {
        "type": spec["type"],
        "data": spec.get("data") or {},
        "source_agent_id": spec.get("source_agent_id"),
        "circle_id": spec.get("circle_id"),
        "project_id": spec.get("project_id"),
        "event_id": "evt_" + secrets.token_hex(8),
        "timestamp": now_iso(),
    }


def check_path(connection: ServerConnection, request: Request) -> Response | None:
    """Refuse the upgrade on any path other than ``/ws/dashboard``."""
    if urlsplit(request.path).path != WS_PATH:
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
    return None


async def handler(ws: ServerConnection) -> None:
    """Serve one client: greet it, answer pings, broadcast what it publishes."""
    query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
    client_id = query.get("client_id", [f"client_{id(ws):x}"])[0]
    CLIENTS.add(ws)
    try:
        await ws.send(
            json.dumps(
                {
                    "type": "connection.established",
                    "data": {"client_id": client_id, "message": "Connected to GatheRing WebSocket"},
                    "timestamp": now_iso(),
                }
            )
        )
        async for raw in ws:
            try:
                message = json.loads(raw)
                kind = message.get("type")
            except (ValueError, AttributeError):
                continue
            if kind == "publish" and isinstance(message.get("data"), dict):
                # Serialise once, hand the same bytes to every connection.
                broadcast(CLIENTS, json.dumps(build_event(message["data"])))
            elif kind == "ping":
                await ws.send(json.dumps({"type": "pong", "timestamp": now_iso()}))
    except ConnectionClosed:
        pass
    finally:
        CLIENTS.discard(ws)


async def main(args: argparse.Namespace) -> None:
    """Serve until SIGINT/SIGTERM."""
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.cancel)
    async with serve(
        handler,
        args.host,
        args.port,
        process_request=check_path,
        compression=None if args.compression == "none" else args.compression,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        max_size=2**20,
        close_timeout=2,
    ):
        try:
            await stop
        except asyncio.CancelledError:
            pass


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--compression", choices=("none", "deflate"), default="none")
    parser.add_argument("--ping-interval", type=float, default=20.0)
    parser.add_argument("--ping-timeout", type=float, default=20.0)
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    logging.basicConfig(level=arguments.log_level.upper())
    asyncio.run(main(arguments))
