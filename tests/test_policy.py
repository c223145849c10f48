"""The session policy without sockets: every decision the server makes, from plain values."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gathering_lab import protocol
from gathering_lab.auth import JWTAuth, mint_token
from gathering_lab.websocket.limits import RateLimits
from gathering_lab.websocket.policy import (
    ChangeFilters,
    ChangeIdentity,
    ClientPolicy,
    CloseConnection,
    Counters,
    HandshakePolicy,
    PublishEvent,
    Refusal,
    Replay,
    Reply,
    Settings,
)

SECRET = "policy-test-secret-0123456789abcdef"
AUTH = JWTAuth(SECRET)


def frame(**message: Any) -> str:
    return json.dumps(message)


def client(
    identity: Any = None, *, rates: RateLimits | None = None, max_patterns: int = 64
) -> ClientPolicy:
    settings = Settings(auth=AUTH, max_patterns=max_patterns, rates=rates or RateLimits(0))
    return ClientPolicy("c1", identity, settings=settings, counters=Counters())


def error_of(action: Any) -> tuple[str, Any]:
    assert isinstance(action, Reply) and action.message["type"] == "error", action
    return action.message["data"]["code"], action.message.get("id")


# Handshake


@pytest.mark.parametrize(
    ("origins", "hosts", "allowed"),
    [
        ([], ["x:1"], True),  # not a browser
        (["http://localhost:3000"], ["x:1"], True),
        (["http://127.0.0.1"], [], True),
        (["https://evil.example"], ["x:1"], False),
        (["https://lab.example"], ["lab.example"], True),  # the page this server served
        (["https://listed.example"], ["x:1"], True),
        (["http://localhost", "http://localhost"], ["x:1"], False),  # two Origin headers
    ],
)
def test_origins(origins: list[str], hosts: list[str], allowed: bool) -> None:
    gate = HandshakePolicy(auth=None, allowed_origins=["https://listed.example/"])
    if allowed:
        gate.check_origin(origins, hosts)
    else:
        with pytest.raises(Refusal, match="Unauthorized origin") as refusal:
            gate.check_origin(origins, hosts)
        assert refusal.value.code == 1008


def test_client_id_comes_from_the_token_then_the_query_then_a_fresh_one() -> None:
    gate = HandshakePolicy(auth=AUTH, allowed_origins=())
    identity = gate.identify(mint_token(SECRET, "dash", ["subscribe"]))
    assert gate.client_id({"client_id": ["other"]}, identity, lambda: "new") == "dash"
    assert gate.client_id({"client_id": ["mine"]}, None, lambda: "new") == "mine"
    assert gate.client_id({}, None, lambda: "new") == "new"
    with pytest.raises(Refusal, match="invalid client_id"):
        gate.client_id({"client_id": ["a b"]}, None, lambda: "new")


@pytest.mark.parametrize("raw", ["-1", "x", "²", "9" * 30, "1.5", ""])
def test_a_bad_resume_point_in_the_url_is_refused(raw: str) -> None:
    with pytest.raises(Refusal, match="last_seq must be an integer"):
        HandshakePolicy.resume({"last_seq": [raw]})


def test_a_resume_point_in_the_url() -> None:
    assert HandshakePolicy.resume({}) is None
    resume = HandshakePolicy.resume({"last_seq": ["7"], "epoch": ["e1"]})
    assert resume == protocol.Resume(7, "e1")


def test_tokens_and_the_first_frame() -> None:
    gate = HandshakePolicy(auth=AUTH, allowed_origins=())
    token = mint_token(SECRET, "c1", ["publish"])
    assert gate.token(f"Bearer {token}", {}) == token
    assert gate.token(None, {"token": [token]}) == token
    assert gate.token(None, {}) is None
    auth = gate.auth_frame(frame(type="auth", data={"token": token}, id=4))
    assert auth.token == token and auth.id == 4
    for bad in (frame(type="ping"), b"\x00", "not json"):
        with pytest.raises(Refusal, match="authentication required"):
            gate.auth_frame(bad)
    with pytest.raises(Refusal, match="neither 'subscribe' nor 'publish'"):
        gate.identify(mint_token(SECRET, "ops", ["admin"]))
    with pytest.raises(Refusal):
        gate.identify(token + "x")


def test_the_greeting_says_whether_every_seq_is_due() -> None:
    gate = HandshakePolicy(auth=AUTH, allowed_origins=())
    scoped = gate.identify(mint_token(SECRET, "c1", ["subscribe"], circles=[1]))
    common = {"seq": 3, "epoch": "e", "filters": protocol.Filters()}
    hello = gate.greeting("c1", None, all_events=True, **common)
    assert hello["type"] == "connection.established"
    assert hello["data"]["contiguous"] is True and hello["data"]["request_ids"] is True
    assert gate.greeting("c1", scoped, all_events=True, **common)["data"]["contiguous"] is False
    assert gate.greeting("c1", None, all_events=False, **common)["data"]["contiguous"] is False


# Messages


def test_every_message_gets_an_answer_with_its_id() -> None:
    policy = client()
    pong = policy.receive(frame(type="ping", id="p1"), 0.0)
    assert isinstance(pong, Reply) and pong.message["type"] == "pong" and pong.message["id"] == "p1"
    sub = policy.receive(frame(type="subscribe", id=2, data={"event_types": ["task.*"]}), 0.0)
    assert isinstance(sub, ChangeFilters) and sub.filters.event_types == ("task.*",)
    assert sub.reply["type"] == "subscribed" and sub.reply["id"] == 2
    unsub = policy.receive(frame(type="unsubscribe", id=3), 0.0)
    assert isinstance(unsub, ChangeFilters) and unsub.filters == protocol.Filters()
    resume = policy.receive(frame(type="resume", id=4, data={"since_seq": 5}), 0.0)
    assert isinstance(resume, Replay) and resume.resume.id == 4
    ack = policy.resumed(resume.resume, sent=2, gap=False, seq=9, epoch="e")
    assert ack["id"] == 4 and ack["data"] == {
        "count": 2,
        "since_seq": 5,
        "seq": 9,
        "epoch": "e",
        "gap": False,
    }


@pytest.mark.parametrize(
    ("text", "code", "echoed"),
    [
        ("not json", "invalid_json", None),
        (frame(type="nope", id=1), "unknown_type", 1),
        (frame(type="publish", id="x", data={"type": "Bad Type"}), "invalid_event_type", "x"),
        ('{"type":"publish","id":7,"data":{"type":"a.b","data":{"v":NaN}}}', "invalid_message", 7),
        (frame(type="publish", id=8, data={"type": "a.b", "data": {"s": "\ud800"}}), None, 8),
        (frame(type="subscribe", id=9, data={"event_types": ["a.b"] * 65}), None, 9),
        (frame(type="ping", id=[1]), "invalid_message", None),  # not a valid id: not echoed
    ],
)
def test_bad_messages_get_an_error_with_their_id(text: str, code: str | None, echoed: Any) -> None:
    policy = client()
    got_code, got_id = error_of(policy.receive(text, 0.0))
    if code is not None:
        assert got_code == code
    assert got_id == echoed
    assert sum(policy.counters.protocol_errors.values()) == 1


def test_too_many_patterns_is_too_large_with_the_servers_limit() -> None:
    policy = client(max_patterns=3)
    text = frame(type="subscribe", data={"event_types": ["a.b", "a.c", "a.d", "a.e"]})
    assert error_of(policy.receive(text, 0.0))[0] == "too_large"


def test_binary_frames_close_the_connection() -> None:
    assert client().receive(b"{}", 0.0) == CloseConnection(
        1003, "binary frames are not supported; send JSON text"
    )


def test_publish_becomes_an_event_and_its_ack() -> None:
    policy = client()
    action = policy.receive(
        frame(
            type="publish", id="q", data={"type": "task.created", "data": {"n": 1}, "circle_id": 2}
        ),
        0.0,
    )
    assert isinstance(action, PublishEvent) and action.request_id == "q"
    assert (action.event.type_name, action.event.circle_id, action.event.seq) == (
        "task.created",
        2,
        None,
    )
    action.event.seq = 11
    ack = policy.published(action)
    assert ack["type"] == "published" and ack["id"] == "q"
    assert ack["data"] == {"event_id": action.event.id, "seq": 11}
    refused = policy.published(action, ValueError("not strict JSON: NaN"))
    assert refused["data"]["code"] == "invalid_message" and refused["id"] == "q"


def test_roles_and_scopes_decide_what_a_token_may_do() -> None:
    gate = HandshakePolicy(auth=AUTH, allowed_origins=())
    reader = client(gate.identify(mint_token(SECRET, "c1", ["subscribe"], circles=[1])))
    publish = frame(type="publish", id=1, data={"type": "a.b", "circle_id": 1})
    assert error_of(reader.receive(publish, 0.0)) == ("forbidden", 1)
    writer = client(gate.identify(mint_token(SECRET, "c1", ["publish"], circles=[1])))
    assert isinstance(writer.receive(publish, 0.0), PublishEvent)
    outside = frame(type="publish", id=2, data={"type": "a.b", "circle_id": 2})
    assert error_of(writer.receive(outside, 0.0)) == ("forbidden", 2)
    assert error_of(writer.receive(frame(type="subscribe", id=3), 0.0)) == ("forbidden", 3)
    assert isinstance(writer.resume_from_url(protocol.Resume(0)), Reply)
    assert isinstance(reader.resume_from_url(protocol.Resume(0)), Replay)


def test_a_fresh_token_on_an_open_connection() -> None:
    gate = HandshakePolicy(auth=AUTH, allowed_origins=())
    policy = client(gate.identify(mint_token(SECRET, "c1", ["subscribe"], ttl=10)))
    fresh = mint_token(SECRET, "c1", ["subscribe", "publish"], ttl=3600)
    action = policy.receive(frame(type="auth", id=5, data={"token": fresh}), 0.0)
    assert isinstance(action, ChangeIdentity) and action.identity.has_role("publish")
    assert action.reply["type"] == "authenticated" and action.reply["id"] == 5
    assert policy.identity is action.identity
    other = mint_token(SECRET, "someone-else", ["subscribe"])
    assert error_of(policy.receive(frame(type="auth", data={"token": other}), 0.0))[0] == (
        "forbidden"
    )
    assert error_of(policy.receive(frame(type="auth", data={"token": "x.y.z"}), 0.0))[0] == (
        "unauthorized"
    )
    no_auth = ClientPolicy("c1", None, settings=Settings())
    assert error_of(no_auth.receive(frame(type="auth", data={"token": fresh}), 0.0))[0] == (
        "invalid_message"
    )


def test_publishes_past_the_rate_are_refused_and_counted() -> None:
    policy = client(rates=RateLimits(publish_rate=10, publish_burst=3))
    publish = frame(type="publish", data={"type": "a.b"})
    got = [policy.receive(publish, 0.0) for _ in range(5)]
    assert [isinstance(a, PublishEvent) for a in got] == [True, True, True, False, False]
    assert error_of(got[3])[0] == "rate_limited"
    assert policy.counters.publishes_rate_limited == 2
    assert isinstance(policy.receive(publish, 0.2), PublishEvent)  # 0.2 s refilled 2 tokens


def test_other_messages_past_their_rate_are_paced_not_dropped() -> None:
    policy = client(rates=RateLimits(publish_rate=10, publish_burst=2))  # messages: 20/s, 4
    delays = [policy.throttle(0.0) for _ in range(6)]
    assert delays[:4] == [0.0] * 4 and 0 < delays[4] < delays[5] <= 0.2
    assert policy.counters.messages_throttled == 2
    assert client().throttle(0.0) == 0.0  # no limit
