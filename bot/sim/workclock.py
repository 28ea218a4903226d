"""Working time as arithmetic: a calendar's open intervals over a span, with cumulative sums.

`BusinessCalendar` (bot.core.sla) defines when a calendar is open; a `WorkClock` asks it once
for every open interval of the simulated span and then converts between wall time and working
time with a binary search, which is what makes simulating a year of conversations fast.
Times are POSIX seconds (floats) in UTC.
"""

from __future__ import annotations

import bisect
from datetime import UTC, datetime

import numpy as np

from bot.core.sla import BusinessCalendar

HOUR = 3600.0
WEEK_HOURS = 168


def to_seconds(instant: datetime) -> float:
    return instant.timestamp()


def to_datetime(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class WorkClock:
    """One calendar's open time between `start` and `end` (outside that span: closed)."""

    def __init__(self, calendar: BusinessCalendar, start: float, end: float) -> None:
        self.calendar = calendar
        self.tz = calendar.tz
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.cum: list[float] = []  # working seconds before each interval
        total = 0.0
        for low, high in calendar.open_intervals(to_datetime(start), to_datetime(end)):
            a, b = low.timestamp(), high.timestamp()
            self.starts.append(a)
            self.ends.append(b)
            self.cum.append(total)
            total += b - a
        self.total = total
        self.cum_end = [c + (b - a) for c, a, b in zip(self.cum, self.starts, self.ends, strict=True)]
        self.span = (start, end)
        self._how_cache: dict[int, int] = {}
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = (
                np.asarray(self.starts, dtype=float),
                np.asarray(self.ends, dtype=float),
                np.asarray(self.cum, dtype=float),
                np.asarray(self.cum_end, dtype=float),
            )
        return self._arrays

    def work_many(self, t: np.ndarray) -> np.ndarray:
        starts, ends, cum, _ = self.arrays()
        i = np.searchsorted(starts, t, side="right") - 1
        j = np.clip(i, 0, max(len(starts) - 1, 0))
        if not len(starts):
            return np.zeros(t.shape)
        done = cum[j] + np.minimum(t, ends[j]) - starts[j]
        return np.where(i >= 0, done, 0.0)

    def wall_many(self, w: np.ndarray) -> np.ndarray:
        starts, _, cum, cum_end = self.arrays()
        i = np.searchsorted(cum_end, w, side="left")
        j = np.clip(i, 0, max(len(starts) - 1, 0))
        if not len(starts):
            return np.full(w.shape, np.inf)
        return np.where(i < len(starts), starts[j] + (w - cum[j]), np.inf)

    def is_open(self, t: float) -> bool:
        i = bisect.bisect_right(self.starts, t) - 1
        return i >= 0 and t < self.ends[i]

    def work(self, t: float) -> float:
        """Working seconds from the span's start to `t`."""
        i = bisect.bisect_right(self.starts, t) - 1
        if i < 0:
            return 0.0
        return self.cum[i] + min(t, self.ends[i]) - self.starts[i]

    def wall(self, w: float) -> float:
        """The earliest instant by which `w` working seconds have passed (inf beyond the span)."""
        i = bisect.bisect_left(self.cum_end, w)
        if i >= len(self.starts):
            return float("inf")
        return self.starts[i] + (w - self.cum[i])

    def between(self, a: float, b: float) -> float:
        return max(self.work(b) - self.work(a), 0.0)

    def next_open(self, t: float) -> float:
        """The first open instant at or after `t` (inf when none in the span)."""
        i = bisect.bisect_right(self.starts, t) - 1
        if i >= 0 and t < self.ends[i]:
            return t
        if i + 1 < len(self.starts):
            return self.starts[i + 1]
        return float("inf")

    def hour_of_week(self, t: float) -> int:
        """Local hour of the week (0 = Monday 00:00-01:00) of instant `t`."""
        key = int(t // HOUR)
        found = self._how_cache.get(key)
        if found is None:
            local = datetime.fromtimestamp(key * HOUR, self.tz)
            found = local.weekday() * 24 + local.hour
            self._how_cache[key] = found
        return found
