"""Soak: a real server subprocess under churn, floods, resumes, stuck readers and garbage.

The scenario lives in ``benchmarks/soak.py`` (``python benchmarks/soak.py --minutes 10``
runs it longer, with size flags); here it runs at CI size: ~25 s of traffic. It checks
issue 8's "done when" for the soak: no loss or duplication for well-behaved clients
(resuming after cuts and evictions, holes only where a ``resumed`` ack announced a gap),
server RSS growth within a budget justified in :func:`soak.rss_budget`, ``/health``
answered throughout, and no traceback in the server's log.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _load_soak() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("gathering_lab_soak", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


soak = _load_soak()


def test_rss_budget_is_far_below_the_attack() -> None:
    """The budget would catch the issue's 56 MB -> 2 GB replay attack by a wide margin."""
    budget = soak.rss_budget(soak.SoakConfig())
    assert 64 * 2**20 < budget < 256 * 2**20


def test_check_reports_each_kind_of_failure() -> None:
    """The checker is not vacuous: each failure it exists for is reported."""
    report = soak.SoakReport(config=soak.SoakConfig(), published=10, last_seq=10, budget=100)
    sub = soak.Subscriber("sub-0", resumer=True, first_seq=1, last_seq=10)
    report.subscribers = [sub]
    assert soak.check(report) == []
    sub.holes.append((3, 4))
    sub.repeats = 1
    sub.not_strict = 1
    report.health_failed.append("refused")
    report.rss_peak = 1000
    report.tracebacks = 1
    assert len(soak.check(report)) == 6


def test_gap_accounting() -> None:
    """A hole is excused only by a ``resumed`` ack with ``"gap": true``, before or after it."""
    s = soak.Soak(soak.SoakConfig())
    sub = soak.Subscriber("s", resumer=True)
    hello = b'{"type":"connection.established","data":{"seq":0,"epoch":"e"}}'
    s._take(sub, hello)
    for seq in (1, 2, 3):
        s._take(sub, b'{"type":"a.b","seq":%d,"epoch":"e"}' % seq)
    sub.resuming = True  # a resume whose replay starts late, ack after the replay
    s._take(sub, b'{"type":"a.b","seq":7,"epoch":"e"}')
    s._take(sub, b'{"type":"resumed","data":{"gap":true}}')
    assert sub.gaps == [(4, 6)] and sub.holes == []
    sub.resuming = True  # ack first, then the late replay
    s._take(sub, b'{"type":"resumed","data":{"gap":true}}')
    s._take(sub, b'{"type":"a.b","seq":9,"epoch":"e"}')
    assert sub.gaps == [(4, 6), (8, 8)]
    s._take(sub, b'{"type":"a.b","seq":11,"epoch":"e"}')  # live, no excuse
    s._take(sub, b'{"type":"a.b","seq":11,"epoch":"e"}')
    s._take(sub, b'{"type":"a.b","seq":3,"epoch":"e","x":NaN}')
    assert sub.holes == [(10, 10)] and sub.repeats == 1 and sub.not_strict == 1


async def test_soak() -> None:
    """~25 s of mixed traffic against ``python -m gathering_lab serve --port 0``."""
    report = await soak.run_soak(soak.SoakConfig())
    print(soak.summary(report))
    problems = soak.check(report)
    assert not problems, "\n".join(problems) + "\n\n" + soak.summary(report)
