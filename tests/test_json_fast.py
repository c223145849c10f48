"""orjson on the hot paths (issue 11, item 3): the same bytes and the same strict rules.

:func:`protocol.encode` writes with orjson and falls back to the standard library (the
reference, ``protocol._encode_stdlib``) for what orjson refuses; :func:`protocol.decode`,
:func:`protocol.loads` and :func:`protocol.parse_client_message` parse with orjson and
fall back likewise. These tests hold the fast path to the reference: byte for byte over
generated envelopes, and rule for rule on NaN, Infinity, lone surrogates, depth and
integers past 64 bits (which orjson alone would refuse to write, or read as floats).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gathering_lab import protocol
from gathering_lab.client import LabClient, connect
from gathering_lab.events import Event, EventBus
from gathering_lab.exceptions import ProtocolError
from gathering_lab.testing import recv_until, timeout, wait_for
from gathering_lab.websocket import Server

reference = protocol._encode_stdlib
MAX = MAX_DEPTH_ENVELOPE = protocol.MAX_DEPTH + 1


def _stdlib(message: Any) -> bytes:
    return reference(message, MAX)


# Strategies: what a publisher may put in an event, and the envelopes around it.

KEYS = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=16)
INTS = st.integers() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
SCALARS = st.none() | st.booleans() | INTS | TEXT
FLOATS = st.floats(allow_nan=False, allow_infinity=False)


def _json(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
        max_leaves=20,
    )


IDS = st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | TEXT.filter(bool)
WORD = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)
TYPES = st.lists(WORD, min_size=2, max_size=4).map(".".join)
MOMENTS = st.datetimes(
    min_value=datetime(1000, 1, 1), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)
)


@st.composite
def events(draw: st.DrawFn, leaves: st.SearchStrategy[Any] = SCALARS) -> Event:
    event = Event(
        type=draw(TYPES),
        data=draw(st.dictionaries(KEYS, _json(leaves), max_size=5)),
        source_agent_id=draw(IDS),
        circle_id=draw(IDS),
        project_id=draw(IDS),
        timestamp=draw(MOMENTS),
    )
    event.seq = draw(st.none() | st.integers(min_value=1, max_value=2**63 - 1))
    event.epoch = draw(st.none() | st.text("0123456789abcdef", min_size=12, max_size=12))
    return event


# Byte-identical output


@settings(max_examples=400)
@given(events())
def test_event_envelopes_are_byte_identical_to_the_stdlib_encoding(event: Event) -> None:
    wire = event.encoded()
    assert wire == _stdlib(event.to_dict())
    assert wire.startswith(b'{"type":"' + event.type_name.encode() + b'","data":')
    timestamp = json.loads(wire)["timestamp"]
    assert timestamp.endswith("Z") and len(timestamp) == len("2024-01-15T10:30:00.123456Z")


@settings(max_examples=300)
@given(_json(SCALARS))
def test_any_json_value_without_floats_encodes_to_the_same_bytes(value: Any) -> None:
    message = {"type": "x.y", "data": value}
    assert protocol.encode(message) == _stdlib(message)


_NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _numbers_as_floats(raw: bytes) -> bytes:
    """Every number-like token respelled as Python's float repr (the same on both sides)."""
    return _NUMBER.sub(lambda m: repr(float(m.group())).encode(), raw)


@settings(max_examples=300)
@given(_json(SCALARS | FLOATS))
def test_floats_may_be_spelled_differently_but_are_the_same_numbers(value: Any) -> None:
    message = {"type": "x.y", "data": value}
    fast, slow = protocol.encode(message), _stdlib(message)
    assert json.loads(fast) == json.loads(slow)
    # Where the bytes differ, it is only in how numbers are spelled.
    assert _numbers_as_floats(fast) == _numbers_as_floats(slow)


@pytest.mark.parametrize(
    ("number", "fast", "stdlib"),
    [(1e-7, b"1e-7", b"1e-07"), (1e-5, b"0.00001", b"1e-05"), (1e16, b"1e+16", b"1e+16")],
)
def test_the_known_float_spellings(number: float, fast: bytes, stdlib: bytes) -> None:
    """The difference the docs state (design-notes, "JSON"): the same double, other text."""
    assert protocol.encode({"x": number}) == b'{"x":' + fast + b"}"
    assert _stdlib({"x": number}) == b'{"x":' + stdlib + b"}"
    assert json.loads(fast) == json.loads(stdlib) == number


@settings(max_examples=300)
@given(MOMENTS | st.datetimes(timezones=st.timezones()))
def test_timestamps_are_the_isoformat_text(moment: datetime) -> None:
    expected = moment.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"
    assert protocol.format_timestamp(moment) == expected


def test_timestamps_keep_six_digits_when_the_microseconds_are_zero() -> None:
    moment = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
    assert protocol.format_timestamp(moment) == "2024-01-15T10:30:00.000000Z"
    assert protocol.format_timestamp(moment.replace(microsecond=7)) == (
        "2024-01-15T10:30:00.000007Z"
    )
    paris = timezone(timedelta(hours=1))
    assert protocol.format_timestamp(datetime(2024, 1, 15, 11, 30, 0, 5, tzinfo=paris)) == (
        "2024-01-15T10:30:00.000005Z"
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        protocol.format_timestamp(datetime(2024, 1, 15))


@dataclasses.dataclass
class Point:
    x: int


def test_objects_json_has_no_type_for_are_written_as_before() -> None:
    """str() for datetimes, dataclasses, sets, Decimals; numbers for float subclasses."""

    class Ratio(float):
        pass

    data = {
        "when": datetime(2024, 1, 15, 10, 30, tzinfo=UTC),
        "point": Point(1),
        "tags": {"a"},
        "price": Decimal("1.10"),
        "ratio": Ratio(0.5),
        "ints": (1, 2),
        1: "int key",
        None: "null key",
    }
    message = {"type": "x.y", "data": data}
    assert protocol.encode(message) == _stdlib(message)
    assert json.loads(protocol.encode(message))["data"]["ratio"] == 0.5


# The strict rules, on the fast path


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "where",
    [
        lambda bad: {"x": bad},
        lambda bad: {"x": None, "y": [None, bad]},  # nulls around it: the count must not hide it
        lambda bad: {"a": {"b": [1, {"c": bad}]}},
        lambda bad: {"null": "null", "x": [bad]},  # "null" in strings: still caught
    ],
)
def test_nan_and_infinity_are_refused_not_written_as_null(where: Any, bad: float) -> None:
    """orjson alone writes NaN and Infinity as null; encode() must refuse them instead."""
    message = {"type": "x.y", "data": where(bad), "circle_id": None}
    with pytest.raises(ValueError, match="not strict JSON"):
        protocol.encode(message)
    bus = EventBus()
    with pytest.raises(ValueError, match="cannot be sent"):
        bus.publish_nowait(Event(type="x.y", data=where(bad)))
    assert bus.get_stats()["events_rejected"] == 1 and bus.last_seq == 0


def test_a_numpy_nan_is_refused_too() -> None:
    numpy = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match="not strict JSON"):
        protocol.encode({"type": "x.y", "data": {"x": numpy.float64("nan")}})
    assert protocol.encode({"data": {"x": numpy.float64(0.5)}}) == b'{"data":{"x":0.5}}'


def test_nulls_in_strings_and_nested_nones_still_encode() -> None:
    message = {"type": "x.y", "data": {"a": [None, {"b": None}], "s": "null null"}}
    assert protocol.encode(message) == _stdlib(message)


def test_lone_surrogates_are_refused_on_the_way_out_and_in() -> None:
    with pytest.raises(ValueError, match="lone surrogate"):
        protocol.encode({"type": "x.y", "data": {"x": "a\ud800"}})
    with pytest.raises(ValueError, match="lone surrogate"):
        protocol.encode({"type": "x.y", "data": {"a\udc00": 1}})
    for frame in ('{"type":"x.y","v":"\\ud800"}', '{"type":"x.y","v":"\ud800"}'):
        with pytest.raises(ProtocolError) as raised:
            protocol.decode(frame)
        assert raised.value.code == "invalid_json"
        with pytest.raises(ProtocolError) as raised:
            protocol.parse_client_message(frame.replace("x.y", "ping"))
        assert raised.value.code == "invalid_message"
    assert protocol.decode('{"type":"x.y","v":"\\ud83d\\ude00"}')["v"] == "\U0001f600"


def test_depth_is_bounded_on_the_way_out() -> None:
    deep: Any = 1
    for _ in range(protocol.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ValueError, match="nested more than"):
        protocol.encode({"type": "x.y", "data": {"d": deep}})
    very_deep: Any = 1
    for _ in range(300):  # past orjson's own limit: the reference path answers
        very_deep = {"a": very_deep}
    with pytest.raises(ValueError, match="nested more than"):
        protocol.encode({"type": "x.y", "data": very_deep})


def test_the_client_decoder_refuses_nan_and_infinity() -> None:
    """The old decoder took them; a server sending them is now reported, not believed."""
    for frame in (
        b'{"type":"x.y","v":NaN}',
        b'{"type":"x.y","v":-Infinity}',
        b'{"type":"x.y","v":1e999}',
    ):
        with pytest.raises(ProtocolError) as raised:
            protocol.decode(frame)
        assert raised.value.code == "invalid_json"
    with pytest.raises(ProtocolError) as raised:
        protocol.decode(b"[1]")
    assert raised.value.code == "invalid_message"


# Integers past 64 bits: carried exactly, never turned into floats


BIG = [2**64, 2**70, -(2**63) - 1, -(2**100), 10**30]


@pytest.mark.parametrize("number", BIG)
def test_big_ints_are_encoded_exactly(number: int) -> None:
    """orjson refuses them (TypeError): the reference path writes them, as before."""
    message = {"type": "x.y", "data": {"n": number}}
    assert protocol.encode(message) == _stdlib(message)
    assert str(number).encode() in protocol.encode(message)


@pytest.mark.parametrize("number", BIG)
def test_big_ints_are_decoded_exactly(number: int) -> None:
    """orjson alone would read them as floats, silently: loads() keeps the exact int."""
    frame = f'{{"type":"x.y","data":{{"n":{number}}}}}'
    for raw in (frame, frame.encode()):
        assert protocol.decode(raw)["data"]["n"] == number
        assert type(protocol.loads(raw)["data"]["n"]) is int
        publish = protocol.parse_client_message(
            f'{{"type":"publish","data":{{"type":"x.y","data":{{"n":{number}}}}}}}'
        )
        assert isinstance(publish, protocol.Publish) and publish.data == {"n": number}


def test_64_bit_edges_and_long_digit_strings() -> None:
    for number in (2**64 - 1, 2**63 - 1, -(2**63), -(2**63) - 1, -(10**19) + 1, 10**19):
        assert protocol.decode(f'{{"type":"x.y","n":{number}}}')["n"] == number
    # 20 digits in a string or a float's fraction take the exact path and parse the same.
    frame = '{"type":"x.y","s":"12345678901234567890123","f":0.12345678901234567891}'
    assert protocol.decode(frame) == json.loads(frame)


def test_nanosecond_timestamps_stay_on_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """time.time_ns() has 19 digits: within 64 bits, so orjson reads it exactly itself."""

    def refuse(*args: Any) -> Any:
        raise AssertionError("took the standard library's path")

    monkeypatch.setattr(protocol, "_parse_stdlib", refuse)
    monkeypatch.setattr(protocol, "loads", refuse)
    sent_ns = 1_764_489_600_123_456_789
    frame = f'{{"type":"publish","data":{{"type":"a.b","data":{{"sent_ns":{sent_ns}}}}}}}'
    publish = protocol.parse_client_message(frame)
    assert isinstance(publish, protocol.Publish) and publish.data == {"sent_ns": sent_ns}
    assert protocol.decode(f'{{"type":"x.y","n":{sent_ns},"m":-{sent_ns // 10}}}')["n"] == sent_ns


@pytest.mark.parametrize(
    "frame",
    [
        b'{"type":"ping","id":"a"}',
        b'{"type":"publish","id":7,"data":{"type":"task.created","data":{"x":[1,2.5,null]}}}',
        b'{"type":"subscribe","data":{"event_types":["task.*"],"circle_id":1}}',
        '{"type":"publish","data":{"type":"a.b","data":{"t":"caf\u00e9 \U0001f600"}}}',
        b'{"type":"resume","data":{"since_seq":3,"epoch":"e"}}',
    ],
)
def test_client_messages_parse_the_same_on_both_paths(frame: str | bytes) -> None:
    assert protocol.parse_client_message(frame) == protocol._parse_stdlib(frame, 64)


# Over real sockets


async def test_a_big_int_goes_through_server_and_client_exactly(
    server: Server, bus: EventBus
) -> None:
    """Published over the wire, carried by the bus, decoded by LabClient: still the int."""
    client: LabClient = await connect(server.url, "big", base_delay=0.05)
    try:
        ack = await client.publish("task.created", {"n": 2**70, "m": -(2**64), "f": 0.5})
        assert ack is not None
        await client.wait_for_events(1, timeout(5))
        row = client.frame.df.iloc[-1]
        assert row["data"] == {"n": 2**70, "m": -(2**64), "f": 0.5}
        assert bus.get_history()[0].data["n"] == 2**70
    finally:
        await client.close()


async def test_nan_published_over_the_wire_is_refused(server: Server, bus: EventBus) -> None:
    """The poison of issue 8 still gets invalid_message with orjson on the way in and out."""
    from websockets.asyncio.client import connect as ws_connect

    async with ws_connect(server.url) as ws:
        await recv_until(ws, lambda m: m["type"] == "connection.established")
        for value in ("NaN", "1e999", "-Infinity"):
            data = '{"x":[null,' + value + "]}"
            await ws.send('{"type":"publish","id":"p","data":{"type":"a.b","data":' + data + "}}")
            reply = (await recv_until(ws, lambda m: m["type"] in ("error", "published")))[-1]
            assert reply["data"]["code"] == "invalid_message" and reply["id"] == "p"
    assert bus.last_seq == 0


# LabClient's direct delivery (connection.DispatchConnection)


def _envelope(seq: int) -> str:
    event = Event(type="task.created", data={"n": seq})
    event.seq, event.epoch = seq, "e1"
    return event.encoded().decode()


async def _scripted_server(script: Any) -> Any:
    """A websockets server that greets like ours, then runs ``script(ws)``."""
    from websockets.asyncio.server import serve as ws_serve

    async def handler(ws: Any) -> None:
        greeting = protocol.connection_established("c", seq=0, epoch="e1", request_ids=True)
        await ws.send(protocol.encode(greeting).decode())
        await script(ws)
        await ws.wait_closed()

    return ws_serve(handler, "127.0.0.1", 0)


async def test_events_reach_the_frame_straight_from_the_parse_loop(
    server: Server, bus: EventBus
) -> None:
    """The fast path is taken (not only the queue): an upgrade of websockets that broke
    the hook would show here first."""
    client = await connect(server.url, "direct", base_delay=0.05, heartbeat=None)
    try:
        for n in range(50):
            await bus.publish(Event(type="task.created", data={"n": n}))
        await client.wait_for_events(50, timeout(5))
        assert list(client.frame.df["seq"]) == list(range(1, 51))
        assert client._ws is not None and client._ws.dispatched >= 50  # type: ignore[attr-defined]
    finally:
        await client.close()


async def test_fragmented_and_queued_messages_keep_their_order() -> None:
    """A fragmented message goes through websockets' queue; those after it wait their turn."""

    def frame(first: int, payload: str) -> bytes:  # an unmasked frame, as a server sends
        data = payload.encode()
        assert len(data) < 65536
        length = bytes((len(data),)) if len(data) < 126 else b"\x7e" + len(data).to_bytes(2)
        return bytes((first,)) + length + data

    async def script(ws: Any) -> None:
        ping = json.loads(await ws.recv())  # the client is in its read loop by now
        text = _envelope(2)
        # One write, so the client parses them all in one go: 1 whole; 2 in three
        # fragments (TEXT without FIN, CONT, CONT with FIN); then 3 to 7 whole.
        burst = frame(0x81, protocol.encode(protocol.pong(ping["id"])).decode())
        burst += frame(0x81, _envelope(1))
        burst += frame(0x01, text[:10]) + frame(0x00, text[10:30]) + frame(0x80, text[30:])
        burst += b"".join(frame(0x81, _envelope(seq)) for seq in range(3, 8))
        ws.transport.write(burst)

    async with await _scripted_server(script) as fake:
        port = next(iter(fake.sockets)).getsockname()[1]
        client = await connect(f"ws://127.0.0.1:{port}/ws/dashboard", "order", heartbeat=None)
        try:
            await client.ping()
            await client.wait_for_events(7, timeout(5))
            assert list(client.frame.df["seq"]) == list(range(1, 8))
            assert client.gaps == 0 and client.duplicates == 0
        finally:
            await client.close()


async def test_a_text_frame_that_is_not_utf8_still_closes_with_1007() -> None:
    closed: list[Any] = []

    async def script(ws: Any) -> None:
        await ws.send(_envelope(1))
        ws.transport.write(b"\x81\x02\xff\xfe")  # an unmasked text frame: invalid UTF-8
        await ws.wait_closed()
        closed.append(ws.close_code)  # what the client sent

    async with await _scripted_server(script) as fake:
        port = next(iter(fake.sockets)).getsockname()[1]
        client = LabClient(f"ws://127.0.0.1:{port}/ws/dashboard", "utf8", reconnect=False)
        await client.connect()
        try:
            await client.wait_for_events(1, timeout(5))
            await client.wait_for_status("disconnected", timeout(5))
            # websockets failed the connection itself, as without direct delivery.
            await wait_for(lambda: closed, timeout(5))
            assert closed == [1007]
            assert len(client.frame) == 1
        finally:
            await client.close()


def test_encoded_events_do_not_keep_orjson_s_whole_buffer() -> None:
    """orjson (3.12 and later) hands back bytes that keep a 4 KiB buffer, however short the
    JSON; a history of 10,000 small events would hold 40 MiB instead of 3."""
    import tracemalloc

    bus = EventBus()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(500):
            bus.publish_nowait(Event(type="task.created", data={"n": n}))
        held = (tracemalloc.get_traced_memory()[0] - before) / 500
    finally:
        tracemalloc.stop()
    wire = len(bus.get_history(limit=1)[0].encoded())
    assert held < wire + 1500, f"{held:.0f} bytes held per event of {wire} bytes of JSON"
