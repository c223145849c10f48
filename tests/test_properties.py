"""Property-based tests (hypothesis) of the wire protocol, pure and over real sockets.

Pure: :func:`protocol.parse_client_message` over arbitrary text, bytes and JSON-ish
structures (valid messages of every type, mutated ones, deep nesting, lone
surrogates, NaN and infinities, huge lists, wrong types) returns one of the message
classes or raises ProtocolError with a code in ERROR_CODES, never anything else;
valid messages round-trip; every server message built from parsed input is strict
JSON (RFC 8259 plus I-JSON's "no lone surrogates": what a browser's ``JSON.parse``
and every other client can take).

Sockets: one server for the module (port 0, its own EventBus and ConnectionManager);
per example a client sends a generated sequence of text frames, valid and invalid,
each with its own request ``id``, and a separate watcher reads everything. Every text
frame gets exactly one answer (ack, pong, error or resumed) carrying its ``id``
(DESIGN.md section 7), the connection stays open through recoverable errors, and the
watcher receives every event acked as published exactly once, in ``seq`` order, all
strict JSON (issue 8, item 1).

The example counts come from the hypothesis profile (tests/conftest.py): derandomized
in CI; ``HYPOTHESIS_PROFILE=dev`` for random runs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from gathering_lab import protocol
from gathering_lab.events import Event, EventBus, EventType
from gathering_lab.exceptions import ProtocolError
from gathering_lab.protocol import ERROR_CODES, parse_client_message
from gathering_lab.testing import timeout
from gathering_lab.websocket import ConnectionManager, Server, serve

MESSAGE_CLASSES = (
    protocol.Ping,
    protocol.Subscribe,
    protocol.Unsubscribe,
    protocol.Publish,
    protocol.Resume,
    protocol.Auth,
)
REPLY_TYPES = frozenset({"pong", "error", "published", "subscribed", "resumed", "authenticated"})
#: An error's text names the bad value, but must not echo a megabyte back (issue 8, item 4).
MAX_ERROR_TEXT = 2048


# Strict JSON


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-JSON constant {name}")


def _lone_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def assert_strict_json(raw: bytes | str) -> Any:
    """Parse ``raw`` as strict JSON (UTF-8, no NaN/Infinity, no lone surrogates); return it."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8")  # a str holding a lone surrogate fails here
    text = raw.decode("utf-8")  # strict: no invalid UTF-8 (nor surrogates encoded in it)
    value = json.loads(text, parse_constant=_refuse_constant)
    stack = [value]
    while stack:  # iterative: a deep value must not blow the test's own stack
        item = stack.pop()
        if isinstance(item, str):
            assert not _lone_surrogate(item), f"lone surrogate in {item!r}"
        elif isinstance(item, dict):
            for key, child in item.items():
                assert not _lone_surrogate(key), f"lone surrogate in key {key!r}"
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, float):
            assert math.isfinite(item)
    return value


def test_the_strict_json_check_refuses_what_browsers_cannot_take() -> None:
    """The oracle itself: each of the issue's poison forms fails it (else nothing is proven)."""
    for bad in (b'{"x":NaN}', b'{"x":-Infinity}', b'{"x":"\\ud800"}', b'{"x":"\xed\xa0\x80"}'):
        with pytest.raises((ValueError, AssertionError)):
            assert_strict_json(bad)
    with pytest.raises(UnicodeEncodeError):
        assert_strict_json('{"x":"\ud800"}')
    assert assert_strict_json(b'{"x":"\\ud83d\\ude00","y":[1.5,null]}') == {
        "x": "\U0001f600",
        "y": [1.5, None],
    }


# Strategies


def _characters() -> st.SearchStrategy[str]:
    # Text with lone surrogates now and then, as a JSON \\uXXXX escape can carry them.
    return st.characters() | st.characters(categories=["Cs"])


ANY_TEXT = st.text(_characters(), max_size=12)
SAFE_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
WORD = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)
EVENT_TYPES = st.lists(WORD, min_size=2, max_size=4).map(".".join) | st.sampled_from(
    [t.value for t in EventType]
)
PATTERNS = (
    st.just("*")
    | EVENT_TYPES
    | st.lists(WORD, min_size=1, max_size=3).map(lambda words: ".".join(words) + ".*")
)
SCOPE_IDS = (
    st.none()
    | st.integers(-(2**53), 2**53)
    | st.text(st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=16)
)
REQUEST_IDS = (
    st.none() | st.integers(0, 2**31) | st.from_regex(r"[A-Za-z0-9_-]{1,16}", fullmatch=True)
)

#: JSON values as a strict encoder emits them: what a valid publish carries.
STRICT_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | SAFE_TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(SAFE_TEXT, children, max_size=4)
    ),
    max_leaves=20,
)
#: Anything Python's json module writes: NaN, +-Infinity, lone surrogates, huge integers.
ANY_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(ANY_TEXT, children, max_size=4)
    ),
    max_leaves=20,
)


def _with_id(message: dict[str, Any], request_id: Any) -> dict[str, Any]:
    return message if request_id is None else {**message, "id": request_id}


MESSAGE_KINDS = ("ping", "subscribe", "unsubscribe", "publish", "resume", "auth")


@st.composite
def valid_messages(draw: st.DrawFn, kinds: tuple[str, ...] = MESSAGE_KINDS) -> dict[str, Any]:
    """A client message the protocol accepts, of one of ``kinds`` (as a dict)."""
    kind = draw(st.sampled_from(kinds))
    request_id = draw(REQUEST_IDS)
    if kind == "ping":
        return _with_id({"type": "ping"}, request_id)
    if kind == "unsubscribe":
        return _with_id({"type": "unsubscribe"}, request_id)
    if kind == "subscribe":
        data: dict[str, Any] = {}
        if draw(st.booleans()):
            data["event_types"] = draw(st.lists(PATTERNS, min_size=1, max_size=5))
        for key in ("circle_id", "project_id"):
            if draw(st.booleans()):
                data[key] = draw(SCOPE_IDS)
        return _with_id({"type": "subscribe", "data": data}, request_id)
    if kind == "publish":
        event: dict[str, Any] = {"type": draw(EVENT_TYPES)}
        if draw(st.booleans()):
            event["data"] = draw(st.dictionaries(SAFE_TEXT, STRICT_VALUES, max_size=5))
        for key in ("source_agent_id", "circle_id", "project_id"):
            if draw(st.booleans()):
                event[key] = draw(SCOPE_IDS)
        return _with_id({"type": "publish", "data": event}, request_id)
    if kind == "resume":
        data = {"since_seq": draw(st.integers(0, 2**40))}
        if draw(st.booleans()):
            data["epoch"] = draw(st.from_regex(r"[0-9a-f]{1,16}", fullmatch=True))
        return _with_id({"type": "resume", "data": data}, request_id)
    token = draw(st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True))
    return _with_id({"type": "auth", "data": {"token": token}}, request_id)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            paths.extend(_paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            paths.extend(_paths(child, (*prefix, index)))
    return paths


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    copy = list(value)
    copy[head] = _replace(copy[head], rest, new)
    return copy


def _delete(value: Any, path: tuple[Any, ...]) -> Any:
    if len(path) == 1:
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if k != path[0]}
        return [v for i, v in enumerate(value) if i != path[0]]
    head = path[0]
    if isinstance(value, dict):
        return {**value, head: _delete(value[head], path[1:])}
    copy = list(value)
    copy[head] = _delete(copy[head], path[1:])
    return copy


def _nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


@st.composite
def mutated_messages(draw: st.DrawFn) -> Any:
    """A valid message with one thing broken: a value replaced, a key dropped or added."""
    message = draw(valid_messages())
    paths = _paths(message)
    how = draw(st.sampled_from(["replace", "delete", "add", "poison", "deep"]))
    if how == "replace":
        path = draw(st.sampled_from(paths))
        return _replace(message, path, draw(ANY_VALUES))
    if how == "delete" and len(paths) > 1:
        return _delete(message, draw(st.sampled_from(paths[1:])))
    if how == "poison":
        # The poison values, where they hurt most: in an event's data.
        poison = draw(
            st.sampled_from([math.nan, math.inf, -math.inf, "\ud800", "a\udfffb", {"\udc00": 1}])
        )
        path = draw(st.sampled_from(paths))
        return _replace(message, path, poison)
    if how == "deep":
        depth = draw(st.sampled_from([64, 500, 900]))  # json.dumps itself stops near 1000
        path = draw(st.sampled_from(paths))
        return _replace(message, path, _nested(depth))
    target = draw(st.sampled_from([p for p in paths if not p or isinstance(p[-1], str)]))
    container = message
    for step in target:
        container = container[step]
    if isinstance(container, dict):
        return _replace(message, target, {**container, draw(ANY_TEXT): draw(ANY_VALUES)})
    return message


def to_text(value: Any, ascii_only: bool) -> str:
    """``value`` as JSON text the way a careless client writes it (NaN, escapes and all)."""
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)


# Pure properties


def server_messages(message: protocol.ClientMessage) -> list[bytes]:
    """What the server would send back for ``message`` (and the event it would broadcast).

    Building the event may refuse it with a ProtocolError (invalid input found late);
    what is built must encode.
    """
    if isinstance(message, protocol.Ping):
        return [protocol.encode(protocol.pong(message.id))]
    if isinstance(message, protocol.Subscribe):
        return [protocol.encode(protocol.ack("subscribed", **message.filters.to_dict()))]
    if isinstance(message, protocol.Unsubscribe):
        return [protocol.encode(protocol.ack("subscribed", **protocol.Filters().to_dict()))]
    if isinstance(message, protocol.Resume):
        return [
            protocol.encode(
                protocol.ack("resumed", count=0, since_seq=message.since_seq, seq=0, gap=True)
            )
        ]
    if isinstance(message, protocol.Publish):
        try:
            event = Event(
                type=message.type,
                data=message.data,
                source_agent_id=message.source_agent_id,
                circle_id=message.circle_id,
                project_id=message.project_id,
            )
            event.seq = 1
            encoded = event.encoded()
        except ProtocolError as exc:
            assert exc.code in ERROR_CODES
            return [protocol.encode(protocol.error(exc.code, exc.message))]
        return [encoded, protocol.encode(protocol.ack("published", event_id=event.id, seq=1))]
    assert isinstance(message, protocol.Auth)
    return []


def check_outcome(frame: str | bytes) -> protocol.ClientMessage | None:
    """Parse ``frame``: a message class or a ProtocolError with a known code; replies strict."""
    try:
        message = parse_client_message(frame)
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES, exc
        assert isinstance(exc.message, str) and exc.message
        length = len(exc.message)
        assert length <= MAX_ERROR_TEXT, f"{length}-character error: {exc.message[:160]!r}..."
        assert_strict_json(protocol.encode(protocol.error(exc.code, exc.message)))
        return None
    assert isinstance(message, MESSAGE_CLASSES), message
    for raw in server_messages(message):
        assert_strict_json(raw)
    return message


@given(st.text(_characters(), max_size=200))
def test_parse_arbitrary_text(frame: str) -> None:
    check_outcome(frame)


@given(st.binary(max_size=200))
def test_parse_arbitrary_bytes(frame: bytes) -> None:
    check_outcome(frame)


@given(ANY_VALUES, st.booleans())
def test_parse_arbitrary_json(value: Any, ascii_only: bool) -> None:
    check_outcome(to_text(value, ascii_only))


@given(mutated_messages(), st.booleans())
def test_parse_mutated_messages(message: Any, ascii_only: bool) -> None:
    """Issue 8 item 1: NaN, lone surrogates and deep nesting are refused (or made strict)."""
    check_outcome(to_text(message, ascii_only))


POISON = st.sampled_from(
    [math.nan, math.inf, -math.inf, "\ud800", "a\udfffb", "\udc00\ud800", {"\udbff": 1}]
)


@given(valid_messages(kinds=("publish",)), POISON, st.data())
def test_parse_poisoned_publish(message: dict[str, Any], poison: Any, data: st.DataObject) -> None:
    """Issue 8 item 1: a poison value anywhere in an event is refused, or the event is strict."""
    event = message["data"]
    payload = event.get("data") or {}
    paths = [p for p in _paths(payload) if p]
    where = data.draw(st.sampled_from(["new key", "new nested", "replace", "scope"]))
    if where == "replace" and paths:
        payload = _replace(payload, data.draw(st.sampled_from(paths)), poison)
    elif where == "new nested":
        payload = {**payload, "deep": _nested(data.draw(st.integers(1, 50)), poison)}
    elif where == "scope" and isinstance(poison, str):
        event = {**event, data.draw(st.sampled_from(["circle_id", "project_id"])): poison}
    else:
        payload = {**payload, "x": poison}
    message = {**message, "data": {**event, "data": payload}}
    check_outcome(to_text(message, data.draw(st.booleans())))


@given(
    st.sampled_from(["[", '{"a":', '{"type":"publish","data":{"type":"a.b","data":{"x":']),
    st.integers(1, 400_000),
)
def test_parse_deep_or_unclosed_nesting(opening: str, depth: int) -> None:
    """Up to 1 MiB of nesting, closed or not: refused with a code, never a RecursionError."""
    frame = opening * depth
    if opening.startswith('{"type"'):
        frame = opening + "[" * depth + "]" * depth + "}}}"
    check_outcome(frame)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.integers(1_000, 120_000), st.sampled_from(["types", "ids", "data"]))
def test_parse_huge_lists(size: int, where: str) -> None:
    """Huge lists in each slot stay within a message of 1 MiB: parsed, or refused by code."""
    if where == "types":
        message: dict[str, Any] = {
            "type": "subscribe",
            "data": {"event_types": [f"t{i}.x" for i in range(size)]},
        }
    elif where == "ids":
        message = {"type": "resume", "data": {"since_seq": list(range(size))}}
    else:
        message = {"type": "publish", "data": {"type": "a.b", "data": {"x": [0] * size}}}
    check_outcome(json.dumps(message))


@given(valid_messages())
def test_valid_messages_parse_and_round_trip(message: dict[str, Any]) -> None:
    """Every valid message is accepted, and parse(encode(msg.to_message())) gives it back."""
    first = parse_client_message(json.dumps(message))
    assert isinstance(first, MESSAGE_CLASSES)
    for raw in server_messages(first):
        assert_strict_json(raw)
    again = parse_client_message(protocol.encode(first.to_message()))
    assert again == first
    assert type(again) is type(first)


@given(valid_messages())
def test_valid_messages_survive_strict_encoding(message: dict[str, Any]) -> None:
    """What a strict client writes (bytes, escapes or raw UTF-8) parses to the same message."""
    as_ascii = parse_client_message(json.dumps(message, ensure_ascii=True).encode())
    as_utf8 = parse_client_message(json.dumps(message, ensure_ascii=False).encode())
    assert as_ascii == as_utf8


# Over real sockets


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def live() -> AsyncIterator[Server]:
    """One server for the module: port 0, its own bus and its own connection manager."""
    async with serve("127.0.0.1", 0, bus=EventBus(), manager=ConnectionManager()) as server:
        yield server


@st.composite
def client_frames(draw: st.DrawFn) -> tuple[str, str]:
    """One text frame: ``(kind, body)``.

    ``kind`` is ``"object"`` (a JSON object: it gets a request ``id``), ``"deep"`` (an
    object nested past what a JSON parser may take: answered with or without the id)
    or ``"other"`` (not a JSON object: answered with an id-less ``invalid_json``).
    An object body holds ``"id":0,`` right after its opening brace, for :func:`render`.
    """
    kind = draw(st.sampled_from(["valid", "valid", "mutated", "poison", "garbage", "not_object"]))
    if kind == "garbage":
        text = draw(st.text(st.characters(exclude_categories=["Cs"]), max_size=40))
        try:
            parsed = json.loads(text)
        except ValueError:
            return "other", text
        assume(not isinstance(parsed, dict))
        return "other", text
    if kind == "not_object":
        value = draw(st.lists(STRICT_VALUES, max_size=3) | STRICT_VALUES)
        assume(not isinstance(value, dict))
        return "other", json.dumps(value)
    if kind == "poison":
        depth = draw(st.sampled_from([980, 1500, 100_000]))
        poison = draw(
            st.sampled_from(
                ['"\\ud800"', "NaN", "Infinity", "-Infinity", '{"\\udfff":1}', '"a\\udc00b"']
                + ["[" * depth + "]" * depth]
            )
        )
        event_type = draw(EVENT_TYPES)
        body = '{"id":0,"type":"publish","data":{"type":"' + event_type + '","data":{"x":'
        body += poison + "}}}"
        return ("deep" if depth > 1000 and poison.startswith("[") else "object"), body
    message = draw(valid_messages() if kind == "valid" else mutated_messages())
    if not isinstance(message, dict):
        return "other", to_text(message, ascii_only=True)
    message = {"id": 0, **{k: v for k, v in message.items() if k != "id"}}
    return "object", to_text(message, ascii_only=True)


def render(body: str, request_id: int | str) -> str:
    """Put ``request_id`` in place of the ``"id":0`` an object body starts with."""
    assert body.startswith('{"id": 0') or body.startswith('{"id":0'), body[:40]
    prefix = '{"id": 0' if body.startswith('{"id": 0') else '{"id":0'
    return '{"id":' + json.dumps(request_id) + body[len(prefix) :]


_examples = itertools.count(1)


async def _recv_raw(ws: ClientConnection, deadline: float) -> bytes:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    raw = await asyncio.wait_for(ws.recv(decode=False), left)
    assert isinstance(raw, bytes)
    return raw


async def _joined(server: Server, client_id: str) -> ClientConnection:
    ws = await connect(f"{server.url}?client_id={client_id}", max_size=2**22)
    hello = assert_strict_json(await _recv_raw(ws, time.monotonic() + timeout(5)))
    assert hello["type"] == "connection.established"
    return ws


@pytest.mark.asyncio(loop_scope="module")
@settings(
    max_examples=max(5, settings().max_examples * 3 // 5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(frames=st.lists(client_frames(), min_size=1, max_size=10))
async def test_every_frame_answered_and_every_acked_event_delivered(
    live: Server, frames: list[tuple[str, str]]
) -> None:
    """Issue 8 items 1 and 7 (request ids), DESIGN.md 3 and 7, over a real socket."""
    example = next(_examples)
    watcher = await _joined(live, f"watcher-{example}")
    fuzzer = await _joined(live, f"fuzzer-{example}")
    sent: dict[Any, tuple[str, str]] = {}  # request id -> (kind, frame)
    without_id = 0
    try:
        for index, (kind, body) in enumerate(frames):
            if kind == "other":
                without_id += 1
                text = body
            else:
                request_id: int | str = index if index % 2 else f"r{example}-{index}"
                text = render(body, request_id)
                sent[request_id] = (kind, text)
            await fuzzer.send(text)
        sentinel = f"end-{example}"
        await fuzzer.send(json.dumps({"type": "ping", "id": sentinel}))

        answers: dict[Any, list[dict[str, Any]]] = {}
        anonymous: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout(10)

        def settled() -> bool:
            answered = sum(1 for rid in sent if rid in answers)
            return sentinel in answers and answered + len(anonymous) >= len(frames)

        while not settled():
            try:
                raw = await _recv_raw(fuzzer, deadline)
            except ConnectionClosed as exc:
                raise AssertionError(
                    f"the server closed the connection ({exc.rcvd}) on a recoverable error; "
                    f"frames: {[t[:120] for _, t in frames]}"
                ) from None
            except TimeoutError:
                missing = {rid: text[:200] for rid, (_, text) in sent.items() if rid not in answers}
                raise AssertionError(
                    f"no answer within the timeout to {missing}; "
                    f"{len(anonymous)} id-less answers for {without_id} id-less frames"
                ) from None
            message = assert_strict_json(raw)
            if message["type"] not in REPLY_TYPES:
                continue  # an event (its own, or replayed by a resume)
            if "id" in message:
                answers.setdefault(message["id"], []).append(message)
            else:
                anonymous.append(message)

        doubled = {rid: got for rid, got in answers.items() if len(got) != 1}
        assert not doubled, f"answered more than once: {doubled}"
        unknown = set(answers) - set(sent) - {sentinel}
        assert not unknown, f"answers to ids never sent: {unknown}"
        unanswered = [rid for rid in sent if rid not in answers]
        for rid in unanswered:
            kind, text = sent[rid]
            assert kind == "deep", f"answered without its id: {text[:200]!r}; got {anonymous}"
        assert len(anonymous) == without_id + len(unanswered), (anonymous, without_id)
        for message in anonymous:
            assert message["type"] == "error", message
            assert message["data"]["code"] in ("invalid_json", "invalid_message"), message
        for rid, (message,) in answers.items():
            if message["type"] == "error":
                assert message["data"]["code"] in ERROR_CODES, message
                assert message["data"]["code"] != "internal_error", (sent.get(rid), message)
        acked = {
            got[0]["data"]["seq"]: got[0]["data"]["event_id"]
            for got in answers.values()
            if got[0]["type"] == "published"
        }

        # The watcher: every acked event exactly once, in seq order, and nothing else.
        seen: list[tuple[int, str]] = []
        deadline = time.monotonic() + timeout(10)
        while not set(acked) <= {seq for seq, _ in seen}:
            try:
                message = assert_strict_json(await _recv_raw(watcher, deadline))
            except TimeoutError:
                missing_seqs = sorted(set(acked) - {seq for seq, _ in seen})
                raise AssertionError(f"the watcher never got seq {missing_seqs}") from None
            if message["type"] not in protocol.CONTROL_TYPES:
                seen.append((message["seq"], message["event_id"]))
        await watcher.send('{"type":"ping","id":"w"}')  # anything still queued comes first
        while True:
            message = assert_strict_json(await _recv_raw(watcher, time.monotonic() + timeout(5)))
            if message["type"] == "pong":
                break
            if message["type"] not in protocol.CONTROL_TYPES:
                seen.append((message["seq"], message["event_id"]))
        assert seen == sorted(acked.items()), (seen, acked)
        assert fuzzer.state is State.OPEN
    finally:
        await fuzzer.close()
        await watcher.close()


# Sliced flushes: whatever joins a flush under way, each client's order is the order things
# were queued for it.

FLUSH_FILTERS = st.sampled_from([None, None, "a.*", "b.*"])
FLUSH_OPS = st.one_of(
    st.tuples(st.just("publish"), st.sampled_from(["a.x", "a.x", "b.x", "c.x"])),
    st.tuples(st.just("turn"), st.just(0)),
    st.tuples(st.just("reply"), st.integers(0, 5)),
)
#: Flushes joined again and again while clients of one group are still waiting.
ALTERNATING = [("publish", "a.x"), ("turn", 0)] * 6 + [("reply", 0), ("publish", "b.x")]


@pytest.mark.asyncio(loop_scope="module")
@settings(max_examples=max(5, settings().max_examples * 3 // 5), deadline=None)
@example(filters=[None] * 6, ops=ALTERNATING, flush_slice=1)
@example(filters=[None, "a.*", None, "b.*", None], ops=ALTERNATING[::-1] * 2, flush_slice=2)
@given(
    filters=st.lists(FLUSH_FILTERS, min_size=2, max_size=6),
    ops=st.lists(FLUSH_OPS, min_size=1, max_size=40),
    flush_slice=st.integers(1, 3),
)
async def test_sliced_flushes_keep_each_clients_order(
    filters: list[str | None], ops: list[tuple[str, Any]], flush_slice: int
) -> None:
    """Events and replies queued in any interleaving with loop turns reach each client
    exactly once, in the order they were queued for it (broadcast or ``send``)."""
    example = next(_examples)
    bus = EventBus()
    manager = ConnectionManager(flush_slice=flush_slice)
    async with serve("127.0.0.1", 0, bus=bus, manager=manager) as server:
        clients: list[ClientConnection] = []
        for index, pattern in enumerate(filters):
            ws = await _joined(server, f"slice-{example}-{index}")
            if pattern is not None:
                await ws.send(json.dumps({"type": "subscribe", "data": {"event_types": [pattern]}}))
                while (
                    assert_strict_json(await _recv_raw(ws, time.monotonic() + timeout(5)))["type"]
                    != "subscribed"
                ):
                    pass
            clients.append(ws)
        sessions = {s.client_id: s for s in manager.sessions}
        expected: list[list[tuple[str, int]]] = [[] for _ in filters]
        for number, (op, arg) in enumerate(ops):
            if op == "publish":
                await bus.publish(Event(type=arg, data={"n": number}))
                for index, pattern in enumerate(filters):
                    if pattern is None or arg.startswith(pattern[:-1]):
                        expected[index].append(("event", number))
            elif op == "reply" and arg < len(filters):
                session = sessions[f"slice-{example}-{arg}"]
                assert manager.send(session, {"type": "note", "data": {"n": number}})
                expected[arg].append(("note", number))
            else:
                await asyncio.sleep(0)  # a loop turn: one slice of a flush under way
        for index in range(len(clients)):
            manager.send(sessions[f"slice-{example}-{index}"], {"type": "note", "data": {"n": -1}})
        for index, ws in enumerate(clients):
            got: list[tuple[str, int]] = []
            deadline = time.monotonic() + timeout(10)
            while True:
                message = assert_strict_json(await _recv_raw(ws, deadline))
                kind = "note" if message["type"] == "note" else "event"
                number = message["data"]["n"]
                if number == -1:
                    break
                got.append((kind, number))
            assert got == expected[index], (index, filters[index], ops)
            await ws.close()
