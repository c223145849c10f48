"""The ``gathering-lab`` command: ``serve``, ``demo``, ``listen``, ``token``, ``load`` ...

This is the only module that calls :func:`asyncio.run` and prints to the terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import logging
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, protocol
from .connection import DEFAULT_URL, TOKEN_ENV, error_text, query_param
from .demo import DemoResult, run_demo, ws_url
from .exceptions import GatheringLabError, PortInUseError, ProtocolError
from .listen import format_event, listen_messages

__all__ = ["main"]

logger = logging.getLogger("gathering_lab.cli")

LOG_LEVELS = ("debug", "info", "warning", "error")
#: Seconds ``serve`` waits for its bus's log at start-up before giving up.
BUS_START_TIMEOUT = 20.0


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


def _milliseconds(text: str) -> float:
    """``20ms``, ``0.02s`` or ``20`` (milliseconds) as seconds."""
    raw = text.strip().lower()
    scale = 1.0 if raw.endswith("s") and not raw.endswith("ms") else 1e-3
    try:
        value = float(raw.removesuffix("ms").removesuffix("s")) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid delay {text!r}: e.g. 20ms, 0.02s") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"invalid delay {text!r}: from 0 to 1s")
    return value


def _report_seconds(text: str) -> float:
    """A node report interval or TTL: ``2``, ``2s``, ``500ms``, ``1m`` as seconds."""
    from .backends.nodes import MAX_REPORT_INTERVAL, MIN_REPORT_INTERVAL

    raw = text.strip().lower()
    if raw.endswith("ms"):
        try:
            value = float(raw.removesuffix("ms")) / 1000
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid duration {text!r}: e.g. 2s, 500ms, 1m"
            ) from None
    else:
        value = _seconds(text)
    if not MIN_REPORT_INTERVAL <= value <= MAX_REPORT_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: from {MIN_REPORT_INTERVAL * 1000:g}ms "
            f"to {MAX_REPORT_INTERVAL:g}s"
        )
    return value


def _workers(text: str) -> int:
    from .workers import MAX_WORKERS

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: expected an integer") from None
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"invalid number {value}: from 1 to {MAX_WORKERS}")
    return value


def _worker(text: str) -> tuple[int, int, int]:
    from .workers import worker_argument

    try:
        return worker_argument(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    from .auth import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit(text: str) -> int:
    """An argparse type for a count where 0 means no limit."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid count {value}: must be >= 0 (0 = no limit)")
    return value


def _proxy(text: str) -> str:
    """An argparse type for an IP address or network."""
    from .websocket.limits import TrustedProxies

    try:
        TrustedProxies([text])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/8, ::1)"
        ) from None
    return text


def _add_limit_arguments(serve: argparse.ArgumentParser) -> None:
    from .websocket.limits import (
        DEFAULT_MAX_CONNECTIONS_PER_IP,
        DEFAULT_OPEN_TIMEOUT,
        DEFAULT_PUBLISH_BURST,
        DEFAULT_PUBLISH_RATE,
        MESSAGE_RATE_FACTOR,
    )
    from .websocket.publishing import DEFAULT_MAX_PUBLISHES_IN_FLIGHT

    group = serve.add_argument_group(
        "admission and rate limits",
        "Past a connection limit the WebSocket upgrade is answered HTTP 503 (/health keeps "
        'answering); a publish past the rate is answered {"type":"error","data":{"code":'
        '"rate_limited"}} and not published.',
    )
    group.add_argument(
        "--max-connections",
        type=_positive_int,
        default=None,
        metavar="N",
        help="WebSocket clients in all (default: what the descriptor limit allows, which "
        "serve raises to its hard limit, up to 65536)",
    )
    group.add_argument(
        "--max-connections-per-ip",
        type=_limit,
        default=DEFAULT_MAX_CONNECTIONS_PER_IP,
        metavar="N",
        help=f"WebSocket clients from one address, loopback included (default "
        f"{DEFAULT_MAX_CONNECTIONS_PER_IP}; 0 = no limit)",
    )
    group.add_argument(
        "--trusted-proxy",
        action="append",
        type=_proxy,
        default=[],
        metavar="ADDR",
        help="a reverse proxy's address or network (repeatable; e.g. 127.0.0.1 for nginx on "
        "this host): from it, the client is the address its X-Forwarded-For names, and "
        "--max-connections-per-ip counts that address",
    )
    group.add_argument(
        "--open-timeout",
        type=_seconds,
        default=DEFAULT_OPEN_TIMEOUT,
        metavar="SECONDS",
        help=f"close connections that have not completed the WebSocket handshake by then "
        f"(default {DEFAULT_OPEN_TIMEOUT:g})",
    )
    group.add_argument(
        "--publish-rate",
        type=_rate,
        default=DEFAULT_PUBLISH_RATE,
        metavar="N",
        help=f"publishes per second per connection (default {DEFAULT_PUBLISH_RATE:g}; "
        "0 = no limit)",
    )
    group.add_argument(
        "--publish-burst",
        type=_positive_int,
        default=DEFAULT_PUBLISH_BURST,
        metavar="N",
        help=f"publishes allowed at once above the rate (default {DEFAULT_PUBLISH_BURST})",
    )
    group.add_argument(
        "--message-rate",
        type=_rate,
        default=None,
        metavar="N",
        help=f"messages of any kind read per second per connection; past it the server "
        f"reads the client's next one later (default {MESSAGE_RATE_FACTOR} x the publish "
        "rate; 0 = no limit)",
    )
    group.add_argument(
        "--message-burst",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"messages read at once above that rate (default {MESSAGE_RATE_FACTOR} x the "
        "publish burst)",
    )
    group.add_argument(
        "--max-publishes-in-flight",
        type=_positive_int,
        default=DEFAULT_MAX_PUBLISHES_IN_FLIGHT,
        metavar="N",
        help=f"on a shared --bus redis://... log, publishes one connection may have sent and "
        f"not yet had answered; its next message is read once one is (default "
        f"{DEFAULT_MAX_PUBLISHES_IN_FLIGHT})",
    )


def _raise_descriptor_limit(max_connections: int | None) -> None:
    """Raise the soft RLIMIT_NOFILE towards the hard one: up to 65536, or what is asked."""
    import resource

    from .websocket.limits import DESCRIPTOR_RESERVE, open_descriptors, socket_headroom

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536
    if max_connections is not None:
        wanted = max(
            wanted,
            max_connections
            + socket_headroom(max_connections)
            + open_descriptors()
            + DESCRIPTOR_RESERVE,
        )
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft == resource.RLIM_INFINITY or wanted <= soft:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        logger.warning("could not raise the descriptor limit from %d to %d: %s", soft, wanted, exc)
        return
    logger.info("raised the descriptor limit (RLIMIT_NOFILE) from %d to %d", soft, wanted)


def _scope_id(text: str) -> int | str:
    text = text.strip()
    if not text or len(text) > 128:
        raise argparse.ArgumentTypeError(f"invalid id {text!r}: expected 1-128 characters")
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def _add_auth_arguments(serve: argparse.ArgumentParser) -> None:
    from .auth import DEFAULT_AUTH_TIMEOUT, SECRET_ENV

    group = serve.add_argument_group(
        "authentication",
        "With a key, every WebSocket client needs a JWT (Authorization: Bearer, ?token=, "
        'or a first {"type":"auth"} frame) and the stats need the admin role.',
    )
    keys = group.add_mutually_exclusive_group()
    keys.add_argument(
        "--jwt-secret",
        metavar="SECRET",
        help=f"HS256 shared secret, at least 32 bytes (default: ${SECRET_ENV}, "
        "which keeps it out of the process list)",
    )
    keys.add_argument(
        "--jwt-public-key", metavar="FILE", help="RS256: verify tokens with this PEM public key"
    )
    group.add_argument(
        "--auth-timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help=f"close clients that have not authenticated by then with 1008 "
        f"(default: {DEFAULT_AUTH_TIMEOUT:g})",
    )


def _add_token_parser(commands: Any) -> None:
    from .auth import SECRET_ENV

    token = commands.add_parser(
        "token",
        help="mint a development JWT",
        description=f"Print a signed JWT for a server started with --jwt-secret (the secret "
        f"comes from --jwt-secret or ${SECRET_ENV}) or --jwt-public-key (sign with "
        "--jwt-private-key). Prints the token only.",
    )
    token.add_argument("--sub", required=True, help="the client id the token names")
    token.add_argument(
        "--roles",
        default="subscribe",
        help="comma-separated roles among subscribe, publish, admin (default: subscribe)",
    )
    token.add_argument(
        "--circle",
        action="append",
        type=_scope_id,
        metavar="ID",
        help="only events of this circle (repeatable; default: every circle)",
    )
    token.add_argument(
        "--project",
        action="append",
        type=_scope_id,
        metavar="ID",
        help="only events of this project (repeatable; default: every project)",
    )
    token.add_argument(
        "--ttl", type=_seconds, default=3600.0, help="lifetime: 3600, 90s, 15m, 1h, 7d (1h)"
    )
    keys = token.add_mutually_exclusive_group()
    keys.add_argument(
        "--jwt-secret", metavar="SECRET", help=f"HS256 secret (default: ${SECRET_ENV})"
    )
    keys.add_argument("--jwt-private-key", metavar="FILE", help="RS256: sign with this PEM key")
    _add_log_level(token, default="warning")


# demo
def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: events per second") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: must be >= 0 (0 = no limit)")
    return value


def _positive_int(text: str) -> int:
    """An argparse type for an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {value}: must be at least 1")
    return value


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: expected an integer") from None


_URL_HELP = f"the server's WebSocket URL (default: {DEFAULT_URL})"


def _add_url_arguments(parser: argparse.ArgumentParser) -> None:
    """``demo`` and ``listen`` take the URL the same way: ``URL`` or ``--url URL``."""
    parser.add_argument(
        "url_positional", nargs="?", type=ws_url, default=None, metavar="URL", help=_URL_HELP
    )
    parser.add_argument(
        "--url", type=ws_url, default=None, metavar="URL", help="the same, as an option"
    )
    parser.set_defaults(url_parser=parser)


def _resolve_url(args: argparse.Namespace) -> None:
    """Set ``args.url`` from ``URL`` or ``--url`` (default if neither); exit 2 if they differ."""
    given = [url for url in (args.url_positional, args.url) if url is not None]
    if len(set(given)) > 1:
        args.url_parser.error(
            f"argument --url: two different URLs given: {given[0]} and {given[1]}"
        )
    args.url = given[0] if given else DEFAULT_URL


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    _add_url_arguments(parser)
    parser.add_argument(
        "--rate", type=_rate, default=5.0, help="events per second (default 5; 0 = no limit)"
    )
    parser.add_argument(
        "--count", type=_positive_int, default=None, help="stop after N events (default: Ctrl+C)"
    )
    parser.add_argument("--seed", type=_seed, default=0, help="story seed (default 0)")
    parser.add_argument(
        "--client-id",
        default=None,
        help="client id (default: the URL's client_id, the token's subject, else 'demo')",
    )
    _add_token_argument(parser)


def _add_token_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token",
        default=None,
        help=f"JWT for a server with authentication, sent as a Bearer header "
        f"(default: ${TOKEN_ENV}, which keeps it out of the process list)",
    )


def _progress_line(result: DemoResult) -> str:
    held = f", held back {result.held_back}" if result.held_back else ""
    return (
        f"demo: {result.sent} sent, {result.acked} acked, {result.errors} errors, "
        f"{result.rate:.1f} ev/s{held}"
    )


def _held_back_line(result: DemoResult) -> str:
    """How the server's publish rate slowed the demo: its pace, the refusals resent."""
    pace = f" at {result.paced_at:.3g} ev/s" if result.paced_at is not None else ""
    return (
        f"demo: held back {result.held_back} times by the server's publish rate: "
        f"{result.paced} paced{pace}, {result.retried} refused (rate_limited) and sent again "
        f"in order; {result.acked} published at {result.effective_rate:.1f} ev/s effective"
    )


def _refusal_line(result: DemoResult) -> str:
    return (
        f"demo: the server refused {result.errors} of {result.sent} publishes "
        f"(last: {result.last_error})"
    )


async def _demo(args: argparse.Namespace) -> int:
    """Run ``gathering-lab demo``: publish until ``--count`` or Ctrl+C, progress on stderr.

    Exit status: 0 when every publish was acknowledged, 1 when the server refused
    or did not answer some (connection failures raise ConnectionFailed). The first
    ``forbidden`` reply stops it: no later publish could succeed.
    """
    err = sys.stderr
    tty = err.isatty()
    state: dict[str, Any] = {"result": None, "open_line": False}

    def show(result: DemoResult) -> None:
        if state["result"] is None:
            state["result"] = result
            server = result.greeting.get("server", "server")
            pace = f"{args.rate:g} ev/s" if args.rate else "no rate limit"
            print(
                f"demo: connected to {args.url} as {result.greeting.get('client_id')} "
                f"({server}), {pace}",
                file=err,
                flush=True,
            )
            return
        if tty:
            print(f"\r{_progress_line(result)}\x1b[K", end="", file=err, flush=True)
            state["open_line"] = True
        else:
            print(_progress_line(result), file=err, flush=True)

    def end_line() -> None:
        if state["open_line"]:
            print(file=err, flush=True)
            state["open_line"] = False

    token = args.token or os.environ.get(TOKEN_ENV)
    client_id = args.client_id
    if client_id is None and not token and not query_param(args.url, "client_id"):
        client_id = "demo"  # with a token, the server names the client after its subject
    try:
        result = await run_demo(
            args.url,
            count=args.count,
            rate=args.rate,
            client_id=client_id,
            seed=args.seed,
            token=token,
            progress=show,
        )
    except asyncio.CancelledError:  # Ctrl+C: say where we stopped, then let cli exit 130
        end_line()
        stopped: DemoResult | None = state["result"]
        if stopped is None:
            print("demo: stopped by Ctrl+C before connecting", file=err, flush=True)
        else:
            print(f"{_progress_line(stopped)}; stopped by Ctrl+C", file=err, flush=True)
            if stopped.held_back:
                print(_held_back_line(stopped), file=err, flush=True)
            if stopped.errors:
                print(_refusal_line(stopped), file=err, flush=True)
        raise
    except BaseException:
        end_line()
        raise
    end_line()
    if result.held_back:
        print(_held_back_line(result), file=err, flush=True)
    if result.stopped_by is not None:
        print(
            f"demo: stopped: the server refused to publish: {result.stopped_by}",
            file=err,
            flush=True,
        )
    elif result.errors:
        print(_refusal_line(result), file=err, flush=True)
    if result.unanswered:
        print(f"demo: {result.unanswered} publishes were not answered", file=err, flush=True)
    return 1 if result.errors or result.unanswered else 0


# listen
def _pattern(text: str) -> str:
    try:
        return protocol.check_pattern(text)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _add_listen_arguments(parser: argparse.ArgumentParser) -> None:
    _add_url_arguments(parser)
    parser.add_argument(
        "--type",
        dest="types",
        action="append",
        type=_pattern,
        metavar="PATTERN",
        help="only these event types: task.created, task.* or * (repeatable)",
    )
    parser.add_argument("--circle", type=_scope_id, metavar="ID", help="only this circle_id")
    parser.add_argument("--project", type=_scope_id, metavar="ID", help="only this project_id")
    parser.add_argument(
        "--client-id",
        default=None,
        help="client id (default: the URL's client_id, the token's subject, else listen-PID)",
    )
    _add_token_argument(parser)
    parser.add_argument(
        "--json", action="store_true", help="print each message as one JSON line (for jq)"
    )
    parser.add_argument(
        "--count", type=_positive_int, default=None, help="exit after N events (default: Ctrl+C)"
    )
    parser.add_argument(
        "--no-reconnect",
        dest="reconnect",
        action="store_false",
        help="exit when the connection drops (default: reconnect with backoff and resume "
        "after the last seq received, reporting server restarts and gaps)",
    )


def _reconnect_line(kind: str, data: dict[str, Any]) -> str:
    """The status line for what :func:`listen_messages` reports about reconnecting."""
    if kind == "reconnecting":
        return f"{data['reason']}; reconnecting in {data['delay']:g}s (attempt {data['attempt']})"
    if kind == "restarted":
        return (
            f"the server restarted (epoch {data['old_epoch']} -> {data['new_epoch']}): events "
            f"its previous run published after seq {data['last_seq']}, if any, were not "
            "received; showing its new run from the start"
        )
    return (
        f"gap: events after seq {data.get('since_seq')} are no longer in the server's "
        "history (serve --history): some are missing here"
    )


def _width() -> int:
    if sys.stdout.isatty():
        return max(60, shutil.get_terminal_size().columns)
    return 200


async def _listen(args: argparse.Namespace) -> int:
    """Run ``gathering-lab listen``: status on stderr, one line (or JSON) per event on stdout."""
    out, err = sys.stdout, sys.stderr
    filters = protocol.Filters(tuple(args.types or ("*",)), args.circle, args.project)
    if "*" in filters.event_types:
        filters = protocol.Filters(("*",), args.circle, args.project)
    token = args.token or os.environ.get(TOKEN_ENV)
    client_id = args.client_id
    if client_id is None and not token and not query_param(args.url, "client_id"):
        client_id = f"listen-{os.getpid()}"  # with a token, the server names us after its sub
    width = _width()
    seen = 0
    sessions = 0
    feed = listen_messages(
        args.url, filters=filters, client_id=client_id, token=token, reconnect=args.reconnect
    )

    def status(text: str) -> None:
        print(f"listen: {text}", file=err, flush=True)

    try:
        async with contextlib.aclosing(feed):
            async for kind, message in feed:
                if kind == "error":
                    status(f"server error: {error_text(message)}")
                    continue
                if kind in ("reconnecting", "restarted", "gap"):
                    status(_reconnect_line(kind, message))
                    continue
                if args.json:
                    print(protocol.encode(message).decode(), file=out, flush=True)
                if kind == "event":
                    if not args.json:
                        print(format_event(message, width), file=out, flush=True)
                    seen += 1
                    if args.count is not None and seen >= args.count:
                        return 0
                elif kind == "connected":
                    data = message.get("data") or {}
                    server = data.get("server", "server")
                    again = "re" if sessions else ""
                    sessions += 1
                    status(f"{again}connected to {args.url} as {data.get('client_id')} ({server})")
                elif kind == "resumed":
                    data = message.get("data") or {}
                    status(f"resumed: {data.get('count')} missed events replayed")
                elif kind == "subscribed":
                    logger.info("the server filters for us: %s", message.get("data"))
                elif kind == "subscribe_refused":
                    print(
                        "listen: the server does not support subscribe "
                        f"({error_text(message)}); filtering locally",
                        file=err,
                        flush=True,
                    )
    except BrokenPipeError:  # `gathering-lab listen | head`
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
        return 0
    except asyncio.CancelledError:
        print(f"listen: stopped after {seen} events", file=err, flush=True)
        raise
    return 0  # pragma: no cover - the feed only ends by raising ConnectionFailed


# record and replay
def _add_record_parser(commands: Any) -> None:
    record = commands.add_parser(
        "record",
        help="record a server's events to Parquet or JSON lines",
        description="Record a server's events, each with its receive time, to FILE: Parquet "
        "(*.parquet) or JSON lines (*.jsonl). Runs until Ctrl+C (or SIGTERM), --count or "
        "--duration, and leaves a complete file on any of them. Reconnects and resumes by "
        "seq; a loss is recorded as a lab.gap row.",
    )
    record.add_argument(
        "--url", type=ws_url, default=DEFAULT_URL, help=f"server WebSocket URL ({DEFAULT_URL})"
    )
    record.add_argument(
        "--out", required=True, metavar="FILE", help="the recording: *.parquet or *.jsonl"
    )
    record.add_argument(
        "--count", type=_positive_int, default=None, help="stop after N events (default: Ctrl+C)"
    )
    record.add_argument(
        "--duration",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="stop after this long: 30, 90s, 15m, 1h (default: Ctrl+C)",
    )
    record.add_argument(
        "--type",
        dest="types",
        action="append",
        type=_pattern,
        metavar="PATTERN",
        help="only these event types: task.created, task.* (repeatable)",
    )
    record.add_argument(
        "--rotate-bytes",
        type=_size,
        default=None,
        metavar="SIZE",
        help="start a new file past this size (e.g. 64m): FILE, then NAME.1.SUFFIX, "
        "NAME.2.SUFFIX, ... (default: one file)",
    )
    record.add_argument(
        "--force", action="store_true", help="overwrite FILE (and its numbered parts)"
    )
    record.add_argument("--client-id", default="record", help="client id (default: record)")
    _add_token_argument(record)
    _add_log_level(record, default="warning")


def _add_replay_parser(commands: Any) -> None:
    replay = commands.add_parser(
        "replay",
        help="publish a recording to a server again",
        description="Publish the events of a recording (*.parquet or *.jsonl, rotated parts "
        "included) to a server again, in order, keeping their relative timing. A publish the "
        "server refuses with rate_limited is sent again, never dropped; a dropped connection "
        "is opened again and the replay goes on from the first unacknowledged event.",
    )
    replay.add_argument("file", metavar="FILE", help="the recording: *.parquet or *.jsonl")
    replay.add_argument(
        "--url", type=ws_url, default=DEFAULT_URL, help=f"server WebSocket URL ({DEFAULT_URL})"
    )
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="play the recorded timing this many times faster (default 1)",
    )
    pace.add_argument(
        "--as-fast-as-possible",
        action="store_true",
        help="ignore the timing: publish as fast as the server takes them",
    )
    replay.add_argument(
        "--window",
        type=_positive_int,
        default=256,
        metavar="N",
        help="publishes sent ahead of their acknowledgement (default 256)",
    )
    from .replay import DEFAULT_MAX_RETRIES, DEFAULT_RETRY_TIMEOUT

    replay.add_argument(
        "--no-reconnect",
        dest="reconnect",
        action="store_false",
        help="exit when the connection drops (default: reconnect with backoff and go on "
        "from the first event not acknowledged)",
    )
    replay.add_argument(
        "--max-retries",
        type=_limit,
        default=DEFAULT_MAX_RETRIES,
        metavar="N",
        help=f"reconnect attempts in a row before giving up (default {DEFAULT_MAX_RETRIES})",
    )
    replay.add_argument(
        "--retry-timeout",
        type=_duration,
        default=DEFAULT_RETRY_TIMEOUT,
        metavar="SECONDS",
        help=f"give up when the server is gone this long (default {DEFAULT_RETRY_TIMEOUT:g})",
    )
    replay.add_argument("--client-id", default="replay", help="client id (default: replay)")
    _add_token_argument(replay)
    _add_log_level(replay, default="warning")


def _tqdm(**options: Any) -> Any:
    from tqdm import tqdm

    return tqdm(file=sys.stderr, disable=None, dynamic_ncols=True, **options)


async def _record(args: argparse.Namespace) -> int:
    """Run ``gathering-lab record``: a counter on stderr, then one summary line."""
    from .record import Recorder, RecordResult, record

    err = sys.stderr
    try:
        Recorder.check_path(args.out, overwrite=args.force)
    except (OSError, ValueError, ImportError) as exc:
        print(f"gathering-lab record: error: {exc}", file=err)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bar = _tqdm(desc="record", unit="ev", total=args.count)

    def show(result: RecordResult) -> None:
        bar.update(result.events - bar.n)

    print(f"record: recording {args.url} to {args.out} (Ctrl+C to stop)", file=err, flush=True)
    try:
        result = await record(
            args.url,
            args.out,
            count=args.count,
            duration=args.duration,
            types=args.types,
            token=args.token or os.environ.get(TOKEN_ENV),
            client_id=args.client_id,
            rotate_bytes=args.rotate_bytes,
            overwrite=args.force,
            stop=stop,
            progress=show,
        )
    finally:
        bar.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    files = result.files
    more = f" (+{len(files) - 1} more files)" if len(files) > 1 else ""
    gaps = f", {result.gaps} gaps" if result.gaps else ""
    print(
        f"record: {result.events} events ({result.rows} rows{gaps}) in {result.elapsed:.1f} s "
        f"to {files[0]}{more}, {result.bytes} bytes; stopped by {result.reason}",
        file=err,
        flush=True,
    )
    return 1 if result.reason == "closed" else 0


async def _replay(args: argparse.Namespace) -> int:
    """Run ``gathering-lab replay``: a progress bar on stderr, then one summary line."""
    from .record import recording_format
    from .replay import replay

    err = sys.stderr
    speed = None if args.as_fast_as_possible else args.speed
    problem = None
    if speed is not None and not speed > 0 or speed == float("inf"):
        problem = f"invalid speed {args.speed:g}: must be > 0 (or --as-fast-as-possible)"
    else:
        try:
            recording_format(args.file)
        except ValueError as exc:
            problem = str(exc)
        else:
            if not os.path.exists(args.file):
                problem = f"no such recording {args.file!r}"
    if problem is not None:
        print(f"gathering-lab replay: error: {problem}", file=err)
        return 2
    try:
        result = await replay(
            args.file,
            args.url,
            speed=speed,
            token=args.token or os.environ.get(TOKEN_ENV),
            client_id=args.client_id,
            progress=_tqdm,
            window=args.window,
            reconnect=args.reconnect,
            max_retries=args.max_retries,
            retry_timeout=args.retry_timeout,
        )
    except (OSError, ValueError, ImportError) as exc:
        print(f"gathering-lab replay: error: {exc}", file=err)
        return 2
    reconnects = (
        f", {result.reconnects} reconnects ({len(result.maybe_duplicated)} events may have "
        "been published twice)"
        if result.reconnects
        else ""
    )
    print(
        f"replay: {result.published} of {result.total} events published in "
        f"{result.elapsed:.2f} s ({result.rate:.0f} ev/s); held back {result.held_back} times "
        f"by the server's publish rate ({result.paced} paced, {result.retried} refused with "
        f"rate_limited and sent again), {result.failed} refused, "
        f"{result.skipped} rows skipped"
        + (f", {result.reordered} out of order" if result.reordered else "")
        + reconnects,
        file=err,
        flush=True,
    )
    if result.maybe_duplicated:
        from .replay import describe_numbers

        print(
            "replay: may have been published twice (sent, no ack, connection lost): "
            f"events {describe_numbers(result.maybe_duplicated)}",
            file=err,
            flush=True,
        )
    if result.last_error:
        print(f"replay: last refusal: {result.last_error}", file=err, flush=True)
    return 0 if result.published == result.total else 1


# load
def _duration(text: str) -> float:
    value = _seconds(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be > 0")
    return value


def _add_load_parser(commands: Any) -> None:
    from .load import DEFAULT_PUBLISHER_RATE

    load = commands.add_parser(
        "load",
        help="load-test a server: N clients, a publish rate, a summary",
        description="Connect N thin WebSocket clients (in --processes worker processes), "
        "publish --rate events/s in all for --duration from a few publisher connections, "
        "then print deliveries/s, loss, duplicates, reordering, latency and connect time, "
        "the server's RSS and CPU when it runs on this machine, and the load generator's own "
        "CPU (flagged at 90%% of a core: then the figures measure the generator). Works "
        "against any server speaking the protocol. Exit status 1 if anything was lost, "
        "duplicated or refused, 2 for bad arguments.",
    )
    load.add_argument(
        "--url", type=ws_url, default=DEFAULT_URL, help=f"server WebSocket URL ({DEFAULT_URL})"
    )
    load.add_argument(
        "--clients", type=_positive_int, default=100, metavar="N", help="subscribers (100)"
    )
    load.add_argument(
        "--rate",
        type=_rate,
        default=0.0,
        metavar="R",
        help=f"events/s in all (default 0: the clients stay idle), spread over publisher "
        f"connections of at most {DEFAULT_PUBLISHER_RATE:g}/s each: our server refuses more "
        "than --publish-rate (500/s by default) per connection",
    )
    load.add_argument(
        "--duration",
        type=_duration,
        default=10.0,
        metavar="S",
        help="seconds of publishing (or idling): 10, 30s, 2m (default 10)",
    )
    load.add_argument(
        "--payload-bytes",
        type=_limit,
        default=200,
        metavar="B",
        help="size of each event's data (200)",
    )
    load.add_argument(
        "--type",
        dest="types",
        action="append",
        type=_pattern,
        metavar="PATTERN",
        help="subscribe every client to these event types (repeatable); the load's events "
        "are of --event-type",
    )
    load.add_argument(
        "--event-type",
        type=_pattern,
        default="task.created",
        help="type of the events (task.created)",
    )
    load.add_argument(
        "--processes",
        type=_positive_int,
        default=None,
        metavar="P",
        help="subscriber processes (default: one per 2500 clients, at most one per CPU)",
    )
    load.add_argument(
        "--publishers",
        type=_limit,
        default=None,
        metavar="N",
        help=f"publisher connections (default: one per {DEFAULT_PUBLISHER_RATE:g} ev/s)",
    )
    load.add_argument(
        "--drain",
        type=_duration,
        default=5.0,
        metavar="S",
        help="after publishing, wait up to this long for deliveries still in flight; what "
        "has not arrived by then counts as lost (default 5)",
    )
    load.add_argument(
        "--out",
        metavar="FILE",
        help="write every delivery (client, seq, received_s, "
        "latency_ms) to FILE: *.parquet or *.csv",
    )
    _add_token_argument(load)
    _add_log_level(load, default="warning")


def _load(args: argparse.Namespace) -> int:
    """Run ``gathering-lab load``: progress bars on stderr, the summary table on stdout."""
    from .load import LoadConfig, check_samples_path, run_load

    config = LoadConfig(
        url=args.url,
        clients=args.clients,
        rate=args.rate,
        duration=args.duration,
        payload_bytes=args.payload_bytes,
        types=tuple(args.types or ()),
        token=args.token or os.environ.get(TOKEN_ENV),
        processes=args.processes,
        publishers=args.publishers,
        event_type=args.event_type,
        drain=args.drain,
    )
    try:
        config.check()
        if args.out is not None:
            check_samples_path(args.out)
        report = asyncio.run(run_load(config, progress=_tqdm))
        if args.out is not None:
            report.write_samples(args.out)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"gathering-lab load: error: {exc}", file=sys.stderr)
        return 2
    print(report.table(), flush=True)
    s = report.summary
    return 1 if s["lost"] or s["duplicates"] or s["publish_refused"] or s["connect_failed"] else 0


def _build_parser() -> argparse.ArgumentParser:
    from .backends.nodes import REPORT_INTERVAL, TTL_INTERVALS
    from .websocket.manager import DEFAULT_FLUSH_SLICE

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
        "--write-delay",
        type=_milliseconds,
        default=0.0,
        metavar="DELAY",
        help="hold each client's frames up to DELAY (e.g. 20ms) and write them as one buffer: "
        "fewer writes for up to that much latency (default 0: off)",
    )
    serve.add_argument(
        "--flush-slice",
        type=_limit,
        default=DEFAULT_FLUSH_SLICE,
        metavar="N",
        help=f"clients an event's fan-out writes per event-loop turn, so that the loop reads "
        f"sockets in between (default {DEFAULT_FLUSH_SLICE}; 0 = all in one turn)",
    )
    serve.add_argument(
        "--history",
        type=_positive_int,
        default=10_000,
        metavar="N",
        help="events kept for clients that resume (10000)",
    )
    serve.add_argument(
        "--history-bytes",
        type=_size,
        default=64 * 2**20,
        metavar="SIZE",
        help="encoded bytes of events kept for resumes; the oldest go first (64m)",
    )
    serve.add_argument(
        "--max-patterns",
        type=_positive_int,
        default=64,
        metavar="N",
        help="event type patterns one subscribe may hold (64)",
    )
    serve.add_argument(
        "--compression",
        choices=("off", "deflate"),
        default="off",
        help="permessage-deflate (default: off)",
    )
    serve.add_argument(
        "--bus",
        default=None,
        metavar="URL",
        help="where events are numbered and kept: memory:// (this process, the default) or "
        "redis://HOST:PORT/DB (shared by every server on it: one stream); "
        "default from $GATHERING_LAB_BUS",
    )
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="run N server processes on the port (SO_REUSEPORT, Linux), each a node of the "
        "shared --bus redis://... log; restarted when one dies (default 1)",
    )
    serve.add_argument(
        "--node-report-interval",
        type=_report_seconds,
        default=REPORT_INTERVAL,
        metavar="DURATION",
        help=f"on a shared --bus redis://... log, how often this node reports its figures "
        f"for the cluster-wide stats: 2s, 500ms (default {REPORT_INTERVAL:g}s)",
    )
    serve.add_argument(
        "--node-ttl",
        type=_report_seconds,
        default=None,
        metavar="DURATION",
        help="how long a node's report lives: a node that stops reporting (killed, cut "
        "off) drops out of the stats' nodes after it; must exceed --node-report-interval "
        f"(default {TTL_INTERVALS} intervals)",
    )
    serve.add_argument("--worker", type=_worker, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--certfile", help="TLS certificate (PEM) to serve wss://")
    serve.add_argument("--keyfile", help="TLS private key (PEM), with --certfile")
    _add_limit_arguments(serve)
    _add_auth_arguments(serve)
    _add_log_level(serve)

    _add_demo_arguments(
        commands.add_parser(
            "demo",
            help="publish realistic agent/task/circle traffic to a server",
            description="Publish realistic GatheRing traffic (agents, tasks, circles, "
            "conversations) to a server over WebSocket, as the guide's "
            "test_websocket_integration.py does.",
        )
    )
    _add_listen_arguments(
        commands.add_parser(
            "listen",
            help="print a server's live events",
            description="Print a readable live tail of a server's events (what websocat "
            "does in the guide).",
        )
    )
    for sub in (commands.choices["demo"], commands.choices["listen"]):
        _add_log_level(sub, default="warning")
    _add_token_parser(commands)
    _add_record_parser(commands)
    _add_replay_parser(commands)
    _add_load_parser(commands)
    sanitize = commands.add_parser(
        "nbval-sanitize",
        help="print the path of the nbval sanitize file for notebooks of events",
        description="Print the absolute path of the nbval sanitize file shipped with the "
        "package (event ids, timestamps, seq, epochs, ports, client ids, durations): "
        'pytest --nbval --nbval-sanitize-with "$(gathering-lab nbval-sanitize)" NOTEBOOK',
    )
    sanitize.set_defaults(log_level="warning")
    return parser


def _add_log_level(parser: argparse.ArgumentParser, default: str = "info") -> None:
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default=default, help=f"logging level ({default})"
    )


async def _serve(args: argparse.Namespace) -> int:
    from .events import event_bus
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

    auth = _auth_from_args(args)
    bus = await _start_bus(args)
    _raise_descriptor_limit(args.max_connections)
    worker = args.worker[0] if args.worker is not None else None
    try:
        server = await serve(
            args.host,
            args.port,
            bus=bus,
            reuse_port=worker is not None,
            worker=worker,
            max_patterns=args.max_patterns,
            allowed_origins=args.allowed_origin,
            auth=auth,
            max_message_size=args.max_message_size,
            max_pending_bytes=args.max_pending,
            write_delay=args.write_delay,
            flush_slice=args.flush_slice,
            node_report_interval=args.node_report_interval,
            node_ttl=args.node_ttl,
            compression=None if args.compression == "off" else args.compression,
            ssl=ssl_context,
            max_connections=args.max_connections,
            max_connections_per_ip=args.max_connections_per_ip or None,
            trusted_proxies=args.trusted_proxy,
            open_timeout=args.open_timeout,
            publish_rate=args.publish_rate,
            publish_burst=args.publish_burst,
            message_rate=args.message_rate,
            message_burst=args.message_burst,
            max_publishes_in_flight=args.max_publishes_in_flight,
        )
    except (OSError, ValueError) as exc:  # PortInUseError is an OSError
        if bus is not event_bus:
            await bus.close()
        raise SystemExit(f"gathering-lab serve: error: {_bind_error(args, exc)}") from None
    # Everything loaded so far lives as long as the process: keep it out of the
    # cyclic GC's way, so a full collection stays short (tail latency).
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.worker is not None:
        await _serve_as_worker(args.worker, server, stop)
        server.close()
        await server.wait_closed()
        await bus.close()
        return 0
    print(f"gathering-lab {__version__} serving", flush=True)
    print(f"  WebSocket  {server.url}", flush=True)
    print(f"  dashboard  {server.http_url}/dashboard", flush=True)
    print(f"  stats      {server.http_url}/admin/websocket/stats", flush=True)
    print(f"  auth       {'off' if auth is None else auth.algorithm + ' tokens'}", flush=True)
    print(f"  bus        {_bus_line(bus)}", flush=True)
    print(f"  limits     {_limits_line(server.get_stats())}", flush=True)
    print("Press Ctrl+C to stop.", flush=True)
    await stop.wait()
    print("shutting down: closing clients with 1001", flush=True)
    server.close()
    await server.wait_closed()
    if bus is not event_bus:
        await bus.close()
    return 0


async def _serve_as_worker(worker: tuple[int, int, int], server: Any, stop: asyncio.Event) -> None:
    """Tell the supervisor this worker serves, then wait for a signal or the supervisor's end."""
    index, ready_fd, parent_fd = worker
    loop = asyncio.get_running_loop()
    logger.info("worker %d (pid %d) serving on %s", index, os.getpid(), server.url)
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    # The supervisor never writes: the pipe reads EOF when it is gone.
    loop.add_reader(parent_fd, stop.set)
    await stop.wait()
    loop.remove_reader(parent_fd)
    logger.info("worker %d (pid %d) stopping: closing clients with 1001", index, os.getpid())


def _serve_workers(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``serve --workers N``: a supervisor of N serving processes on one port (workers.py)."""
    from .backends.bus import BUS_ENV

    url = args.bus if args.bus is not None else os.environ.get(BUS_ENV) or None
    if url is None or url.strip().lower().startswith("memory:"):
        print(
            f"gathering-lab serve: error: --workers {args.workers} needs a shared bus, e.g. "
            f"--bus redis://127.0.0.1:6379/0: with the memory bus ({url or 'memory://'}) each "
            "worker would have its own events",
            file=sys.stderr,
        )
        return 2
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        print(
            f"gathering-lab serve: error: --workers {args.workers} needs SO_REUSEPORT load "
            f"balancing (Linux), not available on {sys.platform}",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(_supervise(args, argv))


async def _supervise(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .workers import Supervisor, child_command, probe_socket

    bus = await _start_bus(args)  # one clear line now if the log is unreachable
    await bus.close()
    try:
        sock = probe_socket(args.host, args.port)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"gathering-lab serve: error: {_bind_error(args, exc)}") from None
    supervisor = Supervisor(child_command(argv), args.workers, sock)

    def ready(supervisor: Supervisor) -> None:
        host = f"[{args.host}]" if ":" in args.host else args.host
        scheme = "wss" if args.certfile else "ws"
        pids = ", ".join(str(w.process.pid) for w in supervisor.workers if w.process)
        print(
            f"gathering-lab {__version__} serving {scheme}://{host}:{supervisor.port}/ws/dashboard"
            f" with {supervisor.count} workers (pids {pids}; bus {_bus_line(bus)}); "
            "Ctrl+C to stop",
            flush=True,
        )

    code = await supervisor.run(ready)
    if supervisor.failure is not None:
        print(f"gathering-lab serve: error: {supervisor.failure}", file=sys.stderr, flush=True)
    return code


async def _start_bus(args: argparse.Namespace) -> Any:
    """The bus ``--bus`` (or $GATHERING_LAB_BUS) names, started; SystemExit with one line if not."""
    from .backends.bus import BUS_ENV, LogBus, bus_for_url, is_memory_url
    from .events import event_bus

    url = args.bus if args.bus is not None else os.environ.get(BUS_ENV) or None
    if is_memory_url(url):
        event_bus.configure(history_size=args.history, history_bytes=args.history_bytes)
        return event_bus
    try:
        bus = bus_for_url(url, history_size=args.history, history_bytes=args.history_bytes)
    except (ValueError, ImportError) as exc:
        raise SystemExit(f"gathering-lab serve: error: --bus: {exc}") from None
    assert isinstance(bus, LogBus)
    try:
        # The log bounds its own calls; this bounds the whole start-up, whatever the backend.
        async with asyncio.timeout(BUS_START_TIMEOUT):
            await bus.start()
    except (GatheringLabError, TimeoutError, OSError) as exc:
        await bus.close()
        reason = str(exc) or f"no answer within {BUS_START_TIMEOUT:g}s"
        where = getattr(bus.log, "where", "")  # the URL without its password
        raise SystemExit(f"gathering-lab serve: error: --bus {where}: {reason}") from None
    return bus


def _bind_error(args: argparse.Namespace, exc: BaseException) -> str:
    """One line, in terms of the command's flags, for a server that could not bind."""
    host, port = args.host, args.port
    if isinstance(exc, PortInUseError):
        return (
            f"port {port} on {host} is already in use; pick another "
            f"(e.g. --port {port + 1}) or --port 0 for a free one"
        )
    if isinstance(exc, UnicodeError) or str(exc).startswith("cannot resolve host"):
        reason = (
            str(exc).split(": ", 1)[-1]
            if not isinstance(exc, UnicodeError)
            else "not a valid host name"
        )
        return (
            f"cannot resolve --host {host!r}: {reason}; use an address of this machine, "
            "e.g. --host 127.0.0.1 (loopback) or --host 0.0.0.0 (every interface)"
        )
    if isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"cannot bind --host {host}: not an address of this machine; use one of its "
            "addresses, --host 127.0.0.1 (loopback) or --host 0.0.0.0 (every interface)"
        )
    if isinstance(exc, OSError) and exc.errno == errno.EACCES:
        return (
            f"cannot bind {host}:{port}: permission denied (ports below 1024 need privileges; "
            "try --port 8000)"
        )
    if isinstance(exc, OSError):
        return f"cannot bind {host}:{port}: {exc.strerror or exc}"
    return str(exc)


def _bus_line(bus: Any) -> str:
    log = getattr(bus, "log", None)
    if log is None:
        return "memory (this process)"
    keeps = f", keeps {log.maxlen}" if isinstance(getattr(log, "maxlen", None), int) else ""
    if getattr(log, "name", "events") not in ("events", ""):
        keeps = f", log {log.name!r}{keeps}"
    return f"{getattr(log, 'where', log.scheme)} (epoch {bus.epoch}, seq {bus.last_seq}{keeps})"


def _limits_line(stats: dict[str, Any]) -> str:
    admission, rates = stats["admission"], stats["rate_limits"]
    per_ip = admission["max_connections_per_ip"]
    rate = rates["publish_rate"]
    proxies = admission.get("trusted_proxies") or []
    behind = f"; clients behind {', '.join(proxies)} by X-Forwarded-For" if proxies else ""
    return (
        f"{admission['max_connections']} clients"
        f" ({'no per-address limit' if per_ip is None else f'{per_ip} per address'}{behind}), "
        + (f"{rate:g} publishes/s per client" if rate else "no publish rate limit")
    )


def _auth_from_args(args: argparse.Namespace) -> Any:
    from .auth import DEFAULT_AUTH_TIMEOUT, SECRET_ENV, JWTAuth

    timeout = DEFAULT_AUTH_TIMEOUT if args.auth_timeout is None else args.auth_timeout
    secret = args.jwt_secret or (None if args.jwt_public_key else os.environ.get(SECRET_ENV))
    try:
        if args.jwt_public_key:
            return JWTAuth.from_public_key_file(args.jwt_public_key, timeout=timeout)
        if secret:
            return JWTAuth(secret, timeout=timeout)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"gathering-lab serve: {exc}") from None
    if args.auth_timeout is not None:
        raise SystemExit(
            "gathering-lab serve: --auth-timeout needs --jwt-secret or --jwt-public-key"
        )
    return None


def _token(args: argparse.Namespace) -> int:
    from .auth import SECRET_ENV, mint_token

    secret = args.jwt_secret or (None if args.jwt_private_key else os.environ.get(SECRET_ENV))
    private_key = None
    if args.jwt_private_key:
        try:
            with open(args.jwt_private_key, "rb") as file:
                private_key = file.read()
        except OSError as exc:
            print(
                f"gathering-lab token: error: cannot read {args.jwt_private_key}: {exc.strerror}",
                file=sys.stderr,
            )
            return 2
    elif not secret:
        print(
            f"gathering-lab token: error: no key: pass --jwt-secret, set ${SECRET_ENV}, "
            "or pass --jwt-private-key",
            file=sys.stderr,
        )
        return 2
    try:
        token = mint_token(
            secret,
            args.sub,
            args.roles,
            circles=args.circle,
            projects=args.project,
            ttl=args.ttl,
            private_key=private_key,
        )
    except (ValueError, TypeError) as exc:
        print(f"gathering-lab token: error: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


#: The nbval sanitize file shipped with the package (``gathering-lab nbval-sanitize``).
NBVAL_SANITIZE = Path(__file__).resolve().with_name("nbval_sanitize.cfg")


def _nbval_sanitize() -> int:
    if not NBVAL_SANITIZE.is_file():
        print(
            f"gathering-lab nbval-sanitize: error: {NBVAL_SANITIZE} is missing from the "
            "installed package; reinstall gathering-lab",
            file=sys.stderr,
        )
        return 1
    print(NBVAL_SANITIZE)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gathering-lab`` command line; returns the exit status."""
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    worker = getattr(args, "worker", None)
    tag = f"[worker {worker[0]} pid {os.getpid()}] " if worker is not None else ""
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s",
    )
    if args.log_level != "debug":
        # websockets logs every connection and HTTP response at INFO: too chatty.
        logging.getLogger("gathering_lab.websocket.connection").setLevel(logging.WARNING)
    if args.command in ("demo", "listen"):
        _resolve_url(args)
    try:
        if args.command == "serve":
            from .backends.nodes import check_timing

            try:
                check_timing(args.node_report_interval, args.node_ttl)
            except ValueError as exc:
                print(
                    f"gathering-lab serve: error: --node-ttl/--node-report-interval: {exc}",
                    file=sys.stderr,
                )
                return 2
            if args.workers > 1 and args.worker is None:
                return _serve_workers(args, argv)
            return asyncio.run(_serve(args))
        if args.command == "demo":
            return asyncio.run(_demo(args))
        if args.command == "listen":
            return asyncio.run(_listen(args))
        if args.command == "token":
            return _token(args)
        if args.command == "record":
            return asyncio.run(_record(args))
        if args.command == "replay":
            return asyncio.run(_replay(args))
        if args.command == "load":
            return _load(args)
        if args.command == "nbval-sanitize":
            return _nbval_sanitize()
    except GatheringLabError as exc:
        print(f"gathering-lab {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
