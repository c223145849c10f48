"""What the panels have in common: the Panel base class, reading new frame rows, HTML helpers."""

from __future__ import annotations

import html
import json
import math
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
import numpy as np

from ..frame import EventFrame
from ..protocol import Filters, check_pattern
from .controller import Controller

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Panel"]

OK_COLOUR = "#1a7f37"
WARN_COLOUR = "#9a6700"
ERROR_COLOUR = "#cf222e"
MUTED_COLOUR = "#57606a"


class Panel(widgets.VBox):
    """A VBox that is a thin view over a :class:`Controller` (given, or made from a source)."""

    def __init__(self, source: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._own_controller = not isinstance(source, Controller)
        self.controller = Controller.of(source)
        self._parts: list[widgets.Widget] = []
        self._closed = False

    def _own(self, *parts: widgets.Widget) -> None:
        """Remember widgets this panel made, to close them with it."""
        self._parts.extend(parts)

    def close(self) -> None:
        """Stop redrawing, close this panel's widgets (and its controller if it made one)."""
        if getattr(self, "_closed", True):  # closed already, or never fully built
            super().close()
            return
        self._closed = True
        controller: Controller | None = getattr(self, "controller", None)
        if controller is not None:
            controller.remove_view(self)
            if self._own_controller:
                controller.close()
        for part in getattr(self, "_parts", ()):
            part.close()
        super().close()


# Reading the rows a frame received since last time


class Cursor:
    """Follows one frame and returns the rows appended since the last call.

    Rows are told apart by their index (the arrival number, see EventFrame), so rows
    appended while reading are not lost and not returned twice.
    """

    #: The last rows read (frame, version, first row, rows), shared by the views that follow
    #: the same frame: each tick converts the new rows once, not once per view. Only read
    #: and written on the widgets' loop; the rows are never modified.
    _last: tuple[weakref.ref[EventFrame], int, int, pd.DataFrame] | None = None

    def __init__(self) -> None:
        self.frame: EventFrame | None = None
        self.seen = 0
        self.version = -1

    def follows(self, frame: EventFrame | None) -> bool:
        """True if the cursor is on ``frame`` (False: call :meth:`reset`)."""
        return frame is self.frame

    def reset(self, frame: EventFrame | None) -> pd.DataFrame | None:
        """Follow ``frame`` from scratch and return all its rows (None if no frame)."""
        self.frame = frame
        if frame is None:
            self.seen, self.version = 0, -1
            return None
        self.version = frame.version
        df = frame.df
        self.seen = int(df.index[-1]) + 1 if len(df) else frame.dropped
        return df

    def changed(self) -> bool:
        """True if the frame changed since the last read."""
        return self.frame is not None and self.frame.version != self.version

    def new_rows(self) -> pd.DataFrame | None:
        """The rows appended since the last read; None if the frame was cleared."""
        frame = self.frame
        assert frame is not None
        self.version = frame.version
        size = len(frame)
        end = frame.dropped + size
        if end < self.seen:
            return None
        shared = Cursor._last
        if shared is not None and shared[0]() is frame and shared[1:3] == (self.version, self.seen):
            rows = shared[3]  # another view of the same frame read these rows this tick
        else:
            seen = self.seen
            n = max(min(end - seen, size), 1)
            while True:
                rows = frame.tail(n)
                if not len(rows) or int(rows.index[0]) <= seen or n >= len(frame):
                    break
                n *= 2  # more rows arrived while we read
            rows = rows[rows.index >= seen]
            Cursor._last = (weakref.ref(frame), self.version, seen, rows)
        if len(rows):
            self.seen = int(rows.index[-1]) + 1
        return rows


# Filtering rows like the server does


def check_patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    """Check type patterns (``*``, ``task.*``, ``task.created``); ValueError names a bad one."""
    checked = []
    for pattern in patterns:
        try:
            checked.append(check_pattern(pattern))
        except Exception as exc:
            raise ValueError(getattr(exc, "message", str(exc))) from None
    return tuple(dict.fromkeys(checked))


def type_mask(types: pd.Series, patterns: Iterable[str]) -> pd.Series:
    """Which rows' types match ``patterns`` (``task.*`` is every type under ``task.``)."""
    patterns = tuple(patterns)
    if "*" in patterns:
        return types.notna()
    exact = [p for p in patterns if not p.endswith(".*")]
    prefixes = tuple(p[:-1] for p in patterns if p.endswith(".*"))
    mask = types.isin(exact)
    if prefixes:
        mask = mask | types.str.startswith(prefixes).fillna(False).astype(bool)
    return mask


def _equals(value: Any, wanted: Any) -> bool:
    try:
        return bool(value == wanted)
    except (TypeError, ValueError):  # pd.NA, arrays
        return False


def apply_filters(df: pd.DataFrame, filters: Filters | None) -> pd.DataFrame:
    """The rows of ``df`` that ``filters`` accept (all of them if None)."""
    if filters is None or not len(df):
        return df
    mask = type_mask(df["type"], filters.event_types)
    for column in ("circle_id", "project_id"):
        wanted = getattr(filters, column)
        if wanted is not None:
            mask &= np.array([_equals(value, wanted) for value in df[column].tolist()], dtype=bool)
    return df[mask]


def describe_filters(filters: Filters | None) -> str:
    """``task.*, agent.started · circle 1`` (or ``everything``)."""
    if filters is None:
        return "everything"
    parts = [", ".join(filters.event_types)]
    if filters.circle_id is not None:
        parts.append(f"circle {filters.circle_id}")
    if filters.project_id is not None:
        parts.append(f"project {filters.project_id}")
    return " · ".join(parts)


# HTML


def esc(value: Any) -> str:
    """Escape a value for HTML; None, NA and NaN show as nothing."""
    if value is None or value.__class__.__name__ in ("NAType", "NaTType"):
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return html.escape(str(value))


def short_json(value: Any, limit: int = 160) -> str:
    """``value`` as compact JSON, cut to ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str, separators=(", ", ": "))
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def note(text: str, colour: str = MUTED_COLOUR) -> str:
    """A small coloured line of (escaped) text."""
    if not text:
        return ""
    return f'<span style="color:{colour}">{html.escape(text)}</span>'


def table(header: Iterable[str], rows: Iterable[Iterable[str]], *, caption: str = "") -> str:
    """An HTML table; cells are inserted as given (escape them first)."""
    head = "".join(
        f'<th style="text-align:left;padding:2px 8px;border-bottom:1px solid #d0d7de">{h}</th>'
        for h in header
    )
    body = "".join(
        "<tr>"
        + "".join(f'<td style="padding:2px 8px;vertical-align:top">{cell}</td>' for cell in row)
        + "</tr>"
        for row in rows
    )
    cap = f'<caption style="text-align:left">{caption}</caption>' if caption else ""
    return (
        '<table style="border-collapse:collapse;font-size:12px;font-family:monospace">'
        f"{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )
