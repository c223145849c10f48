"""Tokens, roles and scopes: gathering_lab.auth alone, then against a real server."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gathering_lab import cli
from gathering_lab.auth import (
    DEFAULT_AUTH_TIMEOUT,
    EVERYTHING,
    NOTHING,
    SECRET_ENV,
    Identity,
    JWTAuth,
    RedactTokens,
    Scope,
    bearer_token,
    mint_token,
    parse_duration,
    redact,
)
from gathering_lab.client import LabClient
from gathering_lab.events import Event, EventBus
from gathering_lab.exceptions import AuthError
from gathering_lab.testing import recv_json, recv_until, running_server, timeout, wait_for
from gathering_lab.websocket import ConnectionManager, Server, serve

SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
OTHER_SECRET = "another-secret-0123456789-abcdefghijklmnopqrstuv"


def token(sub: str = "alice", roles: Any = ("subscribe",), **options: Any) -> str:
    return mint_token(SECRET, sub, roles, **options)


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path_factory.mktemp("keys") / "jwt.pub.pem"
    path.write_bytes(public)
    return private, path


@pytest.fixture
def auth() -> JWTAuth:
    return JWTAuth(SECRET, timeout=timeout(0.5))


@pytest.fixture
async def server(bus: EventBus, manager: ConnectionManager, auth: JWTAuth) -> AsyncIterator[Server]:
    async with running_server(bus=bus, manager=manager, auth=auth) as server:
        yield server


async def closed_before_any_message(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Assert the server sends nothing, then closes; return the close code and reason."""
    with pytest.raises(ConnectionClosed):
        message = await asyncio.wait_for(ws.recv(), timeout(5))
        pytest.fail(f"received {message!r} before the close")
    return ws.close_code, ws.close_reason


async def joined(server: Server, tok: str, query: str = "", **kwargs: Any) -> ClientConnection:
    ws = await connect(
        server.url + query, additional_headers={"Authorization": f"Bearer {tok}"}, **kwargs
    )
    hello = await recv_json(ws)
    assert hello["type"] == "connection.established", hello
    return ws


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout(5)) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


# Tokens, without a server


def test_mint_and_verify_hs256() -> None:
    before = time.time()
    tok = token("alice", "publish,subscribe", circles=[1, "ops"], projects=[7], ttl="1h")
    identity = JWTAuth(SECRET).verify(tok)
    assert identity.sub == "alice"
    assert identity.roles == {"publish", "subscribe"}
    assert identity.scope == Scope(frozenset({1, "ops"}), frozenset({7}))
    assert identity.expires_at is not None
    assert before + 3599 <= identity.expires_at <= time.time() + 3600
    assert identity.to_dict() == {
        "roles": ["publish", "subscribe"],
        "scope": {"circles": [1, "ops"], "projects": [7]},
    }
    claims = jwt.decode(tok, options={"verify_signature": False})
    assert set(claims) == {"sub", "roles", "iat", "exp", "circles", "projects"}
    assert JWTAuth(SECRET).timeout == DEFAULT_AUTH_TIMEOUT == 3.0


def test_rs256_with_a_public_key_file(rsa_keys: tuple[bytes, Path]) -> None:
    private, public_path = rsa_keys
    auth = JWTAuth.from_public_key_file(public_path)
    tok = mint_token(None, "bob", ["subscribe"], private_key=private)
    assert auth.verify(tok).sub == "bob"
    # An HS256 token, even one "signed" with the public key itself, is refused.
    with pytest.raises(AuthError, match="invalid token"):
        auth.verify(token("bob"))
    forged = jwt.encode(
        {"sub": "bob", "roles": ["admin"], "exp": int(time.time()) + 60},
        b"x" * 32,
        algorithm="HS256",
    )
    with pytest.raises(AuthError, match="not signed with RS256"):
        auth.verify(forged)
    with pytest.raises(ValueError, match="cannot read"):
        JWTAuth.from_public_key_file(public_path.parent / "missing.pem")
    with pytest.raises(ValueError, match="not a PEM public key"):
        JWTAuth(public_key=b"not a key")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: token(ttl=1, now=time.time() - 10), "token expired"),
        (lambda: mint_token(OTHER_SECRET, "alice"), "bad signature"),
        (lambda: "not-a-jwt", "invalid token"),
        (lambda: "eyJhbGciOiJIUzI1NiJ9.e30.AAAA", "invalid token"),
        (lambda: jwt.encode({"sub": "a"}, SECRET, algorithm="HS256"), "no 'exp' claim"),
        (
            lambda: jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256"),
            "no 'sub' claim",
        ),
        (
            lambda: jwt.encode(
                {"sub": "has space", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
            ),
            "'sub' must be",
        ),
        (
            lambda: jwt.encode(
                {"sub": "a", "exp": int(time.time()) + 60, "roles": ["root"]},
                SECRET,
                algorithm="HS256",
            ),
            "unknown role",
        ),
        (
            lambda: jwt.encode(
                {"sub": "a", "exp": int(time.time()) + 60, "circles": 1},
                SECRET,
                algorithm="HS256",
            ),
            "'circles' must be a list",
        ),
        (
            lambda: jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, None, algorithm="none"),
            "not signed with HS256",
        ),
        (lambda: "x" * 9000, "too long"),
        (lambda: "", "missing token"),
    ],
)
def test_bad_tokens_are_refused_with_a_safe_reason(make: Any, reason: str) -> None:
    bad = make()
    with pytest.raises(AuthError, match=reason) as info:
        JWTAuth(SECRET).verify(bad)
    if len(bad) > 20:
        assert bad not in str(info.value) and bad[-20:] not in str(info.value)


def test_bad_keys_and_options() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        JWTAuth("short")
    with pytest.raises(ValueError, match="exactly one"):
        JWTAuth()
    with pytest.raises(ValueError, match="exactly one"):
        JWTAuth(SECRET, public_key="x")
    with pytest.raises(ValueError, match="timeout"):
        JWTAuth(SECRET, timeout=0)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        mint_token("short", "a")
    with pytest.raises(ValueError, match="unknown role"):
        mint_token(SECRET, "a", ["root"])
    assert SECRET not in repr(JWTAuth(SECRET))
    with pytest.raises(TypeError, match="JWTAuth"):
        serve(port=0, auth=SECRET)  # type: ignore[arg-type]


def test_scope_semantics() -> None:
    class E:
        def __init__(self, circle_id: Any = None, project_id: Any = None) -> None:
            self.circle_id, self.project_id = circle_id, project_id

    circles = Scope(circles=frozenset({1}))
    assert circles.allows(E(1)) and circles.allows(E(1, 9))
    assert not circles.allows(E(2)) and not circles.allows(E(None))  # no circle: not theirs
    assert not circles.allows(E("1"))  # ids compare exactly, as filters do
    assert not circles.allows(E([1]))  # unhashable: in no list
    projects = Scope(projects=frozenset({"p"}))
    assert projects.allows(E(5, "p")) and not projects.allows(E(5, None))
    assert EVERYTHING.unrestricted and EVERYTHING.allows(E()) and not EVERYTHING.empty
    assert NOTHING.empty and not NOTHING.allows(E(1, "p"))
    publisher = Identity("pub", frozenset({"publish"}))
    assert publisher.receive_scope.empty


def test_durations_and_bearer_headers() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("15m") == 900
    assert parse_duration("1h") == 3600
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration(30) == 30
    for bad in ("", "1y", "-5", "0", "h"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None


def test_redaction_patterns() -> None:
    tok = token()
    signature = tok.rsplit(".", 1)[1]
    lines = [
        f"< GET /ws/dashboard?client_id=x&token={tok} HTTP/1.1",
        f"< GET /ws/dashboard?token={tok}&client_id=x HTTP/1.1",
        f"< Authorization: Bearer {tok}",
        f"> authorization: bearer {tok}",
        f'< TEXT \'{{"type":"auth","data":{{"token":"{tok[:30]}...{tok[-20:]}"}}}}\'',
        f"connection to ws://h/ws?token={tok} lost",
        f"something {tok} else",
        # Keys written percent-encoded, with a value no pattern recognises (a signature).
        f"< GET /ws/dashboard?%74oken={signature} HTTP/1.1",
        f"< GET /ws/dashboard?client_id=x&TOK%2565N={signature}",
        f"< GET /ws/dashboard?access_token={signature}",
        f"connecting to 'ws://h/?a=1&t%6Fken={signature}'",
        f"query a=1&TOKEN={signature}",
    ]
    for line in lines:
        cleaned = redact(line)
        assert "<redacted>" in cleaned
        assert tok[-20:] not in cleaned and tok[:40] not in cleaned, cleaned
    assert "client_id=x" in redact(lines[1])
    record = logging.LogRecord(
        "x", logging.DEBUG, "f", 1, "< %s %s", ("GET", f"/?token={tok}"), None
    )
    assert RedactTokens().filter(record)
    assert tok not in record.getMessage()


# With a server: getting in


async def test_bearer_header_query_and_auth_frame_all_work(server: Server, bus: EventBus) -> None:
    # Authorization: Bearer
    async with await joined(server, token("alice")) as ws:
        pass
    # ?token= (the guide's way), with a ?client_id= that disagrees: ignored
    async with connect(f"{server.url}?client_id=mallory&token={token('bob')}") as ws:
        hello = await recv_json(ws)
        assert hello["data"]["client_id"] == "bob"
        assert hello["data"]["roles"] == ["subscribe"]
        assert hello["data"]["scope"] == {"circles": None, "projects": None}
    # A first {"type": "auth"} frame (browsers)
    async with connect(server.url + "?client_id=carol") as ws:
        await ws.send(json.dumps({"type": "auth", "data": {"token": token("carol", circles=[1])}}))
        hello = await recv_json(ws)
        assert hello["type"] == "connection.established"
        assert hello["data"]["client_id"] == "carol"
        assert hello["data"]["epoch"] == bus.epoch and hello["data"]["seq"] == 0
        ack = await recv_json(ws)
        assert ack["type"] == "authenticated"
        assert ack["data"]["client_id"] == "carol"
        assert ack["data"]["scope"] == {"circles": [1], "projects": None}
        assert isinstance(ack["data"]["expires_at"], float)
        await bus.publish(Event(type="a.b", circle_id=1))
        assert (await recv_json(ws))["type"] == "a.b"
    assert server.get_stats()["rejected_connections"] == 0


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("nothing", "authentication timeout"),
        ("header-bad", "invalid token: bad signature"),
        ("header-expired", "token expired"),
        ("query-bad", "invalid token"),
        ("frame-bad", "invalid token: bad signature"),
        ("frame-expired", "token expired"),
        ("frame-not-auth", "authentication required"),
        ("frame-not-json", "authentication required"),
        ("frame-binary", "authentication required"),
        ("admin-only", "neither 'subscribe' nor 'publish'"),
        ("no-roles", "neither 'subscribe' nor 'publish'"),
    ],
)
async def test_refused_with_1008_before_any_event(
    server: Server, bus: EventBus, how: str, reason: str
) -> None:
    expired = token(ttl=1, now=time.time() - 60)
    wrong = mint_token(OTHER_SECRET, "alice")
    headers: dict[str, str] = {}
    url = server.url
    if how == "header-bad":
        headers["Authorization"] = f"Bearer {wrong}"
    elif how == "header-expired":
        headers["Authorization"] = f"Bearer {expired}"
    elif how == "query-bad":
        url += "?token=garbage"
    elif how == "admin-only":
        headers["Authorization"] = f"Bearer {token('root', ['admin'])}"
    elif how == "no-roles":
        headers["Authorization"] = f"Bearer {token('nobody', [])}"
    async with connect(url, additional_headers=headers) as ws:
        if how == "frame-bad":
            await ws.send(json.dumps({"type": "auth", "data": {"token": wrong}}))
        elif how == "frame-expired":
            await ws.send(json.dumps({"type": "auth", "data": {"token": expired}}))
        elif how == "frame-not-auth":
            await ws.send(json.dumps({"type": "subscribe", "data": {}}))
        elif how == "frame-not-json":
            await ws.send("{nope")
        elif how == "frame-binary":
            await ws.send(b"\x00")
        # Events published while it waits never reach it.
        for _ in range(3):
            await bus.publish(Event(type="secret.event", data={"x": 1}))
        code, close_reason = await closed_before_any_message(ws)
    assert code == 1008
    assert close_reason is not None and reason in close_reason
    stats = server.get_stats()
    assert stats["rejected_connections"] == 1
    assert stats["total_connections"] == 0 and stats["active_connections"] == 0


async def test_rs256_server(bus: EventBus, rsa_keys: tuple[bytes, Path]) -> None:
    private, public_path = rsa_keys
    async with running_server(bus=bus, auth=JWTAuth.from_public_key_file(public_path)) as server:
        signed = mint_token(None, "rs", ["subscribe"], private_key=private)
        async with await joined(server, signed):
            pass
        async with connect(
            server.url, additional_headers={"Authorization": f"Bearer {token()}"}
        ) as ws:
            code, reason = await closed_before_any_message(ws)
        assert (code, reason) == (1008, "invalid token: not signed with RS256")


async def test_lab_client_takes_the_name_its_token_gives(server: Server) -> None:
    client = LabClient(server.url, "what-i-asked", token=token("what-the-token-says"))
    await client.connect()
    try:
        assert client.client_id == "what-the-token-says"
        assert [s.client_id for s in server.manager.sessions] == ["what-the-token-says"]
    finally:
        await client.close()


async def test_a_silent_client_is_closed_after_the_timeout(bus: EventBus) -> None:
    auth = JWTAuth(SECRET, timeout=timeout(0.3))
    async with running_server(bus=bus, auth=auth) as server:
        async with connect(server.url) as ws:
            started = time.monotonic()
            code, reason = await closed_before_any_message(ws)
            waited = time.monotonic() - started
    assert (code, reason) == (1008, "authentication timeout")
    assert timeout(0.2) < waited < timeout(3)


async def test_auth_off_still_answers_auth_frames_with_an_error(bus: EventBus) -> None:
    async with running_server(bus=bus) as server:
        async with connect(server.url) as ws:
            await recv_json(ws)
            await ws.send(json.dumps({"type": "auth", "data": {"token": "x"}}))
            reply = await recv_json(ws)
    assert reply["data"] == {
        "code": "invalid_message",
        "message": "authentication is off on this server",
    }


# Roles


async def test_publish_needs_the_publish_role_and_the_connection_stays_open(
    server: Server, bus: EventBus
) -> None:
    async with await joined(server, token("reader")) as ws:
        await ws.send(json.dumps({"type": "publish", "data": {"type": "task.created"}}))
        reply = await recv_json(ws)
        assert reply["type"] == "error"
        assert reply["data"]["code"] == "forbidden"
        assert "'publish' role" in reply["data"]["message"]
        assert bus.get_stats()["events_published"] == 0
        # Still connected, still receiving.
        await ws.send(json.dumps({"type": "ping", "id": 1}))
        assert (await recv_json(ws))["type"] == "pong"
        await bus.publish(Event(type="a.b"))
        assert (await recv_json(ws))["type"] == "a.b"


async def test_publishers_publish_inside_their_scope_only(server: Server, bus: EventBus) -> None:
    tok = token("writer", ["publish", "subscribe"], circles=[1])
    async with await joined(server, tok) as ws:
        for circle in (2, None):
            await ws.send(
                json.dumps({"type": "publish", "data": {"type": "a.b", "circle_id": circle}})
            )
            reply = await recv_json(ws)
            assert reply["data"]["code"] == "forbidden"
            assert "outside this token's scope" in reply["data"]["message"]
        await ws.send(json.dumps({"type": "publish", "data": {"type": "a.b", "circle_id": 1}}))
        got = await recv_until(ws, lambda m: m["type"] == "published")
        assert [m["type"] for m in got] == ["a.b", "published"]
    assert bus.get_stats()["events_published"] == 1


async def test_publish_only_tokens_receive_nothing(server: Server, bus: EventBus) -> None:
    async with await joined(server, token("demo", ["publish"])) as pub:
        async with await joined(server, token("reader")) as reader:
            await pub.send(json.dumps({"type": "publish", "data": {"type": "a.b"}}))
            ack = await recv_json(pub)  # the ack, not its own event
            assert ack["type"] == "published"
            assert (await recv_json(reader))["seq"] == ack["data"]["seq"]
            for message in (
                {"type": "subscribe", "data": {}},
                {"type": "resume", "data": {"since_seq": 0}},
            ):
                await pub.send(json.dumps(message))
                reply = await recv_json(pub)
                assert reply["data"]["code"] == "forbidden"
                assert "'subscribe' role" in reply["data"]["message"]


# Scopes


async def test_scopes_bound_what_each_client_receives_whatever_its_filters(
    server: Server, bus: EventBus
) -> None:
    clients = {
        "c1": await joined(server, token("c1", circles=[1])),
        "c12": await joined(server, token("c12", circles=[1, 2])),
        "p7": await joined(server, token("p7", projects=[7])),
        "c1p7": await joined(server, token("c1p7", circles=[1], projects=[7])),
        "all": await joined(server, token("all")),
        # Asks for circle 2, may only see circle 1: receives nothing of either.
        "c1-wants-2": await joined(server, token("c1-wants-2", circles=[1])),
        # Filters inside the scope still apply.
        "c12-tasks": await joined(server, token("c12-tasks", circles=[1, 2])),
    }
    for name, body in (
        ("c1-wants-2", {"circle_id": 2}),
        ("c12-tasks", {"event_types": ["task.*"]}),
    ):
        await clients[name].send(json.dumps({"type": "subscribe", "data": body}))
        assert (await recv_json(clients[name]))["type"] == "subscribed"
    published = [
        ("a.one", 1, None),
        ("task.two", 2, None),
        ("a.none", None, None),
        ("task.one7", 1, 7),
        ("a.three7", 3, 7),
        ("a.one8", 1, 8),
    ]
    for kind, circle, project in published:
        await bus.publish(Event(type=kind, circle_id=circle, project_id=project))
    await bus.publish(Event(type="end.marker", circle_id=1, project_id=7))  # everyone but one

    async def received(ws: ClientConnection) -> list[str]:
        got = await recv_until(ws, lambda m: m["type"] == "end.marker", wait=5)
        return [m["type"] for m in got[:-1]]

    assert await received(clients["c1"]) == ["a.one", "task.one7", "a.one8"]
    assert await received(clients["c12"]) == ["a.one", "task.two", "task.one7", "a.one8"]
    assert await received(clients["p7"]) == ["task.one7", "a.three7"]
    assert await received(clients["c1p7"]) == ["task.one7"]
    assert await received(clients["all"]) == [k for k, _, _ in published]
    # Filters inside the scope still apply; what neither allows never arrives.
    await bus.publish(Event(type="task.end", circle_id=1))
    got = await recv_until(clients["c12-tasks"], lambda m: m["type"] == "task.end")
    assert [m["type"] for m in got] == ["task.two", "task.one7", "task.end"]
    with pytest.raises(TimeoutError):
        await recv_until(clients["c1-wants-2"], lambda m: True, wait=0.2)
    # One group per distinct (filters, scope) pair: 5 unfiltered scopes + 2 filtered.
    assert server.get_stats()["filter_groups"] == 7
    for ws in clients.values():
        await ws.close()


async def test_clients_with_the_same_filters_and_scope_share_a_group(
    server: Server, bus: EventBus
) -> None:
    a = await joined(server, token("a", circles=[1]))
    b = await joined(server, token("b", circles=[1]))
    c = await joined(server, token("c", circles=[2]))
    assert server.get_stats()["filter_groups"] == 2
    clients = server.get_stats()["clients"]
    assert {c["client_id"]: c["scope"]["circles"] for c in clients} == {
        "a": [1],
        "b": [1],
        "c": [2],
    }
    for ws in (a, b, c):
        await ws.close()


async def test_a_publish_tests_each_group_once_not_each_client(
    server: Server, bus: EventBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gathering_lab.websocket import manager as manager_module

    calls = {"filters": 0, "scope": 0}
    filters_match, allows = manager_module.filters_match, Scope.allows

    def counting_filters(*args: Any) -> bool:
        calls["filters"] += 1
        return filters_match(*args)

    def counting_allows(self: Scope, event: Any) -> bool:
        calls["scope"] += 1
        return allows(self, event)

    monkeypatch.setattr(manager_module, "filters_match", counting_filters)
    monkeypatch.setattr(Scope, "allows", counting_allows)
    clients = [await joined(server, token(f"c{i}", circles=[1])) for i in range(30)]
    for ws in clients[:15]:
        await ws.send(json.dumps({"type": "subscribe", "data": {"event_types": ["task.*"]}}))
        assert (await recv_json(ws))["type"] == "subscribed"
    assert server.get_stats()["filter_groups"] == 2
    calls.update(filters=0, scope=0)
    await bus.publish(Event(type="task.created", circle_id=1))
    for ws in clients:
        assert (await recv_json(ws))["type"] == "task.created"
    # 30 clients, 2 groups: each check ran once per group.
    assert calls == {"filters": 2, "scope": 2}
    for ws in clients:
        await ws.close()


async def test_resume_replays_only_what_the_scope_allows(server: Server, bus: EventBus) -> None:
    for i in range(10):
        await bus.publish(Event(type="a.b", data={"i": i}, circle_id=i % 2))
    tok = token("r", circles=[1])
    async with await joined(server, tok, f"?last_seq=0&epoch={bus.epoch}") as ws:
        got = await recv_until(ws, lambda m: m["type"] == "resumed")
    assert [m["data"]["i"] for m in got[:-1]] == [1, 3, 5, 7, 9]
    assert got[-1]["data"]["count"] == 5 and got[-1]["data"]["gap"] is False
    async with await joined(server, tok) as ws:
        await ws.send(json.dumps({"type": "resume", "data": {"since_seq": 4}}))
        got = await recv_until(ws, lambda m: m["type"] == "resumed")
    assert [m["data"]["i"] for m in got[:-1]] == [5, 7, 9]


async def test_a_new_token_on_the_connection_changes_the_scope(
    server: Server, bus: EventBus
) -> None:
    async with await joined(server, token("dash", circles=[1])) as ws:
        # Another client's token, or a bad one: refused, the connection stays as it was.
        for tok, code in ((token("other"), "forbidden"), ("garbage", "unauthorized")):
            await ws.send(json.dumps({"type": "auth", "data": {"token": tok}}))
            reply = await recv_json(ws)
            assert reply["data"]["code"] == code
        await ws.send(json.dumps({"type": "auth", "data": {"token": token("dash", circles=[2])}}))
        ack = await recv_json(ws)
        assert ack["type"] == "authenticated"
        assert ack["data"]["scope"]["circles"] == [2]
        await bus.publish(Event(type="a.one", circle_id=1))
        await bus.publish(Event(type="a.two", circle_id=2))
        assert (await recv_json(ws))["type"] == "a.two"


async def test_the_connection_is_closed_when_its_token_expires(
    server: Server, bus: EventBus
) -> None:
    soon = token("brief", ttl=3600, now=time.time() - 3600 + 1.5)
    async with await joined(server, soon) as ws:
        await bus.publish(Event(type="a.b"))
        assert (await recv_json(ws))["type"] == "a.b"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), timeout(5))
    assert (ws.close_code, ws.close_reason) == (1008, "token expired")
    await wait_for(lambda: server.manager.active_connections == 0)


# HTTP


async def test_stats_need_the_admin_role_and_health_stays_open(server: Server) -> None:
    base = server.http_url

    def get(path: str, tok: str | None = None) -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bearer {tok}"} if tok else None
        return http_get(base + path, headers)

    stats = "/admin/websocket/stats"
    status, headers, body = await asyncio.to_thread(get, stats)
    assert status == 401 and "Bearer" in headers["WWW-Authenticate"]
    assert body["error"].startswith("unauthorized")
    status, headers, body = await asyncio.to_thread(get, stats, "garbage")
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
    status, _, body = await asyncio.to_thread(get, stats + "?token=garbage")
    assert status == 401
    status, _, body = await asyncio.to_thread(get, stats, token(ttl=1, now=time.time() - 60))
    assert (status, body["error"]) == (401, "unauthorized: token expired")
    status, _, body = await asyncio.to_thread(get, stats, token("s", ["subscribe", "publish"]))
    assert status == 403 and "'admin' role" in body["error"]
    status, _, body = await asyncio.to_thread(get, stats, token("root", ["admin"]))
    assert status == 200 and body["auth"] == "HS256" and "active_connections" in body
    status, _, body = await asyncio.to_thread(get, f"{stats}?token={token('root', ['admin'])}")
    assert status == 200
    status, _, body = await asyncio.to_thread(get, "/health")
    assert status == 200 and body["status"] == "ok"


# Logs


async def test_tokens_never_reach_a_log(
    server: Server, bus: EventBus, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("", "gathering_lab.websocket.connection", "gathering_lab.client.connection"):
        caplog.set_level(logging.DEBUG, logger=name)
    tokens = {
        "header": token("h", ["subscribe", "publish"]),
        "query": token("q"),
        "frame": token("f"),
        "refresh": token("f", circles=[3]),
        "stats-header": token("admin", ["admin"]),
        "stats-query": token("admin2", ["admin"]),
        "bad": mint_token(OTHER_SECRET, "bad"),
        "expired": token("old", ttl=1, now=time.time() - 60),
        "client": token("lab", ["subscribe", "publish"]),
    }
    async with await joined(server, tokens["header"]):
        pass
    async with connect(f"{server.url}?client_id=q&token={tokens['query']}") as ws:
        await recv_json(ws)
    async with connect(server.url) as ws:
        await ws.send(json.dumps({"type": "auth", "data": {"token": tokens["frame"]}}))
        await recv_until(ws, lambda m: m["type"] == "authenticated")
        await ws.send(json.dumps({"type": "auth", "data": {"token": tokens["refresh"]}}))
        await recv_until(ws, lambda m: m["type"] == "authenticated")
    for bad in ("bad", "expired"):
        async with connect(f"{server.url}?token={tokens[bad]}") as ws:
            await closed_before_any_message(ws)
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "auth", "data": {"token": tokens[bad]}}))
            await closed_before_any_message(ws)
    await asyncio.to_thread(
        http_get,
        server.http_url + "/admin/websocket/stats",
        {"Authorization": f"Bearer {tokens['stats-header']}"},
    )
    await asyncio.to_thread(
        http_get, f"{server.http_url}/admin/websocket/stats?token={tokens['stats-query']}"
    )
    client = LabClient(f"{server.url}?token={tokens['client']}", "lab", token=tokens["client"])
    await client.connect()
    await client.publish("a.b")
    await client.close()

    # Everything logged but the test's own plain websockets clients ("websockets.client"),
    # which are not gathering_lab code.
    text = "\n".join(
        f"{r.name} {r.getMessage()}" for r in caplog.records if r.name != "websockets.client"
    )
    # The logs did record what the tokens travelled in...
    assert "< GET /ws/dashboard?client_id=q&token=<redacted> HTTP/1.1" in text
    assert "< Authorization: <redacted>" in text
    assert "> Authorization: <redacted>" in text  # the client's side
    assert "gathering_lab.websocket.connection < TEXT <" in text  # an auth frame: its size
    assert "GET /admin/websocket/stats?token=<redacted>" in text
    # ...and no token, nor a piece of one.
    for name, tok in tokens.items():
        signature = tok.rsplit(".", 1)[1]
        for piece in (tok, signature[:16], signature[-16:], tok.split(".")[1][:24]):
            assert piece not in text, f"{name} token leaked into the logs"


# CLI


def test_cli_token_prints_only_the_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    argv = ["token", "--sub", "cli", "--roles", "publish,subscribe", "--circle", "1"]
    assert cli.main([*argv, "--circle", "ops", "--project", "7", "--ttl", "1h"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.count("\n") == 1
    identity = JWTAuth(SECRET).verify(out.strip())
    assert identity.sub == "cli"
    assert identity.roles == {"publish", "subscribe"}
    assert identity.scope == Scope(frozenset({1, "ops"}), frozenset({7}))
    assert identity.expires_at is not None and identity.expires_at - time.time() > 3500
    # --jwt-secret wins over the environment
    assert cli.main(["token", "--sub", "x", "--jwt-secret", OTHER_SECRET]) == 0
    assert JWTAuth(OTHER_SECRET).verify(capsys.readouterr().out.strip()).sub == "x"


def test_cli_token_errors(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    rsa_keys: tuple[bytes, Path],
    tmp_path: Path,
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert cli.main(["token", "--sub", "x"]) == 2
    assert "no key" in capsys.readouterr().err
    assert cli.main(["token", "--sub", "x", "--jwt-secret", "short"]) == 2
    assert "at least 32 bytes" in capsys.readouterr().err
    assert cli.main(["token", "--sub", "x", "--roles", "root", "--jwt-secret", SECRET]) == 2
    assert "unknown role" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["token", "--sub", "x", "--ttl", "forever", "--jwt-secret", SECRET])
    capsys.readouterr()
    # RS256: sign with the private key, verify with the public one.
    private, public_path = rsa_keys
    key_file = tmp_path / "jwt.pem"
    key_file.write_bytes(private)
    assert cli.main(["token", "--sub", "rs", "--jwt-private-key", str(key_file)]) == 0
    out = capsys.readouterr().out.strip()
    assert JWTAuth.from_public_key_file(public_path).verify(out).sub == "rs"


def test_cli_serve_refuses_bad_auth_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(SystemExit, match="--auth-timeout needs"):
        cli.main(["serve", "--port", "0", "--auth-timeout", "1"])
    with pytest.raises(SystemExit, match="at least 32 bytes"):
        cli.main(["serve", "--port", "0", "--jwt-secret", "short"])
    with pytest.raises(SystemExit, match="cannot read"):
        cli.main(["serve", "--port", "0", "--jwt-public-key", "/nonexistent/key.pem"])
    with pytest.raises(SystemExit):  # argparse: one key or the other
        cli.main(["serve", "--jwt-secret", SECRET, "--jwt-public-key", "k.pem"])


async def test_cli_serve_with_a_secret_logs_no_token_at_debug() -> None:
    env = {**os.environ, SECRET_ENV: SECRET, "PYTHONUNBUFFERED": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gathering_lab",
        "serve",
        "--port",
        "0",
        "--log-level",
        "debug",
        "--auth-timeout",
        "0.5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        while True:
            raw = await asyncio.wait_for(process.stdout.readline(), timeout(20))
            assert raw, "\n".join(lines)
            lines.append(raw.decode().rstrip())
            if lines[-1].startswith("  WebSocket  "):
                url = lines[-1].split()[-1]
            if lines[-1].startswith("  auth "):
                assert lines[-1].split() == ["auth", "HS256", "tokens"]
                break
        good, bad = token("cli-q"), mint_token(OTHER_SECRET, "cli-bad")
        async with connect(f"{url}?token={good}") as ws:
            assert (await recv_json(ws))["data"]["client_id"] == "cli-q"
        async with connect(url, additional_headers={"Authorization": f"Bearer {bad}"}) as ws:
            await closed_before_any_message(ws)
        async with connect(url) as ws:
            code, reason = await closed_before_any_message(ws)
            assert (code, reason) == (1008, "authentication timeout")
    finally:
        process.terminate()
        rest, _ = await asyncio.wait_for(process.communicate(), timeout(10))
    output = "\n".join(lines) + rest.decode()
    assert "token=<redacted>" in output and "Authorization: <redacted>" in output
    for tok in (good, bad):
        assert tok not in output and tok.rsplit(".", 1)[1][:16] not in output


# Abuse (issue 8): time claims that are not numbers


def _signed(**claims: Any) -> str:
    payload = {"sub": "alice", "roles": ["subscribe"], "exp": int(time.time()) + 600, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        # PyJWT reads these with int(): "9999999999" would be a token that never expires.
        ({"exp": "9999999999"}, "'exp' must be a number of seconds, not str"),
        ({"nbf": "0"}, "'nbf' must be a number of seconds, not str"),
        ({"iat": "0"}, "'iat' must be a number of seconds, not str"),
        ({"exp": True}, "'exp' must be a number of seconds, not bool"),
        ({"nbf": False}, "'nbf' must be a number of seconds, not bool"),
        ({"exp": [9999999999]}, "'exp' must be a number of seconds, not list"),
        ({"exp": {"n": 1}}, "'exp' must be a number of seconds, not dict"),
        ({"exp": float("nan")}, "'exp' must be a finite number"),
        ({"exp": float("inf")}, "'exp' must be a finite number"),
        ({"iat": float("-inf")}, "'iat' must be a finite number"),
    ],
)
def test_time_claims_must_be_numbers(claims: dict[str, Any], reason: str) -> None:
    with pytest.raises(AuthError, match=reason):
        JWTAuth(SECRET).verify(_signed(**claims))


def test_time_claims_keep_their_meaning() -> None:
    now = time.time()
    auth = JWTAuth(SECRET)
    identity = auth.verify(_signed(exp=now + 60.5, nbf=now - 1.5, iat=int(now)))
    assert identity.expires_at == now + 60.5
    with pytest.raises(AuthError, match="token expired"):
        auth.verify(_signed(exp=now - 1))
    with pytest.raises(AuthError, match="not valid yet"):
        auth.verify(_signed(nbf=now + 60))
    with pytest.raises(AuthError, match="not valid yet"):
        auth.verify(_signed(iat=now + 60))
    assert JWTAuth(SECRET, leeway=120).verify(_signed(exp=now - 60, nbf=now + 60)).sub == "alice"
    with pytest.raises(ValueError, match="'exp' must be a number"):
        mint_token(SECRET, "alice", exp="9999999999")


async def test_string_times_are_refused_everywhere(server: Server) -> None:
    never_expires = _signed(exp="9999999999")
    # The upgrade's header, the query string and the first frame: closed 1008, naming 'exp'.
    ws = await connect(server.url, additional_headers={"Authorization": f"Bearer {never_expires}"})
    assert await closed_before_any_message(ws) == (
        1008,
        "invalid token: 'exp' must be a number of seconds, not str",
    )
    ws = await connect(f"{server.url}?token={_signed(nbf='0')}")
    assert (await closed_before_any_message(ws))[1] == (
        "invalid token: 'nbf' must be a number of seconds, not str"
    )
    ws = await connect(server.url)
    await ws.send(json.dumps({"type": "auth", "data": {"token": _signed(iat="0")}}))
    assert (await closed_before_any_message(ws))[1] == (
        "invalid token: 'iat' must be a number of seconds, not str"
    )
    # A fresh token on an open connection: unauthorized, and the connection keeps its token.
    async with await joined(server, token()) as ws:
        await ws.send(json.dumps({"type": "auth", "data": {"token": never_expires}}))
        reply = await recv_json(ws)
        assert reply["type"] == "error" and reply["data"]["code"] == "unauthorized"
        assert "'exp' must be a number" in reply["data"]["message"]
        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv_json(ws))["type"] == "pong"
    # The stats: 401.
    admin = _signed(sub="root", roles=["admin"], exp="9999999999")
    status, headers, body = await asyncio.to_thread(
        http_get,
        server.http_url + "/admin/websocket/stats",
        {"Authorization": f"Bearer {admin}"},
    )
    assert (status, body["error"]) == (
        401,
        "unauthorized: invalid token: 'exp' must be a number of seconds, not str",
    )
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]


# Abuse: duplicated headers


async def raw_http(server: Server, head: str) -> tuple[int, Any]:
    """Send ``head`` (a request without its final blank line) and read the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout(5))
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = body
    return int(status_line.split()[1]), parsed


UPGRADE = (
    "Connection: Upgrade\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\nSec-WebSocket-Version: 13"
)


async def test_duplicated_headers_are_a_400_on_every_route(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("gathering_lab", "gathering_lab.websocket.server"):
        caplog.set_level(logging.DEBUG, logger=name)
    one, two = token("a"), token("b", ["admin"])
    auth2 = f"Authorization: Bearer {one}\nAuthorization: Bearer {two}"
    requests = {
        "ws-auth": f"GET /ws/dashboard HTTP/1.1\nHost: x\nUpgrade: websocket\n{UPGRADE}\n{auth2}",
        "stats-auth": f"GET /admin/websocket/stats HTTP/1.1\nHost: x\n{auth2}",
        "health-auth": f"GET /health HTTP/1.1\nHost: x\n{auth2}",
        "ws-host": f"GET /ws/dashboard HTTP/1.1\nHost: x\nHost: y\nUpgrade: websocket\n{UPGRADE}",
        "ws-upgrade": (
            f"GET /ws/dashboard HTTP/1.1\nHost: x\nUpgrade: websocket\nUpgrade: h2c\n{UPGRADE}"
        ),
    }
    problems = {
        "ws-auth": "2 'Authorization' headers",
        "stats-auth": "2 'Authorization' headers",
        "health-auth": "2 'Authorization' headers",
        "ws-host": "2 'Host' headers",
        "ws-upgrade": "2 'Upgrade' headers",
    }
    rejected = server.manager.rejected_connections
    for name, head in requests.items():
        status, body = await raw_http(server, head)
        expected = {"error": f"bad request: {problems[name]}; send exactly one"}
        assert (status, body) == (400, expected), name
    stats = server.get_stats()
    assert stats["bad_requests"] == 5
    assert server.manager.rejected_connections == rejected + 3  # the three WebSocket upgrades
    logged = [r for r in caplog.records if "bad request" in r.getMessage()]
    assert len(logged) == 5 and all(r.levelno == logging.INFO for r in logged)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert one[-20:] not in text and two[-20:] not in text
    # The server is unharmed.
    async with await joined(server, token()):
        pass


# Abuse: tokens in disguise, in the logs


#: The loggers that see request lines and frames (``gathering-lab serve`` quiets the first).
LOGGERS = ("gathering_lab.websocket.connection", "gathering_lab.client.connection")


def _leaks(text: str, tokens: dict[str, str]) -> list[str]:
    """The tokens of which any 8-character piece is in ``text`` (also once percent-decoded).

    Tokens share their header and much of their payload: a shared piece counts as a leak
    of every token, and a leaked signature names its token.
    """
    texts = (text, urllib.parse.unquote_plus(text))
    leaked = [
        name
        for name, tok in tokens.items()
        if any(tok[i : i + 8] in t for t in texts for i in range(len(tok) - 7))
    ]
    signatures = [
        name
        for name, tok in tokens.items()
        for sig in [tok.rsplit(".", 1)[1]]
        if any(sig[i : i + 8] in t for t in texts for i in range(len(sig) - 7))
    ]
    return signatures or leaked


def _fragments(message: str, secret: str) -> list[str]:
    """``message`` cut in three, the cuts inside ``secret``: the middle part is base64 only."""
    start = message.index(secret)
    return [message[: start + 12], message[start + 12 : -30], message[-30:]]


async def test_disguised_and_fragmented_tokens_never_reach_a_log(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("gathering_lab", *LOGGERS):
        caplog.set_level(logging.DEBUG, logger=name)
    tokens = {name: token(name, ["subscribe", "publish", "admin"]) for name in "abcdefghijk"}
    tokens["f"] = token("e", circles=[3])  # a fresh token for client "e"
    tokens["k"] = token("j", ["subscribe", "publish"])  # and for client "j"

    def encoded(text: str) -> str:
        return "".join(f"%{b:02X}" for b in text.encode())

    # Keys the server decodes to "token" (parse_qs), values written percent-encoded.
    for query in (
        f"?%74oken={encoded(tokens['a'])}",
        f"?client_id=x&tok%65n={tokens['b']}",
        f"?token={encoded(tokens['c'])}",
    ):
        async with connect(server.url + query) as ws:
            assert (await recv_json(ws))["type"] == "connection.established"
    # A key the server does not read (TOKEN=), then an auth frame in three fragments,
    # then a fresh token on the open connection, also in fragments.
    async with connect(f"{server.url}?TOKEN={tokens['d']}") as ws:
        message = json.dumps({"type": "auth", "data": {"token": tokens["e"]}})
        await ws.send(_fragments(message, tokens["e"]))
        await recv_until(ws, lambda m: m["type"] == "authenticated")
        message = json.dumps({"type": "auth", "data": {"token": tokens["f"]}})
        await ws.send(_fragments(message, tokens["f"]))
        await recv_until(ws, lambda m: m["type"] == "authenticated")
    # The stats with a disguised key.
    status, _, _ = await asyncio.to_thread(
        http_get, f"{server.http_url}/admin/websocket/stats?%54%4F%4B%45%4E={tokens['g']}"
    )
    assert status == 401  # TOKEN is not token: no token found
    status, _, _ = await asyncio.to_thread(
        http_get, f"{server.http_url}/admin/websocket/stats?%74oken={tokens['h']}"
    )
    assert status == 200
    # A request line websockets cannot parse: it quotes it in the traceback it logs.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(f"GET /ws/dashboard?token={tokens['i']} HTTP/2.0\r\n\r\n".encode())
    await asyncio.wait_for(reader.read(), timeout(5))
    writer.close()
    # The client's side: a disguised key in its URL, and a fresh token in an auth frame.
    client = LabClient(f"{server.url}?%74oken={tokens['j']}", "j")
    await client.connect()
    await client.authenticate(tokens["k"])
    await client.publish("a.b", {"note": "no secret here"})
    await client.close()

    records = [r for r in caplog.records if r.name.startswith("gathering_lab")]
    formatter = logging.Formatter("%(name)s %(message)s")
    text = "\n".join(formatter.format(r) for r in records)
    # What travelled was logged, every token redacted...
    assert "< GET /ws/dashboard?%74oken=<redacted> HTTP/1.1" in text
    assert "?client_id=x&tok%65n=<redacted>" in text
    assert "?TOKEN=<redacted>" in text
    assert "/admin/websocket/stats?%54%4F%4B%45%4E=<redacted>" in text
    assert "gathering_lab.client.connection > GET /ws/dashboard?token=<redacted>" in text
    assert "! no valid HTTP request" in text and "HTTP/2.0" in text
    # ...frames from the client by their size alone, in the server's log and the client's...
    assert "gathering_lab.websocket.connection < CONT <" in text
    assert "gathering_lab.client.connection > TEXT <" in text
    # even a publish, which mentions no token (its event, sent back to the client, shows)
    assert "gathering_lab.client.connection > TEXT '" not in text
    assert "gathering_lab.websocket.connection < TEXT '" not in text
    # ...while frames to the client stay readable (the server writes most of them raw,
    # past websockets' logging: the client's log shows them).
    assert 'gathering_lab.client.connection < TEXT \'{"type":"connection.established"' in text
    # ...and no piece of any token.
    assert _leaks(text, tokens) == []
