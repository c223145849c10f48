"""Live views: the event log and the notification banner.

Both are redrawn by the controller's ticker (at most 5 times a second), only when the
frame's ``version`` changed, by replacing the value of one ``HTML`` widget inside
``hold_sync()``; nothing is appended per event, so a fast stream cannot flood the browser.
Each redraw reads only the rows appended since the previous one.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
from traitlets import Instance, Int, List, TraitError, Unicode, observe, validate

from ..frame import EventFrame
from ..protocol import Filters
from .base import (
    ERROR_COLOUR,
    MUTED_COLOUR,
    Cursor,
    Panel,
    apply_filters,
    check_patterns,
    describe_filters,
    esc,
    short_json,
    table,
    type_mask,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DEFAULT_NOTIFY", "LiveLog", "Notifications"]

#: The event types that raise a notification unless told otherwise.
DEFAULT_NOTIFY: tuple[str, ...] = ("task.failed", "agent.task.failed", "system.error")

_ROW_COLUMNS = ["seq", "received_at", "type", "source_agent_id", "circle_id", "project_id", "data"]
_HEADER = ("seq", "received", "type", "agent", "circle", "project", "data")


def _format_rows(df: pd.DataFrame, limit: int) -> list[tuple[str, ...]]:
    """The last ``limit`` rows of ``df`` as escaped table cells, oldest first."""
    rows: list[tuple[str, ...]] = []
    for seq, received, kind, agent, circle, project, data in (
        df[_ROW_COLUMNS].tail(limit).itertuples(index=False, name=None)
    ):
        when = received.strftime("%H:%M:%S.%f")[:-3] if hasattr(received, "strftime") else ""
        colour = ERROR_COLOUR if kind.endswith((".failed", ".error")) else "inherit"
        rows.append(
            (
                esc(seq),
                esc(when),
                f'<b style="color:{colour}">{esc(kind)}</b>',
                esc(agent),
                esc(circle),
                esc(project),
                esc(short_json(data)),
            )
        )
    return rows


class LiveLog(Panel):
    """The latest events of a frame as an HTML table, with counts by type.

    ``LiveLog(lab_or_client)`` follows the controller's frame (the client's, else the
    lab's); ``LiveLog(frame=f)`` shows one frame. ``filters`` narrows what is shown and
    counted here, without asking the server (see FilterPanel for that).
    """

    rows = Int(20, help="how many of the latest events the table shows (1-500)").tag(sync=True)
    filters = Instance(
        Filters, allow_none=True, help="show only the events these filters match (None: all)"
    )
    total = Int(0, help="events in the frame that match the filters")
    renders = Int(0, help="how many times the view was redrawn")

    def __init__(
        self,
        source: Any = None,
        *,
        frame: EventFrame | None = None,
        rows: int = 20,
        filters: Filters | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(source, **kwargs)
        self.frame = frame
        self.rows = rows
        self.filters = filters
        self.view = widgets.HTML(value=self._placeholder(), layout=widgets.Layout(width="100%"))
        self._own(self.view)
        self.children = [self.view]
        self._cursor = Cursor()
        self._counts: Counter[str] = Counter()
        self._latest: deque[tuple[str, ...]] = deque(maxlen=rows)
        self._dirty = True
        self.controller.add_view(self)

    @validate("rows")
    def _check_rows(self, proposal: Any) -> int:
        value = proposal["value"]
        if not 1 <= value <= 500:
            raise TraitError(f"rows must be between 1 and 500, not {value}")
        return int(value)

    @observe("rows", "filters")
    def _on_settings(self, change: Any) -> None:
        self._dirty = True  # the ticker rebuilds on the loop's thread

    @property
    def shown_frame(self) -> EventFrame | None:
        """The frame this log shows."""
        return self.frame if self.frame is not None else self.controller.frame

    def _tick(self, now: float) -> None:
        frame = self.shown_frame
        if self._dirty or not self._cursor.follows(frame):
            self._rebuild(frame)
        elif self._cursor.changed():
            rows = self._cursor.new_rows()
            if rows is None:  # cleared
                self._rebuild(frame)
            else:
                self._take(rows)
                self._render()

    def _rebuild(self, frame: EventFrame | None) -> None:
        self._dirty = False
        self._counts.clear()
        self._latest = deque(maxlen=self.rows)
        df = self._cursor.reset(frame)
        if df is not None:
            self._take(df)
        self._render()

    def _take(self, df: pd.DataFrame) -> None:
        matching = apply_filters(df, self.filters)
        if not len(matching):
            return
        self._counts.update({str(k): int(v) for k, v in matching["type"].value_counts().items()})
        self._latest.extend(_format_rows(matching, self.rows))

    def _placeholder(self) -> str:
        return f'<i style="color:{MUTED_COLOUR}">no events yet (connect, then publish)</i>'

    def render(self) -> str:
        """The HTML the view shows now."""
        if self._cursor.frame is None:
            return self._placeholder()
        total = sum(self._counts.values())
        counts = " · ".join(
            f"<b>{esc(kind)}</b> {count}" for kind, count in self._counts.most_common()
        )
        summary = (
            f"<div><b>{total}</b> events ({esc(describe_filters(self.filters))}); "
            f"latest {min(len(self._latest), total)} shown, newest first</div>"
        )
        body = table(_HEADER, reversed(self._latest)) if self._latest else self._placeholder()
        return f'{summary}<div style="margin:4px 0">{counts}</div>{body}'

    def _render(self) -> None:
        value = self.render()
        with self.view.hold_sync():
            self.view.value = value
        self.total = sum(self._counts.values())
        self.renders += 1


class Notifications(Panel):
    """A banner listing the latest events of chosen types (``task.failed``...), counted.

    It stays empty until such an event arrives; ``dismiss()`` (or its button) hides the
    banner until the next one.
    """

    types = List(
        Unicode(),
        default_value=list(DEFAULT_NOTIFY),
        help="event type patterns that raise a notification ('task.failed', 'system.*')",
    ).tag(sync=True)
    latest = Int(5, help="how many of the latest matching events the banner lists (1-50)")
    count = Int(0, help="matching events in the frame followed")
    unseen = Int(0, help="matching events since the banner was last dismissed")

    def __init__(
        self,
        source: Any = None,
        *,
        types: list[str] | tuple[str, ...] = DEFAULT_NOTIFY,
        latest: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(source, **kwargs)
        self.types = list(types)
        self.latest = latest
        self.banner = widgets.HTML(value="")
        self.dismiss_button = widgets.Button(
            description="Dismiss", icon="check", layout=widgets.Layout(display="none")
        )
        self.dismiss_button.on_click(lambda _: self.dismiss())
        self._own(self.banner, self.dismiss_button)
        self.children = [self.banner, self.dismiss_button]
        self._cursor = Cursor()
        self._recent: deque[tuple[str, ...]] = deque(maxlen=latest)
        self._dirty = True
        self.controller.add_view(self)

    @validate("types")
    def _check_types(self, proposal: Any) -> list[str]:
        try:
            return list(check_patterns(proposal["value"]))
        except ValueError as exc:
            raise TraitError(str(exc)) from None

    @validate("latest")
    def _check_latest(self, proposal: Any) -> int:
        value = proposal["value"]
        if not 1 <= value <= 50:
            raise TraitError(f"latest must be between 1 and 50, not {value}")
        return int(value)

    @observe("types", "latest")
    def _on_settings(self, change: Any) -> None:
        self._dirty = True

    def dismiss(self) -> None:
        """Hide the banner until the next matching event (from any thread)."""
        self.controller.call_soon(self._dismiss)

    def _dismiss(self) -> None:
        self._recent.clear()
        self.unseen = 0
        self._render()

    def _tick(self, now: float) -> None:
        frame = self.controller.frame
        if self._dirty or not self._cursor.follows(frame):
            self._dirty = False
            self.count = self.unseen = 0
            self._recent = deque(maxlen=self.latest)
            df = self._cursor.reset(frame)
            if df is not None:
                self._take(df)
            self._render()
        elif self._cursor.changed():
            rows = self._cursor.new_rows()
            if rows is None:
                self._dirty = True
            elif self._take(rows):
                self._render()

    def _take(self, df: pd.DataFrame) -> int:
        if not len(df):
            return 0
        matching = df[type_mask(df["type"], self.types)]
        found = len(matching)
        if found:
            self.count += found
            self.unseen += found
            self._recent.extend(_format_rows(matching, self.latest))
        return found

    def render(self) -> str:
        """The banner's HTML (empty when there is nothing unseen)."""
        if not self.unseen:
            return ""
        rows = [(when, kind, agent, circle, data) for _, when, kind, agent, circle, _, data in
                reversed(self._recent)]  # fmt: skip
        return (
            f'<div role="alert" style="border-left:4px solid {ERROR_COLOUR};background:#ffebe9;'
            'padding:6px 10px;margin:4px 0">'
            f"<b>⚠ {self.unseen} new notification{'s' if self.unseen != 1 else ''}</b> "
            f"({esc(', '.join(self.types))}; {self.count} in all)"
            + table(("received", "type", "agent", "circle", "data"), rows)
            + "</div>"
        )

    def _render(self) -> None:
        value = self.render()
        with self.banner.hold_sync():
            self.banner.value = value
        self.dismiss_button.layout.display = "" if self.unseen else "none"
