"""Tests for gathering_lab.frame.EventFrame."""

from __future__ import annotations

import math
import sys
import threading
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest

from gathering_lab import frame as frame_module
from gathering_lab.frame import COLUMNS, EventFrame, read_csv, read_parquet

T0 = datetime(2024, 1, 15, 10, 30, tzinfo=UTC).timestamp()  # 2024-01-15T10:30:00Z


def event(
    seq: int,
    kind: str = "agent.started",
    *,
    at: float = T0,
    circle_id: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """A wire event as the server sends it, stamped ``at`` (epoch seconds)."""
    stamp = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    message = {
        "type": kind,
        "data": {"agent_id": seq % 3, "n": seq},
        "source_agent_id": 1,
        "circle_id": circle_id,
        "project_id": None,
        "event_id": f"evt_{seq:024x}",
        "timestamp": stamp,
        "seq": seq,
        "epoch": "e1",
    }
    message.update(extra)
    return message


GUIDE_EVENT = {
    "type": "agent.started",
    "data": {"agent_id": 1},
    "source_agent_id": 1,
    "circle_id": None,
    "project_id": None,
    "event_id": "evt_ab12",
    "timestamp": "2024-01-15T10:30:00.123456Z",
    "seq": 5,
    "epoch": "e1",
}


@pytest.fixture(params=["arrow", "pandas"])
def converters(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the pyarrow fast paths and again with the pandas-only fallbacks."""
    if request.param == "pandas":
        monkeypatch.setattr(frame_module, "_arrow", lambda: None)
    return str(request.param)


# -- columns and values ---------------------------------------------------------------------


def test_columns_and_dtypes(converters: str) -> None:
    frame = EventFrame(client_id="nb")
    frame.append(GUIDE_EVENT, received_at=T0 + 0.5)
    df = frame.df
    assert tuple(df.columns) == COLUMNS
    assert df["received_at"].dtype == "datetime64[us, UTC]"
    assert df["timestamp"].dtype == "datetime64[us, UTC]"
    for name in ("seq", "source_agent_id", "circle_id", "project_id"):
        assert df[name].dtype == "Int64", name
    assert df["latency_ms"].dtype == "float64"
    assert df["data"].dtype == object
    for name in ("type", "event_id", "epoch", "client_id"):
        assert pd.api.types.is_string_dtype(df[name].dtype), name

    row = df.iloc[0]
    assert row["received_at"] == pd.Timestamp("2024-01-15T10:30:00.5Z")
    assert row["timestamp"] == pd.Timestamp("2024-01-15T10:30:00.123456Z")
    assert row["type"] == "agent.started"
    assert row["event_id"] == "evt_ab12"
    assert row["seq"] == 5
    assert row["epoch"] == "e1"
    assert row["source_agent_id"] == 1
    assert row["circle_id"] is pd.NA
    assert row["project_id"] is pd.NA
    assert row["data"] == {"agent_id": 1}
    assert row["client_id"] == "nb"
    assert row["latency_ms"] == pytest.approx(500 - 123.456, abs=1e-6)


def test_latency_is_received_minus_timestamp(converters: str) -> None:
    frame = EventFrame()
    frame.append(event(1, at=T0), received_at=T0 + 0.25)
    frame.append(event(2, at=T0 + 1), received_at=T0 + 1.0015)
    frame.append(event(3, at=T0 + 2), received_at=T0 + 1.999)  # sender clock ahead
    assert frame.df["latency_ms"].tolist() == pytest.approx([250.0, 1.5, -1.0], abs=1e-3)


def test_received_at_defaults_to_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frame_module, "_now", lambda: T0 + 3.0)
    frame = EventFrame()
    frame.append(event(1))
    frame.extend([event(2)])
    assert frame.df["received_at"].tolist() == [pd.Timestamp(T0 + 3.0, unit="s", tz="UTC")] * 2
    assert frame.df["latency_ms"].tolist() == pytest.approx([3000.0, 3000.0])


def test_old_protocol_without_seq_epoch_or_microseconds(converters: str) -> None:
    frame = EventFrame()
    old = {
        "type": "task.created",
        "data": {"task_id": 7},
        "source_agent_id": 2,
        "circle_id": 1,
        "project_id": None,
        "event_id": "evt_old",
        "timestamp": "2024-01-15T10:30:00Z",
    }
    frame.append(old, received_at=T0 + 0.1)
    frame.append(GUIDE_EVENT, received_at=T0 + 0.2)  # mixed formats in one column
    df = frame.df
    assert df["seq"].dtype == "Int64"
    assert df["seq"].isna().tolist() == [True, False]
    assert pd.isna(df["epoch"].iloc[0]) and df["epoch"].iloc[1] == "e1"
    assert df["timestamp"].tolist() == [
        pd.Timestamp("2024-01-15T10:30:00Z"),
        pd.Timestamp("2024-01-15T10:30:00.123456Z"),
    ]
    assert df["latency_ms"].tolist() == pytest.approx([100.0, 200 - 123.456], abs=1e-6)


def test_non_event_messages_are_accepted(converters: str) -> None:
    frame = EventFrame()
    frame.append(
        {"type": "connection.established", "data": {"client_id": "x"}, "timestamp": None}, T0
    )
    frame.append({"type": "pong"}, received_at=T0)
    df = frame.df
    assert df["type"].tolist() == ["connection.established", "pong"]
    assert df["timestamp"].isna().all()
    assert df["latency_ms"].isna().all()
    assert df["data"].tolist() == [{"client_id": "x"}, None]
    assert df["seq"].isna().all() and df["seq"].dtype == "Int64"


def test_unparsable_or_unusual_timestamps(converters: str) -> None:
    frame = EventFrame()
    frame.append(event(1, timestamp="yesterday"), received_at=T0)
    frame.append(event(2, timestamp=12345), received_at=T0)
    frame.append(event(3, timestamp="2024-01-15T12:30:00+02:00"), received_at=T0 + 1)
    frame.append(event(4, timestamp=datetime.fromtimestamp(T0, UTC)), received_at=T0 + 2)
    df = frame.df
    assert df["timestamp"].isna().tolist() == [True, True, False, False]
    assert df["latency_ms"].iloc[:2].isna().all()
    assert df["latency_ms"].iloc[2:].tolist() == pytest.approx([1000.0, 2000.0])
    # Naive text is read as UTC; nanoseconds are cut to microseconds (pandas decides both).
    frame.append(event(5, timestamp="2024-01-15T10:30:00.000001999"), received_at=T0)
    assert frame.df["timestamp"].iloc[-1] == pd.Timestamp("2024-01-15T10:30:00.000001Z")


def test_ids_that_are_not_integers_fall_back_to_object(converters: str) -> None:
    frame = EventFrame()
    frame.append(event(1, circle_id="circle-a", source_agent_id=[1, 2]), received_at=T0)
    frame.append(event(2, circle_id=3, source_agent_id=[3, 4], project_id=2**70), T0)
    frame.append({**event(3), "seq": "not-a-number"}, received_at=T0)
    df = frame.df
    assert df["circle_id"].dtype == object
    assert df["circle_id"].tolist() == ["circle-a", 3, None]
    assert df["source_agent_id"].tolist() == [[1, 2], [3, 4], 1]
    assert df["project_id"].tolist() == [None, 2**70, None]
    assert df["seq"].tolist() == [1, 2, "not-a-number"]


def test_enum_type_is_stored_as_its_value() -> None:
    class Kind(str, Enum):
        STARTED = "agent.started"

    frame = EventFrame()
    frame.append({"type": Kind.STARTED}, received_at=T0)
    frame.extend([{"type": Kind.STARTED}], received_at=T0)
    assert frame.df["type"].tolist() == ["agent.started", "agent.started"]
    assert all(type(value) is str for value in frame.df["type"].tolist())


def test_client_id_applies_to_rows_appended_while_set() -> None:
    frame = EventFrame(client_id="a")
    frame.append(event(1), received_at=T0)
    frame.client_id = "b"
    frame.append(event(2), received_at=T0)
    frame.client_id = None
    frame.append(event(3), received_at=T0)
    values = frame.df["client_id"].tolist()
    assert values[:2] == ["a", "b"] and pd.isna(values[2])


def test_append_and_extend_build_the_same_frame(converters: str) -> None:
    messages = [event(i, circle_id=i % 2 or None) for i in range(5)]
    messages.append({"type": "pong", "timestamp": "2024-01-15T10:30:00Z"})
    one, many = EventFrame(client_id="x"), EventFrame(client_id="x")
    for message in messages:
        one.append(message, received_at=T0 + 1)
    many.extend(messages, received_at=T0 + 1)
    pdt.assert_frame_equal(one.df, many.df)


# -- max_rows -------------------------------------------------------------------------------


def test_max_rows_keeps_the_most_recent_and_counts_dropped() -> None:
    frame = EventFrame(max_rows=3)
    for seq in range(5):
        frame.append(event(seq), received_at=T0 + seq)
    assert len(frame) == 3
    assert frame.dropped == 2
    df = frame.df
    assert df["seq"].tolist() == [2, 3, 4]
    assert df.index.tolist() == [2, 3, 4]  # arrival numbers survive eviction
    assert "dropped=2" in repr(frame) and "max_rows=3" in repr(frame)

    frame.extend([event(seq) for seq in range(5, 10)], received_at=T0)
    assert len(frame) == 3
    assert frame.dropped == 7
    assert frame.df["seq"].tolist() == [7, 8, 9]
    assert frame.tail(2)["seq"].tolist() == [8, 9]


def test_unbounded_frame_drops_nothing() -> None:
    frame = EventFrame()
    frame.extend([event(seq) for seq in range(1000)], received_at=T0)
    assert len(frame) == 1000 and frame.dropped == 0
    assert frame.df["seq"].tolist() == list(range(1000))


# -- cache, version, tail, clear ------------------------------------------------------------


def test_df_is_cached_until_the_next_change(monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[int] = []
    real_build = frame_module._build

    def counting_build(columns: list[list[Any]], start: int) -> pd.DataFrame:
        builds.append(len(columns[0]))
        return real_build(columns, start)

    monkeypatch.setattr(frame_module, "_build", counting_build)
    frame = EventFrame()
    frame.append(event(1), received_at=T0)
    first = frame.df
    second = frame.df
    assert builds == [1]
    pdt.assert_frame_equal(first, second)

    first["extra"] = 1  # a reader's change does not leak into the cache
    first.loc[first.index[0], "type"] = "changed"
    assert "extra" not in frame.df.columns
    assert frame.df["type"].tolist() == ["agent.started"]

    frame.append(event(2), received_at=T0)
    assert frame.df["seq"].tolist() == [1, 2]
    assert builds == [1, 2]
    frame.clear()
    assert len(frame.df) == 0
    assert builds == [1, 2, 0]


def test_version_changes_on_every_mutation() -> None:
    frame = EventFrame()
    assert frame.version == 0
    frame.append(event(1), received_at=T0)
    frame.append(event(2), received_at=T0)
    assert frame.version == 2
    frame.extend([event(3), event(4)], received_at=T0)
    assert frame.version == 3
    frame.extend([], received_at=T0)
    assert frame.version == 3
    _ = frame.df
    assert frame.version == 3
    frame.clear()
    assert frame.version == 4


def test_tail_matches_df_without_building_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    for max_rows in (None, 50):
        frame = EventFrame(max_rows=max_rows, client_id="t")
        for seq in range(80):
            frame.append(event(seq, circle_id=seq % 2 or None), received_at=T0 + seq)
        pdt.assert_frame_equal(frame.tail(5), frame.df.tail(5))
        pdt.assert_frame_equal(frame.tail(500), frame.df)
        assert len(frame.tail(0)) == 0 and tuple(frame.tail(0).columns) == COLUMNS

    sizes: list[int] = []
    real_build = frame_module._build

    def sizing_build(columns: list[list[Any]], start: int) -> pd.DataFrame:
        sizes.append(len(columns[0]))
        return real_build(columns, start)

    monkeypatch.setattr(frame_module, "_build", sizing_build)
    frame.tail(3)
    assert sizes == [3]
    with pytest.raises(TypeError, match="n must be an int"):
        frame.tail("3")  # type: ignore[arg-type]


def test_clear_empties_and_resets_dropped() -> None:
    frame = EventFrame(max_rows=2)
    frame.extend([event(seq) for seq in range(5)], received_at=T0)
    assert frame.dropped == 3
    frame.clear()
    assert len(frame) == 0 and frame.dropped == 0
    df = frame.df
    assert tuple(df.columns) == COLUMNS and len(df) == 0
    assert df["received_at"].dtype == "datetime64[us, UTC]"
    frame.append(event(9), received_at=T0)
    assert frame.df["seq"].tolist() == [9] and frame.df.index.tolist() == [0]


def test_repr_and_html() -> None:
    frame = EventFrame(client_id="nb")
    frame.append(GUIDE_EVENT, received_at=T0)
    assert repr(frame) == ("<EventFrame rows=1 max_rows=None dropped=0 version=1 client_id='nb'>")
    html = frame._repr_html_()
    assert "&lt;EventFrame rows=1" in html and "<table" in html and "evt_ab12" in html


# -- analysis -------------------------------------------------------------------------------


@pytest.fixture
def crafted() -> EventFrame:
    """6 events: 3 task.created, 2 agent.started, 1 circle.created, over seconds 0-2.

    received_at offsets 0.1 0.2 0.3 | (none in second 1) | 2.1 2.2 2.3, latencies 10..60 ms.
    """
    frame = EventFrame()
    plan = [
        ("task.created", 1, 0.1),
        ("task.created", 1, 0.2),
        ("agent.started", None, 0.3),
        ("task.created", 2, 2.1),
        ("agent.started", None, 2.2),
        ("circle.created", 2, 2.3),
    ]
    for seq, (kind, circle, offset) in enumerate(plan, start=1):
        received = T0 + offset
        message = event(seq, kind, at=received - seq * 0.010, circle_id=circle)
        message["data"] = {"priority": "high" if seq % 2 else "low", "n": seq}
        frame.append(message, received_at=received)
    return frame


def test_counts(crafted: EventFrame) -> None:
    counts = crafted.counts()
    assert counts.to_dict() == {"task.created": 3, "agent.started": 2, "circle.created": 1}
    assert counts.tolist() == [3, 2, 1]  # most first
    assert counts.dtype == "int64" and crafted.counts("circle_id").dtype == "int64"
    assert crafted.counts("circle_id").to_dict() == {1: 2, 2: 2, pd.NA: 2}

    by_two = crafted.counts(["type", "circle_id"])
    assert by_two.index.names == ["type", "circle_id"]
    assert by_two.to_dict() == {
        ("task.created", 1): 2,
        ("agent.started", pd.NA): 2,
        ("task.created", 2): 1,
        ("circle.created", 2): 1,
    }
    assert by_two.tolist() == [2, 2, 1, 1]  # most first

    assert crafted.counts("data.priority").to_dict() == {"high": 3, "low": 3}
    with pytest.raises(KeyError, match="unknown column 'nope'"):
        crafted.counts("nope")
    with pytest.raises(ValueError, match="cannot count by 'data'"):
        crafted.counts("data")


def test_rate(crafted: EventFrame) -> None:
    rate = crafted.rate("1s")
    assert list(rate.columns) == ["events"]
    assert rate["events"].tolist() == [3, 0, 3]  # the empty second is there, as 0
    assert rate.index[0] == pd.Timestamp("2024-01-15T10:30:00Z")
    assert rate.index.name == "received_at"
    assert str(rate.index.dtype) == "datetime64[us, UTC]"

    per_type = crafted.rate("1s", by="type")
    assert per_type.loc[:, "task.created"].tolist() == [2, 0, 1]
    assert per_type.loc[:, "agent.started"].tolist() == [1, 0, 1]
    assert per_type.loc[:, "circle.created"].tolist() == [0, 0, 1]

    assert crafted.rate("2s")["events"].tolist() == [3, 3]
    stamped = crafted.rate("1s", on="timestamp")
    assert stamped.index.name == "timestamp" and stamped["events"].sum() == 6
    with pytest.raises(ValueError, match="on must be"):
        crafted.rate(on="seq")
    assert len(EventFrame().rate()) == 0
    assert len(EventFrame().rate(by="type")) == 0


def test_latency(crafted: EventFrame) -> None:
    summary = crafted.latency()
    assert list(summary.index) == ["count", "mean", "p50", "p90", "p99", "max"]
    expected = np.array([10.0, 20, 30, 40, 50, 60])
    assert summary["count"] == 6
    assert summary["mean"] == pytest.approx(35.0, abs=1e-3)
    assert summary["p50"] == pytest.approx(35.0, abs=1e-3)
    assert summary["p90"] == pytest.approx(np.percentile(expected, 90), abs=1e-3)  # 55
    assert summary["p99"] == pytest.approx(59.5, abs=1e-3)
    assert summary["max"] == pytest.approx(60.0, abs=1e-3)

    custom = crafted.latency(percentiles=(0, 99.9))
    assert list(custom.index) == ["count", "mean", "p0", "p99.9", "max"]
    assert custom["p0"] == pytest.approx(10.0, abs=1e-3)

    per_type = crafted.latency(by="type")
    assert per_type.loc["task.created", "count"] == 3
    assert per_type.loc["task.created", "mean"] == pytest.approx(70 / 3, abs=1e-3)
    assert per_type.loc["circle.created", "max"] == pytest.approx(60.0, abs=1e-3)

    per_circle = crafted.latency(by="circle_id")
    assert per_circle["count"].sum() == 6 and len(per_circle) == 3  # circles 1, 2 and none
    assert per_circle.loc[1, "mean"] == pytest.approx(15.0, abs=1e-3)

    with pytest.raises(ValueError, match="between 0 and 100"):
        crafted.latency(percentiles=(50, 101))
    empty = EventFrame().latency()
    assert empty["count"] == 0 and math.isnan(empty["p50"])


def test_latency_skips_rows_without_timestamp() -> None:
    frame = EventFrame()
    frame.append(event(1, at=T0), received_at=T0 + 0.01)
    frame.append({"type": "pong"}, received_at=T0)
    summary = frame.latency()
    assert summary["count"] == 1 and summary["max"] == pytest.approx(10.0, abs=1e-3)


# -- flatten --------------------------------------------------------------------------------


def test_flatten_adds_data_columns() -> None:
    frame = EventFrame()
    frame.append(event(1, data={"agent_id": 1, "task": {"id": 3, "tags": ["a"]}}), T0)
    frame.append(event(2, data={"agent_id": 2}), received_at=T0)
    frame.append({"type": "pong"}, received_at=T0)
    flat = frame.df_flat
    assert list(flat.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert {"data.agent_id", "data.task.id", "data.task.tags"} <= set(flat.columns)
    assert flat["data.agent_id"].tolist()[:2] == [1, 2]
    assert pd.isna(flat["data.agent_id"].iloc[2])
    assert flat["data.task.id"].iloc[0] == 3 and flat["data.task.tags"].iloc[0] == ["a"]
    assert flat.index.equals(frame.df.index)
    pdt.assert_frame_equal(frame.to_pandas(flatten=True), flat)

    shallow = frame.to_pandas(flatten=True, max_level=0)
    assert "data.task.id" not in shallow.columns
    assert shallow["data.task"].iloc[0] == {"id": 3, "tags": ["a"]}

    frame.append(event(3, data={"new_key": True}), received_at=T0)
    assert "data.new_key" in frame.df_flat.columns  # cache follows appends
    pdt.assert_frame_equal(frame.to_pandas(), frame.df)


# -- export ---------------------------------------------------------------------------------


@pytest.fixture
def exportable() -> EventFrame:
    frame = EventFrame(max_rows=4, client_id="nb")
    frame.append(GUIDE_EVENT, received_at=T0 + 1)
    frame.append(event(6, data={"nested": {"x": [1, 2]}, "text": 'é, "quoted"\nline'}), T0)
    frame.append({"type": "pong", "timestamp": "2024-01-15T10:30:00Z"}, received_at=T0 + 2)
    frame.append(event(7, circle_id=3), received_at=T0 + 3)
    frame.append(event(8, data=None), received_at=T0 + 4)  # evicts the first row
    return frame


def test_parquet_round_trip(exportable: EventFrame, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    path = tmp_path / "events.parquet"
    exportable.to_parquet(path)
    back = read_parquet(path)
    pdt.assert_frame_equal(back, exportable.df)
    assert back.index.tolist() == [1, 2, 3, 4]
    assert back["data"].iloc[0] == {"nested": {"x": [1, 2]}, "text": 'é, "quoted"\nline'}


def test_parquet_round_trip_with_mixed_ids(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    frame = EventFrame()
    frame.append(event(1, circle_id="c-1"), received_at=T0)
    frame.append(event(2, circle_id=2), received_at=T0)
    frame.to_parquet(tmp_path / "mixed.parquet")
    back = read_parquet(tmp_path / "mixed.parquet")
    assert back["circle_id"].tolist() == ["c-1", 2]
    pdt.assert_frame_equal(back, frame.df)


def test_to_parquet_without_pyarrow(
    exportable: EventFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"to_parquet needs pyarrow.*gathering-lab\[parquet\]"):
        exportable.to_parquet(tmp_path / "x.parquet")


def test_csv_round_trip(exportable: EventFrame, tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    exportable.to_csv(path)
    header = path.read_text(encoding="utf-8").splitlines()[0]
    assert header == "," + ",".join(COLUMNS)
    back = read_csv(path)
    pdt.assert_frame_equal(back, exportable.df)


def test_csv_round_trip_with_mixed_ids(tmp_path: Path) -> None:
    frame = EventFrame()
    frame.append(event(1, circle_id="7"), received_at=T0)
    frame.append(event(2, circle_id=7), received_at=T0)
    frame.to_csv(tmp_path / "mixed.csv")
    assert read_csv(tmp_path / "mixed.csv")["circle_id"].tolist() == ["7", 7]


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "error", "match"),
    [
        (["type", "x"], TypeError, r"message must be a dict, got list: \['type', 'x'\]"),
        ("agent.started", TypeError, "message must be a dict, got str: 'agent.started'"),
        (None, TypeError, "message must be a dict, got NoneType: None"),
        ({"data": {}}, ValueError, r"message has no 'type': \{'data': \{\}\}"),
        ({"type": 5}, TypeError, "message type must be a str, got int: 5"),
        ({"type": None}, TypeError, "message type must be a str, got NoneType: None"),
        ({"type": ""}, ValueError, "message type must not be empty"),
    ],
)
def test_bad_messages_are_rejected(message: Any, error: type[Exception], match: str) -> None:
    frame = EventFrame()
    with pytest.raises(error, match=match):
        frame.append(message)
    with pytest.raises(error, match=match):
        frame.extend([event(1), message])
    assert len(frame) == 0 and frame.version == 0  # extend added nothing


def test_extend_wants_an_iterable_of_messages() -> None:
    with pytest.raises(TypeError, match="extend takes an iterable of messages, got one message"):
        EventFrame().extend(GUIDE_EVENT)  # type: ignore[arg-type]


def test_long_bad_values_are_shortened() -> None:
    with pytest.raises(TypeError) as info:
        EventFrame().append(["x" * 1000])  # type: ignore[arg-type]
    assert len(str(info.value)) < 200 and str(info.value).endswith("...")


@pytest.mark.parametrize("received_at", ["now", True, [1.0]])
def test_bad_received_at(received_at: Any) -> None:
    frame = EventFrame()
    with pytest.raises(TypeError, match="received_at must be epoch seconds"):
        frame.append(event(1), received_at=received_at)
    with pytest.raises(TypeError, match="received_at must be epoch seconds"):
        frame.extend([event(1)], received_at=received_at)
    assert len(frame) == 0


def test_integer_received_at_is_accepted() -> None:
    frame = EventFrame()
    frame.append(event(1), received_at=int(T0))
    assert frame.df["received_at"].iloc[0] == pd.Timestamp(T0, unit="s", tz="UTC")


@pytest.mark.parametrize(
    ("max_rows", "error", "match"),
    [
        (0, ValueError, "max_rows must be a positive int or None, got 0"),
        (-5, ValueError, "got -5"),
        (1.5, TypeError, "got float: 1.5"),
        ("10", TypeError, "got str: '10'"),
        (True, TypeError, "got bool: True"),
    ],
)
def test_bad_max_rows(max_rows: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        EventFrame(max_rows=max_rows)


def test_bad_client_id() -> None:
    with pytest.raises(TypeError, match="client_id must be a str or None, got int: 5"):
        EventFrame(client_id=5)  # type: ignore[arg-type]
    frame = EventFrame()
    with pytest.raises(TypeError, match="client_id must be a str or None"):
        frame.client_id = b"x"  # type: ignore[assignment]


# -- threads --------------------------------------------------------------------------------


@pytest.mark.parametrize("max_rows", [None, 500])
def test_concurrent_reader_never_sees_a_torn_row(max_rows: int | None) -> None:
    """Rows carry their number in seq, event_id and data: a torn row would disagree."""
    frame = EventFrame(max_rows=max_rows, client_id="w")
    total = 20_000
    done = threading.Event()
    problems: list[str] = []
    reads = 0

    def write() -> None:
        try:
            for seq in range(total):
                frame.append(event(seq), received_at=T0 + seq * 1e-3)
                if seq % 1000 == 999:
                    frame.extend([event(-1, data={"n": -1})], received_at=T0)
        finally:
            done.set()

    def check(df: pd.DataFrame, where: str) -> None:
        seqs = df["seq"].to_numpy(dtype=np.int64)
        numbers = np.array([data["n"] for data in df["data"]], dtype=np.int64)
        ids = np.array(
            [int(text[4:], 16) if text != f"evt_{-1:024x}" else -1 for text in df["event_id"]],
            dtype=np.int64,
        )
        if not (np.array_equal(seqs, numbers) and np.array_equal(seqs, ids)):
            problems.append(f"{where}: columns disagree")
        if df["received_at"].isna().any() or df["client_id"].isna().any():
            problems.append(f"{where}: missing cells")
        if max_rows is not None and len(df) > max_rows:
            problems.append(f"{where}: {len(df)} rows > max_rows")

    writer = threading.Thread(target=write)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so reads land mid-append
    writer.start()
    try:
        for _ in range(2000):  # bounded: stops once the writer is done
            if done.is_set():
                break
            check(frame.df, "df")
            check(frame.tail(50), "tail")
            reads += 1
    finally:
        writer.join(timeout=60)
        sys.setswitchinterval(interval)
    assert not writer.is_alive()
    assert not problems, problems[:3]
    assert reads > 0
    final = frame.df
    check(final, "final")
    assert len(final) + frame.dropped == total + total // 1000


# -- row storage: appended rows move into the columns in chunks ------------------------------


class _Kind(str, Enum):
    DONE = "task.done"


def _mixed(seq: int) -> dict[str, Any]:
    """Every seventh message is one append cannot take in one step."""
    message = event(seq, at=T0 + seq)
    odd = seq % 7
    if odd == 1:
        del message["epoch"], message["project_id"]  # an old server: keys missing
    elif odd == 2:
        message["type"] = _Kind.DONE
    elif odd == 3:
        message["timestamp"] = datetime.fromtimestamp(T0 + seq, UTC)
    elif odd == 4:
        message["circle_id"] = f"c{seq}"  # ids that are not all integers: object
    return message


@pytest.mark.parametrize(
    "rows", [0, 1, 5, frame_module.CHUNK_ROWS, 2 * frame_module.CHUNK_ROWS + 7]
)
def test_appended_rows_build_the_frame_extend_builds(rows: int) -> None:
    """One append per message (rows settled in chunks) gives the same DataFrame, dtypes and
    all, as the same messages through ``extend`` (straight into the columns)."""
    appended = EventFrame(client_id="c")
    extended = EventFrame(client_id="c")
    for seq in range(rows):
        appended.append(_mixed(seq), received_at=T0 + seq + 0.5)
        extended.extend([_mixed(seq)], received_at=T0 + seq + 0.5)
    assert len(appended) == rows and appended.version == rows
    pdt.assert_frame_equal(appended.df, extended.df)
    pdt.assert_frame_equal(appended.tail(3), extended.tail(3))
    if rows:
        assert appended.df["type"].iloc[-1] == _mixed(rows - 1)["type"]
        assert (appended.df["circle_id"].dtype == "Int64") == (rows <= 4)


def test_append_extend_and_clear_keep_their_order_across_chunks() -> None:
    frame = EventFrame()
    frame.append(event(0))
    frame.extend([event(1), event(2)])  # the pending row goes first
    for seq in range(3, 3 + frame_module.CHUNK_ROWS):
        frame.append(event(seq))
    frame.extend([event(-1)])
    assert list(frame.df["seq"]) == [*range(3 + frame_module.CHUNK_ROWS), -1]
    frame.clear()
    frame.append(event(7))
    assert list(frame.df["seq"]) == [7] and frame.df.index[0] == 0


@pytest.mark.parametrize("max_rows", [1, 5, 100, 5000])
def test_bounded_counts_and_len_include_rows_not_yet_settled(max_rows: int) -> None:
    frame = EventFrame(max_rows=max_rows)
    total = 1000
    for seq in range(total):
        frame.append(event(seq))
        if seq in (0, 3, 499):  # reading in between settles what is pending
            assert frame.dropped == max(0, seq + 1 - max_rows)
            assert len(frame) == min(seq + 1, max_rows)
    assert frame.dropped == max(0, total - max_rows)
    assert len(frame) == min(total, max_rows)
    df = frame.df
    assert df.index[0] == frame.dropped
    assert list(df["seq"]) == list(range(total - len(df), total))
    # Not yet moved into the columns: never more than an eighth of max_rows on top.
    assert len(frame._pending) <= max(1, max_rows // 8)


def test_a_reader_thread_sees_every_appended_row_once_in_order() -> None:
    """append takes no lock: a reader settling rows while the writer appends must neither
    lose nor repeat nor reorder one, and a cached df must never hide a newer row."""
    frame = EventFrame()
    total = 30_000
    done = threading.Event()
    problems: list[str] = []

    def write() -> None:
        try:
            for seq in range(total):
                frame.append(event(seq), received_at=T0)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    writer.start()
    reads = 0
    try:
        while not done.is_set() and reads < 5000:  # bounded
            size = len(frame)
            seqs = frame.tail(5)["seq"].tolist()
            if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
                problems.append(f"tail {seqs}")
            df = frame.df
            if not np.array_equal(df["seq"].to_numpy(), np.arange(len(df))):
                problems.append(f"df of {len(df)} rows is not 0..n-1 in order")
            if len(df) < size:
                problems.append(f"df has {len(df)} rows after len() said {size}")
            reads += 1
    finally:
        writer.join(timeout=60)
        sys.setswitchinterval(interval)
    assert not writer.is_alive()
    assert not problems, problems[:3]
    assert reads > 0
    assert list(frame.df["seq"]) == list(range(total)) and len(frame) == total
