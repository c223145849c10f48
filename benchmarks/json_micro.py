"""Per-call JSON costs of one event envelope: the standard library, orjson, and the protocol's.

    PYTHONPATH=$PWD python benchmarks/json_micro.py              # this checkout
    PYTHONPATH=../before python benchmarks/json_micro.py         # another one, same machine

Rows: ``json`` and ``orjson`` alone (the same compact, UTF-8 output), then what the package
does per event with them: :func:`protocol.encode` of the envelope (strict checks included),
``Event.to_dict()`` and a fresh ``Event.encoded()`` (what the bus does when it numbers an
event), :func:`protocol.decode` (what LabClient does per message) and
:func:`protocol.parse_client_message` of a ``publish`` (what the server does per publish).
Each figure is the best of 7 repeats of 100,000 calls, in µs per call.
"""

from __future__ import annotations

import argparse
import json
import timeit
from typing import Any

import gathering_lab
from gathering_lab import protocol
from gathering_lab.events import Event


def envelope() -> Event:
    """A ``task.created`` event with ~200 bytes of data, numbered like the bus does."""
    data = {"task_id": 42, "title": "write the report", "priority": 3, "tags": ["a", "b"]}
    data["note"] = "x" * 100
    event = Event(type="task.created", data=data, source_agent_id=1, circle_id=2)
    event.seq, event.epoch = 12345, "abcdef012345"
    return event


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    event = envelope()
    message = event.to_dict()
    wire = protocol.encode(message)
    text = wire.decode()
    publish = json.dumps(
        {"type": "publish", "id": "r1", "data": {"type": "task.created", "data": event.data}},
        separators=(",", ":"),
    )
    stdlib = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    def fresh_encoded() -> bytes:
        event._wire = None
        return event.encoded()

    rows: list[tuple[str, Any]] = [
        ("json encode (compact, ensure_ascii=False)", lambda: stdlib.encode(message).encode()),
        ("json.loads (str)", lambda: json.loads(text)),
    ]
    try:
        import orjson

        rows += [
            ("orjson.dumps", lambda: orjson.dumps(message)),
            ("orjson.loads (str)", lambda: orjson.loads(text)),
        ]
    except ImportError:
        pass
    rows += [
        ("protocol.encode(envelope)", lambda: protocol.encode(message)),
        ("Event.to_dict()", event.to_dict),
        ("Event.encoded() (to_dict + encode)", fresh_encoded),
        ("protocol.decode(frame) (client)", lambda: protocol.decode(text)),
        ("protocol.parse_client_message(publish)", lambda: protocol.parse_client_message(publish)),
    ]
    print(f"package: {gathering_lab.__file__}")
    print(f"envelope: {len(wire)} bytes; publish frame: {len(publish)} bytes")
    for label, call in rows:
        best = min(timeit.repeat(call, number=args.number, repeat=args.repeat))
        print(f"| {label} | {best / args.number * 1e6:.2f} |")


if __name__ == "__main__":
    main()
