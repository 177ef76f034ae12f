"""Small pure rules of a conversation's timing: typing pauses, how much history fits, retry delays, log throttling."""

from __future__ import annotations

import random
import time
from collections.abc import (
    Callable,
    Iterable,
)


class EveryMinute:
    """Log a recurring configuration error once a minute per key, with how many were not logged."""

    def __init__(self, *, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.clock = interval, clock
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def due(self, key: str) -> int | None:
        """None when this occurrence stays quiet; else how many were kept quiet since the last line."""
        now = self.clock()
        if key in self._last and now - self._last[key] < self.interval:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._quiet.pop(key, 0)


def typing_pause_seconds(text: str, *, rng: Callable[[], float] = random.random) -> float:
    """A human-looking typing time: grows with the reply, 1-4 s, randomised (WAHA's anti-ban advice)."""
    return min(4.0, max(1.0, len(text) * 0.02)) * (0.8 + 0.4 * rng())


def trim_history(turns: Iterable[tuple[str, str]], *, max_chars: int) -> list[tuple[str, str]]:
    """Drop the oldest turns until the rest fit in max_chars and start with the customer's turn."""
    kept = list(turns)
    while kept and (sum(len(content) for _, content in kept) > max_chars or kept[0][0] != "user"):
        kept = kept[1:]
    return kept


def retry_delay_seconds(attempt: int, *, base: float) -> float:
    """Our own retries of a failed send: slower than WAHA's redelivery (2 s), so that goes first."""
    growth: float = 3 ** (attempt - 1)  # an int, or a fraction for attempt < 1
    return min(base * growth, 15 * 60)
