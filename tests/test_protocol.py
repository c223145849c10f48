from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gathering_lab import protocol
from gathering_lab.exceptions import ProtocolError


def test_timestamps_are_utc_with_z_and_microseconds() -> None:
    moment = datetime(2024, 1, 15, 10, 30, 0, 123456, tzinfo=UTC)
    assert protocol.format_timestamp(moment) == "2024-01-15T10:30:00.123456Z"
    paris = moment.astimezone(timezone(timedelta(hours=1)))
    assert protocol.format_timestamp(paris) == "2024-01-15T10:30:00.123456Z"
    assert protocol.format_timestamp().endswith("Z")


def test_naive_timestamp_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        protocol.format_timestamp(datetime(2024, 1, 1))


@pytest.mark.parametrize(
    "text",
    ["2024-01-15T10:30:00Z", "2024-01-15T10:30:00.123456Z", "2024-01-15T11:30:00+01:00"],
)
def test_parse_timestamp_accepts_the_guides_forms(text: str) -> None:
    assert protocol.parse_timestamp(text).replace(microsecond=0) == datetime(
        2024, 1, 15, 10, 30, tzinfo=UTC
    )


def test_parse_timestamp_names_bad_value() -> None:
    with pytest.raises(ValueError, match="'yesterday'"):
        protocol.parse_timestamp("yesterday")


def test_event_ids_are_unique_and_prefixed() -> None:
    ids = {protocol.new_event_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("evt_") and len(i) == 28 for i in ids)


def test_server_messages_start_with_type() -> None:
    hello = protocol.connection_established("test-cli", seq=3)
    assert list(hello) == ["type", "data", "timestamp"]
    assert hello["data"] == {
        "client_id": "test-cli",
        "message": "Connected to GatheRing WebSocket",
        "seq": 3,
    }
    assert protocol.pong()["type"] == "pong"
    assert protocol.pong(7)["id"] == 7
    assert "id" not in protocol.pong()
    err = protocol.error("invalid_json", "bad")
    assert err["data"] == {"code": "invalid_json", "message": "bad"}
    with pytest.raises(ValueError, match="unknown error code"):
        protocol.error("oops", "x")


def test_encode_is_compact_utf8_and_decode_round_trips() -> None:
    raw = protocol.encode({"type": "x.y", "data": {"name": "Zoé"}})
    assert raw == '{"type":"x.y","data":{"name":"Zoé"}}'.encode()
    assert protocol.decode(raw) == {"type": "x.y", "data": {"name": "Zoé"}}
    with pytest.raises(ProtocolError) as info:
        protocol.decode(b"[1]")
    assert info.value.code == "invalid_message"


@pytest.mark.parametrize("value", ["task.created", "a.b", "deploy.finished_ok", "x.y.z9"])
def test_valid_event_types(value: str) -> None:
    assert protocol.check_event_type(value) == value


@pytest.mark.parametrize("value", ["task", "Task.Created", "task..x", ".task", "task.", "t-x.y", 5])
def test_invalid_event_types(value: object) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.check_event_type(value)
    assert info.value.code == "invalid_event_type"


def parse(message: object) -> protocol.ClientMessage:
    return protocol.parse_client_message(json.dumps(message))


def test_parse_ping() -> None:
    assert parse({"type": "ping"}) == protocol.Ping()
    assert parse({"type": "ping", "id": "a1"}) == protocol.Ping("a1")


def test_parse_publish() -> None:
    message = parse(
        {
            "type": "publish",
            "data": {"type": "task.created", "data": {"x": 1}, "circle_id": 2},
        }
    )
    assert message == protocol.Publish("task.created", {"x": 1}, None, 2, None)


def test_parse_subscribe_and_unsubscribe() -> None:
    message = parse({"type": "subscribe", "data": {"event_types": ["task.*"], "circle_id": 1}})
    assert message == protocol.Subscribe(protocol.Filters(("task.*",), 1, None))
    assert parse({"type": "subscribe", "data": {}}) == protocol.Subscribe(protocol.Filters())
    everything = parse({"type": "subscribe", "data": {"event_types": ["task.*", "*"]}})
    assert isinstance(everything, protocol.Subscribe)
    assert everything.filters.event_types == ("*",)
    assert parse({"type": "unsubscribe"}) == protocol.Unsubscribe()


def test_parse_resume_and_auth() -> None:
    assert parse({"type": "resume", "data": {"since_seq": 5, "epoch": "e"}}) == protocol.Resume(
        5, "e"
    )
    auth = parse({"type": "auth", "data": {"token": "secret-token"}})
    assert isinstance(auth, protocol.Auth)
    assert "secret-token" not in repr(auth)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_json"),
        ('{"data": {}}', "invalid_message"),
        ('{"type": 3}', "invalid_message"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "publish", "data": []}', "invalid_message"),
        ('{"type": "publish", "data": {}}', "invalid_message"),
        ('{"type": "publish", "data": {"type": "Nope"}}', "invalid_event_type"),
        ('{"type": "publish", "data": {"type": "a.b", "data": [1]}}', "invalid_message"),
        ('{"type": "publish", "data": {"type": "a.b", "circle_id": [1]}}', "invalid_message"),
        ('{"type": "subscribe", "data": {"event_types": []}}', "invalid_message"),
        ('{"type": "subscribe", "data": {"event_types": ["TASK"]}}', "invalid_message"),
        ('{"type": "subscribe", "data": {"colour": "red"}}', "invalid_message"),
        ('{"type": "resume", "data": {"since_seq": -1}}', "invalid_message"),
        ('{"type": "resume", "data": {"since_seq": true}}', "invalid_message"),
        ('{"type": "auth", "data": {}}', "invalid_message"),
    ],
)
def test_bad_client_messages_raise_precise_codes(frame: str, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_client_message(frame)
    assert info.value.code == code
    assert info.value.code in protocol.ERROR_CODES
    assert str(info.value)


def test_unknown_type_message_names_the_type_and_is_bounded() -> None:
    with pytest.raises(ProtocolError, match="'dance'"):
        protocol.parse_client_message('{"type": "dance"}')
    with pytest.raises(ProtocolError) as info:
        protocol.parse_client_message(json.dumps({"type": "x" * 10000}))
    assert len(info.value.message) < 300


@pytest.mark.parametrize(
    "message",
    [
        protocol.Ping(),
        protocol.Ping("p1"),
        protocol.Subscribe(protocol.Filters(("task.*",), 1, None)),
        protocol.Unsubscribe(),
        protocol.Publish("task.created", {"x": 1}, 2, 3, 4),
        protocol.Resume(7, "e1"),
        protocol.Auth("t0ken"),
    ],
)
def test_client_messages_round_trip(message: protocol.ClientMessage) -> None:
    assert protocol.parse_client_message(protocol.encode(message.to_message())) == message


def test_building_a_publish_checks_its_type() -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.Publish("Bad Type", {}).to_message()
    assert info.value.code == "invalid_event_type"


@pytest.mark.parametrize(
    ("patterns", "type_name", "expected"),
    [
        (("*",), "agent.started", True),
        (("task.*",), "task.conflict.detected", True),
        (("task.*",), "taskx.created", False),
        (("task.created",), "task.created", True),
        (("task.created",), "task.created.extra", False),
        (("agent.*", "task.created"), "task.created", True),
    ],
)
def test_type_matches(patterns: tuple[str, ...], type_name: str, expected: bool) -> None:
    assert protocol.type_matches(patterns, type_name) is expected


def test_filters_match_type_circle_and_project() -> None:
    filters = protocol.Filters(("task.*",), circle_id=1, project_id=None)
    assert filters.matches("task.created", 1, 99)
    assert not filters.matches("task.created", 2, 99)
    assert not filters.matches("agent.started", 1, 99)
    assert protocol.Filters().matches("anything.at.all")
