"""The control panels: connect, publish, filter, server stats.

Callbacks here may run on any thread (a kernel subshell, the main thread, a test's
thread): they read widget values, validate them, and hand the request to the
controller, whose done-callbacks show the outcome by setting widget traits.
"""

from __future__ import annotations

import concurrent.futures
import html
import json
import time
from typing import Any

import ipywidgets as widgets
from traitlets import Dict, Float, Instance, Int, TraitError, Unicode, observe, validate

from ..events import EventType
from ..protocol import Filters, check_event_type
from .base import (
    ERROR_COLOUR,
    MUTED_COLOUR,
    OK_COLOUR,
    WARN_COLOUR,
    Panel,
    check_patterns,
    describe_filters,
    esc,
    note,
    table,
)
from .controller import check_ws_url, error_text, parse_id, same_server, stats_url

__all__ = ["ConnectPanel", "FilterPanel", "PublishPanel", "StatsPanel", "parse_data"]

EVENT_TYPES: list[str] = [member.value for member in EventType]
_WIDE = widgets.Layout(width="32em")
_ID_LAYOUT = widgets.Layout(width="14em")


def parse_data(text: str) -> dict[str, Any]:
    """Parse the JSON editor's text as an object; ValueError says where it is wrong."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"data must be a JSON object {{...}}, not {type(value).__name__}")
    return value


def _status_html(status: str) -> str:
    if status.startswith("connected"):
        colour, mark = OK_COLOUR, "●"
    elif status.startswith(("connecting", "reconnecting")):
        colour, mark = WARN_COLOUR, "◐"
    else:
        colour, mark = ERROR_COLOUR, "○"
    return f'<span style="color:{colour}">{mark} {html.escape(status)}</span>'


def _outcome(future: concurrent.futures.Future[Any]) -> tuple[Any, str | None]:
    """A finished future's (result, None) or (None, error text)."""
    if future.cancelled():
        return None, "cancelled"
    exc = future.exception()
    if exc is not None:
        return None, error_text(exc)
    return future.result(), None


class ConnectPanel(Panel):
    """URL and client id, Connect / Disconnect, and the client's status as it changes."""

    status = Unicode("not connected", help="the status shown: the client's, or why it failed")

    def __init__(self, source: Any = None, *, client_id: str = "workbench", **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        controller = self.controller
        current = controller.client
        self.url_input = widgets.Text(
            value=controller.default_url, description="URL", layout=_WIDE, continuous_update=True
        )
        self.client_id_input = widgets.Text(
            value=current.client_id if current is not None and current.client_id else client_id,
            description="client id",
            layout=_ID_LAYOUT,
        )
        self.token_input = widgets.Password(
            value="",
            description="token",
            placeholder="optional",
            layout=_ID_LAYOUT,
        )
        self.connect_button = widgets.Button(
            description="Connect", button_style="success", icon="plug"
        )
        self.disconnect_button = widgets.Button(description="Disconnect", icon="times")
        self.status_label = widgets.HTML()
        self.error_label = widgets.HTML()
        self._own(
            self.url_input,
            self.client_id_input,
            self.token_input,
            self.connect_button,
            self.disconnect_button,
            self.status_label,
            self.error_label,
        )
        row = widgets.HBox(
            [
                self.url_input,
                self.client_id_input,
                self.token_input,
                self.connect_button,
                self.disconnect_button,
            ]
        )
        self._own(row)
        self.children = [row, widgets.HBox([self.status_label, self.error_label])]
        self._own(self.children[1])
        self.url_input.observe(self._check_url, "value")
        self.connect_button.on_click(self._connect_clicked)
        self.disconnect_button.on_click(self._disconnect_clicked)
        controller.observe(self._on_controller_status, "status")
        self.status = controller.status
        self.status_label.value = _status_html(self.status)
        self._check_url()

    @observe("status")
    def _show_status(self, change: Any) -> None:
        self.status_label.value = _status_html(change["new"])

    def _on_controller_status(self, change: Any) -> None:
        self.status = change["new"]

    def _check_url(self, change: Any = None) -> bool:
        try:
            check_ws_url(self.url_input.value)
        except ValueError as exc:
            self.error_label.value = note(str(exc), ERROR_COLOUR)
            self.connect_button.disabled = True
            return False
        self.error_label.value = ""
        self.connect_button.disabled = False
        return True

    def _connect_clicked(self, button: Any = None) -> None:
        if not self._check_url():
            return
        client_id = self.client_id_input.value.strip() or "workbench"
        token = self.token_input.value.strip() or None
        self.connect_button.disabled = True
        self.controller.connect(
            self.url_input.value, client_id, token=token, on_done=self._connected
        )

    def _connected(self, future: concurrent.futures.Future[Any]) -> None:
        self.connect_button.disabled = False
        _, error = _outcome(future)
        if error is not None:
            self.status = f"failed: {error}"

    def _disconnect_clicked(self, button: Any = None) -> None:
        self.controller.disconnect(on_done=self._disconnected)

    def _disconnected(self, future: concurrent.futures.Future[Any]) -> None:
        _, error = _outcome(future)
        if error is not None:
            self.error_label.value = note(error, ERROR_COLOUR)

    def close(self) -> None:
        if not getattr(self, "_closed", True):
            self.controller.unobserve(self._on_controller_status, "status")
        super().close()


class PublishPanel(Panel):
    """Event type (known or custom), JSON data, optional ids, Publish, and the outcome.

    Errors in the form are shown as you type and disable the button. Publishing goes
    through the connected client (the server acknowledges with ``seq`` and ``event_id``),
    else straight onto the lab's bus.
    """

    error = Unicode("", help="why the form cannot be published as it is (empty: it can)")
    last_result = Dict(
        help="the last outcome: {'type', 'event_id', 'seq', 'via'}, or {'error': text}"
    )
    published = Int(0, help="how many events this panel published")

    def __init__(
        self,
        source: Any = None,
        *,
        event_type: EventType | str = EventType.TASK_CREATED,
        data: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(source, **kwargs)
        self.type_input = widgets.Combobox(
            value=getattr(event_type, "value", event_type),
            options=EVENT_TYPES,
            ensure_option=False,
            placeholder="task.created, or a custom.dotted.type",
            description="type",
            layout=_WIDE,
        )
        self.data_input = widgets.Textarea(
            value=json.dumps(data if data is not None else {"title": "hello"}, indent=2),
            description="data",
            rows=6,
            continuous_update=True,
            layout=_WIDE,
        )
        self.agent_input = widgets.Text(
            description="agent id", placeholder="optional", layout=_ID_LAYOUT
        )
        self.circle_input = widgets.Text(
            description="circle id", placeholder="optional", layout=_ID_LAYOUT
        )
        self.project_input = widgets.Text(
            description="project id", placeholder="optional", layout=_ID_LAYOUT
        )
        self.publish_button = widgets.Button(
            description="Publish", button_style="primary", icon="paper-plane"
        )
        self.error_label = widgets.HTML()
        self.result_label = widgets.HTML()
        ids = widgets.HBox([self.agent_input, self.circle_input, self.project_input])
        self._own(
            self.type_input,
            self.data_input,
            self.agent_input,
            self.circle_input,
            self.project_input,
            self.publish_button,
            self.error_label,
            self.result_label,
            ids,
        )
        self.children = [
            self.type_input,
            self.data_input,
            ids,
            self.error_label,
            self.publish_button,
            self.result_label,
        ]
        for field in (
            self.type_input,
            self.data_input,
            self.agent_input,
            self.circle_input,
            self.project_input,
        ):
            field.observe(self._check_form, "value")
        self.publish_button.on_click(self._publish_clicked)
        self._check_form()

    def form(self) -> dict[str, Any]:
        """The event the form describes (``type``, ``data``, ids); ValueError if it is wrong."""
        try:
            type_name = check_event_type(self.type_input.value.strip())
        except Exception as exc:
            raise ValueError(getattr(exc, "message", str(exc))) from None
        return {
            "type": type_name,
            "data": parse_data(self.data_input.value),
            "source_agent_id": parse_id(self.agent_input.value, "agent id"),
            "circle_id": parse_id(self.circle_input.value, "circle id"),
            "project_id": parse_id(self.project_input.value, "project id"),
        }

    def _check_form(self, change: Any = None) -> None:
        try:
            self.form()
        except ValueError as exc:
            self.error = str(exc)
        else:
            self.error = ""

    @observe("error")
    def _show_error(self, change: Any) -> None:
        self.error_label.value = note(change["new"], ERROR_COLOUR)
        self.publish_button.disabled = bool(change["new"])

    def _publish_clicked(self, button: Any = None) -> None:
        try:
            event = self.form()
        except ValueError as exc:
            self.error = str(exc)
            return
        self.result_label.value = note(f"publishing {event['type']}…")
        kind = event.pop("type")
        self.controller.publish(kind, on_done=self._published, **event)

    def _published(self, future: concurrent.futures.Future[Any]) -> None:
        result, error = _outcome(future)
        if error is not None:
            self.last_result = {"error": error}
            self.result_label.value = note(f"not published: {error}", ERROR_COLOUR)
            return
        self.published += 1
        self.last_result = dict(result)
        text = (
            f"published {result['type']} · seq {result.get('seq')} · "
            f"{result.get('event_id')} (via {result['via']})"
        )
        self.result_label.value = note(text, OK_COLOUR)


class FilterPanel(Panel):
    """Type patterns, circle and project: filter the live view here, or ask the server.

    Typing updates ``filters`` (linked to a LiveLog's by the workbench); "Subscribe on
    server" sends the same filters as a ``subscribe`` so the server sends only those
    events to the client; "Receive everything" sends ``unsubscribe``.
    """

    filters = Instance(
        Filters, allow_none=True, help="the filters as typed, applied locally (None: all)"
    )
    subscribed = Instance(
        Filters,
        allow_none=True,
        help="the filters the server applies to the client since the last subscribe (None: all)",
    )
    error = Unicode("", help="why the typed filters are invalid (empty: they are valid)")

    def __init__(self, source: Any = None, **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        self.types_input = widgets.Text(
            description="types",
            placeholder="task.*, agent.started   (empty: all)",
            continuous_update=True,
            layout=_WIDE,
        )
        self.circle_input = widgets.Text(
            description="circle id", placeholder="any", layout=_ID_LAYOUT
        )
        self.project_input = widgets.Text(
            description="project id", placeholder="any", layout=_ID_LAYOUT
        )
        self.subscribe_button = widgets.Button(
            description="Subscribe on server", icon="filter", button_style="info"
        )
        self.unsubscribe_button = widgets.Button(description="Receive everything", icon="globe")
        self.error_label = widgets.HTML()
        self.result_label = widgets.HTML(note("local filter only; the server sends everything"))
        ids = widgets.HBox([self.circle_input, self.project_input])
        buttons = widgets.HBox([self.subscribe_button, self.unsubscribe_button])
        self._own(
            self.types_input,
            self.circle_input,
            self.project_input,
            self.subscribe_button,
            self.unsubscribe_button,
            self.error_label,
            self.result_label,
            ids,
            buttons,
        )
        self.children = [self.types_input, ids, self.error_label, buttons, self.result_label]
        for field in (self.types_input, self.circle_input, self.project_input):
            field.observe(self._typed, "value")
        self.subscribe_button.on_click(self._subscribe_clicked)
        self.unsubscribe_button.on_click(self._unsubscribe_clicked)

    @validate("filters", "subscribed")
    def _check_filters(self, proposal: Any) -> Filters | None:
        value = proposal["value"]
        if value is None:
            return None
        try:
            patterns = check_patterns(value.event_types)
        except ValueError as exc:
            raise TraitError(str(exc)) from None
        if not patterns:
            raise TraitError("filters need at least one type pattern ('*' for all)")
        if "*" in patterns:
            patterns = ("*",)
        return Filters(patterns, value.circle_id, value.project_id)

    def read(self) -> Filters | None:
        """The filters typed in the form (None: everything); ValueError if they are wrong."""
        patterns = [p.strip() for p in self.types_input.value.replace(";", ",").split(",")]
        patterns = [p for p in patterns if p]
        circle = parse_id(self.circle_input.value, "circle id")
        project = parse_id(self.project_input.value, "project id")
        if not patterns and circle is None and project is None:
            return None
        return Filters(check_patterns(patterns or ["*"]), circle, project)

    def _typed(self, change: Any = None) -> None:
        try:
            self.filters = self.read()
        except (ValueError, TraitError) as exc:
            self.error = str(exc)
        else:
            self.error = ""

    @observe("error")
    def _show_error(self, change: Any) -> None:
        self.error_label.value = note(change["new"], ERROR_COLOUR)
        self.subscribe_button.disabled = bool(change["new"])

    def _subscribe_clicked(self, button: Any = None) -> None:
        try:
            filters = self.read()
        except ValueError as exc:
            self.error = str(exc)
            return
        self.result_label.value = note(f"subscribing to {describe_filters(filters)}…")
        self.controller.subscribe(filters, on_done=lambda f: self._subscribed(f, filters))

    def _unsubscribe_clicked(self, button: Any = None) -> None:
        self.result_label.value = note("asking the server for everything…")
        self.controller.subscribe(None, on_done=lambda f: self._subscribed(f, None))

    def _subscribed(self, future: concurrent.futures.Future[Any], filters: Filters | None) -> None:
        _, error = _outcome(future)
        if error is not None:
            self.result_label.value = note(f"not subscribed: {error}", ERROR_COLOUR)
            return
        self.subscribed = filters
        self.result_label.value = note(
            f"the server now sends {describe_filters(filters)}", OK_COLOUR
        )


_HEADLINE = ("active_connections", "total_connections", "total_messages_sent", "total_broadcasts")
_BUS = ("events_published", "events_delivered", "handler_errors", "history_size", "last_seq")
_CLIENT = ("client_id", "connected_at", "messages_sent", "messages_received", "pending_bytes")


class StatsPanel(Panel):
    """The server's stats, refreshed every ``interval`` seconds.

    From ``lab.stats()`` for the lab in this kernel; from ``GET /admin/websocket/stats``
    (in a worker thread) for a client connected to another server.
    """

    stats = Dict(help="the last stats received (the keys of /admin/websocket/stats)")
    interval = Float(2.0, help="seconds between two refreshes (>= 0.5)").tag(sync=True)
    refreshes = Int(0, help="how many times the stats were fetched")
    error = Unicode("", help="why the last refresh failed (empty if it worked)")

    def __init__(self, source: Any = None, *, interval: float = 2.0, **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        self.interval = interval
        self.view = widgets.HTML(value=note("no stats yet"))
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _: self.refresh())
        self._own(self.view, self.refresh_button)
        self.children = [self.view, self.refresh_button]
        self._due = 0.0
        self._busy = False
        self.controller.add_view(self)

    @validate("interval")
    def _check_interval(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not 0.5 <= value <= 3600:
            raise TraitError(f"interval must be between 0.5 and 3600 seconds, not {value}")
        return value

    @property
    def source(self) -> str:
        """Where the stats come from: ``lab``, the stats URL, or ``none``."""
        lab, client = self.controller.lab, self.controller.client
        if lab is not None and (client is None or same_server(client.url, lab.url)):
            return "lab"
        if client is not None:
            return stats_url(client.url)
        return "none"

    def _tick(self, now: float) -> None:
        if now >= self._due and not self._busy:
            self.refresh()

    def refresh(self) -> None:
        """Fetch the stats now (from any thread); the view updates when they arrive."""
        self._busy = True
        self._due = time.monotonic() + self.interval
        self.controller.submit(self._fetch(), self._fetched)

    async def _fetch(self) -> dict[str, Any]:
        source = self.source
        if source == "lab":
            assert self.controller.lab is not None
            return self.controller.lab.stats()
        if source == "none":
            raise RuntimeError("not connected: no lab and no client to ask")
        client = self.controller.client
        assert client is not None
        return await client.fetch_stats()

    def _fetched(self, future: concurrent.futures.Future[Any]) -> None:
        self._busy = False
        result, error = _outcome(future)
        self.refreshes += 1
        if error is not None:
            self.error = error
        else:
            self.error = ""
            self.stats = result
        value = self.render()
        with self.view.hold_sync():
            self.view.value = value

    def render(self) -> str:
        """The view's HTML for the current stats."""
        stats = self.stats
        parts = []
        if self.error:
            parts.append(f"<div>{note('refresh failed: ' + self.error, ERROR_COLOUR)}</div>")
        if not stats:
            return "".join(parts) or note("no stats yet")
        rows = [(esc(key), f"<b>{esc(stats.get(key))}</b>") for key in _HEADLINE if key in stats]
        bus = stats.get("bus")
        if isinstance(bus, dict):
            rows += [(esc(f"bus.{key}"), esc(bus.get(key))) for key in _BUS if key in bus]
        if "status" in stats:
            rows.append(("status", esc(stats["status"])))
        parts.append(table(("stat", "value"), rows, caption=f"<b>{esc(self.source)}</b>"))
        clients = stats.get("clients") or []
        if clients:
            parts.append(
                table(
                    _CLIENT,
                    ([esc(c.get(key)) for key in _CLIENT] for c in clients),
                    caption="clients",
                )
            )
        parts.append(f'<div style="color:{MUTED_COLOUR}">every {self.interval:g} s</div>')
        return "".join(parts)
