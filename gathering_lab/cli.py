"""The ``gathering-lab`` command: ``serve``, ``demo`` and ``listen``.

This is the only module that calls :func:`asyncio.run` and prints to the terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from . import __version__
from .exceptions import GatheringLabError

__all__ = ["main"]

logger = logging.getLogger("gathering_lab.cli")

LOG_LEVELS = ("debug", "info", "warning", "error")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected 0-65535") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: expected 0-65535")
    return port


def _size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    factor = units.get(raw[-1:], 1)
    if factor != 1:
        raw = raw[:-1]
    try:
        value = int(float(raw) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: e.g. 1048576, 512k, 4m") from None
    if value < 1024:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: at least 1k")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gathering-lab",
        description="Serve, generate and watch GatheRing events over WebSocket.",
    )
    parser.add_argument("--version", action="version", version=f"gathering-lab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the event bus and the WebSocket server",
        description="Run the event bus and the WebSocket server (ws://HOST:PORT/ws/dashboard).",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port (default: 8000; 0 = any)")
    serve.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="also accept browsers from this origin, e.g. https://app.example.com (repeatable; "
        "loopback origins are always accepted)",
    )
    serve.add_argument(
        "--max-message-size", type=_size, default=2**20, help="largest incoming message (1m)"
    )
    serve.add_argument(
        "--max-pending",
        type=_size,
        default=4 * 2**20,
        help="pending outgoing bytes per client before it is closed as slow (4m)",
    )
    serve.add_argument(
        "--compression",
        choices=("off", "deflate"),
        default="off",
        help="permessage-deflate (default: off)",
    )
    serve.add_argument("--certfile", help="TLS certificate (PEM) to serve wss://")
    serve.add_argument("--keyfile", help="TLS private key (PEM), with --certfile")
    _add_log_level(serve)

    from . import demo as demo_module

    demo_module.add_arguments(
        commands.add_parser(
            "demo",
            help="publish realistic agent/task/circle traffic to a server",
            description="Publish realistic GatheRing traffic (agents, tasks, circles, "
            "conversations) to a server over WebSocket, as the guide's "
            "test_websocket_integration.py does.",
        )
    )
    from . import listen as listen_module

    listen_module.add_arguments(
        commands.add_parser(
            "listen",
            help="print a server's live events",
            description="Print a readable live tail of a server's events (what websocat "
            "does in the guide).",
        )
    )
    for sub in (commands.choices["demo"], commands.choices["listen"]):
        _add_log_level(sub, default="warning")
    return parser


def _add_log_level(parser: argparse.ArgumentParser, default: str = "info") -> None:
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default=default, help=f"logging level ({default})"
    )


async def _serve(args: argparse.Namespace) -> int:
    from .websocket import serve

    ssl_context = None
    if args.certfile or args.keyfile:
        import ssl

        if not (args.certfile and args.keyfile):
            raise SystemExit("gathering-lab serve: --certfile and --keyfile go together")
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(args.certfile, args.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise SystemExit(f"gathering-lab serve: cannot load TLS certificate: {exc}") from None

    server = await serve(
        args.host,
        args.port,
        allowed_origins=args.allowed_origin,
        max_message_size=args.max_message_size,
        max_pending_bytes=args.max_pending,
        compression=None if args.compression == "off" else args.compression,
        ssl=ssl_context,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"gathering-lab {__version__} serving", flush=True)
    print(f"  WebSocket  {server.url}", flush=True)
    print(f"  dashboard  {server.http_url}/dashboard", flush=True)
    print(f"  stats      {server.http_url}/admin/websocket/stats", flush=True)
    print("Press Ctrl+C to stop.", flush=True)
    await stop.wait()
    print("shutting down: closing clients with 1001", flush=True)
    server.close()
    await server.wait_closed()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gathering-lab`` command line; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.log_level != "debug":
        # websockets logs every connection and HTTP response at INFO: too chatty.
        logging.getLogger("gathering_lab.websocket.connection").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            return asyncio.run(_serve(args))
        if args.command == "demo":
            from .demo import run_cli as run_demo

            return asyncio.run(run_demo(args))
        if args.command == "listen":
            from .listen import run_cli as run_listen

            return asyncio.run(run_listen(args))
    except GatheringLabError as exc:
        print(f"gathering-lab {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
