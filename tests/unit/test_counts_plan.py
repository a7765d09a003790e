"""``reports.counts.plan``: whatever the window and the clock, the hours it counts whole, the
rows it adds and the rows it takes away cover each instant of the window exactly once, and
nothing outside it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from tracking.reports.counts import HOUR, floor_hour, plan

BASE = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
instants = st.integers(0, 6 * 3600 * 1000).map(lambda ms: BASE + timedelta(milliseconds=ms))
on_the_hour = st.integers(0, 6).map(lambda h: BASE + timedelta(hours=h))
moments = st.one_of(instants, on_the_hour)


def coverage(p, t: datetime) -> int:
    hours = p.hours is not None and p.hours[0] <= t < p.hours[1]
    return (int(hours) + sum(a <= t < b for a, b in p.added)
            - sum(a <= t < b for a, b in p.taken))


@settings(max_examples=500, deadline=None)
@given(a=moments, b=moments, now=moments, probes=st.lists(instants, max_size=20))
def test_every_instant_of_the_window_counts_once(a, b, now, probes):
    start, end = min(a, b), max(a, b)
    p = plan(start, end, now)
    if p.hours is not None:
        assert p.hours[0] == floor_hour(p.hours[0]) and p.hours[1] == floor_hour(p.hours[1])
    edges = [start, end, floor_hour(start), floor_hour(end), floor_hour(start) + HOUR,
             floor_hour(end) + HOUR]
    for t in [*probes, *edges, *(e - timedelta(microseconds=1) for e in edges)]:
        assert coverage(p, t) == (1 if start <= t < end else 0), (start, end, now, t, p)


def test_a_window_that_ends_now_reads_no_row_of_the_current_hour():
    now = BASE + timedelta(hours=3, minutes=40)
    p = plan(now - timedelta(days=7), now, now)
    assert p.hours is not None and p.hours[1] == floor_hour(now) + HOUR
    assert (now, floor_hour(now) + HOUR) in p.taken  # rows after now: none to read
    assert all(floor_hour(now) not in (a, b) or b <= now for a, b in p.added)


def test_a_window_inside_one_hour_reads_the_smaller_side():
    h = BASE + timedelta(hours=2)
    small = plan(h + timedelta(minutes=10), h + timedelta(minutes=12), h + HOUR * 3)
    assert small.hours is None and small.added == [(h + timedelta(minutes=10),
                                                    h + timedelta(minutes=12))]
    large = plan(h + timedelta(minutes=1), h + timedelta(minutes=59), h + HOUR * 3)
    assert large.hours == (h, h + HOUR) and not large.added
