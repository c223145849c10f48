from __future__ import annotations

import enum
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

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


# Strict JSON (issue 8: poison input)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"x": float("nan")}, "not strict JSON"),
        ({"x": [float("inf")]}, "not strict JSON"),
        ({"x": -float("inf")}, "not strict JSON"),
        ({"x": "\ud800"}, "lone surrogate"),
        ({"\udfff": 1}, "lone surrogate"),
    ],
)
def test_encode_refuses_what_json_parse_would_not_take(data: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        protocol.encode({"type": "a.b", "data": data})


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_encode_bounds_depth_without_recursing_out() -> None:
    protocol.encode({"data": nested(protocol.MAX_DEPTH)})  # the envelope adds one level
    with pytest.raises(ValueError, match=f"more than {protocol.MAX_DEPTH + 1} levels"):
        protocol.encode({"data": nested(protocol.MAX_DEPTH + 1)})
    with pytest.raises(ValueError, match="levels deep"):  # not RecursionError
        protocol.encode({"data": nested(5000)})
    # Brackets inside strings are not nesting.
    protocol.encode({"data": {"text": "[" * 10_000}})


def test_encode_keeps_valid_unicode() -> None:
    assert protocol.encode({"s": "é😀\u2028"}) == '{"s":"é😀\u2028"}'.encode()


def publish_frame(data_json: str) -> str:
    return '{"type":"publish","data":{"type":"a.b","data":' + data_json + "}}"


@pytest.mark.parametrize(
    "data_json",
    [
        '{"x":NaN}',
        '{"x":Infinity}',
        '{"x":[-Infinity]}',
        '{"x":"\\ud800"}',
        '{"x":"a\\udc00b"}',
        '{"\\ud83d":1}',
        "[" * 2000 + "]" * 2000,
        '{"x":' + "[" * (protocol.MAX_DEPTH) + "]" * (protocol.MAX_DEPTH) + "}",
        '{"x":' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
    ids=["nan", "inf", "-inf", "surrogate", "low-surrogate", "surrogate-key", "deep", "65", "huge"],
)
def test_parse_refuses_non_strict_json_up_front(data_json: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_client_message(publish_frame(data_json))
    assert caught.value.code == "invalid_message"
    assert protocol.encode(protocol.error(caught.value.code, caught.value.message))


def test_parse_refuses_a_lone_surrogate_anywhere() -> None:
    frame = '{"type":"subscribe","data":{"circle_id":"\\ud800"}}'
    with pytest.raises(ProtocolError, match="surrogate"):
        protocol.parse_client_message(frame)


@pytest.mark.parametrize(
    "data_json",
    [
        '{"x":"\\ud83d\\ude00"}',  # a pair: fine
        '{"x":"\\\\ud800"}',  # an escaped backslash, then text
        '{"x":' + "[" * (protocol.MAX_DEPTH - 1) + "]" * (protocol.MAX_DEPTH - 1) + "}",
        '{"x":1e308,"y":-0.0}',
    ],
)
def test_parse_accepts_strict_json(data_json: str) -> None:
    message = protocol.parse_client_message(publish_frame(data_json))
    assert isinstance(message, protocol.Publish)
    protocol.encode({"data": message.data})


# Bounded subscriptions


def subscribe_frame(patterns: list[str]) -> str:
    return json.dumps({"type": "subscribe", "data": {"event_types": patterns}})


def test_subscribe_past_max_patterns_is_too_large() -> None:
    patterns = [f"p{i}.x" for i in range(75_000)]
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_client_message(subscribe_frame(patterns))
    assert caught.value.code == "too_large"
    assert "75000" in caught.value.message
    assert f"limit is {protocol.DEFAULT_MAX_PATTERNS}" in caught.value.message
    ok = protocol.parse_client_message(subscribe_frame(patterns[:64]))
    assert isinstance(ok, protocol.Subscribe) and len(ok.filters.event_types) == 64
    with pytest.raises(ProtocolError, match="limit is 3"):
        protocol.parse_client_message(subscribe_frame(patterns[:4]), max_patterns=3)


def test_long_patterns_and_types_are_refused() -> None:
    long = "a." + "b" * protocol.MAX_PATTERN_LENGTH
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_client_message(subscribe_frame([long]))
    assert caught.value.code == "too_large"
    assert str(protocol.MAX_PATTERN_LENGTH) in caught.value.message
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_client_message(json.dumps({"type": "publish", "data": {"type": long}}))
    assert caught.value.code == "invalid_event_type"
    assert protocol.check_pattern("a." + "b" * (protocol.MAX_PATTERN_LENGTH - 2))


class CountingSet(frozenset[str]):
    """A frozenset that counts membership tests."""

    lookups = 0

    def __contains__(self, item: object) -> bool:
        CountingSet.lookups += 1
        return super().__contains__(item)


@pytest.mark.parametrize("count", [1, 64, 100_000])
def test_type_matches_looks_up_prefixes_not_patterns(count: int) -> None:
    patterns = CountingSet([f"p{i}.x" for i in range(count - 1)] + ["task.*"])
    CountingSet.lookups = 0
    assert protocol.type_matches(patterns, "task.conflict.detected")
    assert not protocol.type_matches(patterns, "agent.task.assigned")
    # "*", the type, then one "prefix.*" per dot: the same for 1 or 100,000 patterns.
    assert CountingSet.lookups <= 2 * (2 + 2)


def test_filters_match_through_a_frozenset() -> None:
    filters = protocol.Filters(tuple(f"p{i}.*" for i in range(64)) + ("task.created",))
    assert isinstance(filters._types, frozenset)
    assert filters.matches("p63.a.b") and filters.matches("task.created")
    assert not filters.matches("task.created.more") and not filters.matches("p640.a")
    assert filters == protocol.Filters(filters.event_types)  # still a value (group key)
    assert hash(filters) == hash(protocol.Filters(filters.event_types))


@pytest.mark.parametrize(
    ("patterns", "type_name", "expected"),
    [
        (["*"], "a.b", True),
        (["a.*"], "a.b.c", True),
        (["a.b.*"], "a.b.c", True),
        (["a.b.*"], "a.b", False),
        (["a.b"], "a.bc", False),
        (["a.*"], "ab.c", False),
        (["b.*"], "a.b.c", False),
    ],
)
def test_one_type_matching_rule(patterns: list[str], type_name: str, expected: bool) -> None:
    assert protocol.type_matches(patterns, type_name) is expected
    assert protocol.type_matches(frozenset(patterns), type_name) is expected
    assert protocol.Filters(tuple(patterns)).matches(type_name) is expected
    assert (type_name in protocol.matching_patterns(type_name)) is True
    assert any(p in protocol.matching_patterns(type_name) for p in patterns) is expected


# One id-equality rule


class Circle(enum.IntEnum):
    ONE = 1


class Name(str, enum.Enum):
    ONE = "1"


ID_CASES = [
    (1, 1, True),
    ("1", "1", True),
    ("a", "a", True),
    (1, "1", False),
    ("1", 1, False),
    (1, True, False),
    (1, 1.0, False),
    (1, None, False),
    (1, Circle.ONE, True),
    ("1", Name.ONE, True),
    (1, [1], False),
]


@pytest.mark.parametrize(("wanted", "value", "expected"), ID_CASES)
def test_ids_compare_exactly_everywhere(wanted: Any, value: Any, expected: bool) -> None:
    from gathering_lab.auth import Scope
    from gathering_lab.events import Event
    from gathering_lab.listen import event_matches

    assert protocol.same_id(wanted, value) is expected
    assert protocol.Filters(circle_id=wanted).matches("a.b", value, None) is expected
    assert protocol.Filters(project_id=wanted).matches("a.b", None, value) is expected
    # client side: gathering-lab listen, LabClient (Filters.matches on the message)
    assert (
        event_matches(protocol.Filters(circle_id=wanted), {"type": "a.b", "circle_id": value})
        is expected
    )
    # server side: token scopes and the bus's history filters
    assert Scope(frozenset([wanted])).allows_ids(value, None) is expected
    if not isinstance(value, list):
        assert Event("a.b", circle_id=value).matches_filter(circle_id=wanted) is expected
