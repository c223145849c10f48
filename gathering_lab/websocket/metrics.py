"""``/metrics``: a node's stats in Prometheus' text format (prometheus-client).

A custom collector turns one stats dict (``Server.get_stats()``'s shape) into metric
families on a private registry made for each request: nothing is registered in the
process-wide default registry. The figures are this node's (Prometheus scrapes every
node and sums them itself; the stats endpoint's summed figures would be counted once
per node), plus ``gathering_lab_cluster_nodes`` and ``gathering_lab_cluster_connections``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "StatsCollector", "render"]

#: The Content-Type of the text exposition format.
CONTENT_TYPE = CONTENT_TYPE_LATEST

_PREFIX = "gathering_lab_"

# (metric name, help, key in the node entry or the local stats): counters.
_NODE_COUNTERS = (
    ("connections", "WebSocket connections accepted by this node", "total_connections"),
    ("messages_sent", "Messages sent to clients by this node", "messages_sent"),
    ("broadcasts", "Events this node broadcast to its clients", "broadcasts"),
    ("messages_dropped", "Messages dropped for slow clients", "drops"),
    ("slow_consumers_closed", "Clients closed for reading too slowly", "slow_consumers_closed"),
    ("rejected_connections", "Connections refused (limits, auth, origin)", "rejected_connections"),
)
_STATS_COUNTERS = (
    ("publishes_rate_limited", "Publishes answered rate_limited", "publishes_rate_limited"),
    ("publishes_unavailable", "Publishes answered unavailable (log down)", "publishes_unavailable"),
    ("messages_throttled", "Client messages read later (message rate)", "messages_throttled"),
    (
        "publishes_held",
        "Times a client's next message waited for a publish in flight to be answered",
        "publishes_held",
    ),
    ("bad_requests", "HTTP requests answered 400", "bad_requests"),
    ("accept_errors", "accept() failures (descriptors, memory)", "accept_errors"),
)
# Counters of the shared log backend (stats["bus"]["log"]).
_LOG_COUNTERS = (
    ("log_reconnects", "Times the log came back after being unreachable", "reconnects"),
    ("log_failures", "Log commands that failed to reach the backend", "failures"),
    ("log_append_refused", "Appends refused while the log was unreachable", "append_refused"),
    ("log_tail_reconnects", "Times this node's tail lost its connection", "tail_reconnects"),
    ("log_tail_stalls", "Times this node's tail stalled", "tail_stalls"),
    ("log_tail_gaps", "Entries trimmed before this node's tail read them", "tail_gaps"),
    ("log_epoch_changes", "Times the log lost its data (new epoch)", "epoch_changes"),
)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


class StatsCollector(Collector):
    """A prometheus-client collector over one stats dict (and the bus lag, if known)."""

    def __init__(self, stats: dict[str, Any], bus_lag: int | None = None) -> None:
        self.stats = stats
        self.bus_lag = bus_lag

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families of the stats dict."""
        stats = self.stats
        node = stats.get("node") or {}
        bus = stats.get("bus") or {}
        gauge = GaugeMetricFamily
        yield gauge(
            _PREFIX + "active_connections",
            "WebSocket clients connected to this node",
            value=_number(node.get("connections", stats.get("active_connections"))),
        )
        for name, text, key in _NODE_COUNTERS:
            yield CounterMetricFamily(_PREFIX + name, text, value=_number(node.get(key)))
        for name, text, key in _STATS_COUNTERS:
            yield CounterMetricFamily(_PREFIX + name, text, value=_number(stats.get(key)))
        if "max_publishes_in_flight" in stats:
            yield gauge(
                _PREFIX + "max_publishes_in_flight",
                "Publishes one connection may have in flight on a shared log",
                value=_number(stats["max_publishes_in_flight"]),
            )
        codes = CounterMetricFamily(
            _PREFIX + "close_codes", "Client connections ended, by close code", labels=["code"]
        )
        for code, count in sorted((stats.get("close_codes") or {}).items()):
            codes.add_metric([str(code)], _number(count))
        yield codes
        log = bus.get("log") or {}
        for name, text, key in _LOG_COUNTERS:
            yield CounterMetricFamily(_PREFIX + name, text, value=_number(log.get(key)))
        yield CounterMetricFamily(
            _PREFIX + "bus_publishes_unavailable",
            "Bus publishes refused because the log was unreachable",
            value=_number(bus.get("publishes_unavailable")),
        )
        yield gauge(
            _PREFIX + "bus_last_seq",
            "Last seq this node delivered",
            value=_number(bus.get("last_seq")),
        )
        healthy = gauge(_PREFIX + "bus_up", "1 when the bus's log answers, else 0")
        healthy.add_metric([], 1.0 if bus.get("health", "ok") == "ok" else 0.0)
        yield healthy
        if self.bus_lag is not None:
            yield gauge(
                _PREFIX + "bus_lag",
                "Events in the log this node has not delivered yet (log last seq - node's)",
                value=float(self.bus_lag),
            )
        cluster = stats.get("cluster") or {}
        yield gauge(
            _PREFIX + "cluster_nodes",
            "Live nodes (reporting to the shared log)",
            value=_number(cluster.get("nodes_live", 1)),
        )
        yield gauge(
            _PREFIX + "cluster_connections",
            "WebSocket clients connected to all live nodes",
            value=_number(stats.get("active_connections")),
        )
        yield CounterMetricFamily(
            _PREFIX + "node_report_failures",
            "Reports of this node's figures that did not reach the log",
            value=_number(cluster.get("report_failures")),
        )


def render(stats: dict[str, Any], bus_lag: int | None = None) -> bytes:
    """The stats as a Prometheus text exposition (on a private registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats, bus_lag))
    return generate_latest(registry)
